"""The broker options this plugin adds to ``broker_transport_options``.

kombu hands every transport option to py-amqp's ``Connection`` as a keyword, so the
options below are taken out first (:func:`split_options`) and the rest (``heartbeat``,
``confirm_publish``, ``ssl``, ``connect_timeout``, ``client_properties``, ...) go to
py-amqp unchanged. Each option is checked when the first connection opens, and a bad
value stops there with an error that names the option.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from kernel.exceptions import ConfigurationError

QUEUE_TYPES = ("classic", "quorum")
#: Default ``x-delivery-limit`` of quorum queues: none, so a task queue is declared
#: with exactly the arguments Celery declares it with (RabbitMQ refuses a second
#: declaration with other arguments, and Celery has no way round that). Bound
#: redelivery with a policy instead (see ``docs/amqp.md``, "Poison messages").
DEFAULT_DELIVERY_LIMIT = None
GLOBAL_QOS_CHOICES = ("auto", True, False)


@attrs.frozen
class QueueDefinition:
    """How one queue is declared, from the ``queues`` option (Celery's ``task_queues``).

    Whenever a queue of this name is declared through the transport (a worker's
    ``-Q``, a publisher's declaration), it gets these arguments and is also bound to
    ``exchange`` (of ``exchange_type``) with ``routing_key``.
    """

    name: str
    exchange: str | None = None
    exchange_type: str = "direct"
    routing_key: str | None = None
    arguments: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def parse(cls, value: Any) -> QueueDefinition:
        """A kombu ``Queue`` or a dict ``{"name", "exchange", "exchange_type",
        "routing_key", "queue_arguments"}``."""
        if isinstance(value, Mapping):
            unknown = set(value) - {
                "name",
                "exchange",
                "exchange_type",
                "routing_key",
                "queue_arguments",
            }
            if unknown or not value.get("name"):
                raise ConfigurationError(
                    f"broker_transport_options['queues'] entry {dict(value)!r} must have a "
                    "'name' and only the keys exchange, exchange_type, routing_key, "
                    f"queue_arguments (unknown: {sorted(unknown)})"
                )
            return cls(
                name=str(value["name"]),
                exchange=value.get("exchange"),
                exchange_type=str(value.get("exchange_type") or "direct"),
                routing_key=value.get("routing_key"),
                arguments=dict(value.get("queue_arguments") or {}),
            )
        name = getattr(value, "name", None)
        if not name:
            raise ConfigurationError(
                f"broker_transport_options['queues'] entry {value!r} is neither a kombu "
                "Queue nor a dict with a 'name'"
            )
        if getattr(value, "bindings", None):
            raise ConfigurationError(
                f"broker_transport_options['queues'] entry {value!r} has a bindings list; "
                "this option binds a queue to one exchange. Put the Queue in the "
                "task_queues setting instead: it is declared with all of its bindings."
            )
        from kombu.transport.base import to_rabbitmq_queue_arguments

        exchange = getattr(value, "exchange", None)
        # The Queue's own attributes become the x-arguments kombu would declare it with.
        arguments = to_rabbitmq_queue_arguments(
            dict(getattr(value, "queue_arguments", None) or {}),
            expires=getattr(value, "expires", None),
            message_ttl=getattr(value, "message_ttl", None),
            max_length=getattr(value, "max_length", None),
            max_length_bytes=getattr(value, "max_length_bytes", None),
            max_priority=getattr(value, "max_priority", None),
        )
        return cls(
            name=str(name),
            exchange=(exchange.name or None) if exchange is not None else None,
            exchange_type=(exchange.type if exchange is not None else None) or "direct",
            routing_key=getattr(value, "routing_key", None) or None,
            arguments=dict(arguments),
        )


def _queue_type(value: Any) -> str:
    text = str(value).lower()
    if text not in QUEUE_TYPES:
        raise ConfigurationError(
            f"broker_transport_options queue type {value!r} is not supported; use one of "
            f"{', '.join(QUEUE_TYPES)}"
        )
    return text


def _optional_positive_int(name: str) -> Any:
    def convert(value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(
                f"broker_transport_options[{name!r}] must be a whole number of at least 1 "
                f"or None, got {value!r}"
            )
        return value

    return convert


def _max_priority(value: Any) -> int | None:
    value = _optional_positive_int("max_priority")(value)
    if value is not None and value > 255:
        raise ConfigurationError(
            f"broker_transport_options['max_priority'] must be 1..255 (RabbitMQ's limit; "
            f"10 is usual), got {value}"
        )
    return value


def _queue_arguments(value: Any) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(args, Mapping) for args in value.values()
    ):
        raise ConfigurationError(
            "broker_transport_options['queue_arguments'] must map queue names to argument "
            f"dicts, e.g. {{'video': {{'x-max-length': 1000}}}}; got {value!r}"
        )
    return {str(name): dict(args) for name, args in value.items()}


def _queues(value: Any) -> tuple[QueueDefinition, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise ConfigurationError(
            "broker_transport_options['queues'] must be a list of kombu Queues or dicts, "
            f"got {value!r}"
        )
    return tuple(QueueDefinition.parse(item) for item in value)


def _queue_name(option: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ConfigurationError(
                f"broker_transport_options[{option!r}] must be a queue name, got {value!r}"
            )
        return value

    return convert


def _global_qos(value: Any) -> Any:
    if value not in GLOBAL_QOS_CHOICES:
        raise ConfigurationError(
            f"broker_transport_options['global_qos'] must be 'auto', True or False, got {value!r}"
        )
    return value


def _confirm_timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigurationError(
            "broker_transport_options['confirm_timeout'] must be a number of seconds above "
            f"0, or None, got {value!r}"
        )
    return float(value)


@attrs.frozen
class AmqpOptions:
    """The plugin's own options, with their defaults (see ``docs/amqp.md``)."""

    #: Type of the durable, shared queues declared through the transport when their
    #: declaration names none: "classic" (RabbitMQ's default) or "quorum".
    queue_type: str = attrs.field(default="classic", converter=_queue_type)
    #: ``x-max-priority`` for classic queues that set none (quorum queues of
    #: RabbitMQ < 4 have no priorities: it is left out for them).
    max_priority: int | None = attrs.field(default=None, converter=_max_priority)
    #: ``x-delivery-limit`` for quorum queues that set none: after that many returns
    #: (any channel closed holding the message, a worker killed by it included) the
    #: broker dead-letters the message. None by default (Celery's declaration); set it
    #: well above ``task_max_deliveries``: it only stops a message that keeps killing
    #: workers.
    delivery_limit: int | None = attrs.field(
        default=DEFAULT_DELIVERY_LIMIT, converter=_optional_positive_int("delivery_limit")
    )
    #: A queue receiving the messages the broker dead-letters (rejected without
    #: requeue, over the delivery limit, expired). None: the broker drops them.
    dead_letter_queue: str | None = None
    #: Where quorum queues with a delivery limit dead-letter when ``dead_letter_queue``
    #: is unset: the kernel passes its ``task_dead_letter_queue`` here, so the
    #: messages the broker gives up on land next to the ones the worker gives up on.
    kernel_dead_letter_queue: str = attrs.field(
        default="kernel.dead_letter", converter=_queue_name("kernel_dead_letter_queue")
    )
    #: Extra arguments per queue name.
    queue_arguments: dict[str, dict[str, Any]] = attrs.field(
        factory=dict, converter=_queue_arguments
    )
    #: Queue definitions declared with every queue of the same name.
    queues: tuple[QueueDefinition, ...] = attrs.field(factory=tuple, converter=_queues)
    #: Hold messages with a future ``x-deliver-at`` in the broker's delay queues.
    delayed_delivery: bool = attrs.field(default=True, converter=bool)
    #: Type of the 28 delay queues (Celery's ``broker_native_delayed_delivery_queue_type``).
    delayed_delivery_queue_type: str = attrs.field(default="quorum", converter=_queue_type)
    #: Prefix of the delay exchanges and queues (``<prefix>_celery_delayed_<n>``); None
    #: keeps Celery's names, which a mixed fleet needs.
    delayed_delivery_prefix: str | None = None
    #: When a queue or exchange already exists with other arguments, use it as it is
    #: (one warning) instead of failing with PRECONDITION_FAILED.
    adopt_existing: bool = attrs.field(default=True, converter=bool)
    #: Prefetch shared by all consumers of a channel ("auto": when every queue it
    #: consumes is classic and the server is RabbitMQ 3.3-3.x), else per consumer.
    global_qos: Any = attrs.field(default="auto", converter=_global_qos)

    #: Seconds to wait for RabbitMQ to confirm a publish (``confirm_publish``) before
    #: failing with :class:`~kernel_amqp.transport.ConfirmTimeout`; None waits forever.
    confirm_timeout: float | None = attrs.field(default=30.0, converter=_confirm_timeout)

    def definition(self, queue: str) -> QueueDefinition | None:
        for item in self.queues:
            if item.name == queue:
                return item
        return None

    def exchange_type(self, exchange: str) -> str | None:
        """The type the ``queues`` option gives ``exchange``, if any."""
        for item in self.queues:
            if item.exchange == exchange:
                return item.exchange_type
        return None


#: Option names taken out of ``broker_transport_options`` before py-amqp sees them.
OPTION_NAMES = frozenset(field.name for field in attrs.fields(AmqpOptions))


#: Keys kombu and the kernel put in ``broker_transport_options`` for every transport
#: (connection retry policy; ``visibility_timeout`` means nothing to RabbitMQ).
GENERIC_NAMES = frozenset(
    {
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "connect_retries_timeout",
        "visibility_timeout",
    }
)
#: What kombu itself passes to the connection.
KOMBU_NAMES = frozenset({"host", "userid", "password", "login_method", "virtual_host", "insist"})


def _connection_parameters() -> frozenset[str]:
    """The keyword parameters of py-amqp's ``Connection``."""
    import inspect

    import amqp

    return frozenset(
        name
        for name, parameter in inspect.signature(amqp.Connection.__init__).parameters.items()
        if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD
    )


def check_names(transport_options: Mapping[str, Any]) -> None:
    """ConfigurationError for a key that is neither this plugin's option nor a py-amqp
    ``Connection`` parameter (py-amqp would ignore it silently: a typo like
    ``queue_typ`` would go unnoticed)."""
    known = OPTION_NAMES | GENERIC_NAMES | KOMBU_NAMES | _connection_parameters()
    unknown = sorted(str(key) for key in transport_options if key not in known)
    if unknown:
        listed = sorted(OPTION_NAMES | (_connection_parameters() - KOMBU_NAMES))
        raise ConfigurationError(
            f"unknown broker_transport_options key(s) {', '.join(map(repr, unknown))} for the "
            f"amqp transport; known keys: {', '.join(listed)} (and kombu's max_retries, "
            "interval_start, interval_step, interval_max, connect_retries_timeout)"
        )


def split_options(transport_options: Mapping[str, Any]) -> tuple[AmqpOptions, dict[str, Any]]:
    """(this plugin's options, what is left for py-amqp's ``Connection``)."""
    check_names(transport_options)
    ours = {key: value for key, value in transport_options.items() if key in OPTION_NAMES}
    rest = {key: value for key, value in transport_options.items() if key not in OPTION_NAMES}
    try:
        return AmqpOptions(**ours), rest
    except TypeError as exc:  # pragma: no cover - names are filtered above
        raise ConfigurationError(f"bad broker_transport_options: {exc}") from exc
