"""Delayed delivery, requeueing and rpc:// edge cases on RabbitMQ: which messages may
wait in the broker's delay topology (and which must be delivered at once for the
worker to hold), requeued copies, subtasks' results, declarations that fail."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import kombu
import pytest
from amqp_harness import Broker, wait_until
from kombu import Exchange, Queue

from kernel.exceptions import Reject

pytestmark = pytest.mark.integration

TRANSPORT = "kernel_amqp.transport:Transport"


@pytest.fixture
def connect(rabbitmq_url: str, delay_prefix: str) -> Iterator[Callable[..., Any]]:
    """``connect(**options)``: an open kombu connection through the transport."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        connection = kombu.Connection(
            rabbitmq_url,
            transport=TRANSPORT,
            transport_options={"delayed_delivery_prefix": delay_prefix, **options},
        )
        connection.connect()
        made.append(connection)
        return connection

    yield make
    for connection in made:
        connection.release()


def publish(connection: Any, exchange: str, routing_key: str, delay: float, **body: Any) -> None:
    connection.Producer(serializer="json").publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        headers={"x-deliver-at": time.time() + delay},
    )


def arrival(broker: Broker, queue: str, timeout: float) -> float:
    """Seconds until ``queue`` holds a message (fails after ``timeout``)."""
    started = time.monotonic()
    wait_until(lambda: broker.count(queue) >= 1, timeout, f"a message in {queue}")
    return time.monotonic() - started


def test_a_delayed_message_to_an_auto_delete_queue_is_delivered_at_once(connect, broker):
    """Finding 1: auto-delete and exclusive queues get no delay binding; a delayed
    message to them would be lost in the delay topology."""
    exchange = Exchange(broker.name("x"), "direct")
    private = Queue(broker.name("auto"), exchange, routing_key="private", auto_delete=True)
    durable = Queue(broker.name("dur"), exchange, routing_key="private")  # same key too
    alone = Queue(broker.name("dur"), exchange, routing_key="alone")
    connection = connect()
    for queue in (private, durable, alone):
        queue(connection.default_channel).declare()
    publish(connection, exchange.name, "private", 2, to="private")
    publish(connection, exchange.name, "alone", 2, to="alone")
    # the route with a private queue on it cannot wait in the broker: both its queues
    # have the message at once (the worker holds it until due)
    assert arrival(broker, private.name, 1.5) < 1.5
    assert arrival(broker, durable.name, 1.5) < 1.5
    # a route of durable queues only still waits in the broker
    assert broker.count(alone.name) == 0
    assert arrival(broker, alone.name, 6) >= 1.0


def test_a_delayed_message_to_an_exchange_of_unknown_type_is_delivered_at_once(connect, broker):
    """Finding 2: a process that did not declare a fanout exchange (a prefork child,
    a retry with declare=False) must not send its messages to the delay topology."""
    from kernel_amqp import transport

    everyone = Exchange(broker.name("all"), "fanout")
    members = [Queue(broker.name("m"), everyone, routing_key="") for _ in range(2)]
    declaring = connect()
    for queue in members:
        queue(declaring.default_channel).declare()
    transport.exchange_types._types.clear()  # what a process that declared nothing knows
    publish(connect(), everyone.name, "", 1, to="all")
    for queue in members:
        assert arrival(broker, queue.name, 1.5) < 1.5


def test_wildcard_bindings_and_keys_on_several_exchanges_get_no_delay_copies(
    connect, broker, caplog
):
    """Finding 3: delay bindings match the routing key only, whatever the exchange."""
    media, other = broker.name("media"), broker.name("other")
    patterned = Queue(broker.name("all-video"), Exchange(media, "topic"), routing_key="video.#")
    exact = Queue(broker.name("hd"), Exchange(other, "direct"), routing_key="video.hd")
    first = Queue(broker.name("k1"), Exchange(media, "topic"), routing_key="shared.key")
    second = Queue(broker.name("k2"), Exchange(other, "direct"), routing_key="shared.key")
    connection = connect()
    with caplog.at_level("WARNING", logger="kernel_amqp.transport"):
        for queue in (patterned, exact, first, second):
            queue(connection.default_channel).declare()
    assert any("bound on several exchanges" in r.getMessage() for r in caplog.records)
    publish(connection, other, "video.hd", 1, to="hd")
    publish(connection, media, "shared.key", 1, to="first")
    assert arrival(broker, exact.name, 6) >= 0.5  # waited in the broker
    wait_until(lambda: broker.count(first.name) == 1, 3, "the message to the first key")
    time.sleep(1.5)  # any copy would have arrived by now
    assert broker.count(patterned.name) == 0  # "video.#" on another exchange: no copy
    assert broker.count(second.name) == 0  # same key, other exchange: no copy


