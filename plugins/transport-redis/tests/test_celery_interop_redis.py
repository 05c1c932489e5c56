"""Wire compatibility with real Celery over Redis, broker and result backend both.

A ``kernel worker --plugin redis`` and a ``celery worker`` (solo pool) run as
subprocesses on one Redis database, each consuming a queue of its own (see
``interop_tasks``). Celery clients send to the kernel worker and read its results
with Celery's own Redis backend; kernel clients send to the Celery worker and read its
results with this plugin's backend. Celery's side uses nothing of kernel: its stock
kombu Redis transport and result backend, as a process that has not migrated yet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

celery = pytest.importorskip("celery")
celery_exceptions = pytest.importorskip("celery.exceptions")

import redis  # noqa: E402
from interop_tasks import CELERY_QUEUE, KERNEL_QUEUE, InteropError  # noqa: E402 - imports celery

from kernel import App, chord  # noqa: E402
from kernel.exceptions import ChordError  # noqa: E402
from kernel.exceptions import TimeoutError as KernelTimeoutError  # noqa: E402

pytestmark = pytest.mark.integration

TESTS_DIR = Path(__file__).parent
#: Seconds a worker subprocess has to say it is ready.
START_TIMEOUT = 60.0
#: Seconds any one result has to arrive.
RESULT_TIMEOUT = 30.0
#: Lines of a worker's log quoted when a test fails waiting on it.
LOG_TAIL = 40


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``predicate`` until truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class WorkerProcess:
    """A worker subprocess in its own session (so its pool children die with it),
    logging to a file."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path, ready_marker: str
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.ready_marker = ready_marker
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=TESTS_DIR,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self) -> str:
        lines = self.log().splitlines()[-LOG_TAIL:]
        return f"--- last lines of the {self.name} log ({self.log_path}):\n" + "\n".join(lines)

    def wait_ready(self) -> WorkerProcess:
        def ready() -> bool:
            if self.ready_marker in self.log():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the {self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            return False

        try:
            wait_until(ready, START_TIMEOUT, f"the {self.name} to be ready")
        except AssertionError:
            self.stop()
            raise
        return self

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"the {self.name} died (exit {self.proc.returncode}):\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM (warm shutdown), then SIGKILL the whole session if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:  # the worker, or pool children a dead worker left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def worker_env(redis_db: str) -> dict[str, str]:
    return {
        **os.environ,
        "INTEROP_REDIS_URL": redis_db,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def kernel_worker(worker_env, tmp_path_factory) -> Iterator[WorkerProcess]:
    """``kernel worker --plugin redis`` on the kernel queue, solo pool."""
    log_path = tmp_path_factory.mktemp("kernel-worker") / "worker.log"
    argv = [sys.executable, "-m", "kernel", "-A", "interop_tasks:kernel_app", "worker"]
    argv += ["--plugin", "redis", "-P", "solo", "-l", "INFO", "-n", "kernel-interop@%h"]
    argv += ["-Q", KERNEL_QUEUE]
    process = WorkerProcess("kernel worker", argv, worker_env, log_path, " ready: ")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def celery_worker(worker_env, tmp_path_factory) -> Iterator[WorkerProcess]:
    """A real ``celery worker`` on the Celery queue, solo pool."""
    log_path = tmp_path_factory.mktemp("celery-worker") / "worker.log"
    argv = [sys.executable, "-m", "celery", "-A", "interop_tasks:celery_app", "worker"]
    argv += ["-P", "solo", "-l", "INFO", "-n", "celery-interop@%h", "-Q", CELERY_QUEUE]
    argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    process = WorkerProcess("celery worker", argv, worker_env, log_path, " ready.")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture
def on_kernel(kernel_worker) -> Iterator[WorkerProcess]:
    """The kernel worker, checked alive before and after the test."""
    kernel_worker.check_alive()
    yield kernel_worker
    kernel_worker.check_alive()


@pytest.fixture
def on_celery(celery_worker) -> Iterator[WorkerProcess]:
    """The Celery worker, checked alive before and after the test."""
    celery_worker.check_alive()
    yield celery_worker
    celery_worker.check_alive()


@pytest.fixture
def celery_client(redis_db) -> Iterator[celery.Celery]:
    """A Celery 5 client on stock kombu Redis; its tasks go to the kernel worker.

    Its task is a stand-in for ``delay()``: only the worker's definition runs.
    """
    app = celery.Celery("interop_client", broker=redis_db, backend=redis_db, set_as_current=False)
    app.conf.task_default_queue = KERNEL_QUEUE

    @app.task(name="interop.describe", shared=False)
    def describe(*args, **kwargs):
        raise AssertionError("a client's stand-in: runs on the kernel worker only")

    yield app
    app.close()


@pytest.fixture
def kernel_client(redis_db, kernel_plugins) -> Iterator[App]:
    """A kernel client on this plugin's broker and backend; its tasks go to the Celery
    worker. Its task is a stand-in for ``delay()``: only the worker's definition runs."""
    app = App(
        "interop_client",
        broker=redis_db,
        backend=redis_db,
        task_default_queue=CELERY_QUEUE,
        plugins=kernel_plugins,
    )

    @app.task(name="interop.describe")
    def describe(*args, **kwargs):
        raise AssertionError("a client's stand-in: runs on the Celery worker only")

    yield app
    app.close()


@pytest.fixture
def raw(redis_db) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_db)
    yield client
    client.close()


def outcome(result: Any, worker: WorkerProcess) -> Any:
    """``result.get()`` within :data:`RESULT_TIMEOUT` (Celery's or kernel's handle); a
    timeout fails the test with the end of the worker's log."""
    try:
        return result.get(timeout=RESULT_TIMEOUT)
    except (celery_exceptions.TimeoutError, KernelTimeoutError) as exc:
        raise AssertionError(f"no result for {result.id}: {exc}\n{worker.tail()}") from exc


# -- a task each way -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["delay", "send_task"])
def test_celery_clients_task_runs_on_a_kernel_worker_and_both_read_its_result(
    how, celery_client, kernel_client, on_kernel
):
    args, kwargs = ("x", [1, 2]), {"label": "from celery"}
    if how == "delay":
        sent = celery_client.tasks["interop.describe"].delay(*args, **kwargs)
    else:
        sent = celery_client.send_task("interop.describe", args, kwargs)
    value = outcome(sent, on_kernel)
    assert value == {
        "ran_on": "kernel",
        "args": ["x", [1, 2]],
        "kwargs": {"label": "from celery"},
        "id": sent.id,
        "root_id": sent.id,
        "parent_id": None,
        "retries": 0,
    }
    assert sent.state == "SUCCESS"
    read_by_kernel = kernel_client.AsyncResult(sent.id)
    assert outcome(read_by_kernel, on_kernel) == value
    assert read_by_kernel.state == "SUCCESS"
    assert read_by_kernel.date_done is not None


def test_celery_clients_countdown_task_runs_on_a_kernel_worker_once_due(celery_client, on_kernel):
    countdown = 1.0
    started = time.monotonic()
    sent = celery_client.send_task("interop.describe", ("later",), countdown=countdown)
    assert outcome(sent, on_kernel)["args"] == ["later"]
    assert time.monotonic() - started >= countdown


@pytest.mark.parametrize("how", ["delay", "send_task"])
def test_kernel_clients_task_runs_on_a_celery_worker_and_both_read_its_result(
    how, kernel_client, celery_client, on_celery
):
    args, kwargs = (3, {"nested": [None, True]}), {"label": "from kernel"}
    if how == "delay":
        sent = kernel_client.tasks["interop.describe"].delay(*args, **kwargs)
    else:
        sent = kernel_client.send_task("interop.describe", args, kwargs)
    value = outcome(sent, on_celery)
    assert value == {
        "ran_on": "celery",
        "args": [3, {"nested": [None, True]}],
        "kwargs": {"label": "from kernel"},
        "id": sent.id,
        "root_id": sent.id,
        "parent_id": None,
        "retries": 0,
    }
    assert sent.state == "SUCCESS"
    assert sent.date_done is not None
    read_by_celery = celery_client.AsyncResult(sent.id)
    assert outcome(read_by_celery, on_celery) == value
    assert read_by_celery.state == "SUCCESS"


# -- failures --------------------------------------------------------------------------

FAILURES = [
    pytest.param("builtin", LookupError, id="builtin-exception"),
    pytest.param("custom", InteropError, id="application-exception"),
]


@pytest.mark.parametrize(("kind", "error"), FAILURES)
def test_kernel_workers_failure_reads_as_the_same_exception_in_celery(
    kind, error, celery_client, kernel_client, on_kernel
):
    message = f"no such thing: {kind} #42"
    sent = celery_client.send_task("interop.fail", (kind, message))
    with pytest.raises(error) as raised:
        outcome(sent, on_kernel)
    assert raised.type is error and str(raised.value) == message
    assert sent.state == "FAILURE"
    assert sent.traceback.startswith("Traceback (most recent call last)")
    assert f"{error.__name__}: {message}" in sent.traceback
    read_by_kernel = kernel_client.AsyncResult(sent.id)
    with pytest.raises(error) as raised:
        outcome(read_by_kernel, on_kernel)
    assert raised.type is error and str(raised.value) == message
    assert read_by_kernel.traceback == sent.traceback


@pytest.mark.parametrize(("kind", "error"), FAILURES)
def test_celery_workers_failure_reads_as_the_same_exception_in_kernel(
    kind, error, kernel_client, celery_client, on_celery
):
    message = f"no such thing: {kind} #43"
    sent = kernel_client.send_task("interop.fail", (kind, message))
    with pytest.raises(error) as raised:
        outcome(sent, on_celery)
    assert raised.type is error and str(raised.value) == message
    assert sent.state == "FAILURE"
    assert sent.traceback.startswith("Traceback (most recent call last)")
    assert f"{error.__name__}: {message}" in sent.traceback
    read_by_celery = celery_client.AsyncResult(sent.id)
    with pytest.raises(error) as raised:
        outcome(read_by_celery, on_celery)
    assert raised.type is error and str(raised.value) == message
    assert read_by_celery.traceback == sent.traceback


# -- retries ---------------------------------------------------------------------------


def wait_for_retry_state(result: Any, worker: WorkerProcess) -> None:
    try:
        wait_until(lambda: result.state == "RETRY", RESULT_TIMEOUT, f"RETRY of {result.id}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{worker.tail()}") from None


def test_kernel_worker_retries_a_celery_clients_task_and_celery_reads_each_state(
    celery_client, kernel_client, raw, on_kernel
):
    release_key = f"interop.release.{uuid.uuid4().hex}"
    sent = celery_client.send_task("interop.retry_once", (release_key,))
    try:
        wait_for_retry_state(sent, on_kernel)  # its second run waits for the release
        assert isinstance(sent.info, InteropError)
        assert str(sent.info) == "first run asks for a retry"
        assert kernel_client.AsyncResult(sent.id).state == "RETRY"
    finally:  # whatever happened, do not leave the worker waiting
        raw.rpush(release_key, "go")
    expected = {"ran_on": "kernel", "retries": 1, "released": True}
    assert outcome(sent, on_kernel) == expected
    assert outcome(kernel_client.AsyncResult(sent.id), on_kernel) == expected


def test_celery_worker_retries_a_kernel_clients_task_and_kernel_reads_each_state(
    kernel_client, celery_client, raw, on_celery
):
    release_key = f"interop.release.{uuid.uuid4().hex}"
    sent = kernel_client.send_task("interop.retry_once", (release_key,))
    try:
        wait_for_retry_state(sent, on_celery)  # its second run waits for the release
        assert isinstance(sent.info, InteropError)
        assert str(sent.info) == "first run asks for a retry"
        assert celery_client.AsyncResult(sent.id).state == "RETRY"
    finally:  # whatever happened, do not leave the worker waiting
        raw.rpush(release_key, "go")
    expected = {"ran_on": "celery", "retries": 1, "released": True}
    assert outcome(sent, on_celery) == expected
    assert outcome(celery_client.AsyncResult(sent.id), on_celery) == expected


# -- chords ----------------------------------------------------------------------------

SQUARES = {"values": [0, 1, 4, 9, 16, 25], "sum": 55}


def test_celery_clients_chord_completes_on_kernel_workers(celery_client, kernel_client, on_kernel):
    header = [celery_client.signature("interop.square", (i,)) for i in range(6)]
    sent = celery.chord(header)(celery_client.signature("interop.total"))
    expected = {"ran_on": "kernel", **SQUARES}
    assert outcome(sent, on_kernel) == expected
    assert outcome(kernel_client.AsyncResult(sent.id), on_kernel) == expected
    assert [outcome(part, on_kernel) for part in sent.parent.results] == SQUARES["values"]


def test_kernel_clients_chord_completes_on_a_celery_worker(kernel_client, celery_client, on_celery):
    header = [kernel_client.signature("interop.square", (i,)) for i in range(6)]
    sent = chord(header)(kernel_client.signature("interop.total"))
    expected = {"ran_on": "celery", **SQUARES}
    assert outcome(sent, on_celery) == expected
    assert outcome(celery_client.AsyncResult(sent.id), on_celery) == expected


def failing_header(app: Any) -> list[Any]:
    """Three parts, the middle one failing; frozen, so their ids are known."""
    parts = [
        app.signature("interop.square", (2,)),
        app.signature("interop.fail", ("custom", "part two broke")),
        app.signature("interop.square", (3,)),
    ]
    for part in parts:
        part.freeze()
    return parts


def test_celery_clients_chord_with_a_failed_part_fails_its_body_on_kernel_workers(
    celery_client, kernel_client, on_kernel
):
    header = failing_header(celery_client)
    sent = celery.chord(header)(celery_client.signature("interop.total"))
    reason = f"Dependency {header[1].id} raised InteropError('part two broke')"
    body = celery_client.AsyncResult(sent.id)  # ``sent`` would raise its parent's error first
    with pytest.raises(celery_exceptions.ChordError) as raised:
        outcome(body, on_kernel)
    assert str(raised.value) == reason
    assert body.state == "FAILURE"
    with pytest.raises(ChordError) as raised:
        outcome(kernel_client.AsyncResult(sent.id), on_kernel)
    assert str(raised.value) == reason


def test_kernel_clients_chord_with_a_failed_part_fails_its_body_on_a_celery_worker(
    kernel_client, celery_client, on_celery
):
    header = failing_header(kernel_client)
    sent = chord(header)(kernel_client.signature("interop.total"))
    reason = f"Dependency {header[1].id} raised InteropError('part two broke')"
    with pytest.raises(ChordError) as raised:
        outcome(sent, on_celery)
    assert str(raised.value) == reason
    assert sent.state == "FAILURE"
    with pytest.raises(celery_exceptions.ChordError) as raised:
        outcome(celery_client.AsyncResult(sent.id), on_celery)
    assert str(raised.value) == reason
