"""Builtin pools: solo, threads, prefork."""

import os

from kernel.plugins.hookspecs import hookimpl
from kernel.plugins.specs import PoolSpec


def cpu_count() -> int:
    return os.cpu_count() or 1


@hookimpl
def kernel_pools():
    return [
        PoolSpec(
            name="solo",
            factory="kernel.worker.pools:SoloPool",
            # A cold shutdown interrupts the running task; SIGALRM gives soft limits.
            supports={"terminate", "soft_time_limit"},
            default_concurrency=lambda: 1,
        ),
        PoolSpec(
            name="threads",
            factory="kernel.worker.pools:ThreadsPool",
            supports={"soft_time_limit", "terminate_task", "autoscale"},
            default_concurrency=lambda: 4 * cpu_count(),
        ),
        PoolSpec(
            name="prefork",
            factory="kernel.worker.pools:PreforkPool",
            supports={
                "terminate",
                "terminate_task",
                "hard_time_limit",
                "soft_time_limit",
                "max_tasks_per_child",
                "max_memory_per_child",
                "autoscale",
            },
            default_concurrency=cpu_count,
        ),
    ]
