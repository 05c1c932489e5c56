"""The SQLite transport's tables: schema, claim queries, queue limits, and row helpers.

Kept apart from the kombu channel (``sqlite_transport``) so the storage layout and the
SQL that relies on its index can be read, and changed, in one place. That includes the
background work a channel does on the tables: renewing its leases, and keeping the
expiring queues it consumes alive.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from typing import Any

import attrs
from kombu.utils.json import loads

from kernel.exceptions import ConfigurationError
from kernel.plugins.builtin.sqlite_db import Database

logger = logging.getLogger(__name__)

#: Version of the tables below, recorded in ``kernel_schema``. 2: claims use the
#: ``kernel_messages_visible`` index instead of ``kernel_messages_claim``. 3: queue
#: arguments ``x-expires`` and ``x-message-ttl`` live in ``kernel_queue_limits``.
SCHEMA_VERSION = 3

#: Claims one poll tries before leaving a hotly contested queue to the next poll.
CLAIM_ATTEMPTS = 20

#: When a row may be claimed: once it is due and no consumer holds a lease on it. An
#: expression, not a stored column, so that no write can leave it stale and a version 1
#: table needs no ``ALTER TABLE``; queries must spell it exactly so for SQLite to match
#: it to the ``kernel_messages_visible`` index.
VISIBLE_AT = "max(deliver_at, coalesce(lease_until, deliver_at))"

# Every statement is idempotent: ``Database`` runs the script whenever the recorded
# version differs, possibly in several processes at once, and for a version 1 or 2
# database (the same tables) it is the whole migration. A version 1 process opening the
# file afterwards rebuilds its index and records version 1, so the next version 3
# process drops it again; a version 1 or 2 process ignores queue limits and leaves a
# deleted queue's limits row behind. It works, but upgrade all processes together.
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS kernel_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    deliver_at REAL NOT NULL,
    payload TEXT NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    created_at REAL NOT NULL
);
DROP INDEX IF EXISTS kernel_messages_claim;
CREATE INDEX IF NOT EXISTS kernel_messages_visible
    ON kernel_messages (queue, priority DESC, {VISIBLE_AT});
CREATE INDEX IF NOT EXISTS kernel_messages_lease_owner
    ON kernel_messages (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS kernel_queues (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kernel_exchanges (
    name TEXT PRIMARY KEY,
    type TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kernel_bindings (
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    pattern TEXT NOT NULL,
    queue TEXT NOT NULL,
    UNIQUE (exchange, routing_key, queue)
);
CREATE INDEX IF NOT EXISTS kernel_bindings_queue ON kernel_bindings (queue);
CREATE TABLE IF NOT EXISTS kernel_dead_messages (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    payload,
    reason TEXT NOT NULL,
    dead_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kernel_queue_limits (
    name TEXT PRIMARY KEY,
    expires REAL,
    message_ttl REAL,
    used_at REAL NOT NULL
);
"""

READY = "queue = ? AND (lease_until IS NULL OR lease_until < ?)"

# The best visible row of the highest priority below ``:below`` that the queue holds, as
# (that priority, id, payload, delivery_count, created_at); id and the rest are NULL
# when none of the level's rows is visible yet, the priority too when no level is left.
# Each part is one seek in the index, so delayed and leased rows are never read and a
# backlog never sorted; ``ORDER BY priority DESC, id`` over all visible rows would have
# to sort it.
CANDIDATE = f"""
SELECT level.priority, message.id, message.payload, message.delivery_count,
    message.created_at
FROM (
    SELECT max(priority) AS priority FROM kernel_messages
    WHERE queue = :queue AND priority < :below
) AS level
LEFT JOIN kernel_messages AS message ON message.id = (
    SELECT id FROM kernel_messages
    WHERE queue = :queue AND priority = level.priority AND {VISIBLE_AT} <= :now
    ORDER BY {VISIBLE_AT}, id
    LIMIT 1
)
"""

#: Priorities are SQLite integers (64 bits), all below this.
ABOVE_EVERY_PRIORITY = 2.0**63


