"""Wire compatibility with real Celery 5 over RabbitMQ: rpc:// (and redis://) results.

A ``kernel worker`` and a ``celery worker`` (solo pool) run as subprocesses on one
RabbitMQ, each consuming a queue of its own (see ``amqp_interop_tasks``). Celery
clients send to the kernel worker and read the results with Celery's own rpc://
backend (its reply queue, its consumer); kernel clients send to the Celery worker and
read the results with this plugin's rpc:// backend. Celery's side uses nothing of
kernel: its stock kombu py-amqp transport.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

celery = pytest.importorskip("celery")
celery_exceptions = pytest.importorskip("celery.exceptions")
celery_result = pytest.importorskip("celery.result")

from amqp_harness import RUN, TESTS_DIR, Broker, WorkerProcess, wait_until  # noqa: E402
from amqp_interop_tasks import InteropError  # noqa: E402 - imports celery
from kernel_amqp import delayed  # noqa: E402
from kombu import Exchange, Queue  # noqa: E402

from kernel import App  # noqa: E402
from kernel.exceptions import TimeoutError as KernelTimeoutError  # noqa: E402
from kernel.testing.services import require_service  # noqa: E402

pytestmark = pytest.mark.integration

#: Seconds any one result has to arrive.
RESULT_TIMEOUT = 30.0


class Side:
    """A kernel worker and a Celery worker on queues of their own, sharing a result
    backend; clients of either kind, made on demand."""

    def __init__(
        self,
        tmp_path: Path,
        url: str,
        backend: str,
        broker: Broker,
        kernel_options: dict | None = None,
        quorum_topic: bool = False,
    ) -> None:
        self.url, self.backend, self.broker = url, backend, broker
        tag = uuid.uuid4().hex[:6]
        self.kernel_queue = f"kt{RUN}.ikernel.{tag}"
        self.celery_queue = f"kt{RUN}.icelery.{tag}"
        self.control = f"kt{RUN}.icontrol.{tag}"
        for name in (self.kernel_queue, self.celery_queue):
            broker.track(queue=name, exchange=name)
        broker.track(exchange=f"{self.control}.pidbox")
        broker.track(exchange=f"reply.{self.control}.pidbox")
        self.release_dir = tmp_path / "release"
        self.release_dir.mkdir()
        self.kernel_options = dict(kernel_options or {})
        self.quorum_topic = quorum_topic
        if quorum_topic:  # both queues as Celery's task_queues define them
            self.kernel_options["queues"] = [
                {
                    "name": name,
                    "exchange": name,
                    "exchange_type": "topic",
                    "routing_key": name,
                    "queue_arguments": {"x-queue-type": "quorum"},
                }
                for name in (self.kernel_queue, self.celery_queue)
            ]
        import json

        self.env = {
            **os.environ,
            "INTEROP_AMQP_URL": url,
            "INTEROP_BACKEND": backend,
            "INTEROP_KERNEL_QUEUE": self.kernel_queue,
            "INTEROP_CELERY_QUEUE": self.celery_queue,
            "INTEROP_CONTROL": self.control,
            "INTEROP_RELEASE_DIR": str(self.release_dir),
            "INTEROP_KERNEL_OPTIONS": json.dumps(self.kernel_options),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])
            ),
            "PYTHONUNBUFFERED": "1",
        }
        if quorum_topic:
            self.env["INTEROP_QUORUM_TOPIC"] = "1"
        self.tmp_path = tmp_path
        self.processes: list[WorkerProcess] = []
        self.clients: list[Any] = []

    def start_kernel_worker(self) -> WorkerProcess:
        args = ["-A", "amqp_interop_tasks:kernel_app", "worker", "-P", "solo", "-l", "INFO"]
        args += ["-n", "kernel-interop@%h", "-Q", self.kernel_queue]
        process = WorkerProcess("kernel worker", args, self.env, self.tmp_path / "kernel.log")
        self.processes.append(process)
        return process.wait_ready()

    def start_celery_worker(self) -> WorkerProcess:
        args = ["-A", "amqp_interop_tasks:celery_app", "worker", "-P", "solo", "-l", "INFO"]
        args += ["-n", "celery-interop@%h", "-Q", self.celery_queue]
        args += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
        process = WorkerProcess(
            "celery worker",
            args,
            self.env,
            self.tmp_path / "celery.log",
            command=[sys.executable, "-m", "celery"],
            ready_marker=" ready.",
        )
        self.processes.append(process)
        return process.wait_ready()

    def celery_client(self) -> Any:
        """A Celery 5 client whose tasks go to the kernel worker."""
        app = celery.Celery(
            "interop_client", broker=self.url, backend=self.backend, set_as_current=False
        )
        app.conf.task_default_queue = self.kernel_queue
        app.conf.control_exchange = self.control
        if self.quorum_topic:
            exchange = Exchange(self.kernel_queue, "topic")
            app.conf.task_queues = [
                Queue(
                    self.kernel_queue,
                    exchange,
                    routing_key=self.kernel_queue,
                    queue_arguments={"x-queue-type": "quorum"},
                )
            ]
        self.clients.append(app)
        return app

    def kernel_client(self) -> App:
        """A kernel client whose tasks go to the Celery worker."""
        app = App(
            "interop_client",
            broker=self.url,
            backend=self.backend,
            task_default_queue=self.celery_queue,
            control_exchange=self.control,
            broker_transport_options=dict(self.kernel_options),
        )
        self.clients.append(app)
        return app

    def release(self, name: str) -> None:
        (self.release_dir / name).touch()

    def close(self) -> None:
        for process in self.processes:
            if process.name.startswith("celery"):
                # The tests are over: its warm stop waits for what it still holds (on a
                # quorum queue 15-20 s), for nothing.
                process.kill_group()
            process.stop()  # kernel workers stop warm: they delete their reply queues
        for client in self.clients:
            backend = getattr(client, "_backend", None)
            if backend is not None and hasattr(backend, "reply_queue_name"):
                self.broker.track(queue=backend.reply_queue_name)
            try:
                client.close()
            except Exception:
                pass


@pytest.fixture(scope="module")
def module_broker(rabbitmq_url) -> Iterator[Broker]:
    instance = Broker(rabbitmq_url)
    yield instance
    instance.close()


def _side(tmp_path_factory, rabbitmq_url, module_broker, backend, **options) -> Iterator[Side]:
    side = Side(tmp_path_factory.mktemp("interop"), rabbitmq_url, backend, module_broker, **options)
    try:
        side.start_kernel_worker()
        side.start_celery_worker()
        yield side
    finally:
        side.close()


@pytest.fixture(scope="module")
def rpc_side(tmp_path_factory, rabbitmq_url, delay_prefix, module_broker) -> Iterator[Side]:
    """Both workers with rpc:// results."""
    yield from _side(
        tmp_path_factory,
        rabbitmq_url,
        module_broker,
        "rpc://",
        kernel_options={"delayed_delivery_prefix": delay_prefix},
    )


