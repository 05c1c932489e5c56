"""What the Redis broker adds to kombu's transport, checked against the real Redis:
leases, delayed delivery, delivery counts, priorities, key prefixes, queue existence."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import kombu
import pytest
import redis
from kombu import Exchange, Queue

TRANSPORT = "kernel_redis.transport:Transport"


def wait_for(condition, timeout: float = 10.0, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class Broker:
    def __init__(self, url: str) -> None:
        self.url = url
        self.connections: list[kombu.Connection] = []
        self.raw = redis.Redis.from_url(url)

    def connect(self, **options) -> kombu.Connection:
        connection = kombu.Connection(self.url, transport=TRANSPORT, transport_options=options)
        connection.connect()
        self.connections.append(connection)
        return connection

    @staticmethod
    def queue(**kwargs) -> Queue:
        name = f"broker-{uuid.uuid4().hex}"
        return Queue(name, Exchange(name, "direct"), routing_key=name, **kwargs)

    @staticmethod
    def publish(connection: kombu.Connection, queue: Queue, body, **kwargs) -> None:
        connection.Producer(serializer="json").publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue], **kwargs
        )

    @staticmethod
    def get(connection: kombu.Connection, queue: Queue, timeout: float = 5.0):
        bound = queue(connection.default_channel)
        return wait_for(lambda: bound.get(no_ack=False), timeout)

    def close(self) -> None:
        for connection in self.connections:
            connection.release()
        self.raw.close()


@pytest.fixture
def broker(redis_db: str) -> Iterator[Broker]:
    instance = Broker(redis_db)
    yield instance
    instance.close()


def test_a_live_consumer_keeps_a_message_past_the_visibility_timeout(broker):
    holder = broker.connect(visibility_timeout=1)
    other = broker.connect(visibility_timeout=1)
    queue = broker.queue()
    broker.publish(holder, queue, "long task")
    message = broker.get(holder, queue)
    assert message is not None

    # Three visibility timeouts pass; the other consumer sweeps all the while.
    sweeper = other.default_channel
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert sweeper.restore_expired() == 0
        time.sleep(0.2)
    assert queue(sweeper).get(no_ack=False) is None
    message.ack()
    assert broker.raw.hlen("unacked") == 0


def test_a_dead_consumers_message_comes_back_with_its_delivery_counted(broker):
    queue = broker.queue()
    producer = broker.connect()
    broker.publish(producer, queue, "orphan")
    # A consumer process takes the message and dies without a word.
    script = textwrap.dedent(
        f"""
        import os, kombu
        from kombu import Exchange, Queue
        connection = kombu.Connection({broker.url!r}, transport={TRANSPORT!r},
                                      transport_options={{"visibility_timeout": 1}})
        queue = Queue({queue.name!r}, Exchange({queue.name!r}, "direct"),
                      routing_key={queue.name!r})
        message = queue(connection.default_channel).get(no_ack=False)
        assert message is not None
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert broker.raw.hlen("unacked") == 1
    assert broker.raw.zcard("_kernel.leases") == 1
    assert broker.raw.zcard("unacked_index") == 0  # Celery workers never see it

    survivor = broker.connect(visibility_timeout=1).default_channel
    started = time.monotonic()
    assert wait_for(lambda: survivor.restore_expired(), timeout=5) == 1
    assert time.monotonic() - started < 2.5
    message = broker.get(survivor.connection.client, queue)
    assert message.payload == "orphan"
    assert message.headers["x-delivery-count"] == 1
    assert message.delivery_info.get("redelivered") is True
    message.ack()


def test_a_late_ack_of_an_old_delivery_does_not_drop_the_new_one(broker):
    connection = broker.connect(visibility_timeout=1)
    queue = broker.queue()
    broker.publish(connection, queue, "twice")
    first = broker.get(connection, queue)
    channel = connection.default_channel
    channel.restore_tags([first.delivery_tag], attempted=True)  # as if its lease expired
    second = broker.get(connection, queue)
    assert second.delivery_tag != first.delivery_tag

    first.ack()  # the stalled consumer finishes after all
    assert broker.raw.hexists("unacked", second.delivery_tag)
    second.ack()
    assert broker.raw.hlen("unacked") == 0


