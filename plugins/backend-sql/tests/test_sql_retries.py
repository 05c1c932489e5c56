"""Transient database errors are retried; a database that stays down gives a clear
error; a wrong configuration fails at once."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from kernel_sql.errors import SQLBackendUnavailable, is_configuration_error, is_transient
from sql_harness import (
    MARIADB_USER,
    POSTGRES_USER,
    Proxy,
    mariadb_database,
    postgres_schema,
    wait_until,
)

from kernel import App, states
from kernel.exceptions import ConfigurationError
from kernel.testing.services import require_service

SERVICES = {"postgresql": "postgres", "mariadb": "mariadb"}


def new_id() -> str:
    return str(uuid.uuid4())


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_url(dialect: str, port: int, database: str, password: str = "") -> str:
    secret = f":{password}" if password else ""
    if dialect == "postgresql":
        return f"db+postgresql://{POSTGRES_USER}{secret}@127.0.0.1:{port}/{database}"
    return f"db+mysql://{MARIADB_USER}{secret}@127.0.0.1:{port}/{database}"


# -- which errors are transient -----------------------------------------------------------


class DriverError(Exception):
    """Stands in for a driver's exception: its args, and a SQLSTATE if it has one."""

    def __init__(self, *args: Any, sqlstate: str | None = None) -> None:
        super().__init__(*args)
        self.sqlstate = sqlstate


def pg(sqlstate: str | None, text: str = "error") -> DriverError:
    return DriverError(text, sqlstate=sqlstate)


@pytest.mark.parametrize(
    ("dialect", "orig", "transient", "configuration"),
    [
        ("postgresql", pg("40P01"), True, False),  # deadlock
        ("postgresql", pg("40001"), True, False),  # serialization failure
        ("postgresql", pg("57P01"), True, False),  # admin shutdown
        ("postgresql", pg("08006"), True, False),  # connection failure
        ("postgresql", pg(None, "Connection refused"), True, False),
        ("postgresql", pg(None, "FATAL:  the database system is starting up"), True, False),
        ("postgresql", pg(None, 'FATAL:  database "x" does not exist'), False, True),
        ("postgresql", pg("28P01"), False, True),  # bad password
        ("postgresql", pg("3F000"), False, True),  # no such schema
        ("postgresql", pg("22001"), False, False),  # value too long
        ("mariadb", DriverError(1213, "Deadlock", sqlstate="40001"), True, False),
        ("mariadb", DriverError(1205, "Lock wait timeout", sqlstate="HY000"), True, False),
        ("mariadb", DriverError(2003, "Can't connect"), True, False),
        ("mariadb", DriverError(2013, "Lost connection"), True, False),
        ("mariadb", DriverError(1045, "Access denied", sqlstate="28000"), False, True),
        ("mariadb", DriverError(1049, "Unknown database", sqlstate="42000"), False, True),
        ("mariadb", DriverError(1406, "Data too long", sqlstate="22001"), False, False),
        ("sqlite", DriverError("database is locked"), True, False),
        ("sqlite", DriverError("no such table: x"), False, False),
    ],
)
def test_errors_are_told_apart(dialect, orig, transient, configuration):
    error = sa.exc.OperationalError("SELECT 1", {}, orig)
    assert is_transient(error, dialect) is transient
    assert is_configuration_error(error, dialect) is configuration


FAILED = 'connection failed: connection to server at "10.0.0.5", port 5432 failed: FATAL:  '


@pytest.mark.parametrize(
    ("fatal", "configuration"),
    [
        # PostgreSQL 15 and 16 wordings of "no free slot": come back later.
        ("remaining connection slots are reserved for non-replication superuser connections", 0),
        ("remaining connection slots are reserved for roles with the SUPERUSER attribute", 0),
        (
            "remaining connection slots are reserved for roles with privileges of the "
            '"pg_use_reserved_connections" role',
            0,
        ),
        ("sorry, too many clients already", 0),
        ('too many connections for role "kernel"', 0),
        ('too many connections for database "results"', 0),
        ("the database system is starting up", 0),
        ("the database system is shutting down", 0),
        ("the database system is in recovery mode", 0),
        ("the database system is not accepting connections", 0),
        ("the database system is not yet accepting connections", 0),
        ('password authentication failed for user "kernel"', 1),
        ('database "results" does not exist', 1),
        ('role "kernel" does not exist', 1),
        (
            'no pg_hba.conf entry for host "10.0.0.9", user "kernel", database "results", '
            "no encryption",
            1,
        ),
        ('permission denied for database "results"', 1),
        ('role "kernel" is not permitted to log in', 1),
    ],
)
def test_postgres_connection_refusals_are_retried_unless_only_the_user_can_fix_them(
    fatal, configuration
):
    error = sa.exc.OperationalError("connect", {}, pg(None, FAILED + fatal))
    assert is_configuration_error(error, "postgresql") is bool(configuration)
    assert is_transient(error, "postgresql") is not bool(configuration)


def test_an_invalidated_connection_is_always_transient():
    error = sa.exc.DBAPIError("SELECT 1", {}, DriverError(), connection_invalidated=True)
    assert is_transient(error, "postgresql")
    assert is_transient(error, "mariadb")


# -- a database that is down, or goes away -------------------------------------------------


