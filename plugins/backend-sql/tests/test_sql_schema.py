"""The tables: the same as real Celery's, created at first use, renamed and placed by
``database_table_names``/``database_table_schemas``, extended when asked."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from kernel_sql.schema import EXTENDED_COLUMNS
from sql_harness import Scratch, mariadb_database, postgres_schema, sqlite_scratch

from kernel import App, states
from kernel.task import Context
from kernel.testing.services import require_service

celery = pytest.importorskip("celery")

CELERY_TABLES = ("celery_taskmeta", "celery_tasksetmeta")


def new_id() -> str:
    return str(uuid.uuid4())


def make_app(url: str, **settings: Any) -> App:
    return App("sql-schema-test", broker="memory://", backend=url, **settings)


def celery_app(scratch: Scratch, **settings: Any) -> Any:
    """A real Celery app whose database backend uses ``scratch``."""
    from celery import Celery

    return Celery(
        "sql-schema-celery",
        broker="memory://",
        backend=f"db+{scratch.sqlalchemy_url}",
        **settings,
    )


def describe_table(inspector: Any, name: str, schema: str | None = None) -> dict[str, Any]:
    """What matters of a table to a program using it, comparable across two schemas."""
    columns = [
        (c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name, schema)
    ]
    pk = inspector.get_pk_constraint(name, schema)["constrained_columns"]
    uniques = sorted(
        tuple(u["column_names"]) for u in inspector.get_unique_constraints(name, schema)
    )
    indexes = sorted(
        (i["name"], tuple(i["column_names"]), bool(i["unique"]))
        for i in inspector.get_indexes(name, schema)
    )
    return {"columns": columns, "primary_key": pk, "unique": uniques, "indexes": indexes}


def describe_database(scratch: Scratch) -> dict[str, Any]:
    engine = scratch.engine()
    try:
        inspector = sa.inspect(engine)
        found = {name: describe_table(inspector, name) for name in CELERY_TABLES}
        if engine.dialect.supports_sequences:
            found["sequences"] = sorted(inspector.get_sequence_names())
        return found
    finally:
        engine.dispose()


@pytest.fixture
def second_db(fresh_db, tmp_path) -> Any:
    """Another empty location on the same database as ``fresh_db``."""
    if fresh_db.dialect == "sqlite":
        yield sqlite_scratch(tmp_path)
        return
    service = "postgres" if fresh_db.dialect == "postgresql" else "mariadb"
    host, port = require_service(service)
    make = postgres_schema if fresh_db.dialect == "postgresql" else mariadb_database
    with make(host, port) as scratch:
        yield scratch


def test_tables_are_the_ones_real_celery_creates(fresh_db, second_db):
    app = make_app(fresh_db.url)
    try:
        app.backend.store_result(new_id(), 1, states.SUCCESS)
    finally:
        app.close()
    celery_side = celery_app(second_db, result_extended=True)
    celery_side.backend.store_result(new_id(), 1, states.SUCCESS)

    ours, celerys = describe_database(fresh_db), describe_database(second_db)
    assert ours == celerys
    assert [name for name, _type, _null in ours["celery_taskmeta"]["columns"]] == [
        "id",
        "task_id",
        "status",
        "result",
        "date_done",
        "traceback",
        "children",
        *EXTENDED_COLUMNS,
        "stamps",
    ]


def test_tables_are_created_at_first_use_not_before(fresh_db):
    app = make_app(fresh_db.url)
    engine = fresh_db.engine()
    try:
        backend = app.backend
        assert not sa.inspect(engine).has_table("celery_taskmeta")
        assert backend.get_task_meta(new_id())["status"] == states.PENDING
        tables = set(sa.inspect(engine).get_table_names())
        assert {
            "celery_taskmeta",
            "celery_tasksetmeta",
            "kernel_chord_keys",
            "kernel_chord_sets",
            "kernel_chord_members",
        } <= tables
    finally:
        app.close()
        engine.dispose()


FIRST_USE = """
import sys, time, uuid
from kernel import App, states
from kernel_sql.backend import SQLBackend

races = []
is_race = SQLBackend._is_creation_race
def spy(self, exc):
    races.append(str(exc).splitlines()[0])
    return is_race(self, exc)
