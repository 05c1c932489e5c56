"""Which database errors are worth retrying, and the error raised when retrying ends.

A transient error is one that the same statement may not meet again: the server is
down or restarting, the connection was lost, the transaction lost a deadlock or
waited too long for a lock (it was rolled back, so running it again is safe), or
SQLite's file was locked by another writer. Anything else (a wrong password, an
unknown database, a missing schema, a value too long for its column) is raised at
once: retrying would only delay the message the user needs.
"""

from __future__ import annotations

from typing import Any

from kernel.exceptions import ConfigurationError, KernelError

#: PostgreSQL SQLSTATEs: serialization failure, deadlock, lock not available, server
#: shutting down or starting, too many connections, and the connection classes.
POSTGRES_TRANSIENT_STATES = frozenset(
    {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300", "53400"}
)
POSTGRES_TRANSIENT_CLASSES = ("08",)
#: PostgreSQL SQLSTATEs that mean the configuration is wrong.
POSTGRES_CONFIGURATION_STATES = frozenset({"28000", "28P01", "3D000", "3F000", "42501"})

#: Words of the PostgreSQL ``FATAL`` refusals at connection time (libpq gives no
#: SQLSTATE then) that mean "fix your settings": a wrong password, an unknown
#: database or role, no pg_hba.conf entry, a role that may not log in or connect.
#: Every other refusal (no free connection slots, too many clients, starting up,
#: shutting down, in recovery, not accepting connections) is retried: a refusal not
#: listed here costs a retry timeout, a transient one listed would fail at once.
POSTGRES_CONFIGURATION_FATAL = (
    "password authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "pg_hba.conf rejects connection",
    "permission denied",
    "is not permitted to log in",
    "authentication failed for user",
)

#: MySQL/MariaDB error codes: too many connections, server shutdown, lock wait
#: timeout, deadlock, connection killed, cannot connect, server gone away, lost
#: connection, disconnected for inactivity.
MYSQL_TRANSIENT_CODES = frozenset(
    {1040, 1053, 1205, 1213, 1927, 2002, 2003, 2006, 2013, 2055, 4031}
)
#: MySQL/MariaDB error codes that mean the configuration is wrong: access denied,
#: unknown database.
MYSQL_CONFIGURATION_CODES = frozenset({1044, 1045, 1049, 1142, 1698})


class ResultNotStored(Exception):
    """Stored as a task's FAILURE in place of a result the database refused (too large
    for its column, say): the task is not run again for a refusal that would recur."""


class SQLBackendUnavailable(KernelError, ConnectionError):
    """The database did not answer, or kept failing, for ``database_retry_timeout``."""


def error_code(exc: BaseException) -> Any:
    """The driver's code for a SQLAlchemy-wrapped error: a SQLSTATE for PostgreSQL, a
    number for MySQL, the error name for SQLite; None when the driver gives none."""
    original = getattr(exc, "orig", None)
    if original is None:
        return None
    args = getattr(original, "args", ())
    if args and isinstance(args[0], int):  # MySQL drivers (which also set a SQLSTATE)
        return args[0]
    sqlstate = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    if sqlstate:
        return str(sqlstate)
    return getattr(original, "sqlite_errorname", None)


def is_transient(exc: BaseException, dialect: str) -> bool:
    """True when running the failed transaction again may succeed."""
    from sqlalchemy import exc as sa_exc

    if not isinstance(exc, sa_exc.DBAPIError):
        return isinstance(exc, (ConnectionError, TimeoutError))
    if exc.connection_invalidated:
        return True
    code = error_code(exc)
    if dialect == "postgresql":
        if code in POSTGRES_CONFIGURATION_STATES or _postgres_refused(exc):
            return False
        if code is None:  # no server reply at all: refused, reset, timed out
            return isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError))
        return code in POSTGRES_TRANSIENT_STATES or str(code).startswith(POSTGRES_TRANSIENT_CLASSES)
    if dialect in ("mysql", "mariadb"):
        if code in MYSQL_CONFIGURATION_CODES:
            return False
        if code in MYSQL_TRANSIENT_CODES:
            return True
        return code is None and isinstance(exc, sa_exc.InterfaceError)
    if dialect == "sqlite":
        text = str(getattr(exc, "orig", exc)).lower()
        return code in ("SQLITE_BUSY", "SQLITE_LOCKED") or "locked" in text or "busy" in text
    return isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError))


def is_configuration_error(exc: BaseException, dialect: str) -> bool:
    """True for errors only the user can fix: credentials, unknown database or schema."""
    from sqlalchemy import exc as sa_exc

    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    code = error_code(exc)
    if dialect == "postgresql":
        return code in POSTGRES_CONFIGURATION_STATES or _postgres_refused(exc)
    if dialect in ("mysql", "mariadb"):
        return code in MYSQL_CONFIGURATION_CODES
    return False


def _postgres_refused(exc: BaseException) -> bool:
    """The server refused the connection for good (unknown database or role, bad
    password): libpq reports it as a ``FATAL`` message without a SQLSTATE."""
    if error_code(exc) is not None:
        return False
    text = str(getattr(exc, "orig", exc))
    fatal = text.partition("FATAL:")[2]
    return any(words in fatal for words in POSTGRES_CONFIGURATION_FATAL)


def configuration_error(exc: BaseException, what: str, url: str) -> ConfigurationError:
    """A ``ConfigurationError`` for an error only the user can fix."""
    cause = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
    return ConfigurationError(
        f"could not {what}: the database of the SQL result backend {url!r} refused it "
        f"({cause}); check the user, password, database name and "
        "database_table_schemas (a schema must exist before the backend uses it)"
    )


def describe(exc: BaseException) -> str:
    """One line naming the error: its class and the driver's first line of text."""
    cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {cause[0] if cause else ''}"


def data_error_advice(exc: BaseException, dialect: str, table: str) -> str:
    """What to do about a value the database refused to store."""
    code = error_code(exc)
    if dialect in ("mysql", "mariadb") and code in (1406, 1153, 1301):
        return (
            f"its columns are too small for it; an administrator can widen them: "
            f"ALTER TABLE {table} MODIFY result LONGBLOB, MODIFY traceback LONGTEXT, "
            "MODIFY children LONGBLOB"
        )
    return "return a smaller value, or store large data elsewhere and return a reference"
