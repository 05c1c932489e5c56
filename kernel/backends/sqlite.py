"""The embedded result backend: a table in a SQLite file (``sqlite:///path``).

Shares the file with the SQLite transport by default. Safe across processes on one
machine (WAL mode); each thread and each forked process opens its own connection.

Chords: the finished parts of a chord are rows of ``kernel_sets`` (one per member),
counted in ``kernel_set_sizes``; both change in one short write transaction, so
workers and their pool processes can report parts at the same time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kernel.backends.base import KeyValueBackend
from kernel.plugins.builtin.sqlite_db import Database, path_from_url

# Version 2 added kernel_sets and kernel_set_sizes (chords). Every statement is
# idempotent, so a file of any earlier version is brought up to date on open.
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS kernel_results (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS kernel_results_expires ON kernel_results (expires_at);
CREATE TABLE IF NOT EXISTS kernel_sets (
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kernel_set_sizes (
    key TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS kernel_set_sizes_expires ON kernel_set_sizes (expires_at);
"""

#: Keys read per statement by ``mget`` (below SQLite's limit on bound parameters).
MGET_BATCH = 500


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

    def mget(self, keys: Sequence[str]) -> list[bytes | str | None]:
        connection = self.database.connection()
        now = time.time()
        found: dict[str, bytes | str] = {}
        for start in range(0, len(keys), MGET_BATCH):
            batch = list(keys[start : start + MGET_BATCH])
            placeholders = ",".join("?" * len(batch))
            rows = connection.execute(
                f"SELECT key, value FROM kernel_results WHERE key IN ({placeholders}) "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (*batch, now),
            )
            found.update(rows)
        return [found.get(key) for key in keys]

    def add_to_set(self, key: str, member: str, expires: float | None) -> int:
        now = time.time()
        expires_at = now + expires if expires else None
        with self.database.transaction() as connection:
            row = connection.execute(
                "SELECT expires_at FROM kernel_set_sizes WHERE key = ?", (key,)
            ).fetchone()
            if row is not None and row[0] is not None and row[0] <= now:  # an expired set
                connection.execute("DELETE FROM kernel_sets WHERE key = ?", (key,))
                connection.execute("DELETE FROM kernel_set_sizes WHERE key = ?", (key,))
            added = connection.execute(
                "INSERT OR IGNORE INTO kernel_sets (key, member) VALUES (?, ?)", (key, member)
            ).rowcount
            connection.execute(
                "INSERT INTO kernel_set_sizes (key, size, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET size = size + excluded.size, "
                "expires_at = excluded.expires_at",
                (key, added, expires_at),
            )
            (size,) = connection.execute(
                "SELECT size FROM kernel_set_sizes WHERE key = ?", (key,)
            ).fetchone()
        return size

    def set_if_absent(self, key: str, value: bytes | str, expires: float | None) -> bool:
        now = time.time()
        with self.database.transaction() as connection:
            connection.execute(
                "DELETE FROM kernel_results WHERE key = ? AND expires_at IS NOT NULL "
                "AND expires_at <= ?",
                (key, now),
            )
            stored = connection.execute(
                "INSERT OR IGNORE INTO kernel_results (key, value, expires_at) VALUES (?, ?, ?)",
                (key, value, now + expires if expires else None),
            ).rowcount
        return stored == 1

    def delete_set(self, key: str) -> None:
        with self.database.transaction() as connection:
            connection.execute("DELETE FROM kernel_sets WHERE key = ?", (key,))
            connection.execute("DELETE FROM kernel_set_sizes WHERE key = ?", (key,))

    def cleanup(self) -> int:
        now = time.time()
        with self.database.transaction() as connection:
            removed = connection.execute(
                "DELETE FROM kernel_results WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (now,),
            ).rowcount
            connection.execute(
                "DELETE FROM kernel_sets WHERE key IN (SELECT key FROM kernel_set_sizes "
                "WHERE expires_at IS NOT NULL AND expires_at <= ?)",
                (now,),
            )
            removed += connection.execute(
                "DELETE FROM kernel_set_sizes WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (now,),
            ).rowcount
        return removed

    def close(self) -> None:
        self.database.close()
