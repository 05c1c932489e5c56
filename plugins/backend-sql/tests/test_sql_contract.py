"""The kernel's backend contract, passed by the SQL backend on each of its databases.

Every class runs the whole ``BackendContract`` (results, failures, states, expiry,
groups, concurrent writers, other processes, and chords reported by threads and by
processes at once) against a real server, in this run's own schema or database.
"""

from __future__ import annotations

import pytest

from kernel.testing.contracts import BackendContract


class SQLContract(BackendContract):
    cross_process = True
    #: MySQL's DATETIME keeps whole seconds: allow for the rounding in expiry.
    expiry_timeout = 10.0


class TestSQLiteBackend(SQLContract):
    @pytest.fixture
    def backend_url(self, sqlite_run):
        return sqlite_run.url


class TestPostgreSQLBackend(SQLContract):
    @pytest.fixture
    def backend_url(self, postgres_run):
        return postgres_run.url


class TestMariaDBBackend(SQLContract):
    @pytest.fixture
    def backend_url(self, mariadb_run):
        return mariadb_run.url
