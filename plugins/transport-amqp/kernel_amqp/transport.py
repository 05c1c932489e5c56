"""The RabbitMQ transport: kombu's py-amqp transport, with what the kernel needs.

Features
========
* Type: native AMQP 0-9-1 (py-amqp)
* Exchanges: direct, topic, fanout, headers (RabbitMQ's own routing)
* Priority: yes (classic queues with ``x-max-priority``)
* Delayed delivery: yes, in the broker (Celery 5.5's delay topology, see
  :mod:`kernel_amqp.delayed`)
* Delivery counts: the published count (the worker's attempts); quorum queues'
  ``x-delivery-limit`` bounds the rest (see :mod:`kernel_amqp.counting`)
* Redelivery: unacknowledged messages return when their channel or connection closes
* Publisher confirms: on by default (``confirm_publish``)

What this module adds to kombu's channel, and why:

- **Queue declarations** (:mod:`kernel_amqp.queues`): shared queues get the options'
  defaults (``queue_type``, ``max_priority``, ``delivery_limit``,
  ``dead_letter_queue``) and per-queue configuration (``queue_arguments``, ``queues``).
  An existing queue or exchange with other arguments is used as it is, after one
  warning (``adopt_existing``), instead of the PRECONDITION_FAILED that would stop a
  worker started with settings that differ from whoever created the queue. The
  declaration is tried on a short-lived channel, since RabbitMQ closes the channel
  of a refused one.
- **Delayed messages**: a message whose ``x-deliver-at`` header is in the future goes
  to the delay topology instead of its exchange when its route is known to have delay
  bindings (:class:`DelayRoutes`). Each durable shared queue bound to a direct or topic
  exchange through this transport, with a key free of wildcards, is also bound to the
  delivery exchange, so the message comes back to it when due.
- **Requeued copies**: a received message's ``delivery_info["queue"]`` names the
  queue it was consumed from, so the worker returns a copy to that queue only.
- **QoS**: a channel's prefetch is shared by its consumers (global QoS) when every
  queue it consumes is classic. The worker can then widen its window at run time;
  RabbitMQ applies a per-consumer prefetch only to consumers created afterwards.
  Quorum queues refuse global QoS (RabbitMQ closes the connection), so a channel with
  one, or a queue of unknown type, keeps per-consumer QoS, as Celery does.
- **Heartbeats**: sent while the connection is drained (``heartbeat`` option, off by
  default; see ``docs/amqp.md`` for why).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import amqp
from amqp.exceptions import MessageNacked
from kombu.transport import pyamqp

from kernel.protocol import DELIVER_AT_HEADER
from kernel_amqp import counting, delayed, queues, replies
from kernel_amqp.options import AmqpOptions, split_options

log = logging.getLogger(__name__)


class MessageRefused(MessageNacked):
    """The broker answered a publish with basic.nack: the message is not queued."""


class ConfirmTimeout(amqp.exceptions.RecoverableConnectionError):
    """RabbitMQ did not confirm a publish within ``confirm_timeout`` seconds."""


_warned: set[tuple] = set()
_warned_lock = threading.Lock()


def warn_once(key: tuple, message: str, *args: Any) -> None:
    """Log ``message`` at WARNING the first time ``key`` is seen in this process."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message, *args)


