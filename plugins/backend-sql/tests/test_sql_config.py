"""URLs and drivers, the plugin's registration, and the engine settings."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid

import pytest
import sqlalchemy as sa
from kernel_sql.urls import SCHEMES, sqlalchemy_url

from kernel import App, states
from kernel.exceptions import ConfigurationError
from kernel.plugins.manager import PluginManager


@pytest.mark.parametrize(
    ("url", "drivername"),
    [
        ("db+postgresql://u:p@db.example/results", "postgresql+psycopg"),
        ("db+postgresql+psycopg://u@db.example/results", "postgresql+psycopg"),
        ("db+mysql://u:p@db.example:3307/results", "mysql+pymysql"),
        ("db+mysql+pymysql://u@db.example/results", "mysql+pymysql"),
        ("db+mariadb://u@db.example/results", "mariadb+pymysql"),
        ("db+sqlite:////var/lib/results.db", "sqlite+pysqlite"),
        ("db+sqlite:///relative.db", "sqlite+pysqlite"),
    ],
)
def test_urls_get_a_maintained_driver_unless_they_name_one(url, drivername):
    parsed = sqlalchemy_url(url)
    assert parsed.drivername == drivername
    assert url.endswith(parsed.database)


def test_url_query_options_reach_the_driver():
    parsed = sqlalchemy_url(
        "db+postgresql://u@h/db?options=-csearch_path%3Dresults&sslmode=require"
    )
    assert dict(parsed.query) == {"options": "-csearch_path=results", "sslmode": "require"}


@pytest.mark.parametrize(
    ("url", "module", "hint"),
    [
        ("db+postgresql://user:secret@h/db", "psycopg", 'pip install "taskkernel[sql-postgresql]"'),
        ("db+mysql://user:secret@h/db", "pymysql", 'pip install "taskkernel[sql-mysql]"'),
    ],
)
def test_a_missing_driver_names_the_extra_to_install(monkeypatch, url, module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(ConfigurationError) as raised:
        sqlalchemy_url(url)
    assert hint in str(raised.value)
    assert "secret" not in str(raised.value)


def test_a_driver_the_plugin_does_not_ship_says_to_install_it():
    with pytest.raises(ConfigurationError, match="install the psycopg2 package"):
        sqlalchemy_url("db+postgresql+psycopg2://u@h/db")


@pytest.mark.parametrize("url", ["db+oracle://u@h/db", "postgresql://u@h/db", "db+://x"])
def test_urls_the_plugin_does_not_serve_are_refused_with_the_forms_it_takes(url):
    with pytest.raises(ConfigurationError, match="db\\+"):
        sqlalchemy_url(url)


def test_every_scheme_is_served_by_the_sql_plugin():
    manager = PluginManager().load()
    for scheme in SCHEMES:
        spec = manager.backend_for_url(f"{scheme}://user@host/db")
        assert spec.name == "sql"
        assert spec.features == {"cross_process", "chords"}


def test_loading_the_plugin_imports_neither_sqlalchemy_nor_a_driver():
    code = (
        "import sys\n"
        "from kernel.plugins.manager import PluginManager\n"
        "PluginManager().load()\n"
        "print(sorted(m for m in ('sqlalchemy', 'psycopg', 'pymysql') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "[]"


def test_engine_options_reach_sqlalchemy(postgres_run):
    options = {"pool_size": 3, "max_overflow": 1, "pool_pre_ping": True, "pool_timeout": 7}
    app = App(
        "sql-config", broker="memory://", backend=postgres_run.url, database_engine_options=options
    )
    try:
        engine = app.backend.database.engine
        assert engine.pool.size() == 3
        assert engine.pool._max_overflow == 1
        assert engine.pool._pre_ping is True
        assert engine.pool._timeout == 7
        assert engine.pool._recycle == 3600  # a default the options did not replace
    finally:
        app.close()


def test_unknown_engine_options_are_a_configuration_error(sqlite_run):
    app = App(
        "sql-config",
        broker="memory://",
        backend=sqlite_run.url,
        database_engine_options={"no_such_option": 1},
    )
    try:
        with pytest.raises(ConfigurationError, match="database_engine_options"):
            app.backend.get_task_meta(str(uuid.uuid4()))
    finally:
        app.close()


def test_short_lived_sessions_keep_no_connection_between_operations(postgres_run):
    name = f"kernel-short-{uuid.uuid4().hex[:8]}"
    url = f"{postgres_run.url}&application_name={name}"
    app = App("sql-config", broker="memory://", backend=url, database_short_lived_sessions=True)
    watcher = postgres_run.engine()
    count = sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name")
    try:
        backend = app.backend
        task_id = str(uuid.uuid4())
        backend.store_result(task_id, "short", states.SUCCESS)
        assert backend.get_task_meta(task_id)["result"] == "short"
        with watcher.connect() as connection:
            # A closed backend may take a moment to leave pg_stat_activity.
            for _ in range(50):
                if connection.execute(count, {"name": name}).scalar_one() == 0:
                    break
                time.sleep(0.05)
            assert connection.execute(count, {"name": name}).scalar_one() == 0
    finally:
        app.close()
        watcher.dispose()


def test_mariadb_sessions_read_committed(mariadb_run):
    """No gap locks on lookups of missing task ids: concurrent inserts don't deadlock."""
    app = App("sql-config", broker="memory://", backend=mariadb_run.url)
    try:
        with app.backend.database.engine.connect() as connection:
            level = connection.exec_driver_sql("SELECT @@tx_isolation").scalar_one()
    finally:
        app.close()
    assert level == "READ-COMMITTED"


