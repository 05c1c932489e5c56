"""Which arguments a queue is declared with: defaults from the options, then the
declaration's own, then per-queue configuration.

Only *shared* queues get defaults: durable, not exclusive, not auto-delete. Those are
task queues. Remote-control queues and other private ones stay as their declaration
says, and are always classic (a quorum queue must be durable and shared); so do the
rpc:// reply queues (:data:`REPLY_QUEUE_PREFIX`) and the delay queues.

The queue type is always sent explicitly for shared queues (``x-queue-type``), so the
transport knows the type of every queue it declared successfully. It needs to:
quorum queues refuse global QoS, and RabbitMQ closes the whole connection then.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs

from kernel_amqp.options import AmqpOptions

log = logging.getLogger(__name__)

QUEUE_TYPE = "x-queue-type"
MAX_PRIORITY = "x-max-priority"
DELIVERY_LIMIT = "x-delivery-limit"
DEAD_LETTER_EXCHANGE = "x-dead-letter-exchange"
DEAD_LETTER_ROUTING_KEY = "x-dead-letter-routing-key"

#: Name prefix of rpc:// reply queues: always declared exactly as asked (classic,
#: no dead-lettering: an expired result must not land among dead task messages).
REPLY_QUEUE_PREFIX = "kernel.reply."

#: Kinds a declared queue may have for the transport: its ``x-queue-type``, or
#: "unknown" when it was found existing with other arguments and used as it is.
UNKNOWN = "unknown"


@attrs.frozen
class Declaration:
    """The arguments to declare a queue with, and the queue type they give it."""

    arguments: dict[str, Any]
    kind: str
    #: Arguments left out because the queue type refuses them (said once, in a log).
    dropped: tuple[str, ...] = ()


def is_shared(durable: bool, exclusive: bool, auto_delete: bool) -> bool:
    return bool(durable) and not exclusive and not auto_delete


def plan(
    options: AmqpOptions,
    queue: str,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
    arguments: dict[str, Any] | None,
    internal: bool = False,
) -> Declaration:
    """The declaration of ``queue``. ``internal`` queues (the delay queues) keep
    exactly the arguments given."""
    given = dict(arguments or {})
    if internal or queue.startswith(("amq.", REPLY_QUEUE_PREFIX)):
        return Declaration(given, str(given.get(QUEUE_TYPE, "classic")))
    configured: dict[str, Any] = {}
    definition = options.definition(queue)
    if definition is not None:
        configured.update(definition.arguments)
    configured.update(options.queue_arguments.get(queue, {}))
    if not is_shared(durable, exclusive, auto_delete):
        merged = {**given, **configured}
        return Declaration(merged, str(merged.get(QUEUE_TYPE, "classic")))
    kind = str(configured.get(QUEUE_TYPE) or given.get(QUEUE_TYPE) or options.queue_type)
    defaults: dict[str, Any] = {QUEUE_TYPE: kind}
    if kind == "classic" and options.max_priority is not None:
        defaults[MAX_PRIORITY] = options.max_priority
    if kind == "quorum" and options.delivery_limit is not None:
        defaults[DELIVERY_LIMIT] = options.delivery_limit
    dead_letter = dead_letter_queue(options, kind)
    if dead_letter and queue != dead_letter:
        defaults[DEAD_LETTER_EXCHANGE] = ""
        defaults[DEAD_LETTER_ROUTING_KEY] = dead_letter
    merged = {**defaults, **given, **configured}
    merged[QUEUE_TYPE] = kind
    dropped: list[str] = []
    if kind == "quorum" and MAX_PRIORITY in merged:
        # RabbitMQ < 4 refuses the argument on quorum queues (PRECONDITION_FAILED).
        del merged[MAX_PRIORITY]
        dropped.append(MAX_PRIORITY)
    return Declaration(merged, kind, tuple(dropped))


def dead_letter_queue(options: AmqpOptions, kind: str) -> str | None:
    """Where the broker dead-letters a queue's messages: the ``dead_letter_queue``
    option; for quorum queues with a delivery limit and no such option, the kernel's
    ``task_dead_letter_queue`` (option ``kernel_dead_letter_queue``), so a message over the
    limit is kept rather than dropped."""
    if options.dead_letter_queue:
        return options.dead_letter_queue
    if kind == "quorum" and options.delivery_limit is not None:
        return options.kernel_dead_letter_queue
    return None


def is_inequivalent(exc: BaseException) -> bool:
    """True for RabbitMQ's answer to re-declaring an existing queue or exchange with
    other arguments or flags (406 PRECONDITION_FAILED "inequivalent arg ...")."""
    return getattr(exc, "reply_code", None) == 406 and "inequivalent" in str(
        getattr(exc, "reply_text", "") or exc
    )
