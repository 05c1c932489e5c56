"""One SQLite file shared by the embedded transport and result backend.

Both open the file through :class:`Database`, which gives each thread of each
process its own connection in WAL mode and creates a component's tables once,
recording their version in ``kernel_schema``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from kernel.exceptions import ConfigurationError

DEFAULT_DATABASE = "kernel.sqlite3"
DEFAULT_BUSY_TIMEOUT = 30.0


def database_path(virtual_host: str | None, hostname: str | None) -> str:
    """Absolute path of the database file a ``sqlite://`` URL names.

    kombu parses ``sqlite:///rel/x.db`` to the virtual host ``rel/x.db`` and
    ``sqlite:////abs/x.db`` to ``/abs/x.db``; no virtual host (or ``/``) means
    ``kernel.sqlite3`` in the current directory. Relative paths are resolved against
    the current directory now, so a later ``chdir`` does not move the database.
    """
    if hostname:
        raise ConfigurationError(
            f"sqlite URL names a host ({hostname!r}, from "
            f"'sqlite://{hostname}/{virtual_host or ''}'), but a SQLite database is a "
            "local file: use three slashes for a relative path (sqlite:///data/kernel.db) "
            "and four for an absolute one (sqlite:////var/lib/kernel/kernel.db)"
        )
    path = virtual_host or ""
    if path in ("", "/"):
        path = DEFAULT_DATABASE
    return os.path.abspath(path)


def path_from_url(url: str) -> str:
    """The file a ``sqlite://`` URL names (SQLAlchemy's slashes rule)."""
    parts = urlsplit(url)
    return database_path(parts.path[1:] if parts.path else "", parts.netloc or None)


class Database:
    """One SQLite file; each thread of each process gets its own connection.

    ``component``, ``version`` and ``schema`` (SQL statements, without a
    transaction) describe the tables the caller needs; they are created the first
    time any process opens the file at that version.

    A forked child never touches a connection it inherited: SQLite forbids carrying
    one across ``fork()``, and closing it could release the parent's locks, so the
    child opens its own and keeps the inherited objects referenced, unused.
    """

    def __init__(
        self,
        path: str,
        component: str,
        version: int,
        schema: str,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        self.path = path
        self.component = component
        self.version = version
        self.schema = schema
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[tuple[int, sqlite3.Connection]] = []
        self._generation = 0

    def connection(self) -> sqlite3.Connection:
        local = self._local
        pid = os.getpid()
        current = getattr(local, "connection", None)
        if current is not None and local.pid == pid and local.generation == self._generation:
            return current
        connection = self._open()
        with self._lock:
            self._opened.append((pid, connection))
            local.connection, local.pid, local.generation = connection, pid, self._generation
        return connection

    def _open(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        connection = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            self._use_wal(connection)
            connection.execute("PRAGMA synchronous = NORMAL")
            if self._schema_version(connection) != self.version:
                connection.executescript(
                    "BEGIN IMMEDIATE;\n"
                    "CREATE TABLE IF NOT EXISTS kernel_schema ("
                    "component TEXT PRIMARY KEY, version INTEGER NOT NULL);\n"
                    f"{self.schema}\n"
                    "INSERT OR REPLACE INTO kernel_schema (component, version) "
                    f"VALUES ('{self.component}', {int(self.version)});\n"
                    "COMMIT;"
                )
        except BaseException:
            connection.close()
            raise
        return connection

    def _use_wal(self, connection: sqlite3.Connection) -> None:
        """Switch the file to WAL mode, waiting out other connections doing the same.

        SQLite answers a journal-mode change that races another one with "database
        is locked" at once, without consulting the busy timeout, so connections
        opening a new file together retry here (bounded by ``busy_timeout``).
        """
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.005
        while True:
            try:
                mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    connection.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise sqlite3.OperationalError(
                        f"could not switch {self.path} to WAL mode within "
                        f"{self.busy_timeout:g} s because another connection kept it "
                        "locked; check for a process holding the file open in a long "
                        "transaction"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _schema_version(self, connection: sqlite3.Connection) -> int | None:
        try:
            row = connection.execute(
                "SELECT version FROM kernel_schema WHERE component = ?", (self.component,)
            ).fetchone()
        except sqlite3.OperationalError:  # no such table: a new database
            return None
        return row[0] if row else None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: takes the write lock at once, so it cannot deadlock."""
        connection = self.connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def close_thread(self) -> None:
        """Close the calling thread's connection (a thread that is about to end)."""
        connection = getattr(self._local, "connection", None)
        if connection is None or self._local.pid != os.getpid():
            return
        self._local.connection = None
        with self._lock:
            self._opened = [entry for entry in self._opened if entry[1] is not connection]
        connection.close()

    def close(self) -> None:
        """Close every connection this process opened; threads reopen on next use."""
        pid = os.getpid()
        with self._lock:
            self._generation += 1
            mine = [connection for owner, connection in self._opened if owner == pid]
            self._opened = [entry for entry in self._opened if entry[0] != pid]
        for connection in mine:
            connection.close()
