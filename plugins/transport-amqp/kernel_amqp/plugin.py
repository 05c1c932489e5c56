"""Entry point ``amqp`` of group ``kernel.plugins``: what this plugin registers.

py-amqp, the transport and the rpc:// backend are imported only when an ``amqp://``,
``amqps://``, ``pyamqp://`` or ``rpc://`` URL is used, so installing the plugin costs
nothing to apps that do not use it.
"""

from __future__ import annotations

import logging
from typing import Any

from kernel import hookimpl
from kernel.plugins.specs import BackendSpec, TransportSpec

log = logging.getLogger(__name__)

BROKER_SCHEMES = ["amqp", "pyamqp"]
TLS_SCHEMES = ["amqps"]
BACKEND_SCHEMES = ["rpc"]
BROKER_FEATURES = {
    "priority",
    "fanout",
    "cross_process",
    "delayed_delivery",
    "redelivery_on_close",
}
#: Publisher confirms: a ``delay()`` that returned means RabbitMQ has the message.
DEFAULT_OPTIONS = {"confirm_publish": True}
#: Kernel settings the transport reads, as its options.
SETTING_OPTIONS = {"kernel_dead_letter_queue": "task_dead_letter_queue"}


@hookimpl
def kernel_transports():
    return [
        TransportSpec(
            name="amqp",
            schemes=BROKER_SCHEMES,
            kombu_transport="kernel_amqp.transport:Transport",
            features=BROKER_FEATURES,
            default_options=dict(DEFAULT_OPTIONS),
            setting_options=dict(SETTING_OPTIONS),
        ),
        TransportSpec(
            name="amqp-tls",
            schemes=TLS_SCHEMES,
            kombu_transport="kernel_amqp.transport:SSLTransport",
            features=BROKER_FEATURES,
            default_options=dict(DEFAULT_OPTIONS),
            setting_options=dict(SETTING_OPTIONS),
        ),
    ]


@hookimpl
def kernel_result_backends():
    return [
        BackendSpec(
            name="rpc",
            schemes=BACKEND_SCHEMES,
            factory="kernel_amqp.rpc:RPCBackend",
        )
    ]


@hookimpl
def kernel_before_task_publish(
    app: Any, headers: dict, properties: dict, routing: dict | None = None
) -> None:
    """Note the exchange type a route names (the transport delays messages only to
    exchanges known to be direct or topic); with rpc:// results, ask for the result on
    the right reply queue."""
    if routing:
        exchange, kind = routing.get("exchange"), routing.get("exchange_type")
        if isinstance(exchange, str) and exchange and isinstance(kind, str) and kind:
            from kernel_amqp.delayed import exchange_hints

            exchange_hints[exchange] = kind
    url = app.conf.result_backend
    if not isinstance(url, str) or not url.lower().startswith("rpc:"):
        return  # touching app.backend would create another backend early
    from kernel_amqp.rpc import RPCBackend

    backend = app.backend
    if isinstance(backend, RPCBackend):
        backend.on_task_publish(headers, properties)


@hookimpl
def kernel_worker_process_init(worker: Any, pid: int) -> None:
    """In a prefork child: declare the worker's queues again on this process's own
    connection. The child forked before the worker declared them, and a process
    delays a message in the broker only for routes it has seen bound (so a
    ``self.retry(countdown=...)`` from the child would otherwise be delivered at once
    and held by the worker). The queues exist: this costs one connection per child."""
    app = worker.app
    try:
        spec = app.plugins.transport_for_url(app.conf.broker_url)
    except Exception:  # noqa: BLE001 - not ours to judge
        return
    if spec.name not in ("amqp", "amqp-tls"):
        return
    try:
        with app.connection() as connection:
            channel = connection.default_channel
            for queue in app.queues_for(worker.queue_names):
                queue(channel).declare()
    except Exception as exc:  # noqa: BLE001 - the child still runs tasks
        log.warning(
            "amqp: prefork child %s could not declare its worker's queues (%s: %s); "
            "retries with a countdown it sends are delivered at once and held by the "
            "worker",
            pid,
            type(exc).__name__,
            exc,
        )
