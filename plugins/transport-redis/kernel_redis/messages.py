"""What the Redis broker reads and writes in a kombu message: pure functions, no I/O.

A kombu virtual message is a dict ``{body, content-type, content-encoding, headers,
properties}``; ``properties`` holds ``delivery_tag``, ``priority`` and
``delivery_info`` (``exchange``, ``routing_key``). Redis stores it as JSON: in a queue's
list as is, in the ``unacked`` hash as ``[message, exchange, routing_key]``, and in a
queue's delayed set prefixed with its priority.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from kernel.protocol import DELIVER_AT_HEADER, DELIVERY_COUNT_HEADER

logger = logging.getLogger(__name__)

#: Suffix (after kombu's separator) of a queue's sorted set of delayed messages.
DELAYED_SUFFIX = "delayed"


def deliver_at(message: dict[str, Any], queue: str) -> float | None:
    """The ``x-deliver-at`` header (epoch seconds) of a message published to ``queue``.

    None when the message has none; a value that is not a finite number is logged and
    treated as none, so that the message is delivered at once rather than lost.
    """
    headers = message.get("headers")
    if not isinstance(headers, dict):
        return None
    value = headers.get(DELIVER_AT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds):
        logger.warning(
            "redis transport: header %s=%r on a message for queue %r is not epoch "
            "seconds; delivering it now",
            DELIVER_AT_HEADER,
            value,
            queue,
        )
        return None
    return seconds


def delayed_member(priority: int, payload: str, separator: str) -> str:
    """The member of a delayed set: the payload behind its priority (see PROMOTE)."""
    return f"{priority}{separator}{payload}"


def stored_delivery(message: dict[str, Any]) -> str:
    """The ``unacked`` hash value of a delivered message, as kombu writes it."""
    info = message["properties"].get("delivery_info") or {}
    return dumps([message, info.get("exchange"), info.get("routing_key")])


def read_stored_delivery(stored: bytes | str) -> tuple[dict[str, Any], str, str]:
    """(message, exchange, routing key) of an ``unacked`` hash value.

    Raises ValueError when the value is not one kombu or this transport wrote.
    """
    try:
        message, exchange, routing_key = loads(bytes_to_str(stored))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not [message, exchange, routing_key] JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("properties"), dict):
        raise ValueError("the message has no 'properties' mapping")
    return message, exchange, routing_key


def redelivery(message: dict[str, Any], attempted: bool) -> dict[str, Any]:
    """The message to put back in its queue after a delivery that was not acked.

    ``attempted``: the delivery counts as an attempt (its consumer died or stalled
    holding it, or rejected it with requeue), so ``x-delivery-count`` goes up by one;
    prefetched messages handed back at shutdown were never started and keep their
    count. The copy gets a new delivery tag, so that a late ack of the old delivery by
    a consumer that stalled cannot remove the new one's lease; it is marked
    redelivered as kombu marks it.
    """
    message = dict(message)
    headers = message.get("headers")
    headers = dict(headers) if isinstance(headers, dict) else {}
    headers["redelivered"] = True
    if attempted:
        try:
            previous = int(headers.get(DELIVERY_COUNT_HEADER) or 0)
        except (TypeError, ValueError):
            previous = 0
        headers[DELIVERY_COUNT_HEADER] = previous + 1
    message["headers"] = headers
    properties = dict(message["properties"])
    properties["delivery_tag"] = str(uuid.uuid4())
    info = properties.get("delivery_info")
    info = dict(info) if isinstance(info, dict) else {}
    info["redelivered"] = True
    properties["delivery_info"] = info
    message["properties"] = properties
    return message
