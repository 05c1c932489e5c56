"""A real worker in a background thread on the memory transport (``kernel_worker``)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from kombu import Queue

from kernel import states
from kernel.exceptions import NotRegistered, TaskRevokedError, WorkerLostError
from kernel.testing.pytest_plugin import start_worker, stop_worker
from kernel.worker.worker import DEAD_LETTER_REASON_HEADER

TIMEOUT = 5.0


@pytest.fixture
def kernel_config():
    """Each test gets its own dead-letter queue (the memory broker is process-wide)."""
    return {"task_dead_letter_queue": f"dead.{uuid.uuid4().hex[:12]}"}


@pytest.fixture
def tasks(kernel_app):
    """A few tasks registered on ``kernel_app``; ``tasks.ran`` records what ran."""

    class Tasks:
        ran: list = []  # a fresh class, so a fresh list, for every test
        release = threading.Event()

        @kernel_app.task
        def add(x, y):
            Tasks.ran.append(("add", x, y))
            return x + y

        @kernel_app.task
        def fail(message):
            raise ValueError(message)

        @kernel_app.task
        def now():
            return time.time()

        @kernel_app.task(bind=True)
        def progress(self):
            self.update_state(state="PROGRESS", meta={"done": 1, "total": 2})
            Tasks.release.wait(TIMEOUT)
            return "complete"

        @kernel_app.task(track_started=True)
        def tracked():
            Tasks.release.wait(TIMEOUT)
            return "tracked"

        @kernel_app.task
        def spawn(x):
            return Tasks.add.delay(x, x).id

        @kernel_app.task(bind=True)
        def record(self, value, tag):
            Tasks.ran.append(("record", value, tag, self.request.parent_id))
            return value

    return Tasks


def wait_until(predicate, timeout=TIMEOUT, interval=0.01):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def publish_raw(app, body, headers=None, **options):
    """Put a message on the app's default queue without the kernel's encoder."""
    queue = app.queues_for([app.conf.task_default_queue])[0]
    with app.connection() as connection:
        connection.Producer().publish(
            body,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            headers=headers,
            declare=[queue],
            **options,
        )


def dead_letter(app, timeout=3.0):
    """The next message in the app's dead-letter queue, or None after ``timeout``."""
    name = app.conf.task_dead_letter_queue
    with app.connection() as connection:
        bound = Queue(name, routing_key=name)(connection.default_channel)
        bound.declare()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = bound.get(
                no_ack=True, accept={"application/json", "application/x-python-serialize"}
            )
            if message is not None:
                return message
            time.sleep(0.01)
    return None


def error_records(caplog):
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# ----------------------------------------------------------------------- results


def test_worker_runs_task_and_stores_its_result(tasks, kernel_worker):
    result = tasks.add.delay(2, 3)
    assert result.get(timeout=TIMEOUT) == 5
    assert result.state == states.SUCCESS
    assert result.date_done is not None


def test_failure_is_stored_with_the_traceback_text(tasks, kernel_worker):
    result = tasks.fail.delay("out of cheese")

    with pytest.raises(ValueError, match="out of cheese"):
        result.get(timeout=TIMEOUT)
    assert result.state == states.FAILURE
    assert "Traceback (most recent call last)" in result.traceback
    assert "raise ValueError(message)" in result.traceback


def test_custom_progress_state_is_visible_while_the_task_runs(tasks, kernel_worker):
    result = tasks.progress.delay()
    try:
        assert wait_until(lambda: result.state == "PROGRESS"), f"state {result.state}"
        assert result.info == {"done": 1, "total": 2}
        assert not result.ready()
    finally:
        tasks.release.set()
    assert result.get(timeout=TIMEOUT) == "complete"


def test_link_callback_runs_with_the_parent_result(tasks, kernel_worker):
    parent = tasks.add.apply_async((2, 3), link=tasks.record.s("sum"))

    assert parent.get(timeout=TIMEOUT) == 5
    assert wait_until(lambda: any(r[0] == "record" for r in tasks.ran))
    assert ("record", 5, "sum", parent.id) in tasks.ran