def parse_tag(delivery_tag: str) -> tuple[int, int]:
    row_id, delivery = str(delivery_tag).split(":")
    return int(row_id), int(delivery)


def message_priority(message: dict[str, Any]) -> int:
    try:
        return int((message.get("properties") or {}).get("priority") or 0)
    except (TypeError, ValueError):
        return 0


def message_deliver_at(message: dict[str, Any], destination: str, now: float) -> float:
    value = (message.get("headers") or {}).get("x-deliver-at")
    if value is None:
        return now
    try:
        return float(value)
    except (TypeError, ValueError):
        logger.warning(
            "sqlite transport: header x-deliver-at=%r on a message for %s is not "
            "epoch seconds; delivering it now",
            value,
            destination,
        )
        return now


def decode_payload(payload: Any) -> dict[str, Any]:
    message = loads(payload)
    if not isinstance(message, dict) or not isinstance(message.get("properties"), dict):
        raise ValueError("not a kombu message: no 'properties' mapping")
    return message


def renew_leases(
    database: Database, owner: str, visibility_timeout: float, stop: threading.Event
) -> None:
    interval = visibility_timeout / 3
    try:
        while not stop.wait(interval):
            try:
                database.connection().execute(
                    "UPDATE kernel_messages SET lease_until = ? WHERE lease_owner = ?",
                    (time.time() + visibility_timeout, owner),
                )
            except sqlite3.Error as exc:
                logger.warning(
                    "sqlite transport: could not renew the leases of channel %s (%s); "
                    "retrying in %.1f s",
                    owner,
                    exc,
                    interval,
                )
    finally:
        database.close_thread()


# -- queue limits: x-expires and x-message-ttl ------------------------------------------

#: Seconds between two marks of an expiring queue as used by one channel: often enough
#: that a queue in use never expires, rarely enough that polls stay read-only. A queue
#: that expires sooner than four times this is marked four times per ``x-expires``.
USE_MARK_INTERVAL = 1.0

#: Seconds between two cleanups of expired queues and messages by one channel's fanout
#: publishes, so that a stream of broadcasts pays for one cleanup a second.
CLEANUP_INTERVAL = 1.0

STORE_LIMITS = (
    "INSERT OR REPLACE INTO kernel_queue_limits (name, expires, message_ttl, used_at) "
    "VALUES (?, ?, ?, ?)"
)
MARK_USED = "UPDATE kernel_queue_limits SET used_at = ? WHERE name = ?"

# Rows older than their queue's TTL, unless a live consumer holds them (its ack must
# still find the row); ``created_at`` is the publish time, as in RabbitMQ. CROSS JOIN
# keeps SQLite from reading every message to look its queue up: it walks the few
# limited queues and seeks each one's rows in the ``kernel_messages_visible`` index.
EXPIRED_MESSAGES = """
DELETE FROM kernel_messages WHERE id IN (
    SELECT message.id FROM kernel_queue_limits AS limits
    CROSS JOIN kernel_messages AS message ON message.queue = limits.name
    WHERE limits.message_ttl IS NOT NULL AND message.created_at < :now - limits.message_ttl
        AND (message.lease_until IS NULL OR message.lease_until < :now)
)
"""


@attrs.frozen
class QueueLimits:
    """What ``x-expires`` and ``x-message-ttl`` ask of a queue, in seconds."""

    expires: float | None = None
    """Delete the queue, its bindings and messages once unused that long (declared,
    polled, or consumed by a live channel); None: never."""

    message_ttl: float | None = None
    """Drop messages published longer ago than that; None: keep them."""

    @classmethod
    def from_arguments(cls, queue: str, arguments: Any) -> QueueLimits | None:
        """The limits in queue arguments (milliseconds, as in AMQP); None if they set none."""
        if not arguments:
            return None
        limits = cls(
            expires=_seconds(queue, arguments, "x-expires", positive=True),
            message_ttl=_seconds(queue, arguments, "x-message-ttl", positive=False),
        )
        return limits if limits != cls() else None

    def arguments(self) -> dict[str, int]:
        """The queue arguments that declare these limits."""
        found = {"x-expires": self.expires, "x-message-ttl": self.message_ttl}
        return {name: round(value * 1000) for name, value in found.items() if value is not None}

    @property
    def use_mark_interval(self) -> float:
        """Seconds a channel may wait between two marks of the queue as used."""
        if self.expires is None:
            return USE_MARK_INTERVAL
        return min(USE_MARK_INTERVAL, self.expires / 4)


