"""The SQL result backend: Celery's tables, on PostgreSQL, MySQL/MariaDB or SQLite.

Results are rows of Celery's ``celery_taskmeta`` and saved groups rows of
``celery_tasksetmeta`` (see :mod:`kernel_sql.schema`), written and read as Celery's
database backend does, so Celery and kernel processes sharing a database read each
other's results. The tables are created on first use.

Chords use kernel's algorithm of :class:`~kernel.backends.base.KeyValueBackend`
over two atomic primitives, implemented here in SQL:

- ``add_to_set``: the finished header tasks of a chord are rows of
  ``kernel_chord_members``; each report locks the chord's row of
  ``kernel_chord_sets`` (``SELECT ... FOR UPDATE``, created on first use), adds its
  member if absent and writes the new size, in one transaction. Reports of one
  chord therefore take turns, and exactly one of them sees the set complete;
- ``set_if_absent``: the claim to send the body is a row of ``kernel_chord_keys``
  inserted if absent (the primary key decides between simultaneous claims).

Results expire after ``result_expires``: reads ignore older rows, and
:meth:`SQLBackend.cleanup` (``kernel cleanup``, the ``celery.backend_cleanup``
task) deletes them, in batches of short transactions.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa

from kernel import states
from kernel.backends import document
from kernel.backends.base import KeyValueBackend, extended_fields
from kernel.exceptions import ConfigurationError, KernelError
from kernel.result import GroupResult, result_from_tuple
from kernel_sql import codec as codecs
from kernel_sql import errors, schema, statements, urls
from kernel_sql.database import Database, new_locks_in_forked_children

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Ids per ``SELECT ... IN`` and rows per cleanup transaction.
BATCH_SIZE = 500

#: The PostgreSQL advisory lock (and MySQL named lock) held while creating tables, so
#: processes starting together do not race each other's ``CREATE TABLE``.
SCHEMA_LOCK_ID = 7_305_462_291_130_001
SCHEMA_LOCK_NAME = "kernel_sql.create_tables"
SCHEMA_LOCK_TIMEOUT = 60

#: Errors meaning "that table does not exist" (dropped behind our back): PostgreSQL's
#: SQLSTATE, MySQL's code, SQLite's message.
MISSING_TABLE_CODES = ("42P01", 1146)

#: Errors of a ``CREATE`` that lost a race with another creator: PostgreSQL's duplicate
#: table, duplicate object (a sequence) and unique violation (its catalog), MySQL's
#: "table exists".
CREATION_RACE_CODES = ("42P07", "42710", "23505", 1050)

#: Errors of a statement the user lacks the privilege for: PostgreSQL's insufficient
#: privilege (42501, also "must be owner"), MySQL's command denied.
PRIVILEGE_CODES = ("42501", 1142, 1044)


class SchemaLockTimeout(KernelError, TimeoutError):
    """Another process held the table-creation lock for too long."""


def _is_privilege_error(exc: BaseException) -> bool:
    return errors.error_code(exc) in PRIVILEGE_CODES


#: PostgreSQL's names of UTC.
UTC_ZONES = frozenset({"UTC", "Etc/UTC", "GMT", "Etc/GMT", "UCT", "Etc/UCT", "Universal", "Zulu"})


class SQLBackend(KeyValueBackend):
    """Results in a SQL database through SQLAlchemy (``db+postgresql://``,
    ``db+mysql://``, ``db+sqlite:///``; see ``docs/sql.md``)."""

    #: Seconds between reads while ``wait_for`` polls without an interval given.
    default_interval = 0.1

    def __init__(self, app: Any, url: str) -> None:
        super().__init__(app, url)
        conf = app.conf
        self.safe_url = urls.safe(url)
        self.tables = schema.build(conf.database_table_names, conf.database_table_schemas)
        self.database = Database(
            urls.sqlalchemy_url(url),
            self.safe_url,
            engine_options=conf.database_engine_options,
            short_lived=conf.database_short_lived_sessions,
            retry_timeout=conf.database_retry_timeout,
        )
        self.dialect = self.database.dialect
        self.codec = codecs.Codec(app)
        #: MySQL's DATETIME keeps whole seconds: stored times are truncated, and the
        #: expiry of a row counted from the second after it.
        self.whole_seconds = self.dialect in ("mysql", "mariadb")
        self._task_columns: frozenset[str] | None = None
        self._prepare_lock = threading.Lock()
        new_locks_in_forked_children(self)

    def _new_locks(self) -> None:
        self._prepare_lock = threading.Lock()

    @property
    def extended(self) -> bool:
        return bool(self.app.conf.result_extended)

    # -- tables and transactions -------------------------------------------------------

    def _run(
        self,
        what: str,
        work: Callable[[sa.Connection], T],
        *,
        write: bool = True,
        single: bool = False,
    ) -> T:
        """``work`` in one retried transaction, once the tables exist (``single``: it
        is one statement; see :meth:`Database.run`)."""
        self.prepare()
        try:
            return self.database.run(what, work, write=write, single=single)
        except sa.exc.DBAPIError as exc:
            if not self._is_missing_table(exc):
                raise
        # A table was dropped since this process created it: create it again, once.
        self._task_columns = None
        self.prepare()
        return self.database.run(what, work, write=write, single=single)

    def _is_missing_table(self, exc: BaseException) -> bool:
        from kernel_sql.errors import error_code

        if self.dialect == "sqlite":
            return "no such table" in str(getattr(exc, "orig", exc)).lower()
        return error_code(exc) in MISSING_TABLE_CODES

    def _is_creation_race(self, exc: BaseException) -> bool:
        from kernel_sql.errors import error_code

        return error_code(exc) in CREATION_RACE_CODES or "already exists" in str(exc).lower()

    def prepare(self) -> None:
        """Create the tables that do not exist yet (once per backend), and, with
        ``result_extended``, add the extended columns to a task table without them."""
        if self._task_columns is not None:
            return
        with self._prepare_lock:
            attempt = 0
            while self._task_columns is None:
                attempt += 1
                try:
                    self._task_columns = self.database.run(
                        "create the result tables", self._create_tables
                    )
                except sa.exc.DBAPIError as exc:
                    # Someone not taking our lock (Celery, say) created a table between
                    # our check and our CREATE: check again, now it exists.
                    if attempt >= 3 or not self._is_creation_race(exc):
                        raise

    def _warn_about_time_zone(self, connection: sa.Connection) -> None:
        """Warn when PostgreSQL sessions default to a zone other than UTC: kernel pins
        its own sessions to UTC, but Celery's clients there store local times."""
        zone = connection.execute(
            sa.text("SELECT reset_val FROM pg_settings WHERE name = 'TimeZone'")
        ).scalar()
        if zone and zone not in UTC_ZONES:
            log.warning(
                "SQL result backend %s: the database's sessions default to the time zone "
                "%r, not UTC. Kernel stores date_done in UTC, but Celery processes using "
                "this database store local times, which kernel then reads as older or "
                "newer than they are (results expiring early, or late). Have an "
                "administrator run: ALTER DATABASE <name> SET timezone = 'UTC'",
                self.safe_url,
                zone,
            )

    def _create_tables(self, connection: sa.Connection) -> frozenset[str]:
        if self.dialect == "postgresql":
            self._warn_about_time_zone(connection)
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": SCHEMA_LOCK_ID})
        elif self.dialect in ("mysql", "mariadb"):
            got = connection.execute(
                sa.text("SELECT GET_LOCK(:name, :timeout)"),
                {"name": SCHEMA_LOCK_NAME, "timeout": SCHEMA_LOCK_TIMEOUT},
            ).scalar()
            if got != 1:  # 0: timed out; NULL: an error (killed, out of memory)
                raise SchemaLockTimeout(
                    f"could not create the result tables: the SQL result backend "
                    f"{self.safe_url!r} did not get the lock {SCHEMA_LOCK_NAME!r} within "
                    f"{SCHEMA_LOCK_TIMEOUT}s (GET_LOCK returned {got!r}); another process "
                    "holds it, creating the tables"
                )
        failed = True
        try:
            self.tables.metadata.create_all(connection, checkfirst=True)
            task = self.tables.task
            missing = schema.missing_columns(connection, task)
            if missing and self.extended:
                self._add_columns(connection, task, missing)
                missing = []
            absent = {column.name for column in missing}
            columns = frozenset(c.name for c in task.columns if c.name not in absent)
            failed = False
            return columns
        finally:
            if self.dialect in ("mysql", "mariadb"):
                try:
                    connection.execute(
                        sa.text("SELECT RELEASE_LOCK(:name)"), {"name": SCHEMA_LOCK_NAME}
                    )
                except sa.exc.DBAPIError:
                    # The connection broke: the server released the lock with it. Raise
                    # this only when nothing else is on its way out.
                    if not failed:
                        raise

    def _add_columns(
        self, connection: sa.Connection, task: sa.Table, missing: list[sa.Column]
    ) -> None:
        """Add the extended columns; a user without the ALTER privilege is told which
        columns are missing and what an administrator should run."""
        for column in missing:
            try:
                schema.add_column(connection, task, column)
            except sa.exc.DBAPIError as exc:
                if errors.is_transient(exc, self.dialect) or not _is_privilege_error(exc):
                    raise
                raise ConfigurationError(
                    f"result_extended needs the column(s) "
                    f"{', '.join(c.name for c in missing)} of the table {task.fullname!r}, "
                    f"which it lacks, and the database user of {self.safe_url!r} may not "
                    f"add them ({errors.describe(exc)}); have an administrator run: "
                    + "; ".join(schema.add_column_ddl(connection.dialect, task, c) for c in missing)
                    + " (or set result_extended = False)"
                ) from exc

    def close(self) -> None:
        self.database.dispose()

    # -- time ----------------------------------------------------------------------------

    def _column_now(self) -> datetime:
        return codecs.to_column_time(codecs.utc_now(), whole_seconds=self.whole_seconds)

    def _expiry_seconds(self) -> float | None:
        """Seconds after which results expire; None when they never do (a
        ``result_expires`` of None, zero or less, as in kernel's other backends)."""
        expires = self.expires
        if expires is None or expires <= 0:
            return None
        return float(expires)

    def _expiry_cutoff(self) -> Any:
        """SQL for the ``date_done`` before which rows have expired, on the database's
        clock (None: nothing expires)."""
        seconds = self._expiry_seconds()
        if seconds is None:
            return None
        return statements.expiry_cutoff_now(self.dialect, seconds)

    def _with_expired(self, query: sa.Select, date_done: sa.Column) -> sa.Select:
        """``query`` with a column ``kernel_expired`` that is true for expired rows."""
        cutoff = self._expiry_cutoff()
        if cutoff is None:
            return query.add_columns(sa.false().label("kernel_expired"))
        return query.add_columns((date_done < cutoff).label("kernel_expired"))

    # -- results -------------------------------------------------------------------------

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
    ) -> dict:
        """Write the task's row (an existing one is updated in place, unless it holds
        SUCCESS already: a task run twice keeps its first stored result, as in Celery).

        A result the database refuses for good (too large for its column) is replaced
        by a FAILURE saying why and what to change, rather than raised: raised, the
        worker would requeue the task and run it again, to meet the same refusal.
        """
        try:
            return self._store_result(task_id, result, state, traceback, request)
        except sa.exc.DataError as exc:
            if isinstance(result, errors.ResultNotStored):
                raise
            table = self.tables.task
            name = table.name if table.schema is None else f"{table.schema}.{table.name}"
            message = (
                f"the {state} result of task {task_id} was not stored: the database of "
                f"the SQL result backend {self.safe_url!r} refused it "
                f"({errors.describe(exc)}); "
                f"{errors.data_error_advice(exc, self.dialect, name)}"
            )
            log.error("%s", message)
            return self._store_result(
                task_id, errors.ResultNotStored(message), states.FAILURE, None, request
            )

    def _store_result(
        self, task_id: str, result: Any, state: str, traceback: str | None, request: Any
    ) -> dict:
        self.prepare()
        children = list(getattr(request, "children", None) or [])
        meta = document.build(task_id, state, self.prepare_value(result), traceback, children)
        date_done = self._column_now() if meta["date_done"] else None
        values = codecs.row_from_document(self.codec, meta, date_done)
        meta["date_done"] = codecs.from_column_time(date_done)
        fields = extended_fields(request) if self.extended else None
        if fields:
            columns = codecs.extended_columns(self.codec, fields)
            for name, value in columns.items():  # name, worker, queue: cut to fit
                length = getattr(self.tables.task.c[name].type, "length", None)
                if length and isinstance(value, str) and len(value) > length:
                    columns[name] = value[:length]
            values.update(columns)
            meta.update(fields)
        columns = self._task_columns or frozenset()
        values = {name: value for name, value in values.items() if name in columns}
        table = self.tables.task
        self._run(
            "store a result",
            lambda connection: statements.store_task(
                connection, table, task_id, values, self._expiry_seconds()
            ),
            single=self.dialect == "postgresql",
        )
        return meta

    def _task_select(self) -> sa.Select:
        """The columns a document is made of (those the table has)."""
        table = self.tables.task
        wanted = {"task_id", *schema.BASE_COLUMNS}
        if self.extended:
            wanted.update(schema.EXTENDED_COLUMNS)
        present = self._task_columns or frozenset(wanted)
        query = sa.select(*(c for c in table.columns if c.name in wanted and c.name in present))
        return self._with_expired(query, table.c.date_done)

    def get_task_meta(self, task_id: str) -> dict:
        self.prepare()
        table = self.tables.task
        query = self._task_select().where(table.c.task_id == task_id)
        row = self._run(
            "read a result",
            lambda connection: connection.execute(query).first(),
            write=False,
            single=True,
        )
        if row is None or row.kernel_expired:
            return document.pending(task_id)
        return codecs.document_from_row(self.codec, row, self.extended)

    def get_task_metas(self, task_ids: Sequence[str]) -> list[dict]:
        """The documents of many tasks, :data:`BATCH_SIZE` ids per query."""
        self.prepare()
        table = self.tables.task
        select = self._task_select()
        found: dict[str, Any] = {}
        wanted = list(dict.fromkeys(task_ids))
        for start in range(0, len(wanted), BATCH_SIZE):
            batch = wanted[start : start + BATCH_SIZE]
            query = select.where(table.c.task_id.in_(batch))
            rows = self._run(
                "read results",
                lambda connection, query=query: connection.execute(query).all(),
                write=False,
                single=True,
            )
            found.update((row.task_id, row) for row in rows)
        metas = []
        for task_id in task_ids:
            row = found.get(task_id)
            if row is None or row.kernel_expired:
                metas.append(document.pending(task_id))
            else:
                metas.append(codecs.document_from_row(self.codec, row, self.extended))
        return metas

    def forget(self, task_id: str) -> None:
        table = self.tables.task
        self._run(
            "forget a result",
            lambda connection: connection.execute(
                sa.delete(table).where(table.c.task_id == task_id)
            ),
            single=True,
        )

    # -- groups --------------------------------------------------------------------------

    def save_group(self, group_id: str, group_result: GroupResult) -> GroupResult:
        """A row of the group table holding the group's result tuple, as Celery saves
        it; it expires after ``result_expires`` like a task's result."""
        values = {
            "result": self.codec.dumps(group_result.as_tuple()),
            "date_done": self._column_now(),
        }
        table = self.tables.group
        self._run(
            "save a group",
            lambda connection: statements.save_group(connection, table, group_id, values),
        )
        return group_result

    def restore_group(self, group_id: str) -> GroupResult | None:
        table = self.tables.group
        query = self._with_expired(sa.select(table.c.result), table.c.date_done).where(
            table.c.taskset_id == group_id
        )
        row = self._run(
            "read a group",
            lambda connection: connection.execute(query).first(),
            write=False,
            single=True,
        )
        if row is None or row.kernel_expired:
            return None
        value = self.codec.loads(row.result)
        if value is None:
            return None
        restored = result_from_tuple(value, self.app)
        if not isinstance(restored, GroupResult):
            restored = GroupResult(restored.id, [restored], app=self.app)
        restored._backend = self
        return restored

    def delete_group(self, group_id: str) -> None:
        table = self.tables.group
        self._run(
            "delete a group",
            lambda connection: connection.execute(
                sa.delete(table).where(table.c.taskset_id == group_id)
            ),
            single=True,
        )

    # -- key-value primitives (chord bookkeeping only) -------------------------------------

    @staticmethod
    def _bytes(value: bytes | str) -> bytes:
        return value.encode("utf-8") if isinstance(value, str) else bytes(value)

    def _now(self) -> Any:
        """SQL for the database's clock as a Unix time, so the expiries of chord rows
        written and compared by different hosts agree even if their clocks do not
        (SQLite is one host: its clock is ours)."""
        if self.dialect == "postgresql":
            return sa.cast(sa.extract("epoch", sa.func.clock_timestamp()), sa.Double)
        if self.dialect in ("mysql", "mariadb"):
            return sa.func.unix_timestamp(sa.func.now(6))
        return sa.literal(time.time(), sa.Double)

    def _expires_at(self, expires: float | None) -> Any:
        """SQL for the expiry of a chord row written now (None: never expires)."""
        return self._now() + float(expires) if expires else None

    def get(self, key: str) -> bytes | None:
        table = self.tables.chord_keys
        now = self._now()
        query = sa.select(table.c.value).where(
            table.c.key == key, sa.or_(table.c.expires_at.is_(None), table.c.expires_at > now)
        )
        value = self._run(
            "read a chord key",
            lambda connection: connection.execute(query).scalar_one_or_none(),
            write=False,
            single=True,
        )
        return None if value is None else bytes(value)

    def set(self, key: str, value: bytes | str, expires: float | None) -> None:
        table = self.tables.chord_keys
        values = {
            "value": self._bytes(value),
            "owner": None,
            "expires_at": self._expires_at(expires),
        }
        self._run(
            "write a chord key",
            lambda connection: statements.put_key(connection, table, key, values),
            single=True,
        )

    def delete(self, key: str) -> None:
        table = self.tables.chord_keys
        self._run(
            "delete a chord key",
            lambda connection: connection.execute(sa.delete(table).where(table.c.key == key)),
            single=True,
        )

    def set_if_absent(self, key: str, value: bytes | str, expires: float | None) -> bool:
        """Insert the key's row unless an unexpired one exists; True if this call did.

        The row carries a token of this call: if the commit succeeded but its reply
        was lost, the retried transaction finds its own token and still answers True.
        """
        table = self.tables.chord_keys
        token = uuid.uuid4().hex
        data = self._bytes(value)

        def claim(connection: sa.Connection) -> bool:
            now = self._now()
            connection.execute(
                sa.delete(table).where(
                    table.c.key == key, table.c.expires_at.is_not(None), table.c.expires_at <= now
                )
            )
            row = {
                "key": key,
                "value": data,
                "owner": token,
                "expires_at": self._expires_at(expires),
            }
            statements.insert_if_absent(connection, table, row)
            owner = connection.execute(
                sa.select(table.c.owner).where(table.c.key == key).with_for_update()
            ).scalar_one_or_none()
            return owner == token

        return self._run("claim a chord", claim)

    def add_to_set(self, key: str, member: str, expires: float | None) -> int:
        """Add ``member`` to the set ``key`` and return its size, atomically.

        The set's row in ``kernel_chord_sets`` is created if needed and locked before
        anything else, so concurrent additions to one set run one after the other,
        each seeing the size the previous one committed.
        """
        sets, members = self.tables.chord_sets, self.tables.chord_members

        def add(connection: sa.Connection) -> int:
            expired = sa.and_(sets.c.expires_at.is_not(None), sets.c.expires_at <= self._now())
            locked = sa.select(sets.c.size, expired.label("expired")).where(sets.c.key == key)
            while True:
                statements.insert_if_absent(
                    connection, sets, {"key": key, "size": 0, "expires_at": None}
                )
                row = connection.execute(locked.with_for_update()).first()
                if row is not None:
                    break
                # PostgreSQL: the set was deleted (its chord fired) between our insert,
                # which found it, and our lock: insert it again, and lock that.
            size, is_expired = row
            if is_expired:  # an expired set starts over
                connection.execute(sa.delete(members).where(members.c.key == key))
                size = 0
            present = connection.execute(
                sa.select(members.c.member).where(members.c.key == key, members.c.member == member)
            ).first()
            if present is None:
                connection.execute(sa.insert(members).values(key=key, member=member))
                size += 1
            connection.execute(
                sa.update(sets)
                .where(sets.c.key == key)
                .values(size=size, expires_at=self._expires_at(expires))
            )
            return int(size)

        return self._run("count a chord part", add)

    def delete_set(self, key: str) -> None:
        sets, members = self.tables.chord_sets, self.tables.chord_members

        def remove(connection: sa.Connection) -> None:
            connection.execute(sa.select(sets.c.key).where(sets.c.key == key).with_for_update())
            connection.execute(sa.delete(members).where(members.c.key == key))
            connection.execute(sa.delete(sets).where(sets.c.key == key))

        self._run("delete a chord's parts", remove)

    # -- expiry --------------------------------------------------------------------------

    def cleanup(self) -> int:
        """Delete results and groups older than ``result_expires`` (by ``date_done``,
        as Celery's cleanup does), and expired chord bookkeeping; return how many rows
        of the task and group tables went.

        Rows are deleted :data:`BATCH_SIZE` at a time, each batch its own short
        transaction, so a large backlog never holds locks for long.
        """
        removed = 0
        cutoff = self._expiry_cutoff()
        if cutoff is not None:
            task, group = self.tables.task, self.tables.group
            removed += self._delete_in_batches(task, task.c.id, task.c.date_done < cutoff)
            removed += self._delete_in_batches(group, group.c.id, group.c.date_done < cutoff)
        now = self._now()
        keys = self.tables.chord_keys
        self._delete_in_batches(keys, keys.c.key, keys.c.expires_at <= now)
        self._delete_expired_sets(now)
        return removed

    def _delete_in_batches(self, table: sa.Table, key: sa.Column, condition: Any) -> int:
        removed = 0
        while True:
            query = sa.select(key).where(condition).order_by(key).limit(BATCH_SIZE)

            def delete_batch(
                connection: sa.Connection, query: sa.Select = query
            ) -> tuple[int, int]:
                ids = connection.execute(query).scalars().all()
                if not ids:
                    return 0, 0
                deleted = connection.execute(sa.delete(table).where(key.in_(ids), condition))
                return len(ids), deleted.rowcount

            selected, deleted = self._run(f"delete expired rows of {table.name}", delete_batch)
            removed += deleted
            if selected < BATCH_SIZE:  # the last batch (rowcount may be less: raced)
                return removed

    def _delete_expired_sets(self, now: Any) -> None:
        sets, members = self.tables.chord_sets, self.tables.chord_members
        expired = sa.and_(sets.c.expires_at.is_not(None), sets.c.expires_at <= now)

        def delete_batch(connection: sa.Connection) -> int:
            keys = (
                connection.execute(
                    sa.select(sets.c.key)
                    .where(expired)
                    .order_by(sets.c.key)
                    .limit(BATCH_SIZE)
                    .with_for_update()
                )
                .scalars()
                .all()
            )
            if keys:
                connection.execute(sa.delete(members).where(members.c.key.in_(keys)))
                connection.execute(sa.delete(sets).where(sets.c.key.in_(keys)))
            return len(keys)

        while self._run("delete expired chord sets", delete_batch) == BATCH_SIZE:
            pass
