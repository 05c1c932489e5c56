"""The transport contract: what the kernel relies on from a kombu transport.

Use it from a plugin's tests::

    import pytest
    from kernel.testing.contracts import TransportContract


    class TestMyTransport(TransportContract):
        transport = "my_plugin.transport:Transport"  # or None: kombu picks by URL
        features = frozenset({"priority", "fanout"})

        @pytest.fixture
        def transport_url(self, tmp_path):
            return f"my://{tmp_path}"

        @pytest.fixture
        def transport_options(self):  # optional
            return {"visibility_timeout": 2}

``transport`` and ``transport_options`` may be class attributes or fixtures;
``transport_url`` is a fixture. ``features`` declares what the transport claims, from
:data:`FEATURES`; a test of an undeclared feature is skipped and says so. The tests
speak only kombu's public API, each uses its own queues and exchanges (uuid names)
and deletes them afterwards, and every wait is bounded.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
from kombu import Exchange, Queue

#: Features a transport may claim, each with the contract tests that check it.
FEATURES = frozenset(
    {
        # higher ``priority`` property delivered first
        "priority",
        # a fanout exchange copies each message to every bound queue
        "fanout",
        # header ``x-deliver-at`` (epoch seconds) holds a message until then
        "delayed_delivery",
        # header ``x-delivery-count``: deliveries before this one, +1 on redelivery
        "delivery_count",
        # a message received but never acked comes back when its connection closes
        "redelivery_on_close",
    }
)


class ContractBroker:
    """Connections, queues and exchanges of one contract test, cleaned up afterwards."""

    def __init__(
        self, url: str, transport: Any, transport_options: dict[str, Any], timeout: float
    ) -> None:
        self.url = url
        self.transport = transport
        self.transport_options = transport_options
        self.timeout = timeout
        self._connections: list[kombu.Connection] = []
        self._queues: list[str] = []
        self._exchanges: list[str] = []

    def connect(self) -> kombu.Connection:
        connection = kombu.Connection(
            self.url, transport=self.transport, transport_options=dict(self.transport_options)
        )
        connection.connect()
        self._connections.append(connection)
        return connection

    def exchange(self, type: str = "direct") -> Exchange:
        name = f"contract-{type}-{uuid.uuid4().hex}"
        self._exchanges.append(name)
        return Exchange(name, type, durable=False)

    def queue(self, exchange: Exchange | None = None, **kwargs: Any) -> Queue:
        name = f"contract-{uuid.uuid4().hex}"
        self._queues.append(name)
        exchange = exchange if exchange is not None else self.exchange()
        # A fanout exchange ignores routing keys on AMQP; kombu's Redis transport treats
        # one given at binding as a topic filter, so bind fanout queues without one.
        routing_key = "" if exchange.type == "fanout" else name
        return Queue(name, exchange, routing_key=routing_key, durable=False, **kwargs)

    def publish(self, connection: kombu.Connection, queue: Queue, body: Any, **kwargs: Any):
        producer = connection.Producer(serializer="json")
        producer.publish(
            body,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            **kwargs,
        )

    def get(self, connection: kombu.Connection, queue: Queue, timeout: float | None = None):
        """The next message of ``queue`` (not acked), or None once ``timeout`` passes."""
        bound = queue(connection.default_channel)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            message = bound.get(no_ack=False)
            if message is not None or time.monotonic() >= deadline:
                return message
            time.sleep(0.01)

    def receive(self, connection: kombu.Connection, queue: Queue, timeout: float | None = None):
        message = self.get(connection, queue, timeout)
        assert message is not None, (
            f"no message arrived on queue {queue.name!r} within {timeout or self.timeout} s"
        )
        return message

    def size(self, connection: kombu.Connection, queue: Queue) -> int:
        return queue(connection.default_channel).queue_declare(passive=True).message_count

    def close(self) -> None:
        for connection in self._connections:
            connection.release()
        self._connections.clear()
        if not (self._queues or self._exchanges):
            return
        with kombu.Connection(
            self.url, transport=self.transport, transport_options=dict(self.transport_options)
        ) as connection:
            channel = connection.default_channel
            for name in self._queues:
                channel.queue_delete(name)
            for name in self._exchanges:
                try:
                    channel.exchange_delete(name)
                except KeyError:  # kombu's virtual transports: never declared here
                    pass


def _setting(test: object, request: pytest.FixtureRequest, name: str, default: Any) -> Any:
    """A subclass's class attribute ``name``, else its fixture ``name``, else ``default``."""
    value = getattr(type(test), name, None)
    if isinstance(value, (type, str, dict)):
        return value
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        return default


