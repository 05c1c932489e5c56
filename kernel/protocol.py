"""Celery Message Protocol v2: building and reading task messages.

The only module that knows the raw message layout. A message is AMQP-style
properties, headers, and a body ``(args, kwargs, embed)`` where ``embed`` holds
``callbacks``, ``errbacks``, ``chain`` and ``chord``. Field meanings follow Celery's
"Message Protocol" reference, so Celery producers and consumers interoperate.
"""

from __future__ import annotations

import functools
import os
import reprlib
import socket
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import attrs

from kernel.exceptions import ProtocolError

#: Header hinting a transport with delayed delivery to hold the message until then
#: (epoch seconds). Celery workers ignore unknown headers.
DELIVER_AT_HEADER = "x-deliver-at"
#: Set by transports that count redeliveries (RabbitMQ quorum-queue semantics).
DELIVERY_COUNT_HEADER = "x-delivery-count"

REPR_LIMIT = 1024


@functools.cache
def _hostname() -> str:
    return socket.gethostname()


def origin() -> str:
    """``gen<pid>@<host>``, the node name Celery puts in the ``origin`` header."""
    return f"gen{os.getpid()}@{_hostname()}"


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = REPR_LIMIT
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 64


def _saferepr(value: Any) -> str:
    """A bounded repr: never builds the whole text of a huge argument."""
    text = _repr.repr(value)
    return text if len(text) <= REPR_LIMIT else text[: REPR_LIMIT - 3] + "..."


def isoformat(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def parse_datetime(value: Any) -> datetime | None:
    """Read an ISO 8601 header value; naive values are taken as UTC."""
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError as exc:
            raise ProtocolError(f"bad ISO 8601 time {value!r} in message header") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@attrs.frozen
class TaskMessage:
    """A task message ready to publish: headers, properties, and the body tuple."""

    headers: dict[str, Any]
    properties: dict[str, Any]
    body: tuple[Any, Any, Any]

    @property
    def id(self) -> str:
        return self.headers["id"]


def build_task_message(
    *,
    name: str,
    task_id: str,
    args: Any = (),
    kwargs: Any = None,
    eta: datetime | None = None,
    expires: datetime | None = None,
    retries: int = 0,
    group_id: str | None = None,
    group_index: int | None = None,
    root_id: str | None = None,
    parent_id: str | None = None,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    callbacks: list | None = None,
    errbacks: list | None = None,
    chain: list | None = None,
    chord: Any = None,
    reply_to: str | None = None,
    ignore_result: bool = False,
    shadow: str | None = None,
    argsrepr: str | None = None,
    kwargsrepr: str | None = None,
    extra_headers: Mapping[str, Any] | None = None,
    origin_name: str | None = None,
) -> TaskMessage:
    """Build a protocol v2 task message; pure, no I/O."""
    args = list(args or ())
    kwargs = dict(kwargs or {})
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": shadow,
        "eta": isoformat(eta),
        "expires": isoformat(expires),
        "group": group_id,
        "group_index": group_index,
        "retries": retries,
        "timelimit": [time_limit, soft_time_limit],  # Celery's order: hard, soft
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        "argsrepr": argsrepr if argsrepr is not None else _saferepr(args),
        "kwargsrepr": kwargsrepr if kwargsrepr is not None else _saferepr(kwargs),
        "origin": origin_name or origin(),
        "ignore_result": ignore_result,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    if extra_headers:
        headers.update(extra_headers)
    properties = {"correlation_id": task_id, "reply_to": reply_to or ""}
    embed = {"callbacks": callbacks, "errbacks": errbacks, "chain": chain, "chord": chord}
    return TaskMessage(headers=headers, properties=properties, body=(args, kwargs, embed))


@attrs.frozen
class DecodedTask:
    """What a worker needs from a received task message."""

    id: str
    name: str
    args: tuple
    kwargs: dict
    embed: dict
    headers: dict
    eta: datetime | None
    expires: datetime | None
    retries: int
    #: (hard, soft) seconds, in the order of the ``timelimit`` header (Celery's).
    time_limits: tuple[float | None, float | None]
    root_id: str | None
    parent_id: str | None
    group_id: str | None
    origin: str | None
    reply_to: str | None
    ignore_result: bool
    delivery_count: int

    @property
    def callbacks(self) -> list:
        return self.embed.get("callbacks") or []

    @property
    def errbacks(self) -> list:
        return self.embed.get("errbacks") or []

    @property
    def chain(self) -> list:
        return self.embed.get("chain") or []


def decode_task(
    headers: Mapping[str, Any] | None, properties: Mapping[str, Any] | None, body: Any
) -> DecodedTask:
    """Read a decoded protocol v2 message; raise ProtocolError saying what is wrong."""
    headers = dict(headers or {})
    properties = dict(properties or {})
    if "task" not in headers or "id" not in headers:
        if isinstance(body, dict) and "task" in body:
            raise ProtocolError(
                f"task {body.get('task')!r} uses Celery message protocol v1, which kernel "
                "does not accept; set task_protocol=2 on the producer"
            )
        missing = [h for h in ("task", "id") if h not in headers]
        raise ProtocolError(f"message is missing header(s) {missing}; not a protocol v2 task")
    try:
        args, kwargs, embed = body
    except (TypeError, ValueError) as exc:
        raise ProtocolError(
            f"task {headers['task']!r} id {headers['id']}: body must be "
            f"[args, kwargs, embed], got {type(body).__name__}"
        ) from exc
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise ProtocolError(
            f"task {headers['task']!r} id {headers['id']}: args must be a list and kwargs "
            f"an object, got {type(args).__name__} and {type(kwargs).__name__}"
        )
    if embed is not None and not isinstance(embed, Mapping):
        raise ProtocolError(
            f"task {headers['task']!r} id {headers['id']}: embed (third body item) must be "
            f"an object of callbacks/errbacks/chain/chord, got {type(embed).__name__}"
        )
    limits = headers.get("timelimit") or (None, None)
    if not isinstance(limits, (list, tuple)):
        raise ProtocolError(
            f"task {headers['task']!r} id {headers['id']}: header timelimit must be "
            f"[hard, soft] (seconds or null), got {limits!r}"
        )
    hard, soft = (list(limits) + [None, None])[:2]
    counts = {}
    for header in ("retries", DELIVERY_COUNT_HEADER):
        try:
            counts[header] = int(headers.get(header) or 0)
        except (TypeError, ValueError):
            raise ProtocolError(
                f"task {headers['task']!r} id {headers['id']}: header {header} must be an "
                f"integer, got {headers.get(header)!r}"
            ) from None
    return DecodedTask(
        id=str(headers["id"]),
        name=str(headers["task"]),
        args=tuple(args),
        kwargs=kwargs,
        embed=dict(embed or {}),
        headers=headers,
        eta=parse_datetime(headers.get("eta")),
        expires=parse_datetime(headers.get("expires")),
        retries=counts["retries"],
        time_limits=(hard, soft),
        root_id=headers.get("root_id"),
        parent_id=headers.get("parent_id"),
        group_id=headers.get("group"),
        origin=headers.get("origin"),
        reply_to=properties.get("reply_to") or None,
        ignore_result=bool(headers.get("ignore_result", False)),
        delivery_count=counts[DELIVERY_COUNT_HEADER],
    )
