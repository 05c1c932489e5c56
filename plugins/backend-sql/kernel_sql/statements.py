"""The few statements whose SQL differs between PostgreSQL, MySQL/MariaDB and SQLite.

Upserts and insert-if-absent are spelled differently by each database (``ON
CONFLICT``, ``ON DUPLICATE KEY UPDATE``); everything else the backend writes in
SQLAlchemy Core, the same for all three.

Storing a result is the hot path (once or twice per task): its statements are built
once per table and set of columns, with bound parameters, and reused.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from kernel import states

MYSQL_DIALECTS = ("mysql", "mariadb")


def _insert(dialect: str, table: sa.Table) -> Any:
    """The dialect's own ``insert()``, which knows its upsert clauses."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect in MYSQL_DIALECTS:
        from sqlalchemy.dialects.mysql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - urls.py admits only the three
        raise NotImplementedError(f"no upsert for the {dialect} dialect")
    return insert(table)


def _param(table: sa.Table, name: str) -> Any:
    """The bound parameter carrying the new value of column ``name``."""
    return sa.bindparam(f"new_{name}", type_=table.c[name].type)


#: Bound parameter of the stored-result statements: how old an expired row is (seconds
#: on PostgreSQL, microseconds on MySQL/MariaDB, the cutoff itself on SQLite).
EXPIRY_PARAM = "kernel_expiry"


def expiry_cutoff(dialect: str, value: Any) -> Any:
    """SQL for "the ``date_done`` before which a row has expired", on the database's
    clock in naive UTC (as Celery stores ``date_done``), whatever the session's time
    zone. ``value`` is what :func:`expiry_value` returns, or a bound parameter of it."""
    if dialect == "postgresql":
        now = sa.func.timezone("UTC", sa.func.statement_timestamp())
        return now - sa.func.make_interval(0, 0, 0, 0, 0, 0, value)
    if dialect in MYSQL_DIALECTS:
        return sa.func.timestampadd(sa.text("MICROSECOND"), -value, sa.func.utc_timestamp(6))
    return value  # SQLite: one host, the cutoff is computed in Python


def expiry_value(dialect: str, seconds: float) -> Any:
    """The value for :func:`expiry_cutoff` of results expiring after ``seconds``."""
    if dialect == "postgresql":
        return float(seconds)
    if dialect in MYSQL_DIALECTS:
        # DATETIME keeps whole seconds (stored times are truncated): count a row's
        # expiry from the second after it, so it never expires early.
        return int((seconds + 1) * 1_000_000)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return now - timedelta(seconds=seconds)


def _expiry_param(dialect: str) -> Any:
    if dialect == "postgresql":
        return sa.bindparam(EXPIRY_PARAM, type_=sa.Float)
    if dialect in MYSQL_DIALECTS:
        return sa.bindparam(EXPIRY_PARAM, type_=sa.BigInteger)
    return sa.bindparam(EXPIRY_PARAM, type_=sa.DateTime)


def _unexpired(table: sa.Table, dialect: str, expiring: bool) -> Any:
    """The row's result has not expired (always true when nothing expires)."""
    if not expiring:
        return sa.true()
    cutoff = expiry_cutoff(dialect, _expiry_param(dialect))
    return sa.or_(table.c.date_done.is_(None), table.c.date_done >= cutoff)


def _not_success(table: sa.Table, dialect: str, expiring: bool) -> Any:
    """The row may be replaced: it holds no SUCCESS, or its SUCCESS has expired."""
    return sa.or_(
        table.c.status.is_(None),
        table.c.status != states.SUCCESS,
        ~_unexpired(table, dialect, expiring),
    )


def store_task(
    connection: sa.Connection,
    table: sa.Table,
    task_id: str,
    values: dict[str, Any],
    expires: float | None = None,
) -> None:
    """Write a task's row, unless it already holds SUCCESS (Celery's rule: a task run
    again after its result was stored, a redelivery say, does not replace it). A
    SUCCESS older than ``expires`` seconds (None: never) no longer counts: the id
    is then free for a new run, which replaces it.

    An existing row is updated in place, keeping its id: an upsert alone would draw a
    new number from the id sequence on every write. A missing row is inserted, with
    an upsert, which also covers another writer inserting it at the same moment.
    On PostgreSQL the two are one statement; elsewhere an UPDATE, then an INSERT if
    it matched nothing, in one transaction.
    """
    dialect = connection.dialect.name
    expiring = expires is not None
    update, insert = _task_statements(table, dialect, tuple(values), expiring)
    params = {"new_task_id": task_id, **{f"new_{name}": v for name, v in values.items()}}
    if expiring:
        params[EXPIRY_PARAM] = expiry_value(dialect, expires)
    if insert is None:
        connection.execute(update, params)
    elif not connection.execute(update, params).rowcount:
        connection.execute(insert, params)


