"""Real Celery 5 and kernel share one database: each reads what the other stored.

Celery's side is its own ``DatabaseBackend`` (``db+`` URL, SQLAlchemy, its models),
configured as a Celery user would, in this process; nothing of kernel is involved.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sql_harness import Scratch

from kernel import App, states
from kernel.exceptions import ContentDisallowed
from kernel.result import AsyncResult, GroupResult
from kernel.task import Context

celery = pytest.importorskip("celery")


class InteropError(Exception):
    """Importable on both sides, so each rebuilds it as this class."""


def new_id() -> str:
    return str(uuid.uuid4())


def kernel_app(scratch: Scratch, **settings: Any) -> App:
    return App("sql-interop-kernel", broker="memory://", backend=scratch.url, **settings)


def celery_app(scratch: Scratch, **settings: Any) -> Any:
    from celery import Celery

    return Celery(
        "sql-interop-celery", broker="memory://", backend=f"db+{scratch.sqlalchemy_url}", **settings
    )


@pytest.fixture
def apps(db):
    """A kernel app and a Celery app on the same database and tables."""
    kernel = kernel_app(db)
    yield kernel, celery_app(db)
    kernel.close()


def raised(exc: BaseException) -> tuple[BaseException, str]:
    import traceback

    try:
        raise exc
    except BaseException as caught:
        return caught, traceback.format_exc()


def near_now(moment: datetime) -> bool:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return abs(datetime.now(timezone.utc) - moment) < timedelta(seconds=30)


def test_celery_reads_a_value_kernel_stored(apps):
    kernel, celery_side = apps
    task_id, child_id = new_id(), new_id()
    request = Context(id=task_id, children=[[[child_id, None], None]])
    kernel.backend.store_result(task_id, {"answer": [4, 2]}, states.SUCCESS, request=request)

    result = celery_side.AsyncResult(task_id)
    assert result.state == "SUCCESS"
    assert result.get(timeout=10) == {"answer": [4, 2]}
    assert near_now(result.date_done)
    assert [child.id for child in result.children] == [child_id]


def test_celery_reads_a_failure_kernel_stored_as_the_same_exception(apps):
    kernel, celery_side = apps
    task_id = new_id()
    exc, text = raised(InteropError("disk full", 28))
    kernel.backend.mark_as_failure(task_id, exc, text)

    result = celery_side.AsyncResult(task_id)
    assert result.state == "FAILURE"
    assert type(result.result) is InteropError
    assert result.result.args == ("disk full", 28)
    assert result.traceback == text
    with pytest.raises(InteropError):
        result.get(timeout=10)


def test_celery_reads_a_custom_state_kernel_stored(apps):
    kernel, celery_side = apps
    task_id = new_id()
    kernel.backend.store_result(task_id, {"done": 3, "total": 10}, "PROGRESS")

    result = celery_side.AsyncResult(task_id)
    assert result.state == "PROGRESS"
    assert result.info == {"done": 3, "total": 10}
    assert result.date_done is None


def test_kernel_reads_a_value_celery_stored(apps):
    kernel, celery_side = apps
    task_id = new_id()
    celery_side.backend.store_result(task_id, ["ünïcödé", 1.5, None], "SUCCESS")

    result = AsyncResult(task_id, kernel)
    assert result.state == states.SUCCESS
    assert result.get(timeout=10) == ["ünïcödé", 1.5, None]
    assert near_now(result.date_done)


def test_kernel_reads_a_failure_celery_stored_as_the_same_exception(apps):
    kernel, celery_side = apps
    task_id = new_id()
    exc, text = raised(InteropError("quota", 5))
    celery_side.backend.mark_as_failure(task_id, exc, traceback=text)

    result = AsyncResult(task_id, kernel)
    assert result.failed()
    assert type(result.result) is InteropError
    assert result.result.args == ("quota", 5)
    assert result.traceback == text
    with pytest.raises(InteropError, match="quota"):
        result.get(timeout=10)


def test_kernel_reads_a_revoke_celery_stored(apps):
    kernel, celery_side = apps
    task_id = new_id()
    celery_side.backend.mark_as_revoked(task_id, reason="revoked")
    result = AsyncResult(task_id, kernel)
    assert result.state == states.REVOKED
    # Celery's own class where Celery is importable (kernel maps only ChordError).
    assert type(result.result).__name__ == "TaskRevokedError"
    assert result.result.args == ("revoked",)


def test_groups_saved_by_one_side_are_restored_by_the_other(apps):
    kernel, celery_side = apps
    from celery.result import AsyncResult as CeleryAsyncResult
    from celery.result import GroupResult as CeleryGroupResult

    member_ids = [new_id(), new_id()]
    group_id = new_id()
    GroupResult(group_id, [AsyncResult(i, kernel) for i in member_ids]).save(kernel.backend)
    restored = CeleryGroupResult.restore(group_id, app=celery_side)
    assert [r.id for r in restored.results] == member_ids

    other_id = new_id()
    CeleryGroupResult(
        other_id, [CeleryAsyncResult(i, app=celery_side) for i in member_ids], app=celery_side
    ).save()
    mine = kernel.backend.restore_group(other_id)
    assert [r.id for r in mine.results] == member_ids

    kernel.backend.delete_group(group_id)
    assert CeleryGroupResult.restore(group_id, app=celery_side) is None


def test_kernel_does_not_replace_a_success_celery_stored(apps):
    """Both follow Celery's rule: once SUCCESS is stored, a second run's writes are
    ignored (a redelivered task does not turn its result back to STARTED)."""
    kernel, celery_side = apps
    task_id = new_id()
    celery_side.backend.store_result(task_id, "first", "SUCCESS")
    kernel.backend.mark_as_started(task_id, {"hostname": "w2"})
    kernel.backend.mark_as_done(task_id, "second")
    assert AsyncResult(task_id, kernel).get(timeout=10) == "first"
    assert celery_side.AsyncResult(task_id).result == "first"


def test_extended_fields_cross_both_ways(db):
    kernel = kernel_app(db, result_extended=True)
    celery_side = celery_app(db, result_extended=True)
    try:
        task_id = new_id()
        request = Context(
            id=task_id,
            task="proj.tasks.add",
            args=(2, 3),
            kwargs={"scale": 10},
            hostname="kernel1@host",
            retries=1,
            delivery_info={"routing_key": "math"},
        )
        kernel.backend.mark_as_done(task_id, 50, request=request)
        theirs = celery_side.AsyncResult(task_id)
        assert (theirs.name, theirs.args, theirs.kwargs) == (
            "proj.tasks.add",
            [2, 3],
            {"scale": 10},
        )
        assert (theirs.worker, theirs.retries, theirs.queue) == ("kernel1@host", 1, "math")

        from celery.app.task import Context as CeleryContext

        other_id = new_id()
        celery_request = CeleryContext(
            id=other_id,
            task="proj.tasks.mul",
            args=[6, 7],
            kwargs={},
            hostname="celery1@host",
            retries=0,
            delivery_info={"routing_key": "celery"},
        )
        celery_side.backend.mark_as_done(other_id, 42, request=celery_request)
        meta = kernel.backend.get_task_meta(other_id)
        assert meta["result"] == 42
        assert (meta["name"], meta["args"], meta["kwargs"]) == ("proj.tasks.mul", [6, 7], {})
        assert (meta["worker"], meta["queue"]) == ("celery1@host", "celery")
    finally:
        kernel.close()


def test_pickled_results_are_read_only_when_pickle_is_accepted(sqlite_run):
    """Celery with ``result_serializer='pickle'`` stores pickles in the same column; a
    kernel reader unpickles them only when told to trust them."""
    celery_side = celery_app(
        sqlite_run, result_serializer="pickle", accept_content=["json", "pickle"]
    )
    task_id = new_id()
    moment = datetime(2026, 1, 2, 3, 4, 5)
    celery_side.backend.store_result(task_id, {"when": moment}, "SUCCESS")

    trusting = kernel_app(sqlite_run, result_accept_content=["json", "pickle"])
    refusing = kernel_app(sqlite_run)
    try:
        assert AsyncResult(task_id, trusting).result == {"when": moment}
        with pytest.raises(ContentDisallowed, match="pickle"):
            AsyncResult(task_id, refusing).result  # noqa: B018 - reading is the test
    finally:
        trusting.close()
        refusing.close()


def test_kernel_with_the_pickle_serializer_writes_what_celery_reads(sqlite_run):
    settings = {"result_serializer": "pickle", "accept_content": ["json", "pickle"]}
    kernel = kernel_app(sqlite_run, **settings)
    try:
        task_id = new_id()
        moment = datetime(2026, 5, 6, 7, 8, 9)
        kernel.backend.store_result(task_id, {"when": moment}, states.SUCCESS)
        assert celery_app(sqlite_run, **settings).AsyncResult(task_id).result == {"when": moment}
    finally:
        kernel.close()