SQLBackend._is_creation_race = spy
app = App("sql-schema-test", broker="memory://", backend=sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
app.backend.store_result(str(uuid.uuid4()), "x", states.SUCCESS)
app.close()
print("races", len(races), races)
"""


def test_processes_starting_together_create_the_tables_once(fresh_db):
    """Four processes (as four workers would) create the tables at the same moment:
    the creation lock makes them take turns, so none meets another's CREATE."""
    import subprocess
    import sys
    import time

    start = time.time() + 3  # every process imported and waiting by then
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_USE, fresh_db.url, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert out.strip() == "races 0 []", out + err
    assert describe_database(fresh_db)["celery_taskmeta"]["primary_key"] == ["id"]


def test_table_names_and_schemas_come_from_the_settings(tmp_path):
    host, port = require_service("postgres")
    with postgres_schema(host, port) as tasks, postgres_schema(host, port) as groups:
        settings = {
            "database_table_names": {"task": "myapp_results", "group": "myapp_groups"},
            "database_table_schemas": {"task": tasks.name, "group": groups.name},
        }
        app = make_app(tasks.url, **settings)
        task_id, group_id = new_id(), new_id()
        try:
            app.backend.store_result(task_id, {"n": 1}, states.SUCCESS)
            from kernel.result import AsyncResult, GroupResult

            GroupResult(group_id, [AsyncResult(task_id, app)]).save(app.backend)
        finally:
            app.close()
        engine = tasks.engine()
        try:
            inspector = sa.inspect(engine)
            assert inspector.has_table("myapp_results", schema=tasks.name)
            assert inspector.has_table("myapp_groups", schema=groups.name)
            assert not inspector.has_table("celery_taskmeta", schema=tasks.name)
            assert inspector.has_table("kernel_chord_sets", schema=tasks.name)
            with engine.connect() as connection:
                status = connection.execute(
                    sa.text(f'SELECT status FROM "{tasks.name}".myapp_results WHERE task_id = :i'),
                    {"i": task_id},
                ).scalar_one()
            assert status == states.SUCCESS
        finally:
            engine.dispose()
        # Celery, configured the same way, reads both.
        other = celery_app(tasks, **settings)
        assert other.AsyncResult(task_id).result == {"n": 1}
        restored = other.GroupResult.restore(group_id)
        assert [r.id for r in restored.results] == [task_id]


def test_table_names_apply_on_every_database(fresh_db):
    settings = {"database_table_names": {"task": "run_results", "group": "run_groups"}}
    app = make_app(fresh_db.url, **settings)
    task_id = new_id()
    try:
        app.backend.store_result(task_id, 7, states.SUCCESS)
        assert app.backend.get_task_meta(task_id)["result"] == 7
    finally:
        app.close()
    engine = fresh_db.engine()
    try:
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"run_results", "run_groups"} <= tables
    assert not tables & set(CELERY_TABLES)


def test_unknown_table_key_is_refused():
    from kernel.exceptions import ConfigurationError

    app = make_app("db+sqlite:///:memory:", database_table_names={"tasks": "x"})
    with pytest.raises(ConfigurationError, match="'task' and 'group'"):
        _ = app.backend


def test_missing_schema_is_a_configuration_error_naming_it(postgres_run):
    from kernel.exceptions import ConfigurationError

    app = make_app(postgres_run.url, database_table_schemas={"task": "no_such_schema_here"})
    try:
        with pytest.raises(ConfigurationError, match="schema must exist") as raised:
            app.backend.store_result(new_id(), 1, states.SUCCESS)
        assert "no_such_schema_here" in str(raised.value)
    finally:
        app.close()


def create_old_celery_table(engine: Any) -> None:
    """``celery_taskmeta`` as Celery versions before extended results made it."""
    metadata = sa.MetaData()
    sa.Table(
        "celery_taskmeta",
        metadata,
        sa.Column("id", sa.Integer, sa.Sequence("task_id_sequence"), primary_key=True),
        sa.Column("task_id", sa.String(155), unique=True),
        sa.Column("status", sa.String(50)),
        sa.Column("result", sa.LargeBinary),
        sa.Column("date_done", sa.DateTime),
        sa.Column("traceback", sa.Text),
        sa.Column("children", sa.LargeBinary),
        sqlite_autoincrement=True,
    )
    metadata.create_all(engine)