@functools.lru_cache(maxsize=64)
def _task_statements(
    table: sa.Table, dialect: str, names: tuple[str, ...], expiring: bool
) -> tuple[Any, Any]:
    """(update, insert) for :func:`store_task`; insert is None when update does both."""
    task_id = _param(table, "task_id")
    update = (
        sa.update(table)
        .where(table.c.task_id == task_id, _not_success(table, dialect, expiring))
        .values({name: _param(table, name) for name in names})
    )
    columns = ("task_id", *names)
    if dialect == "postgresql":
        # The UPDATE in a CTE; the INSERT takes its row from a SELECT that is empty
        # when the UPDATE matched or a row exists, so nextval() runs for new rows only.
        updated = update.returning(table.c.id).cte("updated")
        existing = sa.select(table.c.id).where(table.c.task_id == task_id)
        source = sa.select(*(_param(table, name) for name in columns)).where(
            ~sa.exists(updated.select()), ~existing.exists()
        )
        insert = _insert(dialect, table).from_select(list(columns), source)
        combined = insert.on_conflict_do_update(
            index_elements=[table.c.task_id],
            set_={name: insert.excluded[name] for name in names},
            where=_not_success(table, dialect, expiring),
        )
        return combined, None
    insert = _insert(dialect, table).values({name: _param(table, name) for name in columns})
    if dialect in MYSQL_DIALECTS:
        # MySQL applies the assignments left to right: status and date_done go last
        # (in that order), so every column still compares against the status and
        # date_done the row had before (date_done's own test sees the new status,
        # which is SUCCESS only when the old one was kept or was replaced anyway).
        keep = sa.and_(table.c.status == states.SUCCESS, _unexpired(table, dialect, expiring))
        last = {"status": 1, "date_done": 2}
        assignments = [
            (name, sa.func.if_(keep, table.c[name], insert.inserted[name]))
            for name in sorted(names, key=lambda name: last.get(name, 0))
        ]
        return update, insert.on_duplicate_key_update(assignments)
    return update, insert.on_conflict_do_update(
        index_elements=[table.c.task_id],
        set_={name: insert.excluded[name] for name in names},
        where=_not_success(table, dialect, expiring),
    )


def save_group(
    connection: sa.Connection, table: sa.Table, group_id: str, values: dict[str, Any]
) -> None:
    """Insert or replace a saved group's row (keeping its id when it exists)."""
    updated = connection.execute(
        sa.update(table).where(table.c.taskset_id == group_id).values(**values)
    ).rowcount
    if updated:
        return
    dialect = connection.dialect.name
    insert = _insert(dialect, table).values(taskset_id=group_id, **values)
    if dialect in MYSQL_DIALECTS:
        statement = insert.on_duplicate_key_update({name: insert.inserted[name] for name in values})
    else:
        statement = insert.on_conflict_do_update(
            index_elements=[table.c.taskset_id],
            set_={name: insert.excluded[name] for name in values},
        )
    connection.execute(statement)


def put_key(connection: sa.Connection, table: sa.Table, key: str, values: dict[str, Any]) -> None:
    """Insert or replace the row of ``key`` in a key-value table."""
    dialect = connection.dialect.name
    insert = _insert(dialect, table).values(key=key, **values)
    if dialect in MYSQL_DIALECTS:
        statement = insert.on_duplicate_key_update({name: insert.inserted[name] for name in values})
    else:
        statement = insert.on_conflict_do_update(
            index_elements=[table.c.key], set_={name: insert.excluded[name] for name in values}
        )
    connection.execute(statement)


def insert_if_absent(connection: sa.Connection, table: sa.Table, values: dict[str, Any]) -> None:
    """Insert a row unless its primary key is taken (then do nothing)."""
    dialect = connection.dialect.name
    insert = _insert(dialect, table).values(**values)
    if dialect in MYSQL_DIALECTS:
        # Not INSERT IGNORE, which would also turn real errors into warnings; and not a
        # plain no-op either: this takes the existing row's exclusive lock at once,
        # where a shared lock upgraded later deadlocks against a second waiter.
        first_key = table.primary_key.columns.values()[0]
        statement = insert.on_duplicate_key_update({first_key.name: first_key})
    else:
        statement = insert.on_conflict_do_nothing()
    connection.execute(statement)


def expiry_cutoff_now(dialect: str, seconds: float) -> Any:
    """:func:`expiry_cutoff` for results expiring after ``seconds``, as a literal."""
    value = expiry_value(dialect, seconds)
    return expiry_cutoff(dialect, sa.literal(value, _expiry_param(dialect).type))
