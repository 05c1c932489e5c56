"""The embedded result backend: a table in a SQLite file (``sqlite:///path``).

Shares the file with the SQLite transport by default. Safe across processes on one
machine (WAL mode); each thread and each forked process opens its own connection.
"""

from __future__ import annotations

import time
from typing import Any

from kernel.backends.base import KeyValueBackend
from kernel.plugins.builtin.sqlite_db import Database, path_from_url

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS kernel_results (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS kernel_results_expires ON kernel_results (expires_at);
"""


class SQLiteBackend(KeyValueBackend):
    """Results as rows of ``kernel_results`` keyed like Celery's key-value backends."""

    def __init__(self, app: Any, url: str) -> None:
        super().__init__(app, url)
        self.path = path_from_url(url)
        self.database = Database(self.path, "results", SCHEMA_VERSION, SCHEMA)

    def get(self, key: str) -> bytes | str | None:
        row = (
            self.database.connection()
            .execute(
                "SELECT value FROM kernel_results WHERE key = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (key, time.time()),
            )
            .fetchone()
        )
        return row[0] if row else None

    def set(self, key: str, value: bytes | str, expires: float | None) -> None:
        expires_at = time.time() + expires if expires else None
        self.database.connection().execute(
            "INSERT OR REPLACE INTO kernel_results (key, value, expires_at) VALUES (?, ?, ?)",
            (key, value, expires_at),
        )

    def delete(self, key: str) -> None:
        self.database.connection().execute("DELETE FROM kernel_results WHERE key = ?", (key,))

    def cleanup(self) -> int:
        cursor = self.database.connection().execute(
            "DELETE FROM kernel_results WHERE expires_at IS NOT NULL AND expires_at <= ?",
            (time.time(),),
        )
        return cursor.rowcount

    def close(self) -> None:
        self.database.close()
