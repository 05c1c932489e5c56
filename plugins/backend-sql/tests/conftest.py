"""The databases of this test run: a PostgreSQL schema, a MariaDB database and SQLite
files of its own, each dropped afterwards; ``db`` runs a test on all three.

PostgreSQL and MariaDB tests skip, naming the server, when it is not running (and
fail instead under ``KERNEL_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sql_harness import Scratch, mariadb_database, postgres_schema, sqlite_scratch

from kernel.testing.services import require_service

DIALECTS = ["sqlite", "postgresql", "mariadb"]
RUN_FIXTURES = {"sqlite": "sqlite_run", "postgresql": "postgres_run", "mariadb": "mariadb_run"}


@pytest.fixture(scope="session")
def postgres_run() -> Iterator[Scratch]:
    """A schema of this test run in PostgreSQL's database ``test``."""
    host, port = require_service("postgres")
    with postgres_schema(host, port) as scratch:
        yield scratch


@pytest.fixture(scope="session")
def mariadb_run() -> Iterator[Scratch]:
    """A database of this test run in MariaDB."""
    host, port = require_service("mariadb")
    with mariadb_database(host, port) as scratch:
        yield scratch


@pytest.fixture(scope="session")
def sqlite_run(tmp_path_factory: pytest.TempPathFactory) -> Scratch:
    """A SQLite file of this test run."""
    return sqlite_scratch(tmp_path_factory.mktemp("sql-backend"))


@pytest.fixture(params=DIALECTS)
def db(request: pytest.FixtureRequest) -> Scratch:
    """The run's scratch location on each database in turn (shared by the tests of the
    run: use fresh task ids)."""
    return request.getfixturevalue(RUN_FIXTURES[request.param])


@pytest.fixture(params=DIALECTS)
def fresh_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scratch]:
    """An empty location of this test's own on each database in turn: no tables yet."""
    if request.param == "sqlite":
        yield sqlite_scratch(tmp_path)
        return
    host, port = require_service("postgres" if request.param == "postgresql" else "mariadb")
    make = postgres_schema if request.param == "postgresql" else mariadb_database
    with make(host, port) as scratch:
        yield scratch