@pytest.fixture(scope="module")
def redis_side(tmp_path_factory, rabbitmq_url, delay_prefix, module_broker) -> Iterator[Side]:
    """Both workers with redis:// results (the Redis plugin on the kernel side)."""
    host, port = require_service("redis")
    yield from _side(
        tmp_path_factory,
        rabbitmq_url,
        module_broker,
        f"redis://{host}:{port}/0",
        kernel_options={"delayed_delivery_prefix": delay_prefix},
    )


def outcome(result: Any, side: Side) -> Any:
    """``result.get()`` within :data:`RESULT_TIMEOUT`; a timeout fails the test with the
    end of the workers' logs."""
    try:
        return result.get(timeout=RESULT_TIMEOUT)
    except (celery_exceptions.TimeoutError, KernelTimeoutError) as exc:
        logs = "\n".join(process.tail(30) for process in side.processes)
        raise AssertionError(f"no result for {result.id}: {exc}\n{logs}") from exc


def expected(side: str, args: list, kwargs: dict, task_id: str) -> dict:
    return {"ran_on": side, "args": args, "kwargs": kwargs, "id": task_id, "retries": 0}


def without_time(value: dict) -> dict:
    return {key: item for key, item in value.items() if key != "ran_at"}


# -- rpc:// both ways ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["delay", "send_task"])
def test_celery_clients_task_runs_on_a_kernel_worker_and_its_rpc_result_comes_back(how, rpc_side):
    client = rpc_side.celery_client()

    @client.task(name="interop.describe", shared=False)
    def describe(*args, **kwargs):
        raise AssertionError("a client's stand-in: runs on the kernel worker only")

    args, kwargs = ("x", [1, 2]), {"label": "from celery"}
    if how == "delay":
        sent = describe.delay(*args, **kwargs)
    else:
        sent = client.send_task("interop.describe", args, kwargs)
    value = outcome(sent, rpc_side)
    assert without_time(value) == expected("kernel", ["x", [1, 2]], kwargs, sent.id)
    assert sent.state == "SUCCESS"


