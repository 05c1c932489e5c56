"""The builtin result backends against the backend contract."""

from __future__ import annotations

import uuid

import pytest

from kernel.testing.contracts import BackendContract


class TestSQLiteBackend(BackendContract):
    cross_process = True

    @pytest.fixture
    def backend_url(self, tmp_path):
        return f"sqlite:///{tmp_path / 'results.sqlite3'}"


class TestMemoryBackend(BackendContract):
    @pytest.fixture
    def backend_url(self):
        return f"cache+memory://{uuid.uuid4().hex}"