def _seconds(queue: str, arguments: Any, name: str, positive: bool) -> float | None:
    value = arguments.get(name)
    if value is None:
        return None
    try:
        milliseconds = float(value)
        valid = milliseconds > 0 or (milliseconds == 0 and not positive)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ConfigurationError(
            f"queue {queue!r}: argument {name}={value!r} must be a "
            f"{'positive' if positive else 'non-negative'} number of milliseconds; "
            "kombu converts Queue(expires=..., message_ttl=...) from seconds for you"
        )
    return milliseconds / 1000


def delete_expired(connection: sqlite3.Connection, now: float) -> list[str]:
    """Delete the queues unused for longer than ``x-expires``, and messages past their TTL.

    Run inside a write transaction. Returns the names of the deleted queues.
    """
    expired = [
        row[0]
        for row in connection.execute(
            "SELECT name FROM kernel_queue_limits WHERE used_at + expires < ?", (now,)
        )
    ]
    names = [(name,) for name in expired]
    connection.executemany("DELETE FROM kernel_messages WHERE queue = ?", names)
    connection.executemany("DELETE FROM kernel_bindings WHERE queue = ?", names)
    connection.executemany("DELETE FROM kernel_queues WHERE name = ?", names)
    connection.executemany("DELETE FROM kernel_queue_limits WHERE name = ?", names)
    for name in expired:
        logger.debug("sqlite transport: queue %r expired (x-expires) and was deleted", name)
    connection.execute(EXPIRED_MESSAGES, {"now": now})
    return expired


def drop_expired_messages(
    connection: sqlite3.Connection, queue: str, message_ttl: float, now: float
) -> int:
    """Delete the messages of ``queue`` older than ``message_ttl`` that nobody holds."""
    return connection.execute(
        "DELETE FROM kernel_messages WHERE queue = ? AND created_at < ? "
        "AND (lease_until IS NULL OR lease_until < ?)",
        (queue, now - message_ttl, now),
    ).rowcount


def keep_queues_alive(
    database: Database, queues: dict[str, float], lost: set[str], stop: threading.Event
) -> None:
    """Mark the expiring queues a channel consumes as used, until ``stop`` is set.

    ``queues`` maps each queue to its mark interval; the channel changes it as it starts
    and cancels consumers. A thread of its own, so that a worker whose main thread runs
    a long task keeps its queues, as a live AMQP consumer does. A queue found deleted
    (the process stalled past ``x-expires``) goes to ``lost`` for the channel to declare
    again.
    """
    try:
        while True:
            current = dict(queues)  # a copy: the channel's thread changes the dict
            now = time.time()
            for name in current:
                try:
                    if database.connection().execute(MARK_USED, (now, name)).rowcount == 0:
                        lost.add(name)
                except sqlite3.Error as exc:
                    logger.warning(
                        "sqlite transport: could not mark queue %r as used (%s); retrying",
                        name,
                        exc,
                    )
            if stop.wait(min(current.values(), default=USE_MARK_INTERVAL)):
                return
    finally:
        database.close_thread()


# -- a channel's threads and its view of queue limits ------------------------------------

#: A thread a channel started: (process id, thread, event that stops it).
Started = tuple[int, threading.Thread, threading.Event]


def start_thread(name: str, target: Any, *args: Any) -> Started:
    """Run ``target(*args, stop)`` in a daemon thread until ``stop_thread``."""
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(*args, stop), name=name, daemon=True)
    thread.start()
    return os.getpid(), thread, stop