class ExchangeTypes:
    """The type of each exchange declared through this transport, per broker and
    virtual host, for the whole process.

    Publishing a delayed message needs its exchange's type, and the publishing
    connection may not be the one that declared it. An exchange cannot change type
    while it exists, so one record per name is enough. None means "exists, type not
    known" (adopted as it was).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._types: dict[tuple[str, str, str], str | None] = {}

    def note(self, server: tuple[str, str], exchange: str, type: str | None) -> None:
        with self._lock:
            self._types[(*server, exchange)] = type

    def get(self, server: tuple[str, str], exchange: str) -> str | None:
        with self._lock:
            return self._types.get((*server, exchange))


exchange_types = ExchangeTypes()

#: Exchange types messages can be delayed through (the delay bindings route by key).
DELAYABLE_TYPES = ("direct", "topic")

exchange_hints = delayed.exchange_hints


class DelayRoutes:
    """Which (exchange, routing key) routes may be delayed in the broker, per broker
    and virtual host, for the whole process.

    A route qualifies once bound through this transport with a delay binding, and
    stays qualified only while every queue bound on it got one (an auto-delete or
    exclusive queue bound on it gets none, and would lose delayed messages). A routing
    key bound on two exchanges disqualifies both: delay bindings match the key only.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[tuple[str, str, str, str], bool] = {}
        self._exchanges: dict[tuple[str, str, str], set[str]] = {}

    def note(self, server: tuple[str, str], exchange: str, key: str, delayable: bool) -> None:
        with self._lock:
            route = (*server, exchange, key)
            self._routes[route] = self._routes.get(route, True) and delayable
            self._exchanges.setdefault((*server, key), set()).add(exchange)

    def other_exchanges(self, server: tuple[str, str], exchange: str, key: str) -> set[str]:
        with self._lock:
            return self._exchanges.get((*server, key), set()) - {exchange}

    def delayable(self, server: tuple[str, str], exchange: str, key: str) -> bool:
        with self._lock:
            if self._exchanges.get((*server, key), set()) - {exchange}:
                return False
            return self._routes.get((*server, exchange, key)) is True

    def key_refused(self, server: tuple[str, str], key: str) -> bool:
        """True when this process knows ``key`` is not delayable: bound on several
        exchanges, or a route of it has a queue without a delay binding."""
        with self._lock:
            exchanges = self._exchanges.get((*server, key), set())
            if len(exchanges) > 1:
                return True
            return any(self._routes.get((*server, name, key)) is False for name in exchanges)

    def clear(self) -> None:
        with self._lock:
            self._routes.clear()
            self._exchanges.clear()


delay_routes = DelayRoutes()


class Message(pyamqp.Message):
    """A received message: delivery count merged (see :mod:`kernel_amqp.counting`),
    and the reply address of a task message noted for rpc:// (:mod:`kernel_amqp.replies`)."""

    def __init__(self, msg: Any, channel: Any = None, **kwargs: Any) -> None:
        super().__init__(msg, channel=channel, **kwargs)
        headers = self.headers
        counting.on_receive(headers)
        queue = getattr(channel, "consumer_queues", {}).get(
            (self.delivery_info or {}).get("consumer_tag")
        )
        if queue:
            # The queue this message came from: the worker returns a requeued copy
            # to this queue only, through the default exchange.
            self.delivery_info["queue"] = queue
        reply_to = self.properties.get("reply_to")
        if reply_to and isinstance(headers.get("id"), str) and headers.get("task"):
            replies.remember(headers["id"], reply_to, self.properties.get("correlation_id"))


#: Seconds of one read while waiting for a publisher confirm (see
#: ``Channel._wait_for_confirm``): how far past ``confirm_timeout`` a wait can run.
CONFIRM_READ_SLICE = 0.25