def test_link_error_callback_runs_with_the_failed_task_id(tasks, kernel_worker):
    failed = tasks.fail.apply_async(("no",), link_error=tasks.record.s("failed"))

    with pytest.raises(ValueError):
        failed.get(timeout=TIMEOUT)
    assert wait_until(lambda: any(r[0] == "record" for r in tasks.ran))
    assert ("record", failed.id, "failed", failed.id) in tasks.ran


def test_track_started_task_reads_started_while_it_runs(tasks, kernel_worker):
    result = tasks.tracked.delay()
    try:
        assert wait_until(lambda: result.state == states.STARTED), f"state {result.state}"
        assert result.info["hostname"] == kernel_worker.hostname
    finally:
        tasks.release.set()
    assert result.get(timeout=TIMEOUT) == "tracked"


def test_task_sent_from_a_task_is_recorded_as_its_child(kernel_app, tasks, kernel_worker):
    parent = tasks.spawn.delay(4)
    child_id = parent.get(timeout=TIMEOUT)

    assert [child.id for child in parent.children] == [child_id]
    assert kernel_app.AsyncResult(child_id).get(timeout=TIMEOUT) == 8


# ----------------------------------------------------------------------- bad messages


@pytest.mark.parametrize(
    "body, headers",
    [
        pytest.param([[1, 2], {}, {}], None, id="missing-headers"),
        pytest.param([1, 2], {"task": "x", "id": "bad-body"}, id="body-of-two-items"),
        pytest.param({"args": [1, 2]}, {"task": "x", "id": "bad-body"}, id="body-is-a-dict"),
        pytest.param([[], {}, "oops"], {"task": "x", "id": "bad-embed"}, id="embed-not-a-dict"),
        pytest.param(
            [[], {}, {}],
            {"task": "x", "id": "bad-limit", "timelimit": 5},
            id="timelimit-not-a-pair",
        ),
    ],
)
def test_malformed_message_is_dead_lettered_and_the_worker_goes_on(
    kernel_app, tasks, kernel_worker, caplog, body, headers
):
    publish_raw(kernel_app, body, headers, serializer="json")

    message = dead_letter(kernel_app)
    assert message is not None, "the malformed message was not dead-lettered"
    assert message.payload == body
    assert DEAD_LETTER_REASON_HEADER in message.headers
    errors = error_records(caplog)
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert kernel_app.conf.task_dead_letter_queue in errors[0].getMessage()

    assert tasks.add.delay(1, 1).get(timeout=TIMEOUT) == 2


def test_message_with_content_type_not_accepted_is_dead_lettered(
    kernel_app, tasks, kernel_worker, caplog
):
    task_id = str(uuid.uuid4())
    publish_raw(
        kernel_app, [[1, 2], {}, {}], {"task": tasks.add.name, "id": task_id}, serializer="pickle"
    )

    message = dead_letter(kernel_app)
    assert message is not None
    assert message.content_type == "application/x-python-serialize"
    assert "not accepted" in message.headers[DEAD_LETTER_REASON_HEADER]
    errors = error_records(caplog)
    assert len(errors) == 1
    assert task_id in errors[0].getMessage()
    assert ("add", 1, 2) not in tasks.ran

    assert tasks.add.delay(1, 1).get(timeout=TIMEOUT) == 2


def test_unknown_task_name_is_stored_as_not_registered_failure(kernel_app, tasks, kernel_worker):
    result = kernel_app.send_task("proj.not_defined_here", (1,))

    with pytest.raises(NotRegistered, match="proj.not_defined_here"):
        result.get(timeout=TIMEOUT)
    assert result.state == states.FAILURE
    message = dead_letter(kernel_app)
    assert message is not None
    assert message.headers["id"] == result.id