def stop_thread(started: Started | None) -> None:
    """Stop a thread ``start_thread`` started in this process; a forked child has none."""
    if started is None or started[0] != os.getpid():
        return
    _, thread, stop = started
    stop.set()
    if thread is not threading.current_thread():
        thread.join(timeout=5)


class LimitedQueues:
    """One channel's view of queue limits, and its marks of the expiring queues it uses.

    A plain queue costs one read per channel, the first time it is polled; an expiring
    queue a write at most every ``use_mark_interval``, from the polling thread, or from
    a thread of its own while the channel consumes it.
    """

    def __init__(self, database: Database, owner: str) -> None:
        self.database = database
        self.owner = owner
        self._limits: dict[str, QueueLimits | None] = {}
        self._marked_used: dict[str, float] = {}  # monotonic clock
        self._kept_alive: dict[str, float] = {}  # consumed queue: its mark interval
        self._lost: set[str] = set()
        self._keeper: Started | None = None
        self._next_cleanup = 0.0

    def of(self, queue: str) -> QueueLimits | None:
        """The queue's limits, read once unless this channel declared it."""
        try:
            return self._limits[queue]
        except KeyError:
            pass
        row = self.database.connection().execute(
            "SELECT expires, message_ttl FROM kernel_queue_limits WHERE name = ?", (queue,)
        )
        found = row.fetchone()
        limits = self._limits[queue] = QueueLimits(*found) if found else None
        return limits

    def declare(self, queue: str, limits: QueueLimits) -> None:
        """Create ``queue`` with these limits (replacing others): a declaration is a use.

        Deletes what has expired first, so that a client's reply queues do not pile up
        where nothing is broadcast.
        """
        now = time.time()
        with self.database.transaction() as connection:
            self.clean_up(connection, now, throttle=False)
            connection.execute(
                "INSERT OR IGNORE INTO kernel_queues (name, created_at) VALUES (?, ?)",
                (queue, now),
            )
            connection.execute(STORE_LIMITS, (queue, limits.expires, limits.message_ttl, now))
        self._limits[queue] = limits
        self._marked_used[queue] = time.monotonic()
        self._lost.discard(queue)

    def clean_up(self, connection: sqlite3.Connection, now: float, throttle: bool) -> None:
        """Delete expired queues and messages in a transaction; with ``throttle``, at most
        every ``CLEANUP_INTERVAL``."""
        if throttle:
            if time.monotonic() < self._next_cleanup:
                return
            self._next_cleanup = time.monotonic() + CLEANUP_INTERVAL
        for queue in delete_expired(connection, now):
            if queue in self._kept_alive:  # consumed here, by a stalled process
                self._lost.add(queue)
            else:
                self.forget(queue)

    def polled(self, queue: str, limits: QueueLimits) -> bool:
        """Mark a polled queue as used; True when it must be declared again (it was lost)."""
        if queue in self._lost:
            self._lost.discard(queue)
            return True
        if limits.expires is None or queue in self._kept_alive:  # the keeper marks it
            return False
        now = time.monotonic()
        if now - self._marked_used.get(queue, -math.inf) >= limits.use_mark_interval:
            self._marked_used[queue] = now
            self.database.connection().execute(MARK_USED, (time.time(), queue))
        return False

    def consumed(self, queue: str) -> None:
        limits = self.of(queue)
        if limits is None or limits.expires is None:
            return
        self._kept_alive[queue] = limits.use_mark_interval
        if self._keeper is None or self._keeper[0] != os.getpid():
            self._keeper = start_thread(
                f"kernel-sqlite-queues-{self.owner[:8]}",
                keep_queues_alive,
                self.database,
                self._kept_alive,
                self._lost,
            )

    def cancelled(self, queue: str) -> None:
        self._kept_alive.pop(queue, None)
        self._lost.discard(queue)

    def forget(self, *queues: str) -> None:
        """Drop what the channel knows of deleted queues."""
        for queue in queues:
            self._limits.pop(queue, None)
            self._marked_used.pop(queue, None)
            self._kept_alive.pop(queue, None)
            self._lost.discard(queue)

    def close(self) -> None:
        keeper, self._keeper = self._keeper, None
        stop_thread(keeper)