def test_delayed_message_waits_in_redis_not_in_the_queue(broker):
    connection = broker.connect()
    queue = broker.queue()
    due = time.time() + 1.0
    broker.publish(connection, queue, "later", headers={"x-deliver-at": due})

    assert broker.raw.llen(queue.name) == 0
    assert broker.raw.zcard(f"{queue.name}\x06\x16delayed") == 1
    bound = queue(connection.default_channel)
    assert bound.get(no_ack=False) is None

    # A new connection (a restarted worker) gets it once it is due.
    later = broker.get(broker.connect(), queue, timeout=5)
    assert later is not None and later.payload == "later"
    assert time.time() >= due - 0.05
    later.ack()
    assert broker.raw.zcard(f"{queue.name}\x06\x16delayed") == 0


def test_delayed_messages_keep_their_priority(broker):
    connection = broker.connect()
    queue = broker.queue(max_priority=9)
    due = time.time() + 0.5
    for priority in (0, 9):
        broker.publish(
            connection, queue, priority, priority=priority, headers={"x-deliver-at": due}
        )
    first = broker.get(connection, queue)
    second = broker.get(connection, queue)
    assert [first.payload, second.payload] == [9, 0]


def test_delayed_delivery_can_be_turned_off_for_celery_workers(broker):
    connection = broker.connect(delayed_delivery=False)
    queue = broker.queue()
    broker.publish(connection, queue, "now", headers={"x-deliver-at": time.time() + 60})
    assert broker.raw.llen(queue.name) == 1


def test_purge_counts_and_removes_delayed_messages_too(broker):
    connection = broker.connect()
    queue = broker.queue()
    broker.publish(connection, queue, "ready")
    broker.publish(connection, queue, "delayed", headers={"x-deliver-at": time.time() + 60})
    assert queue(connection.default_channel).purge() == 2
    assert broker.raw.exists(f"{queue.name}\x06\x16delayed") == 0


def test_priority_lowest_first_restores_kombus_order(broker):
    connection = broker.connect(priority_lowest_first=True)
    queue = broker.queue(max_priority=9)
    for priority in (9, 1, 5):
        broker.publish(connection, queue, priority, priority=priority)
    received = []
    for _ in range(3):
        message = broker.get(connection, queue)
        received.append(message.payload)
        message.ack()
    assert received == [1, 5, 9]


def test_an_empty_declared_queue_exists(broker):
    connection = broker.connect()
    queue = broker.queue()
    bound = queue(connection.default_channel)
    bound.declare()
    assert bound.queue_declare(passive=True).message_count == 0
    bound.delete()
    with pytest.raises(connection.channel_errors):
        queue(broker.connect().default_channel).queue_declare(passive=True)


def test_global_keyprefix_prefixes_every_key_and_leases_still_work(broker):
    prefix = f"pfx{uuid.uuid4().hex[:6]}:"
    connection = broker.connect(global_keyprefix=prefix, visibility_timeout=1)
    queue = broker.queue()
    broker.publish(connection, queue, "prefixed")
    broker.publish(connection, queue, "delayed", headers={"x-deliver-at": time.time() + 60})
    keys = {key.decode() for key in broker.raw.keys(f"*{queue.name}*")}
    assert len(keys) >= 3, keys  # bindings, the queue, its delayed set
    assert all(key.startswith(prefix) for key in keys), keys
    assert broker.raw.sismember(f"{prefix}_kernel.queues", queue.name)

    message = broker.get(connection, queue)
    channel = connection.default_channel
    channel.close()  # hands the message back: not started, so not counted
    again = broker.get(broker.connect(global_keyprefix=prefix), queue)
    assert again.payload == "prefixed"
    assert "x-delivery-count" not in again.headers
    assert message.delivery_tag != again.delivery_tag
    again.ack()
    assert broker.raw.hlen(f"{prefix}unacked") == 0


def fail_the_next_removal(monkeypatch, qos) -> None:
    """The next removal of an acknowledged message from Redis fails as if Redis went away."""
    real = type(qos)._remove_from_indices
    failures = iter([redis.ConnectionError("Redis went away")])

    def flaky(self, delivery_tag, pipe=None):
        error = next(failures, None)
        if error is not None:
            raise error
        return real(self, delivery_tag, pipe)

    monkeypatch.setattr(type(qos), "_remove_from_indices", flaky)