def test_message_delivered_too_often_is_dead_lettered_as_worker_lost(
    kernel_app, tasks, kernel_worker
):
    deliveries = kernel_app.conf.task_max_deliveries
    result = tasks.add.apply_async((1, 2), headers={"x-delivery-count": deliveries})

    with pytest.raises(WorkerLostError, match="task_max_deliveries"):
        result.get(timeout=TIMEOUT)
    assert result.state == states.FAILURE
    message = dead_letter(kernel_app)
    assert message is not None
    assert message.headers["id"] == result.id
    assert tasks.ran == []


def test_message_below_max_deliveries_still_runs(tasks, kernel_worker, kernel_app):
    deliveries = kernel_app.conf.task_max_deliveries - 1
    result = tasks.add.apply_async((1, 2), headers={"x-delivery-count": deliveries})
    assert result.get(timeout=TIMEOUT) == 3


# ----------------------------------------------------------------------- time


def test_expired_task_is_revoked_and_not_run(tasks, kernel_worker):
    expired = datetime.now(timezone.utc) - timedelta(seconds=1)
    result = tasks.add.apply_async((1, 2), expires=expired)

    with pytest.raises(TaskRevokedError):
        result.get(timeout=TIMEOUT)
    assert result.state == states.REVOKED
    assert tasks.ran == []


def test_countdown_task_runs_only_after_its_countdown(tasks, kernel_worker):
    countdown = 0.5
    sent_at = time.time()
    result = tasks.now.apply_async(countdown=countdown)

    ran_at = result.get(timeout=TIMEOUT + countdown)
    assert ran_at >= sent_at + countdown


def test_waiting_countdown_tasks_do_not_block_new_tasks(tasks, kernel_worker):
    """Held countdown messages must not use up the prefetch window (Celery raises it)."""
    waiting = [tasks.now.apply_async(countdown=2.0) for _ in range(kernel_worker.prefetch_count)]
    sent_at = time.time()
    ran_at = tasks.now.delay().get(timeout=TIMEOUT)

    assert ran_at - sent_at < 1.0, (
        f"an immediate task waited {ran_at - sent_at:.1f}s behind {len(waiting)} countdown tasks"
    )


def test_worker_runs_other_tasks_while_a_countdown_task_waits(tasks, kernel_worker):
    later = tasks.now.apply_async(countdown=1.0)
    sooner = tasks.now.delay()

    assert sooner.get(timeout=TIMEOUT) < later.get(timeout=TIMEOUT + 1)


# ----------------------------------------------------------------------- pools


def test_threads_pool_runs_tasks_concurrently(kernel_app):
    parties = 4
    barrier = threading.Barrier(parties, timeout=TIMEOUT)

    @kernel_app.task
    def meet():
        barrier.wait()  # breaks (and the task fails) unless all run at once
        return True

    worker, thread = start_worker(kernel_app, pool="threads", concurrency=parties)
    try:
        results = [meet.delay() for _ in range(parties)]
        assert [r.get(timeout=TIMEOUT * 2) for r in results] == [True] * parties
    finally:
        stop_worker(worker, thread)


def test_worker_counts_succeeded_and_failed_tasks(tasks, kernel_worker):
    tasks.add.delay(1, 1).get(timeout=TIMEOUT)
    with pytest.raises(ValueError):
        tasks.fail.delay("x").get(timeout=TIMEOUT)
    assert wait_until(lambda: kernel_worker.counts["failed"] == 1)
    assert kernel_worker.counts["succeeded"] == 1


def test_task_rejecting_itself_without_requeue_is_dead_lettered(kernel_app, kernel_worker):
    from kombu import Connection

    from kernel.exceptions import Reject

    @kernel_app.task
    def refuse():
        raise Reject("not today", requeue=False)

    refuse.delay()
    with Connection("memory://") as connection:
        dead = connection.SimpleQueue(kernel_app.conf.task_dead_letter_queue)
        message = dead.get(timeout=10)
        assert "Reject" in message.headers["x-dead-letter-reason"]
        message.ack()
        dead.close()


