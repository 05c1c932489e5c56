"""The two ends of rpc:// on the broker: reading this process's reply queue, and
sending results to the reply queue a task message named.

:class:`ReplyReader` has one connection that consumes the reply queue (no acks: a
result is read once, into the :class:`~kernel_amqp.rpc_cache.ResultCache`). One
thread at a time drains it; other threads wait on the cache, which each arrival wakes.
When the connection fails, reading pauses and reconnects with growing waits (0.5 s to
5 s). The reply queue is durable, so results sent meanwhile wait for the reader.

:class:`ReplySender` publishes results through one connection per thread (py-amqp
connections are not thread-safe), with publisher confirms, and retries connection
failures (:data:`SEND_RETRY_POLICY`). A result it cannot send raises
:class:`ResultNotSent`; the worker then returns the task's message to the queue.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from kombu import Consumer, Exchange, Queue

from kernel.exceptions import KernelError, broker_connection_errors, describe_broker_error
from kernel.plugins.manager import redact_url

log = logging.getLogger(__name__)

#: How sending a result retries when the broker connection fails (Celery's rpc://
#: backend tries for about 20 s too): attempts after the first, and the waits.
SEND_RETRY_POLICY = {
    "max_retries": 20,
    "interval_start": 0.0,
    "interval_step": 1.0,
    "interval_max": 1.0,
}
#: Seconds between attempts to reconnect the reader: doubled each time, at most the max.
RECONNECT_DELAY = 0.5
RECONNECT_DELAY_MAX = 5.0
#: Longest time a read that must see every result already queued keeps reading.
SYNC_TIMEOUT = 5.0
#: The shortest ``x-expires`` a reply queue gets (so a busy client's refreshes keep up).
MIN_QUEUE_EXPIRES = 60.0


class ResultNotSent(KernelError):
    """A result could not be sent to its reply queue: the broker stayed unreachable."""


def reply_queue(name: str, expires: float) -> Queue:
    """The reply queue ``name``: durable and classic, deleted by RabbitMQ once unused
    for ``expires`` seconds (at least :data:`MIN_QUEUE_EXPIRES`)."""
    return Queue(
        name,
        Exchange("", type="direct"),
        routing_key=name,
        durable=True,
        auto_delete=False,
        expires=max(expires, MIN_QUEUE_EXPIRES),
        queue_arguments={"x-queue-type": "classic"},
    )


class ReplyReader:
    """Consumes one reply queue into a result cache (see the module docstring)."""

    def __init__(
        self,
        connect: Callable[[], Any],
        queue: Queue,
        accept: Any,
        on_reply: Callable[[Any, Any], None],
        cache: Any,
        url: str,
    ) -> None:
        self._connect = connect
        self.queue = queue
        self._accept = accept
        self._on_reply = on_reply
        self._cache = cache
        self._url = url
        self._drain_lock = threading.Lock()
        self._connection: Any = None
        self._consumer: Any = None
        self._errors: tuple[type[BaseException], ...] = (ConnectionError,)
        self._failures = 0
        self._retry_at = 0.0
        self._down_since: float | None = None

    def poll(self, timeout: float, sync: bool = False) -> None:
        """Read arriving replies for up to ``timeout`` seconds (returning after the
        first batch). ``sync`` first makes sure every reply already in the queue is
        read, with one round trip. If another thread is reading, wait for its news."""
        if not self._drain_lock.acquire(blocking=False):
            if timeout > 0:
                self._cache.wait(timeout)
            return
        pause = 0.0
        try:
            if self._ensure_connected():
                try:
                    if sync:
                        self._sync()
                    self._drain(timeout)
                except self._errors as exc:
                    self._lost(exc)
            else:
                pause = min(timeout, max(0.0, self._retry_at - time.monotonic()))
        finally:
            self._drain_lock.release()
            self._cache.wake()  # a waiting thread may take over reading
        if pause > 0:
            self._cache.wait(pause)

    def _sync(self) -> None:
        """Read every reply that is in the queue now. The broker answers a passive
        declare after the deliveries it already sent on this channel, and counts those
        it still holds back (flow control): read until it holds none back."""
        deadline = time.monotonic() + SYNC_TIMEOUT
        channel = self._consumer.channel
        while channel.queue_declare(queue=self.queue.name, passive=True).message_count:
            if time.monotonic() >= deadline:
                return  # results keep pouring in: what is read so far will do
            self._drain(0.05)

    def _drain(self, timeout: float) -> None:
        connection = self._connection
        deadline = time.monotonic() + timeout
        first = True
        while True:
            remaining = deadline - time.monotonic()
            try:
                connection.drain_events(timeout=max(0.0, remaining) if first else 0)
            except TimeoutError:
                return
            first = False  # a batch arrived: take what else is there, then return

    def _ensure_connected(self) -> bool:
        if self._consumer is not None:
            return True
        if time.monotonic() < self._retry_at:
            return False
        connection = self._connect()
        self._errors = (*broker_connection_errors(connection), *connection.channel_errors)
        try:
            connection.ensure_connection(max_retries=0)
            channel = connection.channel()
            consumer = Consumer(
                channel,
                [self.queue],
                callbacks=[self._on_reply],
                accept=self._accept,
                no_ack=True,
            )
            consumer.consume()
        except self._errors as exc:
            self._drop(connection)
            self._lost(exc)
            return False
        self._connection, self._consumer = connection, consumer
        if self._down_since is not None:
            log.info(
                "rpc: reading results again after %.1fs without the broker",
                time.monotonic() - self._down_since,
            )
        self._failures, self._down_since = 0, None
        return True

    def _lost(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "rpc: cannot read results from %s (%s); reconnecting ...",
                redact_url(self._url),
                describe_broker_error(exc),
            )
        delay = min(RECONNECT_DELAY * 2**self._failures, RECONNECT_DELAY_MAX)
        self._failures += 1
        self._retry_at = time.monotonic() + delay
        self._drop(self._connection)
        self._connection = self._consumer = None

    @staticmethod
    def _drop(connection: Any) -> None:
        if connection is None:
            return
        try:
            connection.collect()  # the socket may be dead: do not talk to the broker
        except Exception:
            log.debug("rpc: discarding a failed connection", exc_info=True)

    def close(self) -> None:
        with self._drain_lock:
            connection, self._connection, self._consumer = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception:
                log.debug("rpc: closing the reader's connection", exc_info=True)


class ReplySender:
    """Publishes result documents to reply queues, one connection per thread."""

    def __init__(self, connect: Callable[[], Any], url: str) -> None:
        self._connect = connect
        self._url = url
        self._local = threading.local()
        self._generation = 0
        self._lock = threading.Lock()
        self._connections: list[Any] = []

    def _producer(self) -> tuple[Any, tuple[type[BaseException], ...]]:
        local = self._local
        if getattr(local, "key", None) != (os.getpid(), self._generation):
            connection = self._connect()
            local.connection = connection
            local.producer = connection.Producer()
            local.errors = (*broker_connection_errors(connection), *connection.channel_errors)
            local.key = (os.getpid(), self._generation)
            with self._lock:
                self._connections.append(connection)
        return local.producer, local.errors

    def _forget_thread_connection(self) -> None:
        local = self._local
        connection = getattr(local, "connection", None)
        local.key = None
        if connection is not None:
            with self._lock:
                if connection in self._connections:
                    self._connections.remove(connection)
            ReplyReader._drop(connection)

    def send(self, body: dict, reply_to: str, correlation_id: str, **publish: Any) -> None:
        """Publish ``body`` to the queue ``reply_to``, retrying connection failures."""
        policy = SEND_RETRY_POLICY
        attempt = 0
        while True:
            producer, errors = self._producer()
            try:
                producer.connection.ensure_connection(max_retries=0)
                producer.publish(
                    body,
                    exchange="",
                    routing_key=reply_to,
                    correlation_id=correlation_id,
                    retry=False,
                    **publish,
                )
                return
            except errors as exc:
                self._forget_thread_connection()
                attempt += 1
                if attempt > policy["max_retries"]:
                    raise ResultNotSent(
                        f"could not send the result of task {correlation_id} to reply queue "
                        f"{reply_to!r} on {redact_url(self._url)}: {describe_broker_error(exc)} "
                        f"(gave up after {attempt} attempts); check that the broker is running"
                    ) from exc
                delay = min(
                    policy["interval_start"] + policy["interval_step"] * (attempt - 1),
                    policy["interval_max"],
                )
                log.warning(
                    "rpc: could not send the result of task %s (%s); retry %d of %d in %.1fs",
                    correlation_id,
                    describe_broker_error(exc),
                    attempt,
                    policy["max_retries"],
                    delay,
                )
                time.sleep(delay)

    def close(self) -> None:
        """Close every thread's connection; a thread that sends again reconnects."""
        with self._lock:
            connections, self._connections = self._connections, []
            self._generation += 1
        for connection in connections:
            try:
                connection.release()
            except Exception:
                log.debug("rpc: closing a sender connection", exc_info=True)