def test_an_ack_that_fails_while_redis_is_unreachable_is_sent_later(broker, monkeypatch):
    connection = broker.connect(visibility_timeout=0.6)
    queue = broker.queue()
    broker.publish(connection, queue, "done during an outage")
    message = broker.get(connection, queue)
    fail_the_next_removal(monkeypatch, connection.default_channel.qos)
    message.ack()  # does not raise: deferred

    assert wait_for(lambda: broker.raw.hlen("unacked") == 0, timeout=5)
    # Never restored meanwhile: the lease was kept until the ack went through.
    assert queue(broker.connect().default_channel).get(no_ack=False) is None


def test_bindings_lost_by_a_redis_restart_are_declared_again(broker):
    connection = broker.connect()
    queue = broker.queue()
    broker.publish(connection, queue, "before")
    # Redis restarted without persistence: every binding is gone, but the producer
    # remembers its declarations and will not declare again.
    broker.raw.delete(f"_kombu.binding.{queue.exchange.name}", "_kernel.queues", queue.name)

    broker.publish(connection, queue, "after")
    message = broker.get(connection, queue)
    assert message is not None and message.payload == "after"
    message.ack()
    assert broker.raw.sismember(
        f"_kombu.binding.{queue.exchange.name}", f"{queue.name}\x06\x16\x06\x16{queue.name}"
    )


def waiting_queue(broker: Broker, connection: kombu.Connection, count: int) -> Queue:
    """A new queue holding ``count`` messages, "waiting 0" first."""
    queue = broker.queue()
    for n in range(count):
        broker.publish(connection, queue, f"waiting {n}")
    return queue


def consume_one(connection: kombu.Connection, queue: Queue, no_ack: bool = False):
    """Consume ``queue`` until one message arrives (through the poller: TAKE/BRPOP);
    a prefetch window of one, so that only that message is taken."""
    received = []
    with connection.Consumer(
        queue, callbacks=[lambda body, msg: received.append(msg)], no_ack=no_ack, prefetch_count=1
    ):
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            try:
                connection.drain_events(timeout=0.5)
            except TimeoutError:
                pass
    assert received, f"nothing was delivered from {queue.name}"
    return received[0]


def test_a_waiting_message_is_taken_and_recorded_in_one_step(broker, monkeypatch):
    from kernel_redis import scripts
    from kernel_redis.messages import read_stored_delivery

    connection = broker.connect()
    queue = waiting_queue(broker, connection, 3)
    real = type(connection.default_channel).run_script

    def no_separate_hold(self, source, keys, args):
        assert source != scripts.HOLD, "a waiting message was popped, then recorded"
        return real(self, source, keys, args)

    monkeypatch.setattr(type(connection.default_channel), "run_script", no_separate_hold)
    message = consume_one(connection, queue)
    # Recorded by the take itself, in the stored layout kombu and the sweep read.
    raw, exchange, routing_key = read_stored_delivery(
        broker.raw.hget("unacked", message.delivery_tag)
    )
    assert raw["properties"]["delivery_tag"] == message.delivery_tag
    assert (exchange, routing_key) == (queue.exchange.name, queue.routing_key)
    assert broker.raw.zscore("_kernel.leases", message.delivery_tag) is not None
    message.ack()
    assert broker.raw.hlen("unacked") == 0


def test_no_ack_deliveries_are_never_recorded(broker):
    connection = broker.connect()
    queue = broker.queue()
    broker.publish(connection, queue, "fire and forget")
    broker.publish(connection, queue, "got without ack")
    consume_one(connection, queue, no_ack=True)
    got = wait_for(lambda: queue(connection.default_channel).get(no_ack=True))
    assert got is not None and got.payload == "got without ack"
    # Nothing to renew or sweep: a recorded no-ack delivery would come back later.
    assert broker.raw.hlen("unacked") == 0
    assert broker.raw.zcard("_kernel.leases") == 0


def test_a_popped_message_that_could_not_be_recorded_goes_back_first(broker, monkeypatch):
    connection = broker.connect()
    queue = broker.queue()
    channel = connection.default_channel
    channel._take_next = False  # as after an empty take: the next poll is a BRPOP
    broker.publish(connection, queue, "popped during an outage")
    real = type(channel).run_script
    failures = iter([redis.ConnectionError("Redis went away")])

    def flaky(self, source, keys, args):
        from kernel_redis import scripts

        if source == scripts.HOLD:
            error = next(failures, None)
            if error is not None:
                raise error
        return real(self, source, keys, args)

    monkeypatch.setattr(type(channel), "run_script", flaky)
    consumer = connection.Consumer(queue, callbacks=[lambda body, msg: None])
    with pytest.raises(redis.ConnectionError), consumer:
        connection.drain_events(timeout=5)
    assert channel._unheld  # kept in memory, not lost

    message = consume_one(connection, queue)  # put back at the front, then taken
    assert message.payload == "popped during an outage"
    assert "x-delivery-count" not in message.headers  # never started: not counted
    message.ack()
    assert broker.raw.hlen("unacked") == 0 and not channel._unheld


