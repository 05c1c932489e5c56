"""The worker's link to its broker: connecting, surviving outages, settling messages.

A connection error from the broker stops receiving and dispatching, but running tasks
go on; the worker waits (growing, interruptible pauses), reconnects, revives its
consumer on a new channel only when the old one is unusable, and resumes. Acks and
rejects that fail meanwhile are kept and sent again once the connection is back; a
message whose channel died is redelivered by the broker (at-least-once).
``broker_connection_max_retries`` failed attempts in a row stop the worker (cold).

The remote-control connection recovers the same way, on its own schedule, so that an
outage of it never stops tasks. :class:`BrokerLink` is a part of
:class:`~kernel.worker.worker.Worker`, kept apart because it is one concern of its own.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from typing import Any

from kombu.exceptions import OperationalError

from kernel.exceptions import BrokerConnectionError
from kernel.exceptions import describe_broker_error as _describe
from kernel.plugins.manager import redact_url as _redact
from kernel.protocol import DecodedTask
from kernel.retry_policy import backoff_delay

log = logging.getLogger("kernel.worker.worker")


class BrokerLink:
    """Broker connection handling of the worker (mixed into ``Worker``)."""

    #: Seconds before the first attempt to (re)connect to the broker after a failure;
    #: each further attempt waits twice as long, up to ``reconnect_delay_max``.
    reconnect_delay = 0.5
    reconnect_delay_max = 5.0

    # Provided by Worker.
    app: Any
    hostname: str
    pool: Any
    prefetch_count: int
    held_limit: int
    idle_poll: float
    control_poll: float

    def _init_broker_state(self) -> None:
        self._broker_errors: tuple[type[BaseException], ...] = (OperationalError, ConnectionError)
        #: Channel errors survived as a lost connection (see ``_channel_lost``).
        self._channel_errors: tuple[type[BaseException], ...] = ()
        self._broker_down = False  # lost and not yet reconnected: nothing is received
        self._outage_since: float | None = None  # until consuming works again
        self._reconnect_failures = 0  # failed reconnection attempts in a row
        self._reconnect_at = 0.0
        self._broker_error: BaseException | None = None  # the latest connection error
        self._unsettled: dict[int, tuple[Any, str, bool]] = {}  # failed acks and rejects
        self._control_outage: float | None = None
        self._control_failures = 0
        self._control_retry_at = 0.0

    def _connect(self, connection: Any) -> bool:
        """Connect at start-up, retrying as ``broker_connection_retry_on_startup`` and
        ``broker_connection_max_retries`` say; False when a stop was asked for meanwhile."""
        conf = self.app.conf
        limit = self._max_reconnects()
        failures = 0
        while True:
            try:
                connection.ensure_connection(max_retries=0)  # one attempt: we pace them
                return True
            except self._broker_errors as exc:
                error = exc
            url = _redact(conf.broker_url)
            if not conf.broker_connection_retry_on_startup:
                raise BrokerConnectionError(
                    f"worker {self.hostname} cannot connect to broker {url}: "
                    f"{_describe(error)}; check that the broker is running and reachable "
                    "there (broker_connection_retry_on_startup is False, so it did not retry)"
                ) from error
            if limit is not None and failures >= limit:
                raise BrokerConnectionError(
                    f"worker {self.hostname} cannot connect to broker {url}: "
                    f"{_describe(error)} (gave up after {failures + 1} attempts); check that "
                    "the broker is running and reachable there, or raise "
                    "broker_connection_max_retries (0 or None retries for ever)"
                ) from error
            delay = self._reconnect_backoff(failures)
            failures += 1
            log.warning(
                "cannot connect to broker %s: %s; trying again in %.1fs (retry %d of %s)",
                url,
                _describe(error),
                delay,
                failures,
                limit or "unlimited",
            )
            if not self._pause(delay):
                return False

    def _max_reconnects(self) -> int | None:
        """``broker_connection_max_retries``; None (or 0, as in Celery) is no limit."""
        return self.app.conf.broker_connection_max_retries or None

    def _reconnect_backoff(self, failures: int) -> float:
        return backoff_delay(failures, self.reconnect_delay, self.reconnect_delay_max, False)

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` in short steps, settling tasks that finish meanwhile; False
        as soon as a stop is asked for (never a long blind sleep)."""
        deadline = time.monotonic() + seconds
        while self._stop_mode is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            self._wait_completion(min(remaining, self.idle_poll))
        return False

    def _cancel_consumer(self) -> None:
        try:
            self._consumer.cancel()
        except self._broker_errors as exc:
            log.debug("cancelling the consumer failed (%s); the broker is unreachable", exc)

    def _connection_lost(self, exc: BaseException) -> None:
        """Note a broker connection error; the loop reconnects (or gives up) next."""
        if self._broker_down:
            return
        self._broker_down = True
        self._broker_error = exc
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            self._reconnect_failures = 0
            if self.app.conf.broker_connection_retry:
                log.warning(
                    "broker connection lost: %s; reconnecting to %s (%d task(s) keep running) ...",
                    _describe(exc),
                    _redact(self.app.conf.broker_url),
                    len(self._inflight),
                )
        else:  # the connection came back but did not hold
            self._reconnect_failures += 1
            log.debug("broker connection failed again: %s", _describe(exc))
        self._reconnect_at = now + self._reconnect_backoff(self._reconnect_failures)

    def _channel_lost(self, connection: Any, exc: BaseException) -> None:
        """The broker closed the consumer's channel (an AMQP channel error: a delivery
        unacknowledged past RabbitMQ's ``consumer_timeout``, an unknown delivery tag)
        and took back its unacknowledged messages, those of running tasks included.
        py-amqp reopens such a channel in place, where the old delivery tags mean
        nothing, so the worker drops the whole connection and recovers as from a lost
        one: running tasks finish without acknowledging, and the broker delivers their
        messages again (at least once)."""
        timed_out = "timed out" in str(exc) or "consumer_timeout" in str(exc)
        log.warning(
            "the broker closed the worker's channel: %s; its unacknowledged messages went "
            "back to the queue and are delivered again (%d running task(s) may run "
            "twice). Reconnecting.%s",
            _describe(exc),
            len(self._inflight),
            " A task ran past RabbitMQ's consumer_timeout: raise it (see 'Acknowledged "
            "after the task' in docs/amqp.md)"
            if timed_out
            else "",
        )
        try:
            connection.collect()
        except Exception:
            log.debug("dropping the connection after a channel error failed", exc_info=True)
        self._connection_lost(exc)

    def _reconnect(self, connection: Any) -> None:
        """Wait for the next attempt (settling finished tasks), then reconnect and revive
        the consumer when its channel is unusable; raises BrokerConnectionError when
        retrying is off or used up."""
        conf = self.app.conf
        url = _redact(conf.broker_url)
        error = self._broker_error or OperationalError("connection lost")
        if not conf.broker_connection_retry:
            raise BrokerConnectionError(
                f"worker {self.hostname} lost its connection to broker {url}: "
                f"{_describe(error)}; it stops because broker_connection_retry is False "
                "(unfinished messages return to the queue); set it True to reconnect"
            ) from error
        limit = self._max_reconnects()
        if limit is not None and self._reconnect_failures >= limit:
            assert self._outage_since is not None
            raise BrokerConnectionError(
                f"worker {self.hostname} could not reconnect to broker {url} in "
                f"{self._reconnect_failures} attempts "
                f"({time.monotonic() - self._outage_since:.1f}s): {_describe(error)}; it "
                "stops (cold), unfinished messages return to the queue. Check that the "
                "broker is running and reachable, or raise broker_connection_max_retries "
                "(0 or None retries for ever)"
            ) from error
        if not self._pause(self._reconnect_at - time.monotonic()):
            return  # asked to stop
        try:
            connection.ensure_connection(max_retries=0)  # one attempt: we pace them
            self._revive_if_unusable(connection)
        except self._broker_errors as exc:
            self._broker_error = exc
            self._reconnect_failures += 1
            self._reconnect_at = time.monotonic() + self._reconnect_backoff(
                self._reconnect_failures
            )
            log.debug("reconnecting to broker %s failed: %s", url, _describe(exc))
            return
        # Connected as far as kombu can tell; receiving again proves it (``_step``).
        # Virtual transports (Redis, SQLite) reconnect lazily on the same channel.
        self._broker_down = False

    def _resumed(self) -> None:
        assert self._outage_since is not None
        outage = time.monotonic() - self._outage_since
        self._outage_since = None
        attempts, self._reconnect_failures = self._reconnect_failures + 1, 0
        self._broker_error = None
        log.info(
            "broker connection restored: consuming again after %.1fs without the broker "
            "(%d reconnection attempt(s))",
            outage,
            attempts,
        )
        self._settle_unsettled()

    def _revive_if_unusable(self, connection: Any) -> None:
        """Move the consumer to a new channel when its own is closed or belongs to a
        dead connection. A usable channel is kept: closing it would return the messages
        of running tasks to the queue, and they would run twice."""
        old = self._consumer.channel
        if _channel_usable(old):
            return
        channel = connection.channel()
        self._consumer.revive(channel)
        self._consumer.consume()
        self._producer.revive(channel)
        dropped = self._forget_messages_of(old)
        if self.prefetch_count:  # the window as it is now (autoscale, held messages)
            self._held = min(len(self._scheduled) + len(self.rate_limits), self.held_limit)
            self._consumer.qos(prefetch_count=self.prefetch_count + self._held)
        log.info(
            "consuming on a new channel; the broker delivers again the %d message(s) "
            "still held from the old one",
            dropped,
        )

    def _forget_messages_of(self, channel: Any) -> int:
        """Drop waiting messages that arrived on ``channel``: the broker took them back."""

        def stale(item: tuple[Any, DecodedTask]) -> bool:
            return item[0].channel is channel

        count = len(self.rate_limits.remove(stale))
        kept = deque(item for item in self._reserved if not stale(item))
        count += len(self._reserved) - len(kept)
        self._reserved = kept
        scheduled = [entry for entry in self._scheduled if entry[2].channel is not channel]
        count += len(self._scheduled) - len(scheduled)
        heapq.heapify(scheduled)
        self._scheduled = scheduled
        for tag, (message, _, _) in list(self._unsettled.items()):
            if message.channel is channel:
                del self._unsettled[tag]
                count += 1
        return count

    def _poll_control(self) -> None:
        """Deliver waiting control messages (in this thread), without blocking.

        A broker connection error pauses polling with growing waits between
        reconnection attempts (one warning when lost, one line when back)."""
        self._next_control_poll = time.monotonic() + self.control_poll
        connection = self._control_connection
        if connection is None or self._control is None:
            return
        if self._control_outage is not None:
            if time.monotonic() < self._control_retry_at:
                return
            try:
                connection.ensure_connection(max_retries=0)
                if not _channel_usable(self._control.channel):
                    # Its channel died with the connection: nothing to clean up there.
                    self._control.start(connection)
            except self._broker_errors as exc:
                self._control_failed(exc)
                return
        try:
            connection.drain_events(timeout=0)
        except TimeoutError:
            pass
        except self._broker_errors as exc:
            self._control_failed(exc)
            return
        except Exception:
            log.exception("reading control messages failed; trying again shortly")
            return
        if self._control_outage is not None:
            log.info(
                "remote control connection restored after %.1fs",
                time.monotonic() - self._control_outage,
            )
            self._control_outage = None
            self._control_failures = 0

    def _control_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._control_outage is None:
            self._control_outage = now
            self._control_failures = 0
            log.warning("remote control connection lost: %s; reconnecting ...", _describe(exc))
        else:
            self._control_failures += 1
        limit = self._max_reconnects()
        if limit is not None and self._control_failures >= limit:
            log.error(
                "remote control of worker %s stops: could not reconnect to broker %s in %d "
                "attempts (%s); revoke and other broadcasts no longer reach it until it "
                "restarts",
                self.hostname,
                _redact(self.app.conf.broker_url),
                self._control_failures,
                _describe(exc),
            )
            control, self._control = self._control, None
            control.stop()
            return
        self._control_retry_at = now + self._reconnect_backoff(self._control_failures)

    def _ack(self, message: Any) -> None:
        self._settle_message(message, "ack")

    def _reject(self, message: Any, requeue: bool = True) -> None:
        self._settle_message(message, "reject", requeue)

    def _settle_message(self, message: Any, action: str, requeue: bool = False) -> None:
        """Acknowledge or reject ``message``, surviving a broker outage.

        When the broker cannot be reached, the operation is kept and sent again once
        the connection is back: nothing acknowledged is lost, and a finished task does
        not run again unless the broker itself returned its message meanwhile (as AMQP
        does when a connection dies; a message whose channel was replaced is left to
        that redelivery).
        """
        if message.acknowledged or id(message) in self._unsettled:
            return  # already settled (acks_late=False: at dispatch), or waiting for the broker
        label = _message_label(message)
        if self._consumer is not None and message.channel is not self._consumer.channel:
            log.info(
                "task %s: its message came on a channel that was since replaced; the "
                "broker delivers it again",
                label,
            )
            return
        if self._broker_down:
            self._unsettled[id(message)] = (message, action, requeue)
            log.warning(
                "task %s: the broker is unreachable; its message is %s once the connection is back",
                label,
                "acknowledged" if action == "ack" else "returned to the queue",
            )
            return
        try:
            if action == "ack":
                message.ack()
            else:
                message.reject(requeue=requeue)
        except self._broker_errors as exc:
            self._connection_lost(exc)
            self._unsettled[id(message)] = (message, action, requeue)
            log.warning(
                "task %s: could not %s its message (%s); trying again once the broker "
                "connection is back",
                label,
                "acknowledge" if action == "ack" else "return",
                _describe(exc),
            )

    def _settle_unsettled(self) -> None:
        """Send the acks and rejects that failed while the broker was unreachable."""
        pending = list(self._unsettled.values())
        self._unsettled.clear()
        for message, action, requeue in pending:
            if self._broker_down:  # lost again: keep the rest for the next time
                self._unsettled[id(message)] = (message, action, requeue)
                continue
            try:
                self._settle_message(message, action, requeue)
            except Exception as exc:  # the broker refused it: it redelivers the message
                log.warning(
                    "task %s: could not %s its message after the outage (%s); the broker "
                    "delivers it again",
                    _message_label(message),
                    action,
                    _describe(exc),
                )
        if pending and not self._unsettled:
            log.info("settled %d message(s) held back during the outage", len(pending))


def _channel_usable(channel: Any) -> bool:
    """False when ``channel`` was closed or its connection died: the consumer needs a
    new one. Virtual transports mark a closed channel ``closed``; py-amqp clears
    ``is_open`` and its connection reports ``connected`` False after a socket error."""
    if channel is None or getattr(channel, "closed", False):
        return False
    if getattr(channel, "is_open", True) is False:
        return False
    owner = getattr(channel, "connection", None)
    return owner is not None and getattr(owner, "connected", True) is not False


def _message_label(message: Any) -> str:
    headers = message.headers or {}
    return f"{headers.get('task', '?')}[{headers.get('id', '?')}]"