class Channel(pyamqp.Channel):
    """A channel of an ``amqp://``, ``amqps://`` or ``pyamqp://`` connection."""

    Message = Message

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        # Set before py-amqp opens the channel: its handlers may run from then on.
        self._kinds: dict[str, str] = {}  # queue -> type, as declared on this channel
        self._global_qos = False
        self._qos_decided = False
        self._prefetch: tuple[int, int] = (0, 0)
        self._told_fixed_window = False
        #: consumer tag -> the queue it consumes
        self.consumer_queues: dict[str, str] = {}
        super().__init__(connection, *args, **kwargs)

    @property
    def options(self) -> AmqpOptions:
        return self.connection.kernel_options

    @property
    def _server(self) -> tuple[str, str]:
        return self.connection.server_key

    # -- declarations ----------------------------------------------------------------

    def exchange_declare(
        self,
        exchange: str,
        type: str,
        passive: bool = False,
        durable: bool = False,
        auto_delete: bool = True,
        nowait: bool = False,
        arguments: Any = None,
        argsig: str = "BssbbbbbF",
    ) -> Any:
        if passive:
            return super().exchange_declare(
                exchange, type, passive, durable, auto_delete, nowait, arguments, argsig
            )
        type = self.options.exchange_type(exchange) or type
        if not self.options.adopt_existing:
            result = super().exchange_declare(
                exchange, type, False, durable, auto_delete, nowait, arguments, argsig
            )
            exchange_types.note(self._server, exchange, type)
            return result
        result, exc = self._tentatively(
            "exchange_declare", exchange, type, False, durable, auto_delete, False, arguments
        )
        if exc is not None:
            warn_once(
                ("exchange", self._server, exchange),
                "amqp: exchange %r already exists with other settings than this "
                "declaration (type %r): %s; using it as it is. Delete it, or make the "
                "configuration match, to change it",
                exchange,
                type,
                exc.reply_text,
            )
            result = super().exchange_declare(exchange, type, passive=True)
            exchange_types.note(self._server, exchange, None)
            return result
        exchange_types.note(self._server, exchange, type)
        return result

    def queue_declare(
        self,
        queue: str = "",
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = True,
        nowait: bool = False,
        arguments: Any = None,
        argsig: str = "BsbbbbbF",
    ) -> Any:
        if passive:
            return super().queue_declare(
                queue, passive, durable, exclusive, auto_delete, nowait, arguments, argsig
            )
        options = self.options
        internal = queue in self.connection.topology_names
        plan = queues.plan(options, queue, durable, exclusive, auto_delete, arguments, internal)
        if plan.dropped:
            warn_once(
                ("dropped", queue),
                "amqp: queue %r is a quorum queue, which does not support %s; declaring "
                "it without (priorities need classic queues on RabbitMQ < 4)",
                queue,
                ", ".join(plan.dropped),
            )
        shared = queues.is_shared(durable, exclusive, auto_delete)
        dead_letter = plan.arguments.get(queues.DEAD_LETTER_ROUTING_KEY)
        if shared and not internal and dead_letter and dead_letter != queue:
            self._ensure_dead_letter_queue(str(dead_letter))
        kind = plan.kind
        if not options.adopt_existing or not queue:  # a server-named queue is new
            result = super().queue_declare(
                queue, False, durable, exclusive, auto_delete, nowait, plan.arguments, argsig
            )
            exc = None
        else:
            result, exc = self._tentatively(
                "queue_declare",
                queue,
                False,
                durable,
                exclusive,
                auto_delete,
                False,
                plan.arguments,
            )
        if exc is not None:
            warn_once(
                ("queue", self._server, queue),
                "amqp: queue %r already exists with other arguments than %r: %s; using it "
                "as it is. Delete it (once empty), or make the configuration match, to "
                "change it",
                queue,
                plan.arguments,
                exc.reply_text,
            )
            result = super().queue_declare(queue, passive=True)
            kind = queues.UNKNOWN
        name = result.queue if result is not None else queue
        if not internal:  # the delay queues are never consumed here
            self._kinds[name] = kind
        self.connection.queue_flags[name] = not (exclusive or auto_delete)
        self._declare_configured_binding(name)
        return result

    def _tentatively(self, method: str, *args: Any) -> tuple[Any, Any]:
        """Declare on a short-lived channel of its own: ``(result, None)``, or
        ``(None, error)`` when the queue or exchange exists with other arguments.

        RabbitMQ answers such a declaration by closing the channel, and this channel
        may have consumers, unacknowledged messages or publisher confirms in progress,
        which closing it would lose (the worker would stop consuming, and its
        messages would come back as duplicates)."""
        probe = amqp.Channel(self.connection)
        probe.open()
        try:
            return getattr(amqp.Channel, method)(probe, *args), None
        except amqp.PreconditionFailed as exc:
            if not queues.is_inequivalent(exc):
                raise
            return None, exc
        finally:
            try:
                probe.close()
            except Exception:  # noqa: BLE001 - the probe's end does not matter
                log.debug("amqp: closing a declaration channel failed", exc_info=True)

    def _ensure_dead_letter_queue(self, name: str) -> None:
        if name in self.connection.queue_flags:
            return
        self.queue_declare(name, durable=True, auto_delete=False)

    def _declare_configured_binding(self, queue: str) -> None:
        """Bind ``queue`` as the ``queues`` option defines it (once per connection)."""
        definition = self.options.definition(queue)
        if definition is None or not definition.exchange:
            return
        key = ("configured", queue)
        if key in self.connection.done:
            return
        self.connection.done.add(key)
        self.exchange_declare(
            definition.exchange, definition.exchange_type, durable=True, auto_delete=False
        )
        self.queue_bind(queue, definition.exchange, definition.routing_key or queue)

    def queue_bind(
        self,
        queue: str,
        exchange: str = "",
        routing_key: str = "",
        nowait: bool = False,
        arguments: Any = None,
        argsig: str = "BsssbF",
    ) -> Any:
        result = super().queue_bind(queue, exchange, routing_key, nowait, arguments, argsig)
        self._bind_for_delays(queue, exchange, routing_key)
        return result

    def _kind(self, exchange: str) -> str | None:
        """The type of ``exchange`` as this process knows it, or None."""
        return exchange_types.get(self._server, exchange) or exchange_hints.get(exchange)

    def _bind_for_delays(self, queue: str, exchange: str, routing_key: str) -> None:
        """Bind ``queue`` to the delivery exchange, so delayed messages sent to
        ``exchange`` with ``routing_key`` come back to it, and record whether messages
        to (``exchange``, ``routing_key``) may be delayed (:class:`DelayRoutes`)."""
        options = self.options
        if not options.delayed_delivery or not exchange or exchange.startswith("amq."):
            return
        if exchange in self.connection.topology_names:
            return
        server = self._server
        if self._kind(exchange) not in DELAYABLE_TYPES:
            return  # fanout, headers or unknown type: its messages are delivered at once
        if not self.connection.queue_flags.get(queue):
            # private (exclusive/auto-delete) or not declared here: no delay binding, so
            # delayed messages to this route are delivered at once (the worker holds them)
            delay_routes.note(server, exchange, routing_key, False)
            return
        if any(word in ("*", "#") for word in routing_key.split(".")):
            delay_routes.note(server, exchange, routing_key, False)
            warn_once(
                ("wildcard", exchange, routing_key),
                "amqp: queue %r is bound to exchange %r with routing key %r, which has "
                "'*' or '#' words; a delay binding would take the delayed messages of "
                "every exchange that match it, so it gets none: delayed messages to it "
                "are delivered at once and held by the worker",
                queue,
                exchange,
                routing_key,
            )
            return
        others = delay_routes.other_exchanges(server, exchange, routing_key)
        if others:
            delay_routes.note(server, exchange, routing_key, False)
            warn_once(
                ("shared-key", routing_key),
                "amqp: routing key %r is bound on several exchanges (%s and %r); delay "
                "bindings match the routing key only, so delayed messages with it are "
                "delivered at once and held by the worker",
                routing_key,
                ", ".join(repr(name) for name in sorted(others)),
                exchange,
            )
            return
        key = ("delay-binding", queue, routing_key)
        if key not in self.connection.done:
            self.ensure_delay_topology()
            super().queue_bind(
                queue,
                delayed.delivery_exchange(options.delayed_delivery_prefix),
                delayed.binding_key(routing_key),
            )
            self.connection.done.add(key)
        delay_routes.note(server, exchange, routing_key, True)

    def _delay_target(self, exchange: str, routing_key: str) -> str | None:
        """The destination routing key when a message to ``exchange`` with
        ``routing_key`` can wait in the delay topology, else None.

        Only routes known to have delay bindings qualify: bound here, to a direct or
        topic exchange, from durable shared queues only, with a key free of wildcards
        bound on no other exchange. A message that came through the topology (its
        ``delivery_info`` names a level or the delivery exchange) re-enters it with its
        destination key."""
        if not exchange or exchange.startswith("amq."):
            return None
        key = delayed.strip_delay(routing_key)
        if exchange in self.connection.topology_names:
            # It came through the topology to its queue: a delay binding exists, and
            # re-entering reaches the same queues, unless this process knows better.
            return None if delay_routes.key_refused(self._server, key) else key
        if self._kind(exchange) not in DELAYABLE_TYPES:
            return None
        if not delay_routes.delayable(self._server, exchange, key):
            return None
        return key

    def ensure_delay_topology(self) -> None:
        """Declare the delay exchanges, queues and bindings (once per connection:
        re-declaring existing ones is cheap, and repairs a deleted piece)."""
        connection = self.connection
        if connection.delay_topology_ready:
            return
        try:
            self._declare_delay_topology()
        except amqp.exceptions.AMQPError as exc:
            log.error(
                "amqp: could not declare the delay topology (%s_celery_delayed_*): %s. It "
                "needs RabbitMQ >= 3.10 (quorum queues with x-dead-letter-strategy "
                "at-least-once) and the right to declare those exchanges and queues; set "
                "broker_transport_options delayed_delivery=False to have workers hold "
                "delayed tasks instead",
                self.options.delayed_delivery_prefix or "",
                exc,
            )
            raise
        connection.delay_topology_ready = True

    def _declare_delay_topology(self) -> None:
        options = self.options
        plan = delayed.topology(
            options.delayed_delivery_queue_type, options.delayed_delivery_prefix
        )
        for exchange in plan.exchanges:
            self.exchange_declare(exchange, "topic", durable=True, auto_delete=False)
        for level in plan.queues:
            self.queue_declare(
                level.name, durable=True, auto_delete=False, arguments=level.arguments
            )
        for binding in plan.bindings:
            if binding.to_exchange:
                self.exchange_bind(binding.destination, binding.source, binding.pattern)
            else:
                super().queue_bind(binding.destination, binding.source, binding.pattern)

    # -- publishing ------------------------------------------------------------------

    def _basic_publish(
        self, msg: Any, exchange: str = "", routing_key: str = "", *args: Any, **kwargs: Any
    ) -> Any:
        headers = msg.properties.get("application_headers")
        deliver_at = None
        if headers:
            headers = dict(headers)  # the caller's dict stays as it was
            counting.on_publish(headers)
            msg.properties["application_headers"] = headers
            deliver_at = headers.get(DELIVER_AT_HEADER)
        if deliver_at is not None and self.options.delayed_delivery:
            exchange, routing_key = self._route_delayed(exchange, routing_key, deliver_at)
        elif exchange in self.connection.topology_names:
            exchange, routing_key = self._at_once(exchange, routing_key)
        return super()._basic_publish(msg, exchange, routing_key, *args, **kwargs)

    basic_publish = _basic_publish

    def basic_publish_confirm(self, msg: Any, *args: Any, **kwargs: Any) -> Any:
        timeout = kwargs.pop("confirm_timeout", None)
        if timeout is None:
            timeout = self.options.confirm_timeout
        try:
            if not self._confirm_selected:
                self._confirm_selected = True
                self.confirm_select()
            published = self._basic_publish(msg, *args, **kwargs)
            self._wait_for_confirm(timeout or kwargs.get("timeout"))
            return published
        except TimeoutError as exc:
            exchange = kwargs.get("exchange", args[0] if args else "")
            try:
                self.connection.collect()  # a later confirm must not answer another publish
            except Exception:  # noqa: BLE001
                log.debug("amqp: closing a connection after a confirm timeout", exc_info=True)
            raise ConfirmTimeout(
                f"RabbitMQ did not confirm a message to exchange {exchange!r} within "
                f"{timeout}s (confirm_timeout): the broker may be blocked (memory or disk "
                "alarm) or overloaded. The message may or may not be queued; the "
                "connection is closed so a late confirm cannot be taken for another's"
            ) from exc
        except MessageNacked as exc:
            exchange = kwargs.get("exchange", args[0] if args else "")
            routing_key = kwargs.get("routing_key", args[1] if len(args) > 1 else "")
            raise MessageRefused(
                f"RabbitMQ refused the message to exchange {exchange!r} with routing key "
                f"{routing_key!r} (basic.nack): a queue it routes to is full with "
                "x-overflow=reject-publish, or the broker could not store it. The message "
                "was not queued; make room in the queue or publish again later"
            ) from exc

    def _wait_for_confirm(self, timeout: float | None) -> None:
        """Wait for RabbitMQ's basic.ack (or raise ``MessageNacked`` on basic.nack),
        ``timeout`` seconds at most in all. py-amqp's own wait restarts its timeout
        with every frame that arrives (heartbeats, deliveries on a consuming channel),
        so a blocked broker that still sends heartbeats would keep it waiting for ever;
        this reads in short slices against one deadline instead."""
        from vine import ensure_promise

        def on_confirm(method: Any, *_args: Any) -> None:
            if method == amqp.spec.Basic.Nack:
                raise MessageNacked()

        promise = ensure_promise(on_confirm)
        methods = (amqp.spec.Basic.Ack, amqp.spec.Basic.Nack)
        previous = {method: self._pending.get(method) for method in methods}
        for method in methods:
            self._pending[method] = promise
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not promise.ready:
                connection = self.connection
                if connection is None:
                    raise amqp.RecoverableConnectionError("connection already closed")
                if deadline is None:
                    connection.drain_events(timeout=None)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no publisher confirm within {timeout}s")
                try:
                    connection.drain_events(timeout=min(remaining, CONFIRM_READ_SLICE))
                except TimeoutError:
                    continue  # nothing arrived in this slice; the deadline decides
        finally:
            for method, earlier in previous.items():
                if earlier is not None:
                    self._pending[method] = earlier
                else:
                    self._pending.pop(method, None)

    def _route_delayed(self, exchange: str, routing_key: str, deliver_at: Any) -> tuple[str, str]:
        """Where to publish a message due at ``deliver_at``: the delay topology, or its
        own exchange when it is due, or cannot be delayed (then the worker holds it)."""
        try:
            seconds = delayed.delay_seconds(float(deliver_at), time.time())
        except (TypeError, ValueError):
            log.warning("amqp: ignoring %s=%r, not a UNIX time", DELIVER_AT_HEADER, deliver_at)
            return self._at_once(exchange, routing_key)
        if seconds <= 0:
            return self._at_once(exchange, routing_key)
        target = self._delay_target(exchange, routing_key)
        if target is None:
            kind = self._kind(exchange)
            warn_once(
                ("not-delayable", exchange),
                "amqp: delayed messages to %s cannot wait in the broker (only routes bound "
                "through this transport from durable shared queues to a direct or topic "
                "exchange, with routing keys free of '*' and '#' words, can); they are "
                "delivered at once and the worker holds them until due",
                f"{kind or 'the'} exchange {exchange!r}" if exchange else "the default exchange",
            )
            return self._at_once(exchange, routing_key)
        if seconds > delayed.MAX_DELAY:
            warn_once(
                ("too-far",),
                "amqp: a message due in %ss is beyond the broker's longest delay (%ss); it "
                "is delivered at once and the worker holds it",
                seconds,
                delayed.MAX_DELAY,
            )
            return self._at_once(exchange, routing_key)
        self.ensure_delay_topology()
        prefix = self.options.delayed_delivery_prefix
        return delayed.entry_exchange(prefix), delayed.delayed_routing_key(seconds, target)

    def _at_once(self, exchange: str, routing_key: str) -> tuple[str, str]:
        """Where a message goes now: a message addressed to a topology exchange (a
        retry or requeue of one that came through it) goes straight to the delivery
        exchange, which routes it by its destination key without waiting again."""
        if exchange in self.connection.topology_names:
            prefix = self.options.delayed_delivery_prefix
            key = delayed.strip_delay(routing_key)
            return delayed.delivery_exchange(prefix), "0." * delayed.BITS + key
        return exchange, routing_key

    # -- consuming -------------------------------------------------------------------

    def basic_qos(
        self, prefetch_size: int, prefetch_count: int, a_global: bool, argsig: str = "lBb"
    ) -> Any:
        previous = self._prefetch[1]
        self._prefetch = (prefetch_size, prefetch_count)
        if not self._qos_decided:  # later changes keep the kind of limit (see basic_consume)
            self._global_qos = self._use_global_qos(bool(a_global))
            self._qos_decided = True
        elif (
            not self._global_qos
            and self.consumer_queues
            and previous
            and (prefetch_count == 0 or prefetch_count > previous)
            and not self._told_fixed_window
        ):
            self._told_fixed_window = True
            log.warning(
                "amqp: the worker widened its prefetch window from %d to %s to hold "
                "messages waiting for their ETA or a rate limit, but a per-consumer "
                "prefetch (the kind quorum queues need) cannot change for a running "
                "consumer of %s: held messages occupy its window. Send delayed tasks "
                "through RabbitMQ's delay queues (a direct or topic exchange; see "
                "'Delayed tasks' in docs/amqp.md) or raise worker_prefetch_multiplier",
                previous,
                prefetch_count or "unlimited",
                ", ".join(sorted(set(self.consumer_queues.values()))),
            )
        return super().basic_qos(prefetch_size, prefetch_count, self._global_qos, argsig)

    def _use_global_qos(self, requested: bool) -> bool:
        mode = self.options.global_qos
        if mode is False:
            return False
        classic_only = bool(self._kinds) and all(k == "classic" for k in self._kinds.values())
        if not classic_only:
            if requested or mode is True:
                log.info(
                    "amqp: per-consumer prefetch on this channel: it declared a quorum "
                    "queue or one of unknown type (%s), which refuse global QoS",
                    ", ".join(f"{q}: {k}" for q, k in self._kinds.items()) or "none",
                )
            return False
        if mode is True or requested:
            return True
        return self.connection.global_qos_supported

    def basic_consume(self, queue: str = "", *args: Any, **kwargs: Any) -> Any:
        if self._global_qos and self._kinds.get(queue) != "classic":
            # Consuming a quorum queue with global QoS makes RabbitMQ close the
            # connection: lift the channel-wide limit and limit each consumer instead.
            log.warning(
                "amqp: queue %r (%s) is consumed on a channel with global QoS; switching "
                "to per-consumer prefetch (consumers created before keep no limit)",
                queue,
                self._kinds.get(queue, "not declared on this channel"),
            )
            size, count = self._prefetch
            super().basic_qos(0, 0, True)
            super().basic_qos(size, count, False)
            self._global_qos = False
        tag = super().basic_consume(queue, *args, **kwargs)
        if isinstance(tag, str):
            self.consumer_queues[tag] = queue
        return tag

    def basic_cancel(self, consumer_tag: str, *args: Any, **kwargs: Any) -> Any:
        self.consumer_queues.pop(consumer_tag, None)
        return super().basic_cancel(consumer_tag, *args, **kwargs)