def test_a_retry_of_a_message_that_waited_an_even_delay_waits_again(connect, broker):
    """Finding 4: after an even delay, ``delivery_info`` names a level exchange of the
    topology; publishing there again (a retry with a countdown) must wait too."""
    exchange = Exchange(broker.name("x"), "direct")
    queue = Queue(broker.name("q"), exchange, routing_key="even")
    connection = connect()
    queue(connection.default_channel).declare()
    publish(connection, exchange.name, "even", 2, first=1)
    assert arrival(broker, queue.name, 8) >= 1.5
    received = []
    with kombu.Consumer(connection, [queue], callbacks=[lambda b, m: received.append(m)]):
        wait_until(lambda: connection.drain_events(timeout=0.2) or received, 5, "the message")
    message = received[0]
    message.ack()
    info = message.delivery_info
    assert "celery_delayed_" in info["exchange"]  # a level exchange of the topology
    publish(connection, info["exchange"], info["routing_key"], 2, retry=1)
    assert arrival(broker, queue.name, 8) >= 1.5  # waited again, not delivered at once


def test_a_requeued_message_goes_back_to_its_queue_only(make_app, workers, broker):
    """Finding 7: returning a message to its queue republishes a copy; through a
    fanout exchange it would reach every queue bound there."""
    everyone = Exchange(broker.name("all"), "fanout")
    mine, theirs = (
        Queue(broker.name("a"), everyone, routing_key=""),
        Queue(broker.name("b"), everyone, routing_key=""),
    )
    app = make_app(task_queues=[mine, theirs], task_default_queue=mine.name)
    runs: list[int] = []

    @app.task(name="delivery.once", bind=True)
    def once(self):
        runs.append(self.request.delivery_count)
        if len(runs) == 1:
            raise Reject("try again", requeue=True)

    workers(app, queues=[mine.name], concurrency=1)
    wait_until(lambda: broker.consumers(mine.name) == 1, 10, "the worker")
    broker_channel = broker.channel()
    broker_channel.queue_declare(theirs.name, durable=True, auto_delete=False)
    broker_channel.queue_bind(theirs.name, everyone.name, "")
    broker_channel.close()
    once.apply_async(exchange=everyone.name, exchange_type="fanout", routing_key="", declare=False)
    wait_until(lambda: len(runs) == 2, 10, "the task to run again")
    time.sleep(0.5)
    assert runs == [0, 1]
    assert broker.count(theirs.name) == 1  # its own copy of the send, no requeued copy


def test_a_task_gets_the_result_of_a_task_it_sends_with_rpc(make_app, workers):
    """Finding 8: a plain send from a task reports to the worker's own reply queue."""
    app = make_app()

    @app.task(name="delivery.inner")
    def inner(x):
        return x * 2

    @app.task(name="delivery.outer")
    def outer(x):
        return inner.delay(x).get(timeout=8, disable_sync_subtasks=False)

    workers(app, concurrency=2)
    assert outer.delay(21).get(timeout=20) == 42


def test_a_held_countdown_task_survives_warm_restarts_on_a_quorum_queue(make_app, broker, caplog):
    """Finding 5: RabbitMQ counts every channel closed with the message unacked, also
    ETA messages held and never started; that is not an attempt. The worker also says
    that its window could not grow for the held message (per-consumer prefetch)."""
    from kernel.testing.pytest_plugin import start_worker, stop_worker

    caplog.set_level("WARNING", logger="kernel_amqp.transport")

    dead = broker.name("dead")
    app = make_app(
        options={"queue_type": "quorum", "delayed_delivery": False},
        task_dead_letter_queue=dead,
    )
    ran: list[int] = []

    @app.task(name="delivery.later")
    def later(x):
        ran.append(x)

    later.apply_async((1,), countdown=9, ignore_result=True)
    for _ in range(4):  # warm restarts while the worker holds the message
        worker, thread = start_worker(app, pool="threads", concurrency=1)
        wait_until(lambda worker=worker: worker._scheduled, 5, "the message held")
        stop_worker(worker, thread)
    worker, thread = start_worker(app, pool="threads", concurrency=1)
    try:
        wait_until(lambda: ran == [1], 15, "the task to run")
    finally:
        stop_worker(worker, thread)
    assert broker.count(dead) == 0
    assert "cannot change for a running consumer" in caplog.text


