"""The tables: Celery's two result tables, and three small ones for kernel's chords.

``celery_taskmeta`` and ``celery_tasksetmeta`` are declared column for column as
Celery's database backend declares them (its extended variant, the superset), with
the same types, unique constraints, indexes and id sequences. Celery's workers and
clients therefore read and write the very same rows: a table created by either side
is used by the other as it is.

The chord tables are kernel's own (Celery's database backend synchronises chords by
polling with ``celery.chord_unlock`` instead):

- ``kernel_chord_keys``: small values with an expiry (a chord's size, the claim of the
  worker sending its body); ``owner`` is the token of the call that created the row,
  so a retried ``set_if_absent`` recognises its own earlier success;
- ``kernel_chord_sets``: one row per set of finished header tasks, holding its size;
  every change to a set locks this row first, which serialises the reports of one
  chord (and only of that chord);
- ``kernel_chord_members``: the members of each set, one row each.
"""

from __future__ import annotations

from typing import Any

import attrs
import sqlalchemy as sa

#: Celery's names; ``database_table_names`` may replace them.
DEFAULT_TASK_TABLE = "celery_taskmeta"
DEFAULT_GROUP_TABLE = "celery_tasksetmeta"

#: The sequences that number the rows (PostgreSQL, MariaDB, Oracle); Celery gives
#: them fixed names, whatever the tables are called.
TASK_ID_SEQUENCE = "task_id_sequence"
GROUP_ID_SEQUENCE = "taskset_id_sequence"

#: Columns of the task table written with ``result_extended``.
EXTENDED_COLUMNS = ("name", "args", "kwargs", "worker", "retries", "queue")

#: The base columns every Celery version has had (besides ``id`` and ``task_id``).
BASE_COLUMNS = ("status", "result", "date_done", "traceback", "children")

# Celery widens the ids to BIGINT on SQL Server only.
_ROW_ID = sa.Integer().with_variant(sa.BigInteger(), "mssql")

#: Longest key of the chord tables (kernel's keys are ~60 characters).
KEY_LENGTH = 255


@attrs.frozen
class Tables:
    """The backend's tables, bound to one ``MetaData``."""

    metadata: sa.MetaData
    task: sa.Table
    group: sa.Table
    chord_keys: sa.Table
    chord_sets: sa.Table
    chord_members: sa.Table

    @property
    def celery_tables(self) -> tuple[sa.Table, sa.Table]:
        return (self.task, self.group)


def build(
    table_names: dict[str, Any] | None = None, table_schemas: dict[str, Any] | None = None
) -> Tables:
    """Tables named and placed by the settings ``database_table_names`` and
    ``database_table_schemas`` (keys ``task`` and ``group``)."""
    names = dict(table_names or {})
    schemas = dict(table_schemas or {})
    unknown = sorted((set(names) | set(schemas)) - {"task", "group"})
    if unknown:
        from kernel.exceptions import ConfigurationError

        raise ConfigurationError(
            f"database_table_names/database_table_schemas have unknown key(s) {unknown}; "
            "the keys are 'task' and 'group'"
        )
    task_schema = schemas.get("task") or None
    group_schema = schemas.get("group") or None
    metadata = sa.MetaData()
    task = sa.Table(
        names.get("task") or DEFAULT_TASK_TABLE,
        metadata,
        sa.Column(
            "id",
            _ROW_ID,
            sa.Sequence(TASK_ID_SEQUENCE, schema=task_schema),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("task_id", sa.String(155), unique=True),
        sa.Column("status", sa.String(50)),
        sa.Column("result", sa.LargeBinary, nullable=True),
        sa.Column("date_done", sa.DateTime, nullable=True, index=True),
        sa.Column("traceback", sa.Text, nullable=True),
        sa.Column("children", sa.LargeBinary, nullable=True),
        sa.Column("name", sa.String(155), nullable=True),
        sa.Column("args", sa.LargeBinary, nullable=True),
        sa.Column("kwargs", sa.LargeBinary, nullable=True),
        sa.Column("worker", sa.String(155), nullable=True),
        sa.Column("retries", sa.Integer, nullable=True),
        sa.Column("queue", sa.String(155), nullable=True),
        sa.Column("stamps", sa.LargeBinary, nullable=True),
        schema=task_schema,
        sqlite_autoincrement=True,
    )
    group = sa.Table(
        names.get("group") or DEFAULT_GROUP_TABLE,
        metadata,
        sa.Column(
            "id",
            _ROW_ID,
            sa.Sequence(GROUP_ID_SEQUENCE, schema=group_schema),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("taskset_id", sa.String(155), unique=True),
        sa.Column("result", sa.LargeBinary, nullable=True),
        sa.Column("date_done", sa.DateTime, nullable=True, index=True),
        schema=group_schema,
        sqlite_autoincrement=True,
    )
    chord_keys = sa.Table(
        "kernel_chord_keys",
        metadata,
        sa.Column("key", sa.String(KEY_LENGTH), primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("expires_at", sa.Double, nullable=True, index=True),
        schema=task_schema,
    )
    chord_sets = sa.Table(
        "kernel_chord_sets",
        metadata,
        sa.Column("key", sa.String(KEY_LENGTH), primary_key=True),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=True, index=True),
        schema=task_schema,
    )
    chord_members = sa.Table(
        "kernel_chord_members",
        metadata,
        sa.Column("key", sa.String(KEY_LENGTH), primary_key=True),
        sa.Column("member", sa.String(155), primary_key=True),
        schema=task_schema,
    )
    return Tables(metadata, task, group, chord_keys, chord_sets, chord_members)


def missing_columns(connection: sa.Connection, table: sa.Table) -> list[sa.Column]:
    """Columns of ``table`` that the existing table in the database lacks."""
    existing = {
        column["name"]
        for column in sa.inspect(connection).get_columns(table.name, schema=table.schema)
    }
    return [column for column in table.columns if column.name not in existing]


def add_column_ddl(dialect: Any, table: sa.Table, column: sa.Column) -> str:
    """The ``ALTER TABLE ... ADD COLUMN`` statement of a nullable column."""
    preparer = dialect.identifier_preparer
    column_type = column.type.compile(dialect=dialect)
    return (
        f"ALTER TABLE {preparer.format_table(table)} "
        f"ADD COLUMN {preparer.format_column(column)} {column_type}"
    )


def add_column(connection: sa.Connection, table: sa.Table, column: sa.Column) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for a nullable column (extended results on a
    table created by Celery without them, as Celery itself migrates it)."""
    connection.exec_driver_sql(add_column_ddl(connection.dialect, table, column))