def test_task_that_expires_while_reserved_is_revoked_not_run(kernel_app, kernel_worker):
    import time as time_module

    ran = []

    @kernel_app.task
    def slow():
        time_module.sleep(0.5)

    @kernel_app.task
    def quick():
        ran.append(1)

    blocker = slow.delay()
    late = quick.apply_async(expires=0.2)  # reserved behind the slow task, expires meanwhile
    blocker.get(timeout=10)
    deadline = time_module.monotonic() + 10
    while late.state != "REVOKED" and time_module.monotonic() < deadline:
        time_module.sleep(0.02)
    assert late.state == "REVOKED"
    assert ran == []


def test_retry_goes_back_to_the_queue_it_was_routed_to(kernel_app):
    from kernel.testing.pytest_plugin import start_worker, stop_worker

    kernel_app.conf.task_routes = {"*.bounce": {"queue": "bounces", "routing_key": "rk.bounce"}}
    seen = []

    @kernel_app.task(bind=True, name="routed.bounce", max_retries=2)
    def bounce(self):
        seen.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return "done"

    worker, thread = start_worker(kernel_app, queues=["bounces"])
    try:
        assert bounce.delay().get(timeout=10) == "done"
    finally:
        stop_worker(worker, thread)
    assert seen == [0, 1, 2]


def test_retry_state_is_stored_before_the_retry_is_sent(kernel_app, kernel_worker):
    from kernel import hookimpl

    states_at_publish = []

    class Watch:
        @hookimpl
        def kernel_before_task_publish(self, app, name, body, headers, properties, routing):
            if headers.get("retries"):
                states_at_publish.append(app.AsyncResult(headers["id"]).state)

    kernel_app.plugins.register(Watch(), f"watch-{id(kernel_app)}")

    @kernel_app.task(bind=True, max_retries=1)
    def once_more(self):
        if not self.request.retries:
            raise self.retry(countdown=0)
        return "ok"

    try:
        assert once_more.delay().get(timeout=10) == "ok"
    finally:
        kernel_app.plugins.pm.unregister(name=f"watch-{id(kernel_app)}")
    assert states_at_publish == ["RETRY"]


def test_worker_says_at_start_up_that_its_pool_does_not_enforce_time_limits(kernel_app, caplog):
    from kernel.worker.worker import Worker

    kernel_app.conf.task_time_limit = 30
    with caplog.at_level("WARNING", logger="kernel.worker.worker"):
        Worker(kernel_app, pool="threads", install_signal_handlers=False)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "pool threads does not enforce hard time limits (time_limit); tasks run without them"
    ]


def test_compressed_message_runs_and_returns_its_result(kernel_app, kernel_worker):
    @kernel_app.task
    def echo(text):
        return text

    assert echo.apply_async(("x" * 5000,), compression="zlib").get(timeout=10) == "x" * 5000


def test_pickle_message_is_refused_unless_accept_content_allows_it(kernel_app):
    from kernel.testing.pytest_plugin import start_worker, stop_worker

    @kernel_app.task
    def echo(value):
        return value

    worker, thread = start_worker(kernel_app)
    try:
        refused = echo.apply_async(({"a": 1},), serializer="pickle")
        assert refused.get(timeout=10, propagate=False) is not None
        assert refused.state == "FAILURE"
        assert "not accepted" in str(refused.result)
    finally:
        stop_worker(worker, thread)
    kernel_app.conf.accept_content = ["json", "pickle"]
    worker, thread = start_worker(kernel_app)
    try:
        assert echo.apply_async(({"a": 1},), serializer="pickle").get(timeout=10) == {"a": 1}
    finally:
        stop_worker(worker, thread)


def test_retry_of_a_task_whose_results_are_ignored_by_setting_stores_nothing(
    kernel_app, kernel_worker
):
    kernel_app.conf.task_ignore_result = True
    finished = []

    @kernel_app.task(bind=True, max_retries=1)
    def quiet(self):
        if not self.request.retries:
            raise self.retry(countdown=0)
        finished.append(self.request.id)

    result = quiet.delay()
    deadline = time.monotonic() + 10
    while not finished and time.monotonic() < deadline:
        time.sleep(0.02)
    assert finished == [result.id]
    assert result.state == "PENDING"  # neither RETRY nor SUCCESS was stored