def test_extended_columns_are_added_to_an_older_table_without_them(fresh_db):
    engine = fresh_db.engine()
    try:
        create_old_celery_table(engine)
        before = {c["name"] for c in sa.inspect(engine).get_columns("celery_taskmeta")}
        assert not before & set(EXTENDED_COLUMNS)

        plain = make_app(fresh_db.url)  # result_extended off: the table is left alone
        try:
            plain_id = new_id()
            plain.backend.store_result(plain_id, 2, states.SUCCESS)
            assert plain.backend.get_task_meta(plain_id)["result"] == 2
        finally:
            plain.close()
        columns = {c["name"] for c in sa.inspect(engine).get_columns("celery_taskmeta")}
        assert columns == before

        app = make_app(fresh_db.url, result_extended=True)
        task_id = new_id()
        request = Context(id=task_id, task="proj.add", args=(1, 2), hostname="w1@host")
        try:
            app.backend.store_result(task_id, 3, states.SUCCESS, request=request)
            meta = app.backend.get_task_meta(task_id)
        finally:
            app.close()
        columns = {c["name"] for c in sa.inspect(engine).get_columns("celery_taskmeta")}
        assert set(EXTENDED_COLUMNS) <= columns
        assert (meta["name"], meta["args"], meta["worker"]) == ("proj.add", [1, 2], "w1@host")
    finally:
        engine.dispose()


def test_extended_columns_a_user_may_not_add_are_a_configuration_error_with_the_ddl(
    postgres_run,
):
    import psycopg
    from sql_harness import POSTGRES_DATABASE, POSTGRES_USER, postgres_url

    from kernel.exceptions import ConfigurationError

    host, port = require_service("postgres")
    role = f"kernel_dml_{uuid.uuid4().hex[:8]}"
    admin = dict(host=host, port=port, user=POSTGRES_USER, dbname=POSTGRES_DATABASE)
    with postgres_schema(host, port) as scratch:
        engine = scratch.engine()
        try:
            create_old_celery_table(engine)
            plain = make_app(scratch.url)  # creates the other tables
            plain.backend.get_task_meta(new_id())
            plain.close()
        finally:
            engine.dispose()
        with psycopg.connect(**admin, autocommit=True) as connection:
            connection.execute(f'CREATE ROLE "{role}" LOGIN')
            connection.execute(f'GRANT USAGE ON SCHEMA "{scratch.name}" TO "{role}"')
            connection.execute(
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{scratch.name}" '
                f'TO "{role}"'
            )
            connection.execute(
                f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA "{scratch.name}" TO "{role}"'
            )
        url = postgres_url(host, port, scratch.name).replace(f"{POSTGRES_USER}@", f"{role}@")
        app = make_app(url, result_extended=True, database_retry_timeout=2)
        try:
            with pytest.raises(ConfigurationError) as raised:
                app.backend.store_result(new_id(), 1, states.SUCCESS)
            message = str(raised.value)
            assert "result_extended" in message
            assert "name, args, kwargs, worker, retries, queue" in message
            assert 'ADD COLUMN "name" VARCHAR(155)' in message or "ADD COLUMN name" in message
            assert "result_extended = False" in message
        finally:
            app.close()
            with psycopg.connect(**admin, autocommit=True) as connection:
                connection.execute(f'DROP OWNED BY "{role}"')
                connection.execute(f'DROP ROLE "{role}"')


def test_a_table_creation_lock_not_obtained_is_an_error_not_ignored(monkeypatch):
    import pymysql
    from kernel_sql import backend as backend_module
    from sql_harness import MARIADB_PASSWORD, MARIADB_USER

    host, port = require_service("mariadb")
    monkeypatch.setattr(backend_module, "SCHEMA_LOCK_TIMEOUT", 1)
    holder = pymysql.connect(host=host, port=port, user=MARIADB_USER, password=MARIADB_PASSWORD)
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT GET_LOCK(%s, 5)", (backend_module.SCHEMA_LOCK_NAME,))
        with mariadb_database(host, port) as scratch:
            app = make_app(scratch.url)
            try:
                with pytest.raises(backend_module.SchemaLockTimeout, match="GET_LOCK returned 0"):
                    app.backend.store_result(new_id(), 1, states.SUCCESS)
                engine = scratch.engine()
                try:  # nothing was created without the lock
                    assert sa.inspect(engine).get_table_names() == []
                finally:
                    engine.dispose()
            finally:
                app.close()
    finally:
        holder.close()