@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_a_database_that_stays_down_fails_with_a_clear_error(dialect):
    url = server_url(dialect, closed_port(), "test", password="s3cret")
    app = App("sql-down", broker="memory://", backend=url, database_retry_timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(SQLBackendUnavailable) as raised:
            app.backend.store_result(new_id(), 1, states.SUCCESS)
    finally:
        app.close()
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert 0.5 <= elapsed < 10
    assert "kept failing for 0.5s" in message
    assert "check that the database is running" in message
    assert "database_retry_timeout" in message
    assert "s3cret" not in message and ":***@" in message
    assert isinstance(raised.value, ConnectionError)


@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_a_store_waits_for_the_database_to_come_back(dialect, caplog):
    """The connection to the database breaks between two stores; the second store
    retries until the database is reachable again, then succeeds: nothing is lost."""
    host, port = require_service(SERVICES[dialect])
    make = postgres_schema if dialect == "postgresql" else mariadb_database
    with make(host, port) as scratch, Proxy(host, port) as proxy:
        url = scratch.url.replace(f":{port}/", f":{proxy.port}/")
        app = App("sql-flaky", broker="memory://", backend=url, database_retry_timeout=30)
        try:
            first, second = new_id(), new_id()
            app.backend.store_result(first, "before", states.SUCCESS)
            proxy.cut()
            outcome: list[Any] = []

            def store() -> None:
                try:
                    app.backend.store_result(second, "during", states.SUCCESS)
                    outcome.append("stored")
                except BaseException as exc:  # reported below
                    outcome.append(exc)

            with caplog.at_level(logging.WARNING, logger="kernel_sql.database"):
                writer = threading.Thread(target=store)
                writer.start()
                wait_until(
                    lambda: "retrying for up to" in caplog.text, 20, "the store to start retrying"
                )
                assert outcome == [], "the store finished while the database was away"
                proxy.restore()
                writer.join(30)
            assert outcome == ["stored"]
            assert app.backend.get_task_meta(first)["result"] == "before"
            assert app.backend.get_task_meta(second)["result"] == "during"
        finally:
            app.close()


@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_a_deadlocked_transaction_is_run_again(dialect):
    """Two transactions lock two rows in opposite orders; the database kills one, the
    backend runs it again, and both complete."""
    host, port = require_service(SERVICES[dialect])
    make = postgres_schema if dialect == "postgresql" else mariadb_database
    with make(host, port) as scratch:
        app = App("sql-deadlock", broker="memory://", backend=scratch.url)
        try:
            backend = app.backend
            backend.set("row-a", "0", None)
            backend.set("row-b", "0", None)
            keys = backend.tables.chord_keys
            both_hold_one = threading.Barrier(2, timeout=30)
            attempts: list[str] = []
            errors: list[BaseException] = []

            def locker(first: str, second: str) -> None:
                def work(connection: sa.Connection) -> None:
                    attempts.append(first)
                    lock = sa.select(keys.c.value).with_for_update()
                    connection.execute(lock.where(keys.c.key == first)).one()
                    if len(attempts) <= 2:  # the first attempts meet in the middle
                        both_hold_one.wait()
                    connection.execute(lock.where(keys.c.key == second)).one()

                try:
                    backend.database.run("lock two rows", work)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [
                threading.Thread(target=locker, args=("row-a", "row-b")),
                threading.Thread(target=locker, args=("row-b", "row-a")),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            app.close()
    assert errors == []
    assert len(attempts) == 3, f"expected one transaction to run twice: {attempts}"


# -- configuration errors --------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_an_unknown_database_is_a_configuration_error_at_once(dialect):
    host, port = require_service(SERVICES[dialect])
    url = server_url(dialect, port, "no_such_database_kernel_sql")
    app = App("sql-misconfigured", broker="memory://", backend=url, database_retry_timeout=30)
    started = time.monotonic()
    try:
        with pytest.raises(ConfigurationError, match="check the user, password, database"):
            app.backend.get_task_meta(new_id())
    finally:
        app.close()
    assert time.monotonic() - started < 10, "a configuration error was retried"


@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_a_server_that_accepts_but_never_answers_is_bounded_by_the_retry_timeout(dialect):
    """A hung server (or a half-open path through a firewall) accepts connections and
    never answers: the driver's timeouts give the retry deadline its say."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[Any] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    url = server_url(dialect, listener.getsockname()[1], "test")
    app = App("sql-hung", broker="memory://", backend=url, database_retry_timeout=1)
    outcome: list[Any] = []

    def store() -> None:
        started = time.monotonic()
        try:
            app.backend.store_result(new_id(), 1, states.SUCCESS)
            outcome.append("stored")
        except Exception as exc:
            outcome.append((exc, time.monotonic() - started))

    worker = threading.Thread(target=store, daemon=True)
    try:
        worker.start()
        worker.join(20)
        assert outcome, "the store was still blocked after 20s"
        exc, elapsed = outcome[0]
        assert isinstance(exc, SQLBackendUnavailable)
        assert elapsed < 10
    finally:
        listener.close()
        for connection, _address in held:
            connection.close()
        app.close()


def test_engine_connect_args_of_the_user_win_over_the_default_timeouts():
    from kernel_sql.database import Database
    from kernel_sql.urls import sqlalchemy_url

    mysql = sqlalchemy_url("db+mysql://u@127.0.0.1/db?connect_timeout=9")
    options = {"connect_args": {"read_timeout": 600}}
    database = Database(mysql, "x", engine_options=options, retry_timeout=4)
    connect_args = database.engine_options_with_defaults()["connect_args"]
    assert connect_args == {"read_timeout": 600, "write_timeout": 4}  # URL's connect_timeout
    postgres = Database(sqlalchemy_url("db+postgresql://u@h/db"), "x", retry_timeout=0.5)
    connect_args = postgres.engine_options_with_defaults()["connect_args"]
    assert connect_args["connect_timeout"] == 2  # libpq's least
    assert connect_args["keepalives"] == 1