@pytest.mark.parametrize("how", ["delay", "send_task"])
def test_kernel_clients_task_runs_on_a_celery_worker_and_its_rpc_result_comes_back(how, rpc_side):
    client = rpc_side.kernel_client()

    @client.task(name="interop.describe")
    def describe(*args, **kwargs):
        raise AssertionError("a client's stand-in: runs on the Celery worker only")

    args, kwargs = (3, {"nested": [None, True]}), {"label": "from kernel"}
    if how == "delay":
        sent = describe.delay(*args, **kwargs)
    else:
        sent = client.send_task("interop.describe", args, kwargs)
    value = outcome(sent, rpc_side)
    assert without_time(value) == expected("celery", [3, {"nested": [None, True]}], kwargs, sent.id)
    assert sent.state == "SUCCESS"
    assert sent.date_done is not None


FAILURES = [
    pytest.param("builtin", LookupError, id="builtin-exception"),
    pytest.param("custom", InteropError, id="application-exception"),
]


@pytest.mark.parametrize(("kind", "error"), FAILURES)
def test_kernel_workers_failure_reads_as_the_same_exception_in_celery_over_rpc(
    kind, error, rpc_side
):
    client = rpc_side.celery_client()
    message = f"no such thing: {kind} #42"
    sent = client.send_task("interop.fail", (kind, message))
    with pytest.raises(error) as raised:
        outcome(sent, rpc_side)
    assert raised.type is error and str(raised.value) == message
    assert sent.state == "FAILURE"
    assert f"{error.__name__}: {message}" in sent.traceback


@pytest.mark.parametrize(("kind", "error"), FAILURES)
def test_celery_workers_failure_reads_as_the_same_exception_in_kernel_over_rpc(
    kind, error, rpc_side
):
    client = rpc_side.kernel_client()
    message = f"no such thing: {kind} #43"
    sent = client.send_task("interop.fail", (kind, message))
    with pytest.raises(error) as raised:
        outcome(sent, rpc_side)
    assert raised.type is error and str(raised.value) == message
    assert sent.state == "FAILURE"
    assert sent.traceback.startswith("Traceback (most recent call last)")


def test_celery_client_reads_retry_then_success_of_a_kernel_worker_over_rpc(rpc_side):
    client = rpc_side.celery_client()
    release = uuid.uuid4().hex
    sent = client.send_task("interop.retry_once", (release,))
    try:
        wait_until(lambda: sent.state == "RETRY", RESULT_TIMEOUT, f"RETRY of {sent.id}")
        assert isinstance(sent.info, InteropError)
    finally:
        rpc_side.release(release)
    assert outcome(sent, rpc_side) == {"ran_on": "kernel", "retries": 1, "released": True}


def test_kernel_client_reads_retry_then_success_of_a_celery_worker_over_rpc(rpc_side):
    client = rpc_side.kernel_client()
    release = uuid.uuid4().hex
    sent = client.send_task("interop.retry_once", (release,))
    try:
        wait_until(lambda: sent.state == "RETRY", RESULT_TIMEOUT, f"RETRY of {sent.id}")
        assert isinstance(sent.info, InteropError)
    finally:
        rpc_side.release(release)
    assert outcome(sent, rpc_side) == {"ran_on": "celery", "retries": 1, "released": True}


def test_get_across_several_pending_rpc_results_both_ways(rpc_side):
    celery_client = rpc_side.celery_client()
    from_celery = [celery_client.send_task("interop.square", (i,)) for i in range(10)]
    kernel_client = rpc_side.kernel_client()
    from_kernel = [kernel_client.send_task("interop.square", (i,)) for i in range(10)]
    squares = [i * i for i in range(10)]
    assert kernel_client.GroupResult("g", from_kernel).get(timeout=RESULT_TIMEOUT) == squares
    assert celery_result.ResultSet(from_celery).get(timeout=RESULT_TIMEOUT) == squares


def test_countdown_tasks_run_once_due_both_ways(rpc_side):
    countdown = 1.0
    celery_client = rpc_side.celery_client()
    kernel_client = rpc_side.kernel_client()
    sent_at = time.time()
    to_kernel = celery_client.send_task("interop.describe", ("later",), countdown=countdown)
    # A kernel client's delayed task waits in the broker, then reaches the Celery worker.
    to_celery = kernel_client.send_task("interop.describe", ("later",), countdown=countdown)
    assert outcome(to_kernel, rpc_side)["ran_at"] >= sent_at + countdown
    assert outcome(to_celery, rpc_side)["ran_at"] >= sent_at + countdown


# -- redis:// results with the RabbitMQ broker -------------------------------------------


