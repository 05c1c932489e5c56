"""Native delayed delivery: messages wait in RabbitMQ, not in workers.

The topology is the one Celery 5.5 declares for quorum queues, so kernel and Celery
processes share it:

- 28 levels, ``celery_delayed_27`` down to ``celery_delayed_0``. Level ``n`` is a topic
  exchange and a queue of the same name. The queue holds a message ``2**n`` seconds
  (``x-message-ttl``), then dead-letters it to the exchange of level ``n - 1``; level 0
  dead-letters to the topic exchange ``celery_delayed_delivery``.
- A delayed message is published to ``celery_delayed_27`` with a routing key of 28
  words, the delay in seconds written in binary (most significant bit first), then the
  destination's routing key: ``0.0. ... .1.0.1.video`` waits 5 s, then goes to the
  queues bound to ``video``.
- At level ``n``, a message whose bit ``n`` is 1 goes into the level's queue and waits
  ``2**n`` s; one whose bit is 0 passes on to level ``n - 1`` at once (an
  exchange-to-exchange binding). The waits add up to the delay.
- ``celery_delayed_delivery`` routes the message to its queue. Celery binds the queue's
  (topic) exchange to it with ``#.<routing key>``. kernel binds each queue itself with
  28 ``*`` words then the routing key. That needs no topic exchange, so kernel's direct
  exchanges work too. It also matches exactly: ``#.video`` would also take
  ``x.video``'s messages.

Delays are whole seconds, rounded up so that nothing arrives early, at most
``2**28 - 1`` s (8.5 years). Each level adds a few milliseconds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import attrs

#: Levels of the topology: delays up to ``2**BITS - 1`` seconds.
BITS = 28
MAX_DELAY = 2**BITS - 1

#: Exchange types named by task routes (``exchange_type``) at publishing, by exchange
#: name: a process that did not declare an exchange (a prefork child, a retry sent with
#: ``declare=False``) still learns that it is a fanout one (kept by the plugin's
#: ``kernel_before_task_publish`` hook; read by the transport).
exchange_hints: dict[str, str] = {}

_PREFIX = re.compile(rf"^(?:[01]\.){{{BITS}}}")


def level_name(level: int, prefix: str | None = None) -> str:
    """Name of level ``level``'s exchange and queue (Celery's, with an optional prefix)."""
    if not 0 <= level < BITS:
        raise ValueError(f"level must be 0..{BITS - 1}, got {level}")
    name = f"celery_delayed_{level}"
    return f"{prefix}_{name}" if prefix else name


def delivery_exchange(prefix: str | None = None) -> str:
    """The topic exchange a message reaches when its delay is over."""
    return f"{prefix}_celery_delayed_delivery" if prefix else "celery_delayed_delivery"


def entry_exchange(prefix: str | None = None) -> str:
    """Where delayed messages are published: the highest level."""
    return level_name(BITS - 1, prefix)


def topology_names(prefix: str | None = None) -> set[str]:
    """Every exchange and queue name of the topology."""
    names = {level_name(level, prefix) for level in range(BITS)}
    names.add(delivery_exchange(prefix))
    return names


def delay_seconds(deliver_at: float, now: float) -> int:
    """Whole seconds to hold a message due at ``deliver_at`` (rounded up, so it never
    arrives early); 0 when it is due."""
    remaining = deliver_at - now
    if remaining <= 0:
        return 0
    return math.ceil(remaining - 1e-6)


def strip_delay(routing_key: str) -> str:
    """The destination routing key of a key that may carry a delay prefix (a message
    that came through the topology keeps its prefixed key in ``delivery_info``)."""
    return _PREFIX.sub("", routing_key, count=1)


def delayed_routing_key(seconds: int, routing_key: str) -> str:
    """The routing key that holds a message ``seconds`` before it goes to
    ``routing_key``."""
    if not 1 <= seconds <= MAX_DELAY:
        raise ValueError(f"a delay must be 1..{MAX_DELAY} seconds, got {seconds}")
    bits = format(seconds, f"0{BITS}b")
    return ".".join(bits) + "." + strip_delay(routing_key)


def binding_key(routing_key: str) -> str:
    """How a queue bound with ``routing_key`` is bound to the delivery exchange."""
    return "*." * BITS + routing_key


def _bit_pattern(level: int, bit: str) -> str:
    """A topic pattern matching keys whose bit for ``level`` is ``bit``."""
    position = BITS - 1 - level  # words before this level's bit
    return "*." * position + bit + ".#"


@attrs.frozen
class LevelQueue:
    name: str
    arguments: dict


@attrs.frozen
class Binding:
    """``destination`` (a queue, or an exchange when ``to_exchange``) receives what
    ``source`` routes with ``pattern``."""

    destination: str
    source: str
    pattern: str
    to_exchange: bool


@attrs.frozen
class Topology:
    """Everything to declare, in order: exchanges, queues, then bindings."""

    exchanges: tuple[str, ...]
    queues: tuple[LevelQueue, ...]
    bindings: tuple[Binding, ...]


def topology(queue_type: str = "quorum", prefix: str | None = None) -> Topology:
    """The delay topology with queues of ``queue_type``, arguments as Celery sets them
    (so either side may declare it first)."""
    exchanges = [level_name(level, prefix) for level in range(BITS - 1, -1, -1)]
    exchanges.append(delivery_exchange(prefix))
    queues = []
    bindings = []
    for level in range(BITS - 1, -1, -1):
        name = level_name(level, prefix)
        after = level_name(level - 1, prefix) if level else delivery_exchange(prefix)
        arguments = {
            "x-queue-type": queue_type,
            "x-overflow": "reject-publish",
            "x-message-ttl": (2**level) * 1000,
            "x-dead-letter-exchange": after,
        }
        if queue_type == "quorum":
            arguments["x-dead-letter-strategy"] = "at-least-once"
        queues.append(LevelQueue(name, arguments))
        bindings.append(Binding(name, name, _bit_pattern(level, "1"), to_exchange=False))
        bindings.append(Binding(after, name, _bit_pattern(level, "0"), to_exchange=True))
    return Topology(tuple(exchanges), tuple(queues), tuple(bindings))


def iter_levels(seconds: int) -> Iterator[int]:
    """The levels whose queues a ``seconds`` delay waits in (for explanations/tests)."""
    for level in range(BITS - 1, -1, -1):
        if seconds >> level & 1:
            yield level
