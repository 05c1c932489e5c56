"""A consuming channel's background thread: it keeps the channel's leases and sweeps.

kombu's Redis transport records each delivered, unacknowledged message in the
``unacked`` hash and scores its delivery tag in ``unacked_index`` with the time of
delivery; any consumer puts a message back in its queue once its score is older than
``visibility_timeout``. With a fixed score, a task that runs longer than the timeout
is delivered a second time while the first run goes on, so Celery sets the timeout to
an hour, which is also how long a dead worker's messages wait.

Here the score means "its consumer was alive then": while a channel lives, this thread
sets the scores of the messages it holds to the server's clock every
``visibility_timeout / 3``, and every ``visibility_timeout / 10`` it restores the
messages nobody renewed for ``visibility_timeout``, wherever they came from. A
process that dies stops renewing, and its messages are back in their queues between
``2/3`` and ``1.1`` times ``visibility_timeout`` after its death; one that lives is
never robbed of a message, however long the task runs.

The thread also retries acks that failed while Redis was unreachable, renewing those
messages meanwhile, so that a task finished during an outage is not run again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

logger = logging.getLogger(__name__)

#: Shortest pause between two rounds of the thread, whatever the visibility timeout.
MIN_TICK = 0.05


class LeaseKeeper:
    """The lease thread of one channel, started by its first consumer or delivery.

    Holds the channel weakly: a channel dropped without ``close()`` stops its thread
    (and kombu's finalizer hands its messages back), so nothing is renewed for ever.
    The channel provides ``held_tags()``, ``renew(tags)``, ``remove_held(tags)``,
    ``restore_expired()`` and ``connection_errors``.
    """

    def __init__(self, channel: Any, visibility_timeout: float) -> None:
        self.renew_interval = visibility_timeout / 3
        self.sweep_interval = max(MIN_TICK, visibility_timeout / 10)
        self._channel = weakref.ref(channel)
        self._description = f"channel {id(channel):x}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._deferred_acks: set[str] = set()
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=self._run, name=f"kernel-redis-leases-{id(channel):x}", daemon=True
        )
        self._thread.start()

    @property
    def running(self) -> bool:
        """True in the process that started it (a forked child has no such thread)."""
        return self._pid == os.getpid() and self._thread.is_alive()

    def defer_ack(self, delivery_tag: str) -> None:
        """Ack this message when Redis answers again; keep its lease until then."""
        with self._lock:
            self._deferred_acks.add(delivery_tag)

    def deferred_acks(self) -> list[str]:
        with self._lock:
            return list(self._deferred_acks)

    def flush_deferred_acks(self, channel: Any) -> None:
        """Send the deferred acks now; raises the connection error if Redis still fails."""
        tags = self.deferred_acks()
        if not tags:
            return
        channel.remove_held(tags)
        with self._lock:
            self._deferred_acks.difference_update(tags)
        logger.info(
            "redis transport: %d ack(s) deferred while Redis was unreachable were sent",
            len(tags),
        )

    def stop(self, timeout: float = 5.0) -> None:
        if self._pid != os.getpid():
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        next_renewal = time.monotonic() + self.renew_interval
        sweep_after = 0.0
        failing_since: float | None = None
        while not self._stop.wait(self.sweep_interval):
            channel = self._channel()
            if channel is None or channel.closed:
                return
            try:
                now = time.monotonic()
                self.flush_deferred_acks(channel)
                if now >= next_renewal:
                    channel.renew(channel.held_tags() + self.deferred_acks())
                    next_renewal = now + self.renew_interval
                if now >= sweep_after:
                    channel.restore_expired()
            except Exception as exc:
                if not isinstance(exc, channel.connection_errors):
                    logger.exception(
                        "redis transport: lease upkeep of %s failed; retrying in %.1f s",
                        self._description,
                        self.sweep_interval,
                    )
                    continue
                if failing_since is None:
                    failing_since = time.monotonic()
                    logger.warning(
                        "redis transport: cannot reach Redis to renew the leases of %s "
                        "(%s: %s); retrying every %.1f s",
                        self._description,
                        type(exc).__name__,
                        exc,
                        self.sweep_interval,
                    )
                # Renew first when Redis is back; sweep only once the other consumers,
                # cut off too, had the time to renew theirs.
                next_renewal = time.monotonic()
                sweep_after = time.monotonic() + self.renew_interval + self.sweep_interval
            else:
                if failing_since is not None:
                    logger.warning(
                        "redis transport: leases of %s renewed again after %.1f s",
                        self._description,
                        time.monotonic() - failing_since,
                    )
                    failing_since = None
            finally:
                del channel
