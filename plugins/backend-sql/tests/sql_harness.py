"""Scratch databases, worker subprocesses and a breakable TCP proxy for the SQL tests.

Each scratch location belongs to one test run (or one test) and is dropped afterwards:
a PostgreSQL schema in the database ``test`` (reached through ``search_path`` in the
URL, so child processes that know only the URL use it too), a MariaDB database, or a
SQLite file under pytest's ``tmp_path``.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from kernel.testing.processes import WorkerProcess, wait_until

__all__ = ["Cluster", "Proxy", "Scratch", "WorkerProcess", "wait_until"]

TESTS_DIR = Path(__file__).parent

#: Server accounts of the development machines (overridable for other set-ups).
POSTGRES_USER = os.environ.get("KERNEL_TEST_POSTGRES_USER", "postgres")
POSTGRES_DATABASE = os.environ.get("KERNEL_TEST_POSTGRES_DATABASE", "test")
MARIADB_USER = os.environ.get("KERNEL_TEST_MARIADB_USER", "root")
MARIADB_PASSWORD = os.environ.get("KERNEL_TEST_MARIADB_PASSWORD", "")

#: Seconds a worker subprocess has to say it is ready (several start at once).
START_TIMEOUT = 60.0


def unique_name(prefix: str = "kernel_sql") -> str:
    """A schema/database name of this process and call (lower case, SQL-safe)."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


@attrs.frozen
class Scratch:
    """A database location of one test run: its backend URL, and the schema or
    database name (None for SQLite)."""

    dialect: str
    url: str
    name: str | None = None

    @property
    def sqlalchemy_url(self) -> str:
        """The URL without ``db+``, with the driver the plugin picks."""
        from kernel_sql.urls import sqlalchemy_url

        return sqlalchemy_url(self.url).render_as_string(hide_password=False)

    def engine(self) -> Any:
        import sqlalchemy as sa

        return sa.create_engine(self.sqlalchemy_url, poolclass=sa.pool.NullPool)


def postgres_url(host: str, port: int, schema: str) -> str:
    return (
        f"db+postgresql://{POSTGRES_USER}@{host}:{port}/{POSTGRES_DATABASE}"
        f"?options=-csearch_path%3D{schema}"
    )


@contextmanager
def postgres_schema(host: str, port: int) -> Iterator[Scratch]:
    """A new PostgreSQL schema, the default schema of the URL; dropped afterwards."""
    import psycopg

    name = unique_name()
    admin = dict(host=host, port=port, user=POSTGRES_USER, dbname=POSTGRES_DATABASE)
    with psycopg.connect(**admin, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield Scratch("postgresql", postgres_url(host, port, name), name)
    finally:
        with psycopg.connect(**admin, autocommit=True) as connection:
            connection.execute("SET lock_timeout = '20s'")
            connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@contextmanager
def mariadb_database(host: str, port: int) -> Iterator[Scratch]:
    """A new MariaDB database, the database of the URL; dropped afterwards."""
    import pymysql

    name = unique_name()
    connection = pymysql.connect(
        host=host, port=port, user=MARIADB_USER, password=MARIADB_PASSWORD, autocommit=True
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}`")
        password = f":{MARIADB_PASSWORD}" if MARIADB_PASSWORD else ""
        try:
            yield Scratch(
                "mariadb", f"db+mysql://{MARIADB_USER}{password}@{host}:{port}/{name}", name
            )
        finally:
            with connection.cursor() as cursor:
                cursor.execute("SET SESSION lock_wait_timeout = 20")
                cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        connection.close()


def sqlite_scratch(directory: Path) -> Scratch:
    path = directory / f"{unique_name('results')}.db"
    return Scratch("sqlite", f"db+sqlite:///{path}")  # the path is absolute: 4 slashes


class Cluster:
    """Workers sharing a SQLite broker file and the result backend under test, a client
    app on the same, and the record file their tasks append to."""

    def __init__(self, tmp_path: Path, backend_url: str, **env: str) -> None:
        from kernel import App

        self.tmp_path = tmp_path
        self.broker_url = f"sqlite:///{tmp_path}/broker.sqlite3"
        self.backend_url = backend_url
        self.record_path = tmp_path / "record.txt"
        self.env = {
            **os.environ,
            "KERNEL_BROKER_URL": self.broker_url,
            "KERNEL_RESULT_BACKEND": backend_url,
            "SQL_TEST_RECORD": str(self.record_path),
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.app = App("sql-test-client", broker=self.broker_url, backend=backend_url)
        self.workers: list[WorkerProcess] = []

    def start(self, count: int = 1, *options: str) -> list[WorkerProcess]:
        """Start ``count`` workers at once, then wait until every one is ready."""
        started = []
        for _ in range(count):
            number = len(self.workers) + 1
            args = ["-A", "sql_worker_tasks", "worker", "-l", "INFO", "-n", f"sql{number}@%h"]
            worker = WorkerProcess(
                [*args, *options],
                self.env,
                self.tmp_path / f"worker{number}.log",
                cwd=TESTS_DIR,
                name=f"worker sql{number}",
            )
            self.workers.append(worker)
            started.append(worker)
        for worker in started:
            worker.wait_ready(START_TIMEOUT)
        return started

    def records(self, kind: str | None = None) -> list[list[str]]:
        if not self.record_path.exists():
            return []
        lines = [line.split() for line in self.record_path.read_text().splitlines()]
        return [line for line in lines if kind is None or line[0] == kind]

    def records_of(self, kind: str, token: str) -> list[list[str]]:
        return [line for line in self.records(kind) if len(line) > 1 and line[1] == token]

    def release(self, token: str) -> None:
        (self.tmp_path / f"release-{token}").touch()

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.tail()}" for w in self.workers)

    def close(self) -> None:
        for worker in self.workers:  # all at once: they shut down in parallel
            if worker.alive:
                worker.signal(signal.SIGTERM)
        for worker in self.workers:
            worker.stop()
        self.app.close()


# -- a TCP proxy the tests can cut -----------------------------------------------------


class Proxy:
    """Forwards a local port to a database server; :meth:`cut` closes every
    connection and stops listening (the database "goes away"), :meth:`restore`
    listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = _free_port()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Proxy:
        self.restore()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cut()

    def restore(self) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            sockets, self._sockets = self._sockets, []
        if server is not None:
            try:  # wakes the thread blocked in accept(), which keeps the port otherwise
                server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            server.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _address = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._server is not server:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
