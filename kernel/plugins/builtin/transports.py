"""Builtin transports: the embedded SQLite broker and kombu's in-process memory one."""

from kernel.plugins.hookspecs import hookimpl
from kernel.plugins.specs import TransportSpec


@hookimpl
def kernel_transports():
    return [
        TransportSpec(
            name="sqlite",
            schemes=["sqlite"],
            kombu_transport="kernel.plugins.builtin.sqlite_transport:Transport",
            features={"delayed_delivery", "priority", "fanout", "delivery_count", "cross_process"},
        ),
        TransportSpec(
            name="memory",
            schemes=["memory"],
            kombu_transport="kombu.transport.memory:Transport",
            # one process only; unacked messages are dropped when a channel closes
            features={"fanout"},
        ),
    ]
