"""Entry point ``amqp`` of group ``kernel.plugins``: what this plugin registers.

py-amqp, the transport and the rpc:// backend are imported only when an ``amqp://``,
``amqps://``, ``pyamqp://`` or ``rpc://`` URL is used, so installing the plugin costs
nothing to apps that do not use it.
"""

from __future__ import annotations

from typing import Any

from kernel import hookimpl
from kernel.plugins.specs import BackendSpec, TransportSpec

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


@hookimpl
def kernel_transports():
    return [
        TransportSpec(
            name="amqp",
            schemes=BROKER_SCHEMES,
            kombu_transport="kernel_amqp.transport:Transport",
            features=BROKER_FEATURES,
            default_options=dict(DEFAULT_OPTIONS),
        ),
        TransportSpec(
            name="amqp-tls",
            schemes=TLS_SCHEMES,
            kombu_transport="kernel_amqp.transport:SSLTransport",
            features=BROKER_FEATURES,
            default_options=dict(DEFAULT_OPTIONS),
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
