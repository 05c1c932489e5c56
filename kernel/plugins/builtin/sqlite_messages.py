"""The SQLite transport's messages table: schema, claim queries, and pure row helpers.

Kept apart from the kombu channel (``sqlite_transport``) so the storage layout and the
SQL that relies on its index can be read, and changed, in one place.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Any

from kombu.utils.json import loads

from kernel.plugins.builtin.sqlite_db import Database

logger = logging.getLogger(__name__)

#: Version of the tables below, recorded in ``kernel_schema``. 2: claims use the
#: ``kernel_messages_visible`` index instead of ``kernel_messages_claim``.
SCHEMA_VERSION = 2

#: Claims one poll tries before leaving a hotly contested queue to the next poll.
CLAIM_ATTEMPTS = 20

#: When a row may be claimed: once it is due and no consumer holds a lease on it. An
#: expression, not a stored column, so that no write can leave it stale and a version 1
#: table needs no ``ALTER TABLE``; queries must spell it exactly so for SQLite to match
#: it to the ``kernel_messages_visible`` index.
VISIBLE_AT = "max(deliver_at, coalesce(lease_until, deliver_at))"

# Every statement is idempotent: ``Database`` runs the script whenever the recorded
# version differs, possibly in several processes at once, and for a version 1 database
# (the same table) it is the whole migration. A version 1 process opening the file
# afterwards rebuilds its index and records version 1, so the next version 2 process
# drops it again: it works, but upgrade all processes together.
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
"""

READY = "queue = ? AND (lease_until IS NULL OR lease_until < ?)"

# The best visible row of the highest priority below ``:below`` that the queue holds, as
# (that priority, id, payload, delivery_count); id and the rest are NULL when none of
# the level's rows is visible yet, the priority too when no level is left. Each part is
# one seek in the index, so delayed and leased rows are never read and a backlog never
# sorted; ``ORDER BY priority DESC, id`` over all visible rows would have to sort it.
CANDIDATE = f"""
SELECT level.priority, message.id, message.payload, message.delivery_count
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