def test_celery_and_kernel_share_redis_results_over_a_rabbitmq_broker(redis_side):
    import redis

    celery_client = redis_side.celery_client()
    kernel_client = redis_side.kernel_client()
    to_kernel = celery_client.send_task("interop.describe", ("via redis",))
    to_celery = kernel_client.send_task("interop.describe", ("via redis",))
    try:
        assert outcome(to_kernel, redis_side)["ran_on"] == "kernel"
        assert outcome(to_celery, redis_side)["ran_on"] == "celery"
        # Each side reads the other's stored result too (Celery's key layout).
        assert outcome(kernel_client.AsyncResult(to_kernel.id), redis_side)["ran_on"] == "kernel"
        assert outcome(celery_client.AsyncResult(to_celery.id), redis_side)["ran_on"] == "celery"
    finally:
        client = redis.Redis.from_url(redis_side.backend)
        client.delete(*(f"celery-task-meta-{r.id}" for r in (to_kernel, to_celery)))
        client.close()


# -- quorum queues: Celery 5.5's native delayed delivery ------------------------------


@pytest.fixture(scope="module")
def quorum_side(tmp_path_factory, rabbitmq_url, module_broker) -> Iterator[Side]:
    """A kernel worker and a Celery worker, each on a quorum queue behind a topic
    exchange, as Celery 5.5 wants for native delayed delivery; Celery's own delay
    topology names."""
    channel = module_broker.channel()
    try:
        channel.exchange_declare(delayed.delivery_exchange(), "topic", passive=True)
        existed = True
    except Exception:
        existed = False
    finally:
        if channel.is_open:
            channel.close()
    side = Side(
        tmp_path_factory.mktemp("quorum"),
        rabbitmq_url,
        "rpc://",
        module_broker,
        kernel_options={"queue_type": "quorum"},
        quorum_topic=True,
    )
    try:
        side.start_kernel_worker()
        side.start_celery_worker()
        yield side
    finally:
        side.close()
        if not existed:  # this test may have created Celery's shared topology: delete
            # what nobody else uses, never what other clients may have put there
            module_broker.delete_unused_delay_topology(None, [side.kernel_queue, side.celery_queue])


def test_celery_clients_countdown_task_on_a_quorum_queue_waits_in_rabbitmq(
    quorum_side, module_broker
):
    client = quorum_side.celery_client()
    countdown = 2
    sent_at = time.time()
    sent = client.send_task("interop.describe", ("native delay",), countdown=countdown)
    # Celery published it to its delay exchanges, shared with any other Celery client
    # of this broker: at least ours waits in the level-1 queue (2 s), not in ours.
    wait_until(
        lambda: module_broker.count(delayed.level_name(1)) >= 1,
        5,
        "the message in celery_delayed_1",
    )
    assert module_broker.count(quorum_side.kernel_queue) == 0  # not in our queue yet
    value = outcome(sent, quorum_side)
    assert value["ran_on"] == "kernel"
    assert value["ran_at"] >= sent_at + countdown


def test_kernel_clients_countdown_task_reaches_a_celery_worker_on_a_quorum_queue(
    quorum_side, module_broker
):
    client = quorum_side.kernel_client()
    countdown = 2
    sent_at = time.time()
    sent = client.send_task("interop.describe", ("native delay",), countdown=countdown)
    wait_until(
        lambda: module_broker.count(delayed.level_name(1)) >= 1,
        5,
        "the message in celery_delayed_1",
    )
    assert module_broker.count(quorum_side.celery_queue) == 0  # not in our queue yet
    value = outcome(sent, quorum_side)
    assert value["ran_on"] == "celery"
    assert value["ran_at"] >= sent_at + countdown


def test_celery_declares_a_quorum_queue_a_kernel_process_declared_first(
    rabbitmq_url, broker, delay_prefix
):
    """Review 2, finding 1: by default kernel declares a quorum task queue with exactly
    Celery's arguments, so a Celery client (which declares before sending) can too."""
    from kernel import App

    name = broker.name("quorum")
    app = App(
        "declares-first",
        broker=rabbitmq_url,
        task_default_queue=name,
        broker_transport_options={"queue_type": "quorum", "delayed_delivery_prefix": delay_prefix},
    )
    app.send_task("interop.nothing", ignore_result=True)
    app.close()
    client = celery.Celery("declares-second", broker=rabbitmq_url, set_as_current=False)
    client.conf.task_queues = [Queue(name, queue_arguments={"x-queue-type": "quorum"})]
    client.conf.task_default_queue = name
    client.send_task("interop.nothing", queue=name)  # PRECONDITION_FAILED before the fix
    # Celery publishes without confirms and a quorum queue counts a moment later.
    wait_until(
        lambda: broker.count(name) == 2,
        5,
        "both messages in the quorum queue",
        explain=lambda: f"{broker.count(name)} counted",
    )