def test_a_forked_child_uses_connections_of_its_own(postgres_run, caplog):
    """A prefork pool process must not share its parent's sockets."""
    import os

    app = App("sql-config", broker="memory://", backend=postgres_run.url)
    try:
        backend = app.backend
        parent_id = str(uuid.uuid4())
        backend.store_result(parent_id, "parent", states.SUCCESS)
        parent_engine = backend.database.engine
        backend_pid = sa.text("SELECT pg_backend_pid()")
        with parent_engine.connect() as connection:
            parent_server_pid = connection.execute(backend_pid).scalar_one()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: store through the inherited backend object
            status = 1
            try:
                child_id = str(uuid.uuid4())
                backend.store_result(child_id, "child", states.SUCCESS)
                fresh = backend.database.engine is not parent_engine
                with backend.database.engine.connect() as connection:
                    server_pid = connection.execute(backend_pid).scalar_one()
                os.write(write, f"{child_id} {fresh} {server_pid}".encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        _pid, status = os.waitpid(pid, 0)
        child_id, fresh, child_server_pid = os.read(read, 200).decode().split()
        os.close(read)
        assert status == 0
        assert fresh == "True"
        assert int(child_server_pid) != parent_server_pid  # a connection of its own
        assert backend.get_task_meta(child_id)["result"] == "child"
        # The parent's pooled connection still works after the child exited: the same
        # server process answers, no reconnection (and no retry) was needed.
        with caplog.at_level(logging.WARNING, logger="kernel_sql"):
            assert backend.get_task_meta(parent_id)["result"] == "parent"
            with parent_engine.connect() as connection:
                assert connection.execute(backend_pid).scalar_one() == parent_server_pid
        assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    finally:
        app.close()


def test_postgres_sessions_are_utc_and_a_non_utc_default_is_warned_about(postgres_run, caplog):
    """Kernel's sessions are UTC even where the database's default zone is another
    (here through the URL's options, as ``ALTER DATABASE ... SET timezone`` would
    do); prepare() warns once, since Celery's clients there would store local times."""
    from datetime import datetime

    url = f"{postgres_run.url}%20-ctimezone%3DAmerica/New_York"
    app = App("sql-config", broker="memory://", backend=url, result_expires=3600)
    try:
        backend = app.backend
        task_id = str(uuid.uuid4())
        with caplog.at_level(logging.WARNING, logger="kernel_sql"):
            backend.store_result(task_id, "utc", states.SUCCESS)
            backend.get_task_meta(task_id)
        warnings = [r.getMessage() for r in caplog.records if "time zone" in r.getMessage()]
        assert len(warnings) == 1
        assert "America/New_York" in warnings[0]
        assert "ALTER DATABASE" in warnings[0]
        with backend.database.engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW timezone").scalar_one() == "UTC"
            # The database's clock in naive UTC is what date_done is compared with.
            now = connection.execute(sa.text("SELECT timezone('UTC', now())")).scalar_one()
        done = datetime.fromisoformat(backend.get_task_meta(task_id)["date_done"])
        assert abs((done.replace(tzinfo=None) - now).total_seconds()) < 60
        backend.cleanup()
        assert backend.get_task_meta(task_id)["result"] == "utc"
    finally:
        app.close()


def test_a_child_forked_while_a_lock_is_held_makes_locks_of_its_own(sqlite_run):
    """Another thread held the backend's locks at the fork: the child, where that
    thread does not exist, must not wait for ever for them."""
    import os
    import signal

    app = App("sql-config", broker="memory://", backend=sqlite_run.url)
    backend = app.backend
    backend.database._lock.acquire()
    backend._prepare_lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                signal.alarm(10)  # a deadlock ends the child with SIGALRM
                backend.store_result(str(uuid.uuid4()), "child", states.SUCCESS)
                status = 0
            finally:
                os._exit(status)
        _pid, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        backend._prepare_lock.release()
        backend.database._lock.release()
        app.close()