def drain_once(connection: kombu.Connection) -> None:
    """One poll of the consumer's queues (a TAKE while messages are waiting)."""
    try:
        connection.drain_events(timeout=2)
    except TimeoutError:
        pass


def test_one_take_hands_over_as_many_waiting_messages_as_the_prefetch_window_allows(broker):
    connection = broker.connect()
    queue = waiting_queue(broker, connection, 5)
    channel = connection.default_channel
    received = []
    with connection.Consumer(queue, callbacks=[lambda body, msg: received.append(msg)]):
        channel.basic_qos(0, 3, False)
        drain_once(connection)
        # One round trip: the window's three, in queue order, each recorded.
        assert [m.payload for m in received] == ["waiting 0", "waiting 1", "waiting 2"]
        assert broker.raw.hlen("unacked") == 3
        assert broker.raw.llen(queue.name) == 2
        for message in received:
            message.ack()
        wait_for(lambda: len(received) == 5 or drain_once(connection), timeout=5)
    assert [m.payload for m in received][3:] == ["waiting 3", "waiting 4"]
    for message in received[3:]:
        message.ack()
    assert broker.raw.hlen("unacked") == 0 and broker.raw.zcard("_kernel.leases") == 0


def test_messages_taken_but_not_handed_over_go_back_to_the_front_uncounted(broker):
    connection = broker.connect()
    queue = waiting_queue(broker, connection, 4)
    channel = connection.default_channel
    received = []

    def fails_on_the_second(body, message):
        received.append(message)
        if len(received) == 2:
            raise RuntimeError("consumer callback failed")

    with connection.Consumer(queue, callbacks=[fails_on_the_second]):
        channel.basic_qos(0, 4, False)
        with pytest.raises(RuntimeError, match="callback failed"):
            drain_once(connection)
    # The two after the failing one are back at the front, in order, not counted;
    # the two handed over stay held by this channel.
    assert broker.raw.llen(queue.name) == 2
    assert broker.raw.hlen("unacked") == 2
    again = broker.connect()
    first = consume_one(again, queue)
    assert first.payload == "waiting 2"
    assert "x-delivery-count" not in first.headers
    first.ack()


def test_take_batch_bounds_a_take_without_a_prefetch_window(broker):
    connection = broker.connect(take_batch=2)
    queue = waiting_queue(broker, connection, 3)
    received = []
    with connection.Consumer(queue, callbacks=[lambda body, msg: received.append(msg)]):
        drain_once(connection)
        assert [m.payload for m in received] == ["waiting 0", "waiting 1"]
        for message in received:
            message.ack()


def test_acks_inside_batched_acks_reach_redis_together_when_the_block_ends(broker, monkeypatch):
    connection = broker.connect()
    queue = waiting_queue(broker, connection, 3)
    channel = connection.default_channel
    messages = [broker.get(connection, queue) for _ in range(3)]
    executes = []
    real_execute = redis.client.Pipeline.execute

    def counted(self, *args, **kwargs):
        executes.append(len(self.command_stack))
        return real_execute(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counted)
    with channel.batched_acks():
        for message in messages:
            message.ack()
        assert broker.raw.hlen("unacked") == 3  # not sent yet
    assert executes == [6]  # one round trip: ZREM and HDEL for each of the three
    assert broker.raw.hlen("unacked") == 0


def test_a_batch_of_acks_that_fails_while_redis_is_unreachable_is_sent_later(broker, monkeypatch):
    connection = broker.connect(visibility_timeout=0.6)
    queue = waiting_queue(broker, connection, 2)
    channel = connection.default_channel
    messages = [broker.get(connection, queue) for _ in range(2)]
    fail_the_next_removal(monkeypatch, channel.qos)
    with channel.batched_acks():  # does not raise: both deferred
        for message in messages:
            message.ack()

    assert wait_for(lambda: broker.raw.hlen("unacked") == 0, timeout=5)
    # Never restored meanwhile: the leases were kept until the acks went through.
    assert queue(broker.connect().default_channel).get(no_ack=False) is None
