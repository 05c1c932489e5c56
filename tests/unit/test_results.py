"""Results: the stored document's exception format, and AsyncResult over a backend."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone

import pytest

from kernel import states
from kernel.backends import document
from kernel.exceptions import NotRegistered, RemoteException, TaskRevokedError, TimeoutError
from kernel.result import AsyncResult, EagerResult, GroupResult, result_from_tuple
from kernel.task import Context


class AppError(Exception):
    """An importable exception class of "the application"."""


class Outer:
    class NestedError(Exception):
        """An exception class that is an attribute of a class."""


class NeedsTwoArguments(Exception):
    def __init__(self, code, reason):
        super().__init__(f"{code}: {reason}")


def new_id() -> str:
    return str(uuid.uuid4())


# ----------------------------------------------------------------------- document


def test_exception_is_encoded_with_celery_field_names():
    encoded = document.encode_exception(ValueError("bad value", 3))
    assert encoded == {
        "exc_type": "ValueError",
        "exc_message": ["bad value", 3],
        "exc_module": "builtins",
    }


def test_encoded_exception_is_json_even_with_unserialisable_arguments():
    encoded = document.encode_exception(AppError(object(), {"k": {1, 2}}))
    json.dumps(encoded)
    assert encoded["exc_type"] == "AppError"
    assert encoded["exc_module"] == __name__


def test_builtin_exception_decodes_to_its_class():
    decoded = document.decode_exception(document.encode_exception(KeyError("k")))
    assert type(decoded) is KeyError
    assert decoded.args == ("k",)


def test_application_exception_decodes_to_its_class():
    decoded = document.decode_exception(document.encode_exception(AppError("x", 1)))
    assert type(decoded) is AppError
    assert decoded.args == ("x", 1)


def test_nested_exception_class_decodes_to_its_class():
    decoded = document.decode_exception(document.encode_exception(Outer.NestedError("n")))
    assert type(decoded) is Outer.NestedError


def test_kernel_exception_decodes_with_its_message():
    decoded = document.decode_exception(
        document.encode_exception(NotRegistered("task 'x' is not registered"))
    )
    assert type(decoded) is NotRegistered
    assert str(decoded) == "task 'x' is not registered"


def test_exception_from_unimportable_module_becomes_remote_exception():
    decoded = document.decode_exception(
        {
            "exc_type": "QuotaExceeded",
            "exc_module": "billing_service_not_installed.errors",
            "exc_message": ["over quota", 7],
        }
    )

    assert isinstance(decoded, RemoteException)
    assert decoded.exc_type == "QuotaExceeded"
    assert decoded.exc_module == "billing_service_not_installed.errors"
    assert decoded.message == "over quota 7"
    assert str(decoded) == "billing_service_not_installed.errors.QuotaExceeded: over quota 7"


def test_name_that_is_not_an_exception_class_becomes_remote_exception():
    decoded = document.decode_exception(
        {"exc_type": "path", "exc_module": "os", "exc_message": ["not an exception"]}
    )
    assert isinstance(decoded, RemoteException)
    assert decoded.exc_type == "path"


def test_exception_whose_constructor_refuses_its_args_becomes_remote_exception():
    decoded = document.decode_exception(
        document.encode_exception(NeedsTwoArguments(404, "missing"))
    )
    assert isinstance(decoded, RemoteException)
    assert decoded.exc_type == "NeedsTwoArguments"
    assert decoded.message == "404: missing"


def test_exception_message_given_as_a_string_is_accepted():
    """Some Celery versions store ``exc_message`` as a plain string."""
    decoded = document.decode_exception(
        {"exc_type": "ValueError", "exc_module": "builtins", "exc_message": "plain"}
    )
    assert type(decoded) is ValueError
    assert decoded.args == ("plain",)


def test_document_of_a_ready_state_has_all_celery_fields():
    meta = document.build("id-1", states.SUCCESS, [1, 2], children=[[["c", None], None]])
    assert set(meta) == {"task_id", "status", "result", "traceback", "children", "date_done"}
    assert meta["result"] == [1, 2]
    assert datetime.fromisoformat(meta["date_done"]).tzinfo is not None


def test_document_key_is_celerys():
    assert document.result_key("abc") == "celery-task-meta-abc"


# ----------------------------------------------------------------------- AsyncResult


def test_unknown_result_is_pending_and_not_ready(kernel_app):
    result = kernel_app.AsyncResult(new_id())
    assert result.state == states.PENDING
    assert result.result is None
    assert result.date_done is None
    assert not result.ready()
    assert not result.successful()
    assert not result.failed()


def test_successful_result_reads_state_value_and_date(kernel_app):
    task_id = new_id()
    kernel_app.backend.store_result(task_id, {"total": 3}, states.SUCCESS)

    result = kernel_app.AsyncResult(task_id)
    assert result.state == result.status == states.SUCCESS
    assert result.result == {"total": 3}
    assert result.traceback is None
    assert result.ready() and result.successful() and not result.failed()
    assert result.date_done.tzinfo is not None
    assert abs((datetime.now(timezone.utc) - result.date_done).total_seconds()) < 60
    assert result.get(timeout=1) == {"total": 3}


def test_failed_result_reads_exception_and_traceback(kernel_app):
    task_id = new_id()
    kernel_app.backend.mark_as_failure(task_id, AppError("broken"), "Traceback: line 1")

    result = kernel_app.AsyncResult(task_id)
    assert result.failed() and result.ready() and not result.successful()
    assert isinstance(result.result, AppError)
    assert result.traceback == "Traceback: line 1"
    with pytest.raises(AppError, match="broken"):
        result.get(timeout=1)


def test_get_without_propagate_returns_the_exception(kernel_app):
    task_id = new_id()
    kernel_app.backend.mark_as_failure(task_id, AppError("broken"))
    value = kernel_app.AsyncResult(task_id).get(timeout=1, propagate=False)
    assert isinstance(value, AppError)


def test_revoked_result_raises_task_revoked_error(kernel_app):
    task_id = new_id()
    kernel_app.backend.mark_as_revoked(task_id, "expired")
    with pytest.raises(TaskRevokedError):
        kernel_app.AsyncResult(task_id).get(timeout=1)


def test_get_times_out_on_a_pending_result(kernel_app):
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="PENDING"):
        kernel_app.AsyncResult(new_id()).get(timeout=0.2, interval=0.02)
    assert time.monotonic() - started < 3


def test_get_waits_for_a_result_stored_later(kernel_app):
    import threading

    task_id = new_id()
    timer = threading.Timer(0.1, kernel_app.backend.store_result, (task_id, "late", states.SUCCESS))
    timer.start()
    try:
        assert kernel_app.AsyncResult(task_id).get(timeout=5, interval=0.02) == "late"
    finally:
        timer.join(5)


def test_custom_state_is_not_ready_and_shows_its_meta(kernel_app):
    task_id = new_id()
    kernel_app.backend.store_result(task_id, {"done": 5, "total": 10}, "PROGRESS")
    result = kernel_app.AsyncResult(task_id)
    assert result.state == "PROGRESS"
    assert result.info == {"done": 5, "total": 10}
    assert not result.ready()


def test_state_is_read_again_until_ready(kernel_app):
    task_id = new_id()
    result = kernel_app.AsyncResult(task_id)
    assert result.state == states.PENDING
    kernel_app.backend.mark_as_started(task_id)
    assert result.state == states.STARTED
    kernel_app.backend.mark_as_done(task_id, 1)
    assert result.state == states.SUCCESS


def test_forget_deletes_the_stored_result(kernel_app):
    task_id = new_id()
    kernel_app.backend.store_result(task_id, 1, states.SUCCESS)
    result = kernel_app.AsyncResult(task_id)
    assert result.get(timeout=1) == 1

    result.forget()
    assert result.state == states.PENDING
    assert kernel_app.AsyncResult(task_id).state == states.PENDING


def test_children_are_async_results(kernel_app):
    task_id, child_id = new_id(), new_id()
    request = Context(id=task_id, children=[[[child_id, None], None]])
    kernel_app.backend.store_result(task_id, 1, states.SUCCESS, request=request)

    children = kernel_app.AsyncResult(task_id).children
    assert [c.id for c in children] == [child_id]
    assert all(isinstance(c, AsyncResult) for c in children)


def test_children_that_are_groups_come_back_as_group_results(kernel_app):
    task_id, child_id, group_id, first, second = (new_id() for _ in range(5))
    children = [
        [[child_id, None], None],
        [[group_id, None], [[[first, None], None], [[second, None], None]]],
    ]
    kernel_app.backend.store_result(
        task_id, 1, states.SUCCESS, request=Context(id=task_id, children=children)
    )

    plain, group = kernel_app.AsyncResult(task_id).children
    assert type(plain) is AsyncResult and plain.id == child_id
    assert isinstance(group, GroupResult)
    assert group.id == group_id
    assert [r.id for r in group.results] == [first, second]


def test_result_tuple_is_celerys_with_the_parent_nested(kernel_app):
    grandparent = AsyncResult("a", kernel_app)
    parent = AsyncResult("b", kernel_app, parent=grandparent)
    result = AsyncResult("c", kernel_app, parent=parent)

    assert AsyncResult("x", kernel_app).as_tuple() == (("x", None), None)
    assert result.as_tuple() == (("c", (("b", (("a", None), None)), None)), None)
    assert json.loads(json.dumps(result.as_tuple())) == [
        ["c", [["b", [["a", None], None]], None]],
        None,
    ]


def test_result_rebuilt_from_its_json_tuple_keeps_its_parents(kernel_app):
    stored = [["c", [["b", [["a", None], None]], None]], None]
    result = result_from_tuple(stored, kernel_app)

    assert type(result) is AsyncResult
    assert [result.id, result.parent.id, result.parent.parent.id] == ["c", "b", "a"]
    assert result.parent.parent.parent is None


def test_task_returning_a_group_result_stores_its_tuple(kernel_app):
    task_id = new_id()
    returned = GroupResult("g", [AsyncResult("m1", kernel_app)], app=kernel_app)
    kernel_app.backend.mark_as_done(task_id, returned)

    assert kernel_app.AsyncResult(task_id).get(timeout=1) == [["g", None], [[["m1", None], None]]]


def test_async_results_compare_by_id(kernel_app):
    task_id = new_id()
    assert kernel_app.AsyncResult(task_id) == kernel_app.AsyncResult(task_id)
    assert kernel_app.AsyncResult(task_id) == task_id
    assert len({kernel_app.AsyncResult(task_id), kernel_app.AsyncResult(task_id)}) == 1


def test_eager_result_holds_its_value_without_a_backend(kernel_app):
    meta = document.build("id-e", states.SUCCESS, 42)
    result = EagerResult("id-e", kernel_app, meta)
    assert result.get() == 42
    assert result.successful()
    result.forget()
    assert result.get() == 42


# ----------------------------------------------------------------------- inside tasks


def test_get_inside_a_running_task_raises_runtime_error(kernel_app, kernel_worker):
    other = new_id()
    kernel_app.backend.store_result(other, "ready", states.SUCCESS)

    @kernel_app.task
    def waits_on_other(task_id):
        return kernel_app.AsyncResult(task_id).get(timeout=1)

    result = waits_on_other.delay(other)
    with pytest.raises(RuntimeError, match="never call result.get\\(\\) inside a task"):
        result.get(timeout=5)


def test_get_inside_a_task_is_allowed_with_disable_sync_subtasks_false(kernel_app, kernel_worker):
    other = new_id()
    kernel_app.backend.store_result(other, "ready", states.SUCCESS)

    @kernel_app.task
    def waits_on_other(task_id):
        return kernel_app.AsyncResult(task_id).get(timeout=1, disable_sync_subtasks=False)

    assert waits_on_other.delay(other).get(timeout=5) == "ready"


def test_get_inside_a_task_called_directly_is_allowed(kernel_app):
    other = new_id()
    kernel_app.backend.store_result(other, "ready", states.SUCCESS)

    @kernel_app.task
    def waits_on_other(task_id):
        return kernel_app.AsyncResult(task_id).get(timeout=1)

    assert waits_on_other(other) == "ready"
