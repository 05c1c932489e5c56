"""Apps and tasks: registering, naming, calling, sending, and eager execution."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from kernel import states
from kernel.app import App
from kernel.exceptions import ConfigurationError, NotRegistered
from kernel.result import AsyncResult, EagerResult
from kernel.task import Task, current_task, task_name_for


def multiply(x, y):
    """A module-level function, decorated by the tests below."""
    return x * y


def queued(app: App, queue: str | None = None) -> int:
    """How many messages wait in ``queue`` (the app's default queue)."""
    with app.connection() as connection:
        bound = app.queues_for([queue or app.conf.task_default_queue])[0](
            connection.default_channel
        )
        return bound.queue_declare().message_count


# ----------------------------------------------------------------------- registering


def test_task_decorator_without_options_registers_the_function(kernel_app):
    task = kernel_app.task(multiply)

    assert isinstance(task, Task)
    assert task.name == f"{__name__}.multiply"
    assert kernel_app.tasks[task.name] is task
    assert kernel_app.get_task(task.name) is task
    assert task.__doc__ == multiply.__doc__


def test_task_decorator_with_options_sets_them_on_the_task(kernel_app):
    @kernel_app.task(name="proj.mul", ignore_result=True, queue="math", max_retries=5)
    def mul(x, y):
        return x * y

    assert mul.name == "proj.mul"
    assert kernel_app.tasks["proj.mul"] is mul
    assert mul.ignore_result is True
    assert mul.queue == "math"
    assert mul.max_retries == 5


def test_task_name_is_module_and_function_name(kernel_app):
    assert task_name_for(kernel_app, multiply) == f"{__name__}.multiply"


def test_task_defined_in_main_is_named_after_the_app():
    def job():
        return 1

    job.__module__ = "__main__"
    job.__qualname__ = "job"
    assert task_name_for(App("proj", broker="memory://"), job) == "proj.job"
    assert task_name_for(App(broker="memory://"), job) == "__main__.job"


def test_unknown_task_option_raises_type_error(kernel_app):
    with pytest.raises(TypeError, match="retry_backof"):
        kernel_app.task(retry_backof=True)


def test_positional_task_options_raise_type_error(kernel_app):
    with pytest.raises(TypeError, match="positional"):
        kernel_app.task("proj.name")


def test_unknown_task_name_raises_not_registered(kernel_app):
    with pytest.raises(NotRegistered, match="proj.missing"):
        kernel_app.get_task("proj.missing")


def test_custom_base_class_is_used(kernel_app):
    class Audited(Task):
        audited = True

    @kernel_app.task(base=Audited)
    def audited_task():
        return 1

    assert isinstance(audited_task, Audited)
    assert audited_task.audited is True


# ----------------------------------------------------------------------- calling here


def test_calling_a_task_runs_it_here_without_sending(kernel_app):
    task = kernel_app.task(multiply)

    assert task(6, 7) == 42
    assert queued(kernel_app) == 0


def test_bound_task_called_directly_sees_its_request(kernel_app):
    @kernel_app.task(bind=True)
    def whoami(self, x):
        return {
            "args": self.request.args,
            "task": self.request.task,
            "called_directly": self.request.called_directly,
            "current": current_task() is self,
        }

    assert whoami(5) == {
        "args": (5,),
        "task": whoami.name,
        "called_directly": True,
        "current": True,
    }


def test_request_outside_a_task_is_empty(kernel_app):
    task = kernel_app.task(multiply)
    assert task.request.id is None
    assert current_task() is None


def test_bound_task_in_a_worker_sees_id_hostname_and_arguments(kernel_app, kernel_worker):
    @kernel_app.task(bind=True)
    def whoami(self, x, y=0):
        request = self.request
        return {
            "id": request.id,
            "args": list(request.args),
            "kwargs": request.kwargs,
            "hostname": request.hostname,
            "retries": request.retries,
            "called_directly": request.called_directly,
            "root_id": request.root_id,
        }

    result = whoami.apply_async((1,), {"y": 2})
    seen = result.get(timeout=5)

    assert seen == {
        "id": result.id,
        "args": [1],
        "kwargs": {"y": 2},
        "hostname": kernel_worker.hostname,
        "retries": 0,
        "called_directly": False,
        "root_id": result.id,
    }


# ----------------------------------------------------------------------- sending


def test_delay_publishes_one_message_and_returns_async_result(kernel_app):
    task = kernel_app.task(multiply)
    result = task.delay(2, 3)

    assert isinstance(result, AsyncResult)
    assert result.state == states.PENDING
    assert queued(kernel_app) == 1


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((1, 2, 3), {}),
        ((1,), {}),
        ((1, 2), {"z": 3}),
        ((), {"x": 1}),
    ],
    ids=["too-many", "too-few", "unexpected-kwarg", "missing-positional"],
)
def test_apply_async_with_wrong_arguments_raises_before_publishing(kernel_app, args, kwargs):
    task = kernel_app.task(multiply)

    with pytest.raises(TypeError, match=r"multiply\(x, y\)"):
        task.apply_async(args, kwargs)
    assert queued(kernel_app) == 0


def test_bound_task_arguments_are_checked_without_self(kernel_app):
    @kernel_app.task(bind=True)
    def bound(self, x):
        return x

    with pytest.raises(TypeError):
        bound.delay(1, 2)
    bound.delay(1)
    assert queued(kernel_app) == 1