def test_a_dead_letter_queue_existing_with_other_arguments_does_not_break_the_worker(
    make_app, workers, broker, caplog
):
    """Finding 6: the re-declaration RabbitMQ refuses closes its channel; it must not
    be the worker's (consumers, unacknowledged messages, confirms)."""
    dead = broker.name("dead")
    channel = broker.channel()
    channel.queue_declare(dead, durable=True, auto_delete=False, arguments={"x-max-length": 50})
    channel.close()
    app = make_app(task_dead_letter_queue=dead)
    runs: list[str] = []

    @app.task(name="delivery.slow")
    def slow():
        time.sleep(1.5)
        runs.append("slow")

    @app.task(name="delivery.refuse")
    def refuse():
        runs.append("refuse")
        raise Reject("no", requeue=False)

    caplog.set_level("WARNING", logger="kernel_amqp.transport")
    workers(app, concurrency=2)
    slow_result = slow.delay()
    time.sleep(0.3)  # slow is running, its message unacknowledged
    refuse.delay()
    wait_until(lambda: broker.count(dead) == 1, 10, "the dead-lettered message")
    slow_result.get(timeout=10)
    assert slow.delay().get(timeout=10) is None  # the worker still consumes
    time.sleep(0.5)
    assert sorted(runs) == ["refuse", "slow", "slow"]  # nothing ran twice
    assert any(
        dead in r.getMessage() and "already exists" in r.getMessage() for r in caplog.records
    )


def test_rpc_connections_have_no_heartbeats(make_app, workers):
    """Finding 13: nobody sends heartbeats on the idle reply connections."""
    app = make_app(options={"heartbeat": 5})
    connection = app.backend.connection()
    connection.connect()
    try:
        assert connection.connection.heartbeat == 0
    finally:
        connection.release()


def test_reply_queues_expire_even_when_results_do_not(make_app, broker):
    """Finding 11: with result_expires=None, reply queues of clients gone must still go."""
    app = make_app(result_expires=None)
    assert app.backend._queue.expires == 86400
    app.backend._ensure_reply_queue()
    assert broker.exists(app.backend.reply_queue_name)


def test_an_unconfirmed_publish_fails_after_confirm_timeout(connect, broker):
    """Finding 16: a publish RabbitMQ never confirms (a blocked broker) must not wait
    forever; review 2, finding 4: not even while other frames keep arriving
    (heartbeats, deliveries), which restarted py-amqp's own wait every time."""
    import threading

    from kernel_amqp.transport import ConfirmTimeout

    queue = Queue(broker.name("q"), Exchange(broker.name("x"), "direct"), routing_key="q")
    connection = connect(confirm_publish=True, confirm_timeout=0.5)
    queue(connection.default_channel).declare()
    frames: list[float] = []

    def frames_but_no_confirm(timeout=None):
        """A frame (a heartbeat) every 50 ms; the confirm is never read."""
        time.sleep(min(0.05, timeout or 0.05))
        frames.append(timeout)

    producer = connection.Producer(serializer="json")
    producer.publish({"x": 0}, exchange=queue.exchange.name, routing_key="q", retry=False)
    amqp_connection = connection.connection  # confirms selected, one message confirmed
    amqp_connection.drain_events = frames_but_no_confirm
    raised: list[BaseException] = []

    def publish() -> None:
        try:
            producer.publish({"x": 1}, exchange=queue.exchange.name, routing_key="q", retry=False)
        except BaseException as exc:  # noqa: BLE001 - looked at below
            raised.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    thread.join(10)
    del amqp_connection.drain_events  # the real one again, to close the connection
    assert not thread.is_alive(), "the publish kept waiting for its confirm"
    assert len(raised) == 1 and isinstance(raised[0], ConfirmTimeout), raised
    assert "confirm_timeout" in str(raised[0])
    assert time.monotonic() - started < 5
    assert len(frames) >= 5  # frames did arrive while it waited
