"""Result expiry: ``cleanup()`` deletes what ``result_expires`` allows, ``kernel
cleanup`` and the ``celery.backend_cleanup`` task run it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sql_harness import sqlite_scratch

from kernel import App, states
from kernel.result import AsyncResult, GroupResult

HOUR = 3600.0


def new_id() -> str:
    return str(uuid.uuid4())


def backdate(backend, table: sa.Table, key: sa.Column, ids: list[str], hours: float) -> None:
    """Move ``date_done`` of rows ``hours`` into the past, as if they were old."""
    moment = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    with backend.database.engine.begin() as connection:
        connection.execute(
            sa.update(table).where(key.in_(ids)).values(date_done=moment - timedelta(hours=hours))
        )


def count(backend, table: sa.Table) -> int:
    with backend.database.engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def test_cleanup_deletes_expired_results_groups_and_chord_rows_only(fresh_db):
    app = App("sql-cleanup", broker="memory://", backend=fresh_db.url, result_expires=HOUR)
    try:
        backend = app.backend
        task, group = backend.tables.task, backend.tables.group
        old, fresh = [new_id(), new_id()], new_id()
        running = new_id()
        for task_id in [*old, fresh]:
            backend.store_result(task_id, task_id, states.SUCCESS)
        backend.mark_as_started(running, {"hostname": "w1"})  # no date_done: never expires
        old_group, fresh_group = new_id(), new_id()
        for group_id in (old_group, fresh_group):
            GroupResult(group_id, [AsyncResult(fresh, app)]).save(backend)
        backend.set("kernel-chord-claim-x", "done", -1)  # expired a second ago
        backend.set("kernel-chord-size-y", "3", HOUR)
        backend.add_to_set("kernel-chord-parts-x", "a", -1)
        backend.add_to_set("kernel-chord-parts-y", "a", HOUR)
        backdate(backend, task, task.c.task_id, old, hours=2)
        backdate(backend, group, group.c.taskset_id, [old_group], hours=2)
        # Expired rows already read as gone, before any cleanup.
        assert {backend.get_task_meta(i)["status"] for i in old} == {states.PENDING}
        assert backend.restore_group(old_group) is None

        assert backend.cleanup() == 3  # two results and a group

        assert count(backend, task) == 2
        assert backend.get_task_meta(fresh)["result"] == fresh
        assert backend.get_task_meta(running)["status"] == states.STARTED
        assert count(backend, group) == 1
        assert backend.restore_group(fresh_group) is not None
        assert backend.get("kernel-chord-claim-x") is None
        assert backend.get("kernel-chord-size-y") == b"3"
        assert count(backend, backend.tables.chord_keys) == 1
        assert count(backend, backend.tables.chord_sets) == 1
        assert count(backend, backend.tables.chord_members) == 1
        assert backend.cleanup() == 0
    finally:
        app.close()


def test_cleanup_deletes_in_batches(sqlite_run, monkeypatch):
    from kernel_sql import backend as backend_module

    monkeypatch.setattr(backend_module, "BATCH_SIZE", 7)
    app = App("sql-cleanup", broker="memory://", backend=sqlite_run.url, result_expires=HOUR)
    try:
        backend = app.backend
        ids = [new_id() for _ in range(30)]
        for task_id in ids:
            backend.store_result(task_id, 1, states.SUCCESS)
        backdate(backend, backend.tables.task, backend.tables.task.c.task_id, ids, hours=2)
        assert backend.cleanup() == 30
        assert {m["status"] for m in backend.get_task_metas(ids)} == {states.PENDING}
    finally:
        app.close()


def test_nothing_expires_when_result_expires_is_none(tmp_path):
    url = sqlite_scratch(tmp_path).url
    app = App("sql-cleanup", broker="memory://", backend=url, result_expires=None)
    try:
        backend = app.backend
        task_id = new_id()
        backend.store_result(task_id, "kept", states.SUCCESS)
        backdate(backend, backend.tables.task, backend.tables.task.c.task_id, [task_id], 10_000)
        assert backend.get_task_meta(task_id)["result"] == "kept"
        assert backend.cleanup() == 0
        assert backend.get_task_meta(task_id)["result"] == "kept"
    finally:
        app.close()


def test_kernel_cleanup_command_deletes_expired_results(tmp_path: Path, fresh_db):
    db = fresh_db
    (tmp_path / "cleanup_proj.py").write_text(
        textwrap.dedent(
            f"""
            from kernel import App

            app = App("cleanup_proj", broker="memory://", backend={db.url!r},
                      result_expires=3600)
            """
        )
    )
    app = App("sql-cleanup", broker="memory://", backend=db.url, result_expires=HOUR)
    try:
        backend = app.backend
        old, fresh = new_id(), new_id()
        backend.store_result(old, 1, states.SUCCESS)
        backend.store_result(fresh, 2, states.SUCCESS)
        backdate(backend, backend.tables.task, backend.tables.task.c.task_id, [old], hours=2)

        command = subprocess.run(
            [sys.executable, "-m", "kernel", "-A", "cleanup_proj", "cleanup"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert command.returncode == 0, command.stderr
        assert "deleted 1 expired result(s) (older than 3600s)" in command.stdout
        with backend.database.engine.connect() as connection:
            task = backend.tables.task
            left = connection.execute(
                sa.select(task.c.task_id).where(task.c.task_id.in_([old, fresh]))
            ).scalars()
            assert list(left) == [fresh]
    finally:
        app.close()


def test_backend_cleanup_task_deletes_expired_results(sqlite_run):
    """``celery.backend_cleanup``, Celery's name for it, is what a periodic schedule
    sends; run here eagerly, in a worker it does the same."""
    app = App("sql-cleanup", broker="memory://", backend=sqlite_run.url, result_expires=HOUR)
    try:
        app.finalize()
        backend = app.backend
        old = new_id()
        backend.store_result(old, 1, states.SUCCESS)
        backdate(backend, backend.tables.task, backend.tables.task.c.task_id, [old], hours=2)
        assert app.tasks["celery.backend_cleanup"].apply().get() >= 1
        with backend.database.engine.connect() as connection:
            task = backend.tables.task
            assert (
                connection.execute(sa.select(task.c.id).where(task.c.task_id == old)).first()
                is None
            )
    finally:
        app.close()


def test_a_task_id_reused_after_its_result_expired_is_stored_again(db):
    app = App("sql-cleanup", broker="memory://", backend=db.url, result_expires=HOUR)
    try:
        backend = app.backend
        task, reused, fresh = backend.tables.task, new_id(), new_id()
        backend.store_result(reused, "yesterday", states.SUCCESS)
        backend.store_result(fresh, "first", states.SUCCESS)
        backdate(backend, task, task.c.task_id, [reused], hours=2)  # expired, not cleaned

        backend.store_result(reused, "today", states.STARTED)
        assert backend.get_task_meta(reused)["status"] == states.STARTED
        backend.store_result(reused, "today", states.SUCCESS)
        assert backend.get_task_meta(reused)["result"] == "today"
        # An unexpired SUCCESS is still final.
        backend.store_result(fresh, "second", states.SUCCESS)
        assert backend.get_task_meta(fresh)["result"] == "first"
        assert count(backend, task) >= 2
    finally:
        app.close()


@pytest.mark.parametrize("expires", [0, -5])
def test_zero_or_negative_result_expires_means_never_as_in_other_backends(db, expires):
    app = App("sql-cleanup", broker="memory://", backend=db.url, result_expires=expires)
    try:
        backend = app.backend
        task_id = new_id()
        backend.store_result(task_id, "kept", states.SUCCESS)
        backdate(backend, backend.tables.task, backend.tables.task.c.task_id, [task_id], 1000)
        assert backend.get_task_meta(task_id)["result"] == "kept"
        backend.cleanup()
        assert backend.get_task_meta(task_id)["result"] == "kept"
        backend.store_result(task_id, "again", states.SUCCESS)  # SUCCESS stays final
        assert backend.get_task_meta(task_id)["result"] == "kept"
    finally:
        app.close()


@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_a_chord_claim_written_with_a_skewed_clock_is_honoured(request, dialect, monkeypatch):
    """Claim expiries are written and compared on the database's clock: a writer whose
    clock is two hours behind still holds its ten-minute claim."""
    from kernel_sql import backend as backend_module

    scratch = request.getfixturevalue("postgres_run" if dialect == "postgresql" else "mariadb_run")
    writer = App("sql-skew", broker="memory://", backend=scratch.url)
    reader = App("sql-skew", broker="memory://", backend=scratch.url)
    key, parts = f"kernel-chord-claim-{new_id()}", f"kernel-chord-parts-{new_id()}"
    try:
        real_time = backend_module.time.time
        with monkeypatch.context() as patch:
            patch.setattr(backend_module.time, "time", lambda: real_time() - 2 * HOUR)
            assert writer.backend.set_if_absent(key, "w", 600)
            assert writer.backend.add_to_set(parts, "a", 600) == 1
        assert reader.backend.get(key) == b"w"
        assert not reader.backend.set_if_absent(key, "r", 600)
        assert reader.backend.add_to_set(parts, "b", 600) == 2
        reader.backend.cleanup()
        assert reader.backend.get(key) == b"w"
    finally:
        writer.close()
        reader.close()