def test_argument_checking_can_be_turned_off(kernel_app):
    @kernel_app.task(typing=False)
    def loose(x):
        return x

    loose.delay(1, 2, 3)
    assert queued(kernel_app) == 1


def test_countdown_and_eta_together_raise_type_error(kernel_app):
    task = kernel_app.task(multiply)
    eta = datetime.now(timezone.utc) + timedelta(seconds=10)

    with pytest.raises(TypeError, match="countdown or eta"):
        task.apply_async((1, 2), countdown=10, eta=eta)
    assert queued(kernel_app) == 0


def test_eta_that_is_not_a_time_raises_type_error(kernel_app):
    task = kernel_app.task(multiply)
    with pytest.raises(TypeError, match="eta must be"):
        task.apply_async((1, 2), eta="tomorrow")
    assert queued(kernel_app) == 0


def test_send_task_with_unknown_option_raises_type_error(kernel_app):
    with pytest.raises(TypeError, match="quue"):
        kernel_app.send_task("proj.anything", (1,), quue="typo")
    assert queued(kernel_app) == 0


def test_send_task_with_args_not_a_list_raises_type_error(kernel_app):
    with pytest.raises(TypeError, match="args must be a list or tuple"):
        kernel_app.send_task("proj.anything", "abc")
    with pytest.raises(TypeError, match="kwargs must be a dict"):
        kernel_app.send_task("proj.anything", (), [("a", 1)])
    assert queued(kernel_app) == 0


def test_send_task_with_unknown_serializer_raises_before_publishing(kernel_app):
    with pytest.raises(ConfigurationError, match="yaml"):
        kernel_app.send_task("proj.anything", (1,), serializer="yaml")
    assert queued(kernel_app) == 0


def test_send_task_does_not_need_the_task_code(kernel_app):
    result = kernel_app.send_task("elsewhere.defined", (1, 2))
    assert result.task_name == "elsewhere.defined"
    assert queued(kernel_app) == 1


# ----------------------------------------------------------------------- eager


def test_always_eager_delay_returns_an_eager_result(kernel_eager_app):
    task = kernel_eager_app.task(multiply)

    result = task.delay(3, 4)

    assert isinstance(result, EagerResult)
    assert result.get() == 12
    assert result.state == states.SUCCESS
    assert queued(kernel_eager_app) == 0


def test_apply_runs_here_and_returns_an_eager_result(kernel_app):
    task = kernel_app.task(multiply)

    result = task.apply((5, 6), task_id="fixed-id")

    assert isinstance(result, EagerResult)
    assert result.id == "fixed-id"
    assert result.get() == 30
    assert result.successful()
    assert queued(kernel_app) == 0


def test_apply_stores_no_result(kernel_app):
    task = kernel_app.task(multiply)
    result = task.apply((1, 1))
    assert kernel_app.AsyncResult(result.id).state == states.PENDING


def test_eager_request_is_marked_eager(kernel_eager_app):
    @kernel_eager_app.task(bind=True)
    def flags(self):
        return [self.request.is_eager, self.request.called_directly, self.request.id]

    result = flags.delay()
    assert result.get() == [True, False, result.id]


def test_eager_failure_propagates_when_task_eager_propagates_is_set(kernel_eager_app):
    kernel_eager_app.conf.task_eager_propagates = True

    @kernel_eager_app.task
    def broken():
        raise ValueError("eager boom")

    with pytest.raises(ValueError, match="eager boom"):
        broken.delay()


def test_eager_failure_is_returned_by_default_as_in_celery(kernel_eager_app):
    @kernel_eager_app.task
    def broken():
        raise ValueError("eager boom")

    result = broken.delay()
    assert result.state == states.FAILURE
    assert result.failed()
    assert isinstance(result.get(propagate=False), ValueError)
    assert "eager boom" in result.traceback
    with pytest.raises(ValueError):
        result.get()


def test_eager_link_callback_runs_with_the_result(kernel_eager_app):
    received = []

    @kernel_eager_app.task
    def add(x, y):
        return x + y

    @kernel_eager_app.task
    def record(value, tag):
        received.append((value, tag))

    add.apply_async((2, 3), link=record.s("sum"))

    assert received == [(5, "sum")]


def test_eager_link_error_callback_runs_with_the_task_id(kernel_eager_app):
    kernel_eager_app.conf.task_eager_propagates = False
    received = []

    @kernel_eager_app.task
    def broken():
        raise ValueError("no")

    @kernel_eager_app.task
    def on_error(task_id):
        received.append(task_id)

    result = broken.apply_async(link_error=on_error.s())

    assert received == [result.id]


# ----------------------------------------------------------------------- update_state


def test_update_state_outside_a_task_without_id_raises(kernel_app):
    task = kernel_app.task(multiply)
    with pytest.raises(RuntimeError, match="needs a task_id"):
        task.update_state(state="PROGRESS", meta={"done": 1})


def test_update_state_with_an_id_stores_the_state(kernel_app):
    task = kernel_app.task(multiply)
    task.update_state("some-id", "PROGRESS", {"done": 1})

    result = kernel_app.AsyncResult("some-id")
    assert result.state == "PROGRESS"
    assert result.info == {"done": 1}


def test_current_task_is_set_in_each_thread_separately(kernel_app):
    seen = {}

    @kernel_app.task
    def probe(name):
        seen[name] = current_task()

    thread = threading.Thread(target=probe, args=("thread",))
    thread.start()
    thread.join(5)
    probe("main")
    assert seen == {"thread": probe, "main": probe}
    assert current_task() is None
