"""Entry point ``redis`` of group ``kernel.plugins``: what this plugin registers.

Heavy imports (redis-py, kombu's Redis transport) happen only when a Redis URL is
used, so installing the plugin costs nothing to apps that do not use it.
"""

from __future__ import annotations

from kernel import hookimpl
from kernel.plugins.specs import BackendSpec, TransportSpec

BROKER_SCHEMES = ["redis", "redis+socket"]
TLS_SCHEMES = ["rediss"]
SENTINEL_SCHEMES = ["sentinel"]
BACKEND_SCHEMES = BROKER_SCHEMES + TLS_SCHEMES + SENTINEL_SCHEMES
BROKER_FEATURES = {
    "priority",
    "fanout",
    "cross_process",
    "delayed_delivery",
    "delivery_count",
    "redelivery_on_close",
}


@hookimpl
def kernel_transports():
    return [
        TransportSpec(
            name="redis",
            schemes=BROKER_SCHEMES,
            kombu_transport="kernel_redis.transport:Transport",
            features=BROKER_FEATURES,
        ),
        TransportSpec(
            name="redis-tls",
            schemes=TLS_SCHEMES,
            kombu_transport="kernel_redis.transport:TLSTransport",
            features=BROKER_FEATURES,
        ),
        TransportSpec(
            name="redis-sentinel",
            schemes=SENTINEL_SCHEMES,
            kombu_transport="kernel_redis.transport:SentinelTransport",
            features=BROKER_FEATURES,
        ),
    ]


@hookimpl
def kernel_result_backends():
    return [
        BackendSpec(
            name="redis",
            schemes=BACKEND_SCHEMES,
            factory="kernel_redis.backend:RedisBackend",
            features={"cross_process", "chords"},
        )
    ]
