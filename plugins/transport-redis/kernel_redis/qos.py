"""Acknowledgement emulation for the Redis broker: leases that live as long as their worker.

kombu's Redis QoS records each delivery in the ``unacked`` hash and scores it in
``unacked_index`` with the consumer's clock; this one scores it with the server's
clock (so hosts whose clocks disagree still agree on expiry), lets the channel's
:class:`~kernel_redis.leases.LeaseKeeper` renew the score while the consumer lives,
and puts messages back through one Lua script so that a message is restored once,
with its ``x-delivery-count`` raised when the delivery counted as an attempt.

An ack that fails because Redis is unreachable is not lost: the message keeps its
lease and the ack is sent when Redis answers again, so a task that finished during an
outage is not run a second time.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import virtual
from kombu.transport.redis import QoS as KombuRedisQoS

logger = logging.getLogger(__name__)


class QoS(KombuRedisQoS):
    """kombu's Redis QoS with server-clock leases, deferred acks and counted restores."""

    #: Tags acknowledged inside the channel's ``batched_acks()``: removed from Redis
    #: together, in one round trip, when it ends.
    _ack_batch: list[str] | None = None

    def append(self, message: Any, delivery_tag: str) -> None:
        channel = self.channel
        if not channel.was_taken(delivery_tag):  # TAKE records most deliveries itself
            channel.hold(delivery_tag, message._raw)
        virtual.QoS.append(self, message, delivery_tag)
        channel.keep_leases()

    def ack(self, delivery_tag: str) -> None:
        if self._ack_batch is not None:
            self._ack_batch.append(delivery_tag)
        else:
            self._remove_acked([delivery_tag])
        virtual.QoS.ack(self, delivery_tag)

    def flush_acks(self) -> None:
        """End a batch: remove the messages acknowledged in it, in one round trip."""
        tags, self._ack_batch = self._ack_batch, None
        if tags:
            self._remove_acked(tags)

    def _remove_acked(self, tags: list[str]) -> None:
        try:
            with self.pipe_or_acquire() as pipe:
                for tag in tags:
                    self._remove_from_indices(tag, pipe)
                pipe.execute()
        except self.channel.connection_errors as exc:
            keeper = self.channel.keep_leases()
            for tag in tags:
                keeper.defer_ack(tag)
            logger.warning(
                "redis transport: could not ack %d message(s) (%s: %s); their leases are "
                "kept and the acks are sent when Redis answers again",
                len(tags),
                type(exc).__name__,
                exc,
            )

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            # Back of the queue, counted as an attempt (RabbitMQ's quorum queues count
            # a rejected delivery the same way).
            self.channel.restore_tags([delivery_tag], attempted=True, to_back=True)
        else:
            self._remove_from_indices(delivery_tag).execute()
        virtual.QoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> list[tuple[Exception, Any]]:
        """Hand back what this channel still holds (shutdown): front of the queue, not
        counted as an attempt, since a warm shutdown only returns unstarted messages."""
        self._flush()
        tags = [tag for tag in self._delivered if tag not in self._dirty]
        self._delivered.clear()
        errors: list[tuple[Exception, Any]] = []
        try:
            self.channel.restore_tags(tags, attempted=False, to_back=False)
        except self.channel.connection_errors as exc:
            logger.warning(
                "redis transport: could not hand back %d unacked message(s) (%s); they "
                "return to their queues once their leases expire",
                len(tags),
                exc,
            )
            errors.append((exc, tags))
        return errors

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """Replaced by the channel's lease keeper, which sweeps on its own schedule."""
