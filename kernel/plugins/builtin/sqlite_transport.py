"""SQLite transport: an embedded broker in one file, shared by the processes of one machine.

Features
========
* Type: Virtual
* Supports Direct: Yes
* Supports Topic: Yes
* Supports Fanout: Yes (bindings live in the database, so every process sees them)
* Supports Priority: Yes (a higher number is delivered first, as in RabbitMQ); within
  one priority, messages go out in the order they became deliverable: publish time,
  ``x-deliver-at`` for a delayed message, lease expiry for one whose consumer died
* Supports TTL: Yes, the queue arguments ``x-expires`` (delete a queue unused that
  long: not declared, polled, or consumed by a live channel) and ``x-message-ttl`` (drop
  messages older than that), in milliseconds, as ``Queue(expires=..., message_ttl=...)``
  sends them. There is no timer: a fanout publish (at most once a second per channel)
  and the declaration of a queue with either argument delete what has expired, and a
  consumer that knows its queue's TTL drops expired messages instead of receiving them.
* Delayed delivery: Yes (header ``x-deliver-at``: epoch seconds; the message stays
  invisible until then)
* Delivery count: Yes (header ``x-delivery-count``: deliveries before this one, as in
  RabbitMQ quorum queues)
* Cross-process: Yes, on one machine (WAL mode; never on a network file system)
* Leases: a delivered message is leased to its channel for ``visibility_timeout``
  seconds and the lease is renewed while the channel lives, so a long task is never
  handed out twice; a killed process stops renewing and its messages come back after
  ``visibility_timeout``.

Connection string
=================
SQLAlchemy's convention::

    sqlite://                       ./kernel.sqlite3
    sqlite:///relative/path.db      relative to the current directory
    sqlite:////absolute/path.db     absolute

Transport options
=================
* ``path``: the database file; overrides the URL.
* ``visibility_timeout``: seconds a delivered, unacknowledged message stays leased
  without renewal before another consumer may receive it (default 30).
* ``polling_interval``: the longest pause between polls of empty queues (default
  0.05). After a delivery the next poll follows 1 ms later, and the pause doubles
  while the queues stay empty, so a message sent during a burst is received within
  about a millisecond and an idle consumer polls 20 times a second.
* ``busy_timeout``: seconds a statement waits for another process's write lock
  (default 30).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import uuid
from queue import Empty
from typing import Any

from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.transport.virtual.exchange import DirectExchange as VirtualDirectExchange
from kombu.utils.json import dumps

from kernel.exceptions import ConfigurationError
from kernel.plugins.builtin.sqlite_db import (  # noqa: F401 - database_path is re-exported
    DEFAULT_BUSY_TIMEOUT,
    Database,
    database_path,
)
from kernel.plugins.builtin.sqlite_messages import (
    ABOVE_EVERY_PRIORITY,
    CANDIDATE,
    CLAIM_ATTEMPTS,
    READY,
    SCHEMA,
    SCHEMA_VERSION,
    VISIBLE_AT,
    LimitedQueues,
    QueueLimits,
    Started,
    decode_payload,
    drop_expired_messages,
    message_deliver_at,
    message_priority,
    parse_tag,
    renew_leases,
    start_thread,
    stop_thread,
)
from kernel.polling import Backoff

logger = logging.getLogger(__name__)

DEFAULT_VISIBILITY_TIMEOUT = 30.0
DEFAULT_POLLING_INTERVAL = 0.05


class QoS(virtual.QoS):
    """Acks, rejects and restores act on the leased rows; kombu's bookkeeping stays."""

    def ack(self, delivery_tag: str) -> None:
        self.channel._settle(delivery_tag, "ack")
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            # The delivery counted as an attempt: delivery_count stays.
            self.channel._release(delivery_tag, attempted=True)
        else:
            self.channel._settle(delivery_tag, "reject")
        super().reject(delivery_tag, requeue=False)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Hand back prefetched messages; an unstarted message is not an attempt."""
        self._flush()
        delivered = self._delivered
        errors = []
        while delivered:
            try:
                delivery_tag, message = delivered.popitem()
            except KeyError:  # emptied by another thread meanwhile
                break
            try:
                self.channel._release(delivery_tag, attempted=False)
            except Exception as exc:
                if delivery_tag not in self._dirty:
                    errors.append((exc, message))
        delivered.clear()
        return errors


class DirectExchange(VirtualDirectExchange):
    """Looks up the bindings and stores the message in one statement."""

    def deliver(self, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> None:
        if not self.channel._put_direct(exchange, routing_key, message):
            # Unroutable: kombu's lookup warns, or uses the dead-letter queue if set.
            super().deliver(message, exchange, routing_key, **kwargs)


class Channel(virtual.Channel):
    """A kombu virtual channel whose queues are rows of ``kernel_messages``."""

    QoS = QoS
    exchange_types = {**virtual.Channel.exchange_types, "direct": DirectExchange}
    supports_fanout = True
    do_restore = True

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.database: Database = connection.database
        self.visibility_timeout: float = connection.visibility_timeout
        #: Lease owner id of the rows this channel has claimed.
        self.owner = uuid.uuid4().hex
        self._no_ack_queues: set[str] = set()
        self._renewer: Started | None = None
        self.limited = LimitedQueues(self.database, self.owner)

    def _execute(self, sql: str, parameters: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self.database.connection().execute(sql, parameters)

    def _exchange_type(self, exchange: str) -> str | None:
        row = self._execute("SELECT type FROM kernel_exchanges WHERE name = ?", (exchange,))
        found = row.fetchone()
        return found[0] if found else None

    # -- messages -------------------------------------------------------------------

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        now = time.time()
        self._execute(
            "INSERT INTO kernel_messages (queue, priority, deliver_at, payload, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                queue,
                message_priority(message),
                message_deliver_at(message, f"queue {queue!r}", now),
                dumps(message),
                now,
            ),
        )

    def _put_direct(self, exchange: str, routing_key: str, message: dict[str, Any]) -> int:
        """Insert a copy for every queue bound to ``exchange`` under ``routing_key``.

        Reads the bindings in the INSERT itself: they may change in any process, so they
        cannot be cached, and a separate lookup would cost a statement per publish.
        Returns how many queues received the message.
        """
        now = time.time()
        return self._execute(
            "INSERT INTO kernel_messages (queue, priority, deliver_at, payload, created_at) "
            "SELECT queue, ?, ?, ?, ? FROM kernel_bindings "
            "WHERE exchange = ? AND routing_key = ?",
            (
                message_priority(message),
                message_deliver_at(
                    message, f"exchange {exchange!r}, routing key {routing_key!r}", now
                ),
                dumps(message),
                now,
                exchange,
                routing_key,
            ),
        ).rowcount

    def _put_fanout(
        self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any
    ) -> None:
        now = time.time()
        payload = dumps(message)
        priority = message_priority(message)
        deliver_at = message_deliver_at(message, f"bound to exchange {exchange!r}", now)
        with self.database.transaction() as connection:
            self.limited.clean_up(connection, now, throttle=True)
            queues = [
                row[0]
                for row in connection.execute(
                    "SELECT DISTINCT queue FROM kernel_bindings WHERE exchange = ?", (exchange,)
                )
            ]
            connection.executemany(
                "INSERT INTO kernel_messages (queue, priority, deliver_at, payload, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(queue, priority, deliver_at, payload, now) for queue in queues],
            )

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        return self._claim(queue, remove=queue in self._no_ack_queues)

    def _claim(self, queue: str, remove: bool) -> dict[str, Any]:
        """Take the best ready message: leased to this channel, or deleted if ``remove``.

        A plain SELECT finds a candidate without taking the write lock (empty polls
        stay cheap, however many delayed or leased rows the queue holds); the
        conditional UPDATE/DELETE then wins it unless another consumer was faster, in
        which case the next candidate is tried.
        """
        connection = self.database.connection()
        message_ttl = None
        limits = self.limited.of(queue)
        if limits is not None:
            if self.limited.polled(queue, limits):
                self._redeclare(queue, limits)
            message_ttl = limits.message_ttl
        for _ in range(CLAIM_ATTEMPTS):
            now = time.time()
            row = self._candidate(connection, queue, now)
            if row is None:
                raise Empty()
            row_id, payload, previous, created_at = row
            if message_ttl is not None and created_at < now - message_ttl:
                drop_expired_messages(connection, queue, message_ttl, now)
                continue
            if remove:
                cursor = connection.execute(
                    "DELETE FROM kernel_messages WHERE id = ? AND delivery_count = ? "
                    f"AND {VISIBLE_AT} <= ?",
                    (row_id, previous, now),
                )
            else:
                cursor = connection.execute(
                    "UPDATE kernel_messages SET lease_owner = ?, lease_until = ?, "
                    "delivery_count = delivery_count + 1 WHERE id = ? AND delivery_count = ? "
                    f"AND {VISIBLE_AT} <= ?",
                    (self.owner, now + self.visibility_timeout, row_id, previous, now),
                )
            if cursor.rowcount != 1:
                continue  # another consumer won this one
            try:
                message = decode_payload(payload)
            except ValueError as exc:
                self._bury(row_id, queue, payload, str(exc))
                continue
            if not remove:
                self._ensure_renewer()
            return self._stamp(message, row_id, previous)
        raise Empty()

    @staticmethod
    def _candidate(
        connection: sqlite3.Connection, queue: str, now: float
    ) -> tuple[int, Any, int, float] | None:
        """The best row of ``queue`` visible at ``now``: (id, payload, delivery_count,
        created_at)."""
        below = ABOVE_EVERY_PRIORITY
        while True:
            priority, row_id, payload, previous, created_at = connection.execute(
                CANDIDATE, {"queue": queue, "below": below, "now": now}
            ).fetchone()
            if priority is None:
                return None
            if row_id is not None:
                return row_id, payload, previous, created_at
            below = priority

    @staticmethod
    def _stamp(message: dict[str, Any], row_id: int, previous: int) -> dict[str, Any]:
        properties = message["properties"]
        properties["delivery_tag"] = f"{row_id}:{previous + 1}"
        delivery_info = properties.get("delivery_info")
        if not isinstance(delivery_info, dict):
            delivery_info = properties["delivery_info"] = {}
        delivery_info["redelivered"] = previous > 0
        headers = message.get("headers")
        if not isinstance(headers, dict):
            headers = message["headers"] = {}
        headers["x-delivery-count"] = previous
        message["redelivered"] = previous > 0
        return message

    def _bury(self, row_id: int, queue: str, payload: Any, reason: str) -> None:
        logger.warning(
            "sqlite transport: message row %s in queue %r cannot be decoded (%s); "
            "moved to kernel_dead_messages",
            row_id,
            queue,
            reason,
        )
        with self.database.transaction() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO kernel_dead_messages (id, queue, payload, reason, dead_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (row_id, queue, payload, reason, time.time()),
            )
            connection.execute("DELETE FROM kernel_messages WHERE id = ?", (row_id,))

    def _settle(self, delivery_tag: str, verb: str) -> None:
        """Delete an acked (or dead-rejected) row, if this delivery still holds it."""
        row_id, delivery = parse_tag(delivery_tag)
        cursor = self._execute(
            "DELETE FROM kernel_messages WHERE id = ? AND lease_owner = ? AND delivery_count = ?",
            (row_id, self.owner, delivery),
        )
        if cursor.rowcount != 1:
            self._warn_lease_lost(row_id, verb)

    def _release(self, delivery_tag: str, attempted: bool) -> None:
        """Make a held row ready again; ``attempted=False`` takes back its delivery count."""
        row_id, delivery = parse_tag(delivery_tag)
        cursor = self._execute(
            "UPDATE kernel_messages SET lease_owner = NULL, lease_until = NULL, "
            "delivery_count = delivery_count - ? "
            "WHERE id = ? AND lease_owner = ? AND delivery_count = ?",
            (0 if attempted else 1, row_id, self.owner, delivery),
        )
        if cursor.rowcount != 1:
            if attempted:
                self._warn_lease_lost(row_id, "requeue")
            else:
                logger.debug("sqlite transport: row %s was no longer held at restore", row_id)

    def _warn_lease_lost(self, row_id: int, verb: str) -> None:
        logger.warning(
            "sqlite transport: %s of message row %s ignored: this channel no longer holds "
            "its lease (it expired and the message went to another consumer, or the queue "
            "was deleted); raise visibility_timeout (now %.1f s) if workers stall that long",
            verb,
            row_id,
            self.visibility_timeout,
        )

    # -- leases ---------------------------------------------------------------------

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer[0] != os.getpid():
            self._renewer = start_thread(
                f"kernel-sqlite-leases-{self.owner[:8]}",
                renew_leases,
                self.database,
                self.owner,
                self.visibility_timeout,
            )

    def _stop_renewer(self) -> None:
        renewer, self._renewer = self._renewer, None
        stop_thread(renewer)

    def close(self) -> None:
        try:
            super().close()  # restores unacked messages while leases still hold
        finally:
            self._stop_renewer()
            self.limited.close()

    # -- consuming ------------------------------------------------------------------

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        if not no_ack:
            return super().basic_get(queue, no_ack=False, **kwargs)
        try:
            return self.Message(self._claim(queue, remove=True), channel=self)
        except Empty:
            return None

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> None:
        super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        self.limited.consumed(queue)

    def basic_cancel(self, consumer_tag: str) -> None:
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue not in self._active_queues:
            self._no_ack_queues.discard(queue)
            self.limited.cancelled(queue)

    # -- queues ---------------------------------------------------------------------

    def prepare_queue_arguments(self, arguments: Any, **kwargs: Any) -> Any:
        """``Queue(expires=..., message_ttl=...)`` become ``x-expires``, ``x-message-ttl``.

        kombu's virtual channels drop them; its AMQP transports convert them so.
        """
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _new_queue(self, queue: str, arguments: Any = None, **kwargs: Any) -> None:
        limits = QueueLimits.from_arguments(queue, arguments)
        if limits is not None:
            self.limited.declare(queue, limits)
            return
        self._execute(
            "INSERT OR IGNORE INTO kernel_queues (name, created_at) VALUES (?, ?)",
            (queue, time.time()),
        )

    def _redeclare(self, queue: str, limits: QueueLimits) -> None:
        """Declare a consumed queue found deleted again, with this process's bindings."""
        logger.warning(
            "sqlite transport: queue %r was deleted while this channel consumed it (the "
            "process stalled for longer than its x-expires, %s s, or another process "
            "deleted it); declaring it again: messages sent to it meanwhile are lost",
            queue,
            limits.expires,
        )
        self._new_queue(queue, limits.arguments())
        for exchange, routing_key, arguments in self.state.queue_bindings(queue):
            meta = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
            self._queue_bind(exchange, *meta)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        sql = (
            "SELECT EXISTS (SELECT 1 FROM kernel_queues WHERE name = ?) "
            "OR EXISTS (SELECT 1 FROM kernel_messages WHERE queue = ?)"
        )
        return bool(self._execute(sql, (queue, queue)).fetchone()[0])

    def _size(self, queue: str) -> int:
        """Messages not held by a consumer, delayed ones included."""
        sql = f"SELECT COUNT(*) FROM kernel_messages WHERE {READY}"
        return self._execute(sql, (queue, time.time())).fetchone()[0]

    def _purge(self, queue: str) -> int:
        """Delete the messages no consumer holds (delayed ones too); return how many."""
        sql = f"DELETE FROM kernel_messages WHERE {READY}"
        return self._execute(sql, (queue, time.time())).rowcount

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        with self.database.transaction() as connection:
            connection.execute("DELETE FROM kernel_messages WHERE queue = ?", (queue,))
            connection.execute("DELETE FROM kernel_bindings WHERE queue = ?", (queue,))
            connection.execute("DELETE FROM kernel_queues WHERE name = ?", (queue,))
            connection.execute("DELETE FROM kernel_queue_limits WHERE name = ?", (queue,))
        self.limited.forget(queue)

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        # kombu's version only deletes when this process declared a binding for the queue.
        if if_empty and self._size(queue):
            return
        self.state.queue_bindings_delete(queue)
        self._delete(queue)

    # -- exchanges and bindings, shared through the database --------------------------

    def exchange_declare(
        self,
        exchange: str | None = None,
        type: str = "direct",
        durable: bool = False,
        auto_delete: bool = False,
        arguments: Any = None,
        nowait: bool = False,
        passive: bool = False,
    ) -> None:
        type = type or "direct"
        exchange = exchange or f"amq.{type}"
        if passive and exchange not in self.state.exchanges:
            known_type = self._exchange_type(exchange)
            if known_type is not None:  # declared by another process: learn it here
                super().exchange_declare(exchange, known_type)
                return
        super().exchange_declare(
            exchange, type, durable, auto_delete, arguments, nowait=nowait, passive=passive
        )
        if not passive:
            self._execute(
                "INSERT OR REPLACE INTO kernel_exchanges (name, type) VALUES (?, ?)",
                (exchange, type),
            )

    def exchange_delete(self, exchange: str, *args: Any, **kwargs: Any) -> None:
        super().exchange_delete(exchange, *args, **kwargs)
        with self.database.transaction() as connection:
            connection.execute("DELETE FROM kernel_bindings WHERE exchange = ?", (exchange,))
            connection.execute("DELETE FROM kernel_exchanges WHERE name = ?", (exchange,))

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        if not exchange or exchange in self.state.exchanges:
            return super().typeof(exchange, default)
        return self.exchange_types[self._exchange_type(exchange) or default]

    def queue_bind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        exchange = exchange or "amq.direct"
        known = self.state.has_binding(queue, exchange, routing_key)
        super().queue_bind(queue, exchange, routing_key, arguments, **kwargs)
        if known:  # kombu skips it, but another process may have deleted it since
            meta = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
            self._queue_bind(exchange, *meta)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: Any, queue: str) -> None:
        self._execute(
            "INSERT OR IGNORE INTO kernel_bindings (exchange, routing_key, pattern, queue) "
            "VALUES (?, ?, ?, ?)",
            (exchange, routing_key or "", pattern or "", queue),
        )

    def queue_unbind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        self._execute(
            "DELETE FROM kernel_bindings WHERE exchange = ? AND routing_key = ? AND queue = ?",
            (exchange or "amq.direct", routing_key or "", queue),
        )

    def get_table(self, exchange: str) -> list[tuple[str, str | None, str]]:
        rows = self._execute(
            "SELECT routing_key, pattern, queue FROM kernel_bindings WHERE exchange = ?",
            (exchange,),
        )
        return [(routing_key, pattern or None, queue) for routing_key, pattern, queue in rows]


