"""One SQLAlchemy engine per process, and short transactions retried on transient errors.

Every backend operation is one transaction: :meth:`Database.run` opens a connection
from the pool, begins, runs the operation's statements, commits, and gives the
connection back. An operation is written so that running it twice has the effect of
running it once, so a transaction that failed for a transient reason (a deadlock, a
lost connection, a restarting server, a locked SQLite file) is simply run again,
until ``database_retry_timeout`` seconds have passed; then
:class:`~kernel_sql.errors.SQLBackendUnavailable` says what failed and why.

A forked child (a prefork pool process) must not share its parent's connections:
the engine notices the new process id and makes a pool of its own, leaving the
parent's sockets untouched.

Per dialect:

- MySQL/MariaDB sessions use READ COMMITTED (unless the engine options choose
  another level): a lookup of a missing row then takes no gap lock, so concurrent
  inserts of different task ids do not deadlock each other;
- SQLite files use WAL and a busy timeout, and a write transaction starts with
  ``BEGIN IMMEDIATE``, taking the file's write lock before it reads, so two writers
  never both read and then both fail to write.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from kernel_sql import errors

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Engine options used unless ``database_engine_options`` says otherwise (Celery's).
#: No pre-ping: it costs a round trip per operation, and every operation is rerun on a
#: fresh connection anyway when its pooled connection turns out to be dead.
ENGINE_DEFAULTS: dict[str, Any] = {"pool_pre_ping": False, "pool_recycle": 3600}

#: Options that only make sense with a connection pool (dropped with NullPool).
POOL_OPTIONS = ("pool_size", "max_overflow", "pool_timeout", "pool_recycle", "pool_use_lifo")

#: Seconds a SQLite connection waits for another writer's lock.
SQLITE_BUSY_TIMEOUT = 30.0

#: Execution option marking a connection that will write (SQLite: BEGIN IMMEDIATE).
WRITE_OPTION = "kernel_sql_write"


#: Objects whose locks a forked child must replace (a lock held by another thread
#: at the fork stays held in the child for ever, that thread not being there).
_FORK_SENSITIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def _new_locks_after_fork() -> None:
    for owner in list(_FORK_SENSITIVE):
        owner._new_locks()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks_after_fork)


def new_locks_in_forked_children(owner: Any) -> None:
    """Call ``owner._new_locks()`` in every process forked from this one."""
    _FORK_SENSITIVE.add(owner)


class Database:
    """The engine of one backend URL, made per process, with :meth:`run`."""

    def __init__(
        self,
        url: Any,
        safe_url: str,
        *,
        engine_options: dict[str, Any] | None = None,
        short_lived: bool = False,
        retry_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.safe_url = safe_url
        self.dialect = url.get_backend_name()
        self.engine_options = {**ENGINE_DEFAULTS, **(engine_options or {})}
        self.short_lived = short_lived
        self.retry_timeout = float(retry_timeout)
        self._engine: Any = None
        self._engine_pid: int | None = None
        self._lock = threading.Lock()
        new_locks_in_forked_children(self)

    def _new_locks(self) -> None:
        self._lock = threading.Lock()

    # -- engine ------------------------------------------------------------------------

    @property
    def engine(self) -> Any:
        """This process's engine, created on first use."""
        pid = os.getpid()
        if self._engine is None or self._engine_pid != pid:
            with self._lock:
                if self._engine is None or self._engine_pid != pid:
                    inherited = self._engine
                    if inherited is not None:  # a forked child: leave the parent's sockets
                        inherited.dispose(close=False)
                    self._engine, self._engine_pid = self._create_engine(), pid
        return self._engine

    def _create_engine(self) -> Any:
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        options = self.engine_options_with_defaults()
        if self.dialect == "sqlite":
            connect_args = dict(options.get("connect_args") or {})
            connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT)
            connect_args.setdefault("check_same_thread", False)
            options["connect_args"] = connect_args
            self._make_sqlite_directory()
        if self.short_lived:
            options = {k: v for k, v in options.items() if k not in POOL_OPTIONS}
            options["poolclass"] = NullPool
        try:
            engine = sa.create_engine(self.url, **options)
        except TypeError as exc:
            from kernel.exceptions import ConfigurationError

            raise ConfigurationError(
                f"database_engine_options {options!r} were refused by SQLAlchemy for "
                f"{self.safe_url!r}: {exc}"
            ) from exc
        if self.dialect == "sqlite":
            _configure_sqlite(engine)
        if self.dialect == "postgresql":
            _pin_postgres_time_zone(engine)
        return engine

    def engine_options_with_defaults(self) -> dict[str, Any]:
        """``database_engine_options`` with the plugin's defaults where they say nothing."""
        options = dict(self.engine_options)
        timeouts = self._timeouts()
        if timeouts:
            connect_args = dict(options.get("connect_args") or {})
            for name, value in timeouts.items():
                if name not in self.url.query:  # the user's settings win
                    connect_args.setdefault(name, value)
            options["connect_args"] = connect_args
        if self.dialect in ("mysql", "mariadb"):
            options.setdefault("isolation_level", "READ COMMITTED")
        return options

    def _timeouts(self) -> dict[str, Any]:
        """Driver options bounding a connect, and a read or write on a server that
        stopped answering, by about ``retry_timeout``: without them a hung server (or
        a half-open connection) blocks an operation for as long as TCP allows, and
        the retry deadline is never looked at. Libpq drivers have no read timeout:
        TCP keepalives and ``tcp_user_timeout`` notice a dead peer instead."""
        seconds = max(2, math.ceil(self.retry_timeout))
        driver = self.url.get_driver_name()
        if driver in ("psycopg", "psycopg2"):
            options = {
                "connect_timeout": seconds,
                "keepalives": 1,
                "keepalives_idle": seconds,
                "keepalives_interval": max(1, seconds // 3),
                "keepalives_count": 3,
            }
            if driver == "psycopg":  # its libpq is recent (psycopg2's may predate PG 12)
                options["tcp_user_timeout"] = seconds * 1000
            return options
        if driver in ("pymysql", "mysqldb"):
            return {"connect_timeout": seconds, "read_timeout": seconds, "write_timeout": seconds}
        return {}

    def _make_sqlite_directory(self) -> None:
        path = self.url.database
        if path and path != ":memory:" and not path.startswith("file:"):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def dispose(self) -> None:
        """Close this process's pooled connections (the next use opens new ones)."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose(close=self._engine_pid == os.getpid())

    # -- transactions --------------------------------------------------------------------

    def run(
        self, what: str, work: Callable[[Any], T], *, write: bool = True, single: bool = False
    ) -> T:
        """``work(connection)`` in one transaction, committed; run again on transient
        errors for up to ``retry_timeout`` seconds.

        ``what`` completes "could not ..." in error messages ("store a result").
        ``single``: ``work`` runs one statement, atomic by itself; on PostgreSQL it
        then runs in autocommit mode, saving the BEGIN and COMMIT round trips.
        """
        from sqlalchemy import exc as sa_exc

        deadline = time.monotonic() + self.retry_timeout  # counted from the first try
        pause = 0.01
        attempts = 0
        while True:
            attempts += 1
            try:
                with self.engine.connect() as connection:
                    if write:
                        connection.execution_options(**{WRITE_OPTION: True})
                    if single and self.dialect == "postgresql":
                        connection.execution_options(isolation_level="AUTOCOMMIT")
                    with connection.begin():
                        return work(connection)
            except sa_exc.DBAPIError as exc:
                if errors.is_configuration_error(exc, self.dialect):
                    raise errors.configuration_error(exc, what, self.safe_url) from exc
                if not errors.is_transient(exc, self.dialect):
                    raise
                now = time.monotonic()
                if now >= deadline:
                    raise errors.SQLBackendUnavailable(
                        f"could not {what}: the SQL result backend {self.safe_url!r} kept "
                        f"failing for {self.retry_timeout:g}s ({attempts} attempts; last: "
                        f"{errors.describe(exc)}); check that the database is running and "
                        "reachable, or raise database_retry_timeout"
                    ) from exc
                self._log_retry(what, exc, attempts)
                time.sleep(min(pause, max(0.0, deadline - now)))
                pause = min(pause * 2, 1.0)

    def _log_retry(self, what: str, exc: BaseException, attempts: int) -> None:
        code = errors.error_code(exc)
        contention = code in ("40001", "40P01", "55P03", 1205, 1213) or (self.dialect == "sqlite")
        if contention:  # expected under concurrency: the transaction is simply rerun
            log.debug("%s: retrying after %s", what, errors.describe(exc))
        elif attempts == 1:
            log.warning(
                "SQL result backend %s: could not %s (%s); retrying for up to %gs",
                self.safe_url,
                what,
                errors.describe(exc),
                self.retry_timeout,
            )


def _pin_postgres_time_zone(engine: Any) -> None:
    """Every session in UTC, whatever the server's or database's default: ``date_done``
    is naive UTC (Celery's representation), and nothing of ours may depend on the
    session's zone. A ``SET`` rather than a startup option, which PgBouncer refuses."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        autocommit = getattr(dbapi_connection, "autocommit", None)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SET TIME ZONE 'UTC'")
        finally:
            cursor.close()
        if not autocommit:
            dbapi_connection.commit()


def _configure_sqlite(engine: Any) -> None:
    """WAL, a busy timeout, and transactions begun by us (``BEGIN IMMEDIATE`` for
    writes) instead of by the sqlite3 module, which would begin them late."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT * 1000)}")
            _use_wal(cursor)
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(WRITE_OPTION)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _use_wal(cursor: Any) -> None:
    """Switch the file to WAL. SQLite answers a mode change racing another one with
    "database is locked" at once, ignoring the busy timeout: wait it out here."""
    import sqlite3

    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
    delay = 0.005
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() not in ("wal", "memory"):
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
