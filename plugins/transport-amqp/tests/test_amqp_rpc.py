"""rpc:// with workers in the test process: every state reaches the client that sent
the task, chains report back to it, and threads share one reply queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from amqp_harness import Broker, wait_until

from kernel import App, chain
from kernel.testing.pytest_plugin import start_worker, stop_worker

pytestmark = pytest.mark.integration


@pytest.fixture
def app(rabbitmq_url: str, delay_prefix: str, broker: Broker) -> Iterator[App]:
    control = broker.name("control")
    broker.track(exchange=f"{control}.pidbox")
    broker.track(exchange=f"reply.{control}.pidbox")
    instance = App(
        "rpc",
        broker=rabbitmq_url,
        backend="rpc://",
        task_default_queue=broker.name("rpc"),
        control_exchange=control,
        broker_transport_options={"delayed_delivery_prefix": delay_prefix},
        task_track_started=True,
    )
    yield instance
    if instance._backend is not None:
        broker.track(queue=instance._backend.reply_queue_name)
    instance.close()


@pytest.fixture
def worker(app: App) -> Iterator[object]:
    worker, thread = start_worker(app, pool="threads", concurrency=4)
    yield worker
    stop_worker(worker, thread)


def test_started_progress_and_success_states_reach_the_client(app, worker):
    release = threading.Event()

    @app.task(name="rpc.progress", bind=True)
    def progress(self):
        self.update_state(state="PROGRESS", meta={"done": 1, "total": 2})
        release.wait(10)
        return "finished"

    result = progress.delay()
    wait_until(lambda: result.state == "PROGRESS", 10, "the PROGRESS state")
    assert result.info == {"done": 1, "total": 2}
    release.set()
    assert result.get(timeout=10) == "finished"
    assert result.state == "SUCCESS"
    assert result.date_done is not None


def test_a_chain_reports_every_step_to_the_client_that_started_it(app, worker):
    @app.task(name="rpc.add")
    def add(x, y):
        return x + y

    result = chain(add.s(1, 2), add.s(10), add.s(100)).apply_async()
    assert result.get(timeout=15) == 113
    assert result.parent.get(timeout=5) == 13
    assert result.parent.parent.get(timeout=5) == 3


def test_any_thread_of_the_client_reads_any_result_and_waits_are_woken(app, worker):
    @app.task(name="rpc.slow")
    def slow(value, seconds):
        time.sleep(seconds)
        return value

    results = [slow.delay(n, 0.2 * (n % 3)) for n in range(12)]
    values: dict[int, object] = {}

    def wait(n: int) -> None:
        values[n] = results[n].get(timeout=20)

    threads = [threading.Thread(target=wait, args=(n,)) for n in range(12)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert values == {n: n for n in range(12)}
    assert time.monotonic() - started < 5  # woken by arrivals, not by slow polling


def test_a_result_sent_while_nobody_waits_is_kept_until_asked_for(app, worker):
    @app.task(name="rpc.echo")
    def echo(value):
        return value

    first, second = echo.delay("a"), echo.delay("b")
    assert second.get(timeout=10) == "b"  # reads "a" too, into memory
    assert first.ready()
    assert first.get(timeout=1) == "a"
    first.forget()
    assert app.AsyncResult(first.id).state == "PENDING"