class TransportContract:
    """Behaviour the kernel relies on from a transport; subclass as ``TestXxx``."""

    #: What the transport claims to support, from :data:`FEATURES`.
    features: frozenset[str] = frozenset()
    #: The kombu Transport class (or "module:Class"); None lets kombu pick by URL.
    transport: Any = None
    #: Seconds to wait for a message that should arrive.
    receive_timeout: float = 5.0
    #: Seconds to watch for a message that should not arrive.
    absence_window: float = 0.5

    @pytest.fixture
    def broker(self, request: pytest.FixtureRequest, transport_url: str) -> Iterator[Any]:
        unknown = set(self.features) - FEATURES
        assert not unknown, f"{type(self).__name__}.features names unknown features {unknown}"
        broker = ContractBroker(
            transport_url,
            _setting(self, request, "transport", None),
            _setting(self, request, "transport_options", {}) or {},
            self.receive_timeout,
        )
        yield broker
        broker.close()

    def require(self, feature: str) -> None:
        if feature not in self.features:
            pytest.skip(
                f"{type(self).__name__}.features does not declare {feature!r}; "
                "add it there if the transport supports it"
            )

    # -- every transport ----------------------------------------------------------------

    def test_put_then_get_returns_same_body_headers_and_properties(self, broker):
        connection = broker.connect()
        queue = broker.queue()
        body = {"args": [1, 2], "kwargs": {"name": "ünïcode"}, "nested": {"list": [None, True]}}
        headers = {"task": "tests.add", "id": str(uuid.uuid4()), "retries": 0}
        broker.publish(
            connection, queue, body, headers=headers, correlation_id="corr-1", reply_to="replies"
        )

        message = broker.receive(connection, queue)
        assert message.payload == body
        assert message.content_type == "application/json"
        assert message.headers.items() >= headers.items()
        assert message.properties["correlation_id"] == "corr-1"
        assert message.properties["reply_to"] == "replies"
        assert message.delivery_info["routing_key"] == queue.routing_key
        message.ack()

    def test_consumer_receives_published_message(self, broker):
        connection = broker.connect()
        queue = broker.queue()
        received = []

        def on_message(body, message):
            received.append(body)
            message.ack()

        with connection.Consumer(queue, callbacks=[on_message]):
            broker.publish(connection, queue, {"n": 1})
            deadline = time.monotonic() + broker.timeout
            while not received and time.monotonic() < deadline:
                try:
                    connection.drain_events(timeout=0.1)
                except TimeoutError:
                    pass
        assert received == [{"n": 1}]

    def test_ack_removes_message(self, broker):
        connection = broker.connect()
        queue = broker.queue()
        broker.publish(connection, queue, "once")
        broker.receive(connection, queue).ack()

        assert broker.size(connection, queue) == 0
        connection.release()
        assert broker.get(broker.connect(), queue, timeout=self.absence_window) is None

    def test_reject_with_requeue_redelivers(self, broker):
        connection = broker.connect()
        queue = broker.queue()
        broker.publish(connection, queue, "again")
        broker.receive(connection, queue).reject(requeue=True)

        message = broker.receive(connection, queue)
        assert message.payload == "again"
        message.ack()

    def test_reject_without_requeue_drops_message(self, broker):
        connection = broker.connect()
        queue = broker.queue()
        broker.publish(connection, queue, "gone")
        broker.receive(connection, queue).reject(requeue=False)

        assert broker.get(connection, queue, timeout=self.absence_window) is None
        assert broker.size(connection, queue) == 0

    def test_purge_removes_ready_messages_and_returns_count(self, broker):
        connection = broker.connect()
        queue = broker.queue()
        for n in range(3):
            broker.publish(connection, queue, n)

        assert queue(connection.default_channel).purge() == 3
        assert broker.size(connection, queue) == 0
        assert broker.get(connection, queue, timeout=self.absence_window) is None

    def test_size_counts_messages(self, broker):
        connection = broker.connect()
        queue = broker.queue()
        for n in range(3):
            broker.publish(connection, queue, n)
        assert broker.size(connection, queue) == 3

        broker.receive(connection, queue).ack()
        assert broker.size(connection, queue) == 2

    # -- declared features --------------------------------------------------------------

    def test_unacked_message_is_redelivered_after_connection_closes(self, broker):
        self.require("redelivery_on_close")
        first = broker.connect()
        queue = broker.queue()
        broker.publish(first, queue, "not acked")
        broker.receive(first, queue)  # and never acked
        first.release()

        message = broker.receive(broker.connect(), queue)
        assert message.payload == "not acked"
        message.ack()

    def test_higher_priority_delivered_first(self, broker):
        self.require("priority")
        connection = broker.connect()
        queue = broker.queue(max_priority=10)
        for priority in (1, 9, 5):
            broker.publish(connection, queue, priority, priority=priority)

        received = []
        for _ in range(3):
            message = broker.receive(connection, queue)
            received.append(message.payload)
            message.ack()
        assert received == [9, 5, 1]

    def test_fanout_delivers_a_copy_to_every_bound_queue(self, broker):
        """Every queue bound to a fanout exchange and consumed when the message is sent
        gets one copy. (Brokers that broadcast through pub/sub, like Redis, reach only
        queues being consumed; that is how remote control and events use fanout.)"""
        self.require("fanout")
        exchange = broker.exchange("fanout")
        queues = [broker.queue(exchange) for _ in range(3)]
        # One connection per queue, as each worker has its own.
        connections = [broker.connect() for _ in queues]
        received: dict[str, list[Any]] = {queue.name: [] for queue in queues}

        def collector(name: str):
            def on_message(body: Any, message: Any) -> None:
                received[name].append(body)
                message.ack()

            return on_message

        consumers = [
            connection.Consumer([queue], callbacks=[collector(queue.name)], accept=["json"])
            for connection, queue in zip(connections, queues, strict=True)
        ]
        for consumer in consumers:
            consumer.consume()
        try:
            # Let the consumers start listening (pub/sub subscribes on first poll).
            _drain(connections, self.absence_window)
            producer = broker.connect().Producer(serializer="json")
            producer.publish("to all", exchange=exchange, declare=[exchange])
            deadline = time.monotonic() + broker.timeout
            while time.monotonic() < deadline and not all(received.values()):
                _drain(connections, 0.1)
            _drain(connections, self.absence_window)  # no second copy follows
        finally:
            for consumer in consumers:
                consumer.cancel()
        assert received == {queue.name: ["to all"] for queue in queues}

    def test_delayed_delivery_holds_message_until_deliver_at(self, broker):
        self.require("delayed_delivery")
        connection = broker.connect()
        queue = broker.queue()
        deliver_at = time.time() + 2 * self.absence_window
        broker.publish(connection, queue, "later", headers={"x-deliver-at": deliver_at})

        assert broker.get(connection, queue, timeout=self.absence_window) is None
        message = broker.receive(connection, queue, timeout=self.receive_timeout + 1)
        assert time.time() >= deliver_at - 0.05
        assert message.payload == "later"
        message.ack()

    def test_redelivered_message_carries_incremented_delivery_count(self, broker):
        self.require("delivery_count")
        connection = broker.connect()
        queue = broker.queue()
        broker.publish(connection, queue, "counted")

        first = broker.receive(connection, queue)
        first_count = first.headers.get("x-delivery-count", 0)
        first.reject(requeue=True)
        second = broker.receive(connection, queue)
        assert second.headers.get("x-delivery-count") == first_count + 1
        second.ack()


def _drain(connections: list[kombu.Connection], seconds: float) -> None:
    """Deliver what arrives on ``connections`` for ``seconds``."""
    deadline = time.monotonic() + seconds
    while deadline > time.monotonic():
        for connection in connections:
            try:
                connection.drain_events(timeout=0.02)
            except TimeoutError:
                pass