class Transport(virtual.Transport):
    """kombu transport for ``sqlite://`` URLs; see the module docstring."""

    Channel = Channel

    polling_interval = DEFAULT_POLLING_INTERVAL
    default_port = None
    driver_type = "sqlite"
    driver_name = "sqlite"

    implements = virtual.Transport.implements.extend(
        asynchronous=False,
        exchange_type=frozenset({"direct", "topic", "fanout"}),
    )
    connection_errors = virtual.Transport.connection_errors + (sqlite3.OperationalError,)
    channel_errors = virtual.Transport.channel_errors + (sqlite3.DatabaseError,)

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        options = client.transport_options or {}
        if options.get("path"):
            self.path = os.path.abspath(options["path"])
        else:
            self.path = database_path(client.virtual_host, client.hostname)
        self.visibility_timeout = float(
            options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)
        )
        if self.visibility_timeout <= 0:
            raise ConfigurationError(
                f"sqlite transport option visibility_timeout={self.visibility_timeout!r} "
                "must be a positive number of seconds (default 30)"
            )
        self._pauses = Backoff(float(self.polling_interval or 0))
        busy_timeout = float(options.get("busy_timeout", DEFAULT_BUSY_TIMEOUT))
        self.database = Database(self.path, "transport", SCHEMA_VERSION, SCHEMA, busy_timeout)

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Deliver one message; poll empty queues with growing pauses (see ``polling_interval``).

        kombu's version sleeps the whole ``polling_interval`` after every empty poll,
        which a request-reply round trip pays twice (worker and client)."""
        started = time.monotonic()
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)
            except Empty:
                waited = time.monotonic() - started
                if timeout is not None and waited >= timeout:
                    raise TimeoutError() from None
                pause = self._pauses.next()
                if timeout is not None:
                    pause = min(pause, timeout - waited)
                time.sleep(pause)
            else:
                self._pauses.reset()
                return

    def establish_connection(self) -> Transport:
        self.database.connection()  # fail at connect time if the file cannot be opened
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        try:
            super().close_connection(connection)
        finally:
            self.database.close()

    def driver_version(self) -> str:
        return sqlite3.sqlite_version

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"port": None, "hostname": None}
