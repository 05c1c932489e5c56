"""``db+<dialect>[+<driver>]://...`` result backend URLs, turned into SQLAlchemy URLs.

The part after ``db+`` is a SQLAlchemy URL, as in Celery. Without a driver the
plugin picks a maintained one: psycopg 3 for PostgreSQL, PyMySQL for MySQL and
MariaDB, the standard library for SQLite. A missing driver is reported with the
extra that installs it, before anything connects.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from kernel.exceptions import ConfigurationError

PREFIX = "db+"

#: Driver chosen when the URL names none, per SQLAlchemy dialect.
DEFAULT_DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql"}

#: The Python module each driver imports, and the extra of ``taskkernel`` that
#: installs it (None: not one of ours, install it yourself).
DRIVER_MODULES: dict[str, tuple[str, str | None]] = {
    "psycopg": ("psycopg", "sql-postgresql"),
    "psycopg2": ("psycopg2", None),
    "pg8000": ("pg8000", None),
    "pymysql": ("pymysql", "sql-mysql"),
    "mysqldb": ("MySQLdb", None),
    "mysqlconnector": ("mysql.connector", None),
    "mariadbconnector": ("mariadb", None),
    "pysqlite": ("sqlite3", None),
}

#: The URL schemes the plugin registers (the manager matches schemes exactly).
SCHEMES = [
    "db+postgresql",
    "db+postgresql+psycopg",
    "db+postgresql+psycopg2",
    "db+postgresql+pg8000",
    "db+mysql",
    "db+mysql+pymysql",
    "db+mysql+mysqldb",
    "db+mysql+mysqlconnector",
    "db+mariadb",
    "db+mariadb+pymysql",
    "db+mariadb+mariadbconnector",
    "db+sqlite",
    "db+sqlite+pysqlite",
]


def sqlalchemy_url(url: str) -> Any:
    """The ``sqlalchemy.engine.URL`` for a ``db+...`` backend URL, with its driver.

    Raises ``ConfigurationError`` when the URL is not a ``db+`` URL, its dialect is
    not one the plugin supports, or its driver is not installed.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not url.lower().startswith(PREFIX):
        raise ConfigurationError(
            f"{safe(url)!r} is not a SQL result backend URL; write it as "
            "'db+postgresql://user:password@host/dbname', 'db+mysql://...' or "
            "'db+sqlite:///path/results.db'"
        )
    try:
        parsed = make_url(url[len(PREFIX) :])
    except ArgumentError as exc:
        raise ConfigurationError(
            f"cannot parse the result backend URL {safe(url)!r}: {exc}"
        ) from exc
    dialect, _, driver = parsed.drivername.lower().partition("+")
    if dialect not in ("postgresql", "mysql", "mariadb", "sqlite"):
        raise ConfigurationError(
            f"the SQL result backend supports PostgreSQL, MySQL/MariaDB and SQLite, not "
            f"{dialect!r} ({safe(url)!r})"
        )
    driver = driver or DEFAULT_DRIVERS.get(dialect, "pysqlite")
    require_driver(dialect, driver, url)
    return parsed.set(drivername=f"{dialect}+{driver}")


def require_driver(dialect: str, driver: str, url: str) -> None:
    """Raise ``ConfigurationError`` naming what to install when ``driver`` is missing."""
    module, extra = DRIVER_MODULES.get(driver, (driver, None))
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a stubbed module
        found = False
    if found:
        return
    how = f'pip install "taskkernel[{extra}]"' if extra else f"install the {driver} package"
    raise ConfigurationError(
        f"the database driver {driver!r} for {safe(url)!r} is not installed "
        f"(module {module!r}); {how}"
    )


def safe(url: str) -> str:
    """``url`` with its password hidden."""
    from kernel.plugins.manager import redact_url

    return redact_url(url)