class Connection(pyamqp.Connection):
    """A py-amqp connection that carries this plugin's options and per-connection
    records (what it declared, whether the delay topology is in place)."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.kernel_options, kwargs = split_options(kwargs)
        #: the ``ssl`` option as given; :meth:`connect` derives py-amqp's from it
        self.ssl_option = kwargs.get("ssl")
        if kwargs.get("ssl"):
            kwargs["ssl"] = tls_options(kwargs["ssl"], str(kwargs.get("host") or ""))
        self.delay_topology_ready = False
        self.topology_names = delayed.topology_names(self.kernel_options.delayed_delivery_prefix)
        #: queue -> whether it outlives its consumers (not exclusive, not auto-delete),
        #: so it gets delay bindings; for the queues declared on this connection
        self.queue_flags: dict[str, bool] = {}
        #: one-time declarations already made on this connection
        self.done: set[tuple] = set()
        super().__init__(*args, **kwargs)

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        # kombu sets ``client`` (its Connection) between __init__ and connect(), after
        # turning a "localhost" host into "127.0.0.1": verify the name the URL wrote.
        client = getattr(self, "client", None)
        if self.ssl_option and client is not None:
            self.ssl = tls_options(
                self.ssl_option, str(self.host or ""), server_name=written_hostname(client)
            )
        return super().connect(*args, **kwargs)

    @property
    def server_key(self) -> tuple[str, str]:
        return (str(self.host), str(self.virtual_host))

    @property
    def global_qos_supported(self) -> bool:
        """RabbitMQ 3.3 to 3.x shares a global prefetch among a channel's consumers
        (4.0 deprecates it for classic queues)."""
        properties = self.server_properties or {}
        product = properties.get("product")
        if isinstance(product, bytes):
            product = product.decode(errors="replace")
        if product != "RabbitMQ":
            return False
        version = properties.get("version") or ""
        if isinstance(version, bytes):
            version = version.decode(errors="replace")
        try:
            major, minor = (int(part) for part in str(version).split(".")[:2])
        except ValueError:
            return False
        return (3, 3) <= (major, minor) < (4, 0)


def written_hostname(client: Any) -> str | None:
    """The broker host as the URL wrote it, from kombu's Connection ``client``.

    kombu's py-amqp transport replaces a ``localhost`` host with ``127.0.0.1`` on the
    Connection itself when it connects; the host given at construction
    (``_initial_params``) still says ``localhost``.
    """
    host = getattr(client, "hostname", None)
    if host == "127.0.0.1":
        initial = getattr(client, "_initial_params", None) or {}
        if initial.get("hostname") == "localhost":
            return "localhost"
    return host or None


def tls_options(ssl_option: Any, host: str, server_name: str | None = None) -> dict[str, Any]:
    """py-amqp's ``ssl`` argument, verifying the server's name by default.

    py-amqp checks the server's certificate chain, but checks its name only when
    ``server_hostname`` is given; ``ssl=True`` alone would accept any certificate a
    trusted authority signed, for any host. So ``server_name`` (the host of the broker
    URL as written), else the host of ``host`` (``name:port``), is the expected name
    unless the options say otherwise (or turn verification off with
    ``cert_reqs=ssl.CERT_NONE``).
    """
    import ssl

    options = dict(ssl_option) if isinstance(ssl_option, dict) else {}
    if options.get("cert_reqs") == ssl.CERT_NONE or "context" in options:
        return options
    if options.get("server_hostname") is None:
        if server_name:
            options["server_hostname"] = server_name.strip("[]")
        else:
            options["server_hostname"] = host.rsplit(":", 1)[0].strip("[]") if host else None
    return options


class Transport(pyamqp.Transport):
    """kombu's py-amqp transport with kernel's channel (see the module docstring)."""

    Connection = Connection

    def drain_events(self, connection: Any, **kwargs: Any) -> Any:
        if connection.heartbeat:
            connection.heartbeat_tick()  # the draining thread owns the socket
        return connection.drain_events(**kwargs)


class SSLTransport(Transport):
    """``amqps://``: TLS. The ``ssl`` transport option gives py-amqp's TLS options
    (``ca_certs``, ``certfile``, ``keyfile``, ``cert_reqs``, ``server_hostname``, ...);
    the server's certificate and name are verified by default (:func:`tls_options`)."""

    def __init__(self, client: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(client, *args, **kwargs)
        if not self.client.ssl:
            self.client.ssl = True
