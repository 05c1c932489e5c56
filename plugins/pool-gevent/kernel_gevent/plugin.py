"""Entry point ``gevent`` of group ``kernel.plugins``: the ``gevent`` pool.

Importing this module imports neither gevent nor anything that opens sockets: the
``kernel`` command loads every plugin before it runs the monkey-patching of the pool
named with ``-P``, and that patching must come before sockets, ssl and locks are used.
"""

from __future__ import annotations

from kernel import hookimpl
from kernel.plugins.specs import PoolSpec

#: Tasks a gevent worker runs at once unless ``-c``/``worker_concurrency`` says.
DEFAULT_CONCURRENCY = 100


@hookimpl
def kernel_pools():
    return [
        PoolSpec(
            name="gevent",
            factory="kernel_gevent.pool:GeventPool",
            supports={
                "soft_time_limit",
                "hard_time_limit",
                "terminate",
                "terminate_task",
                "autoscale",
            },
            early_patch="kernel_gevent.patch:patch",
            default_concurrency=lambda: DEFAULT_CONCURRENCY,
        )
    ]
