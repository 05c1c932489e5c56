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
            supports={"terminate"},  # a second signal interrupts the running task
            default_concurrency=lambda: 1,
        ),
        PoolSpec(
            name="threads",
            factory="kernel.worker.pools:ThreadsPool",
            default_concurrency=lambda: 4 * cpu_count(),
        ),
        PoolSpec(
            name="prefork",
            factory="kernel.worker.pools:PreforkPool",
            supports={"terminate", "max_tasks_per_child"},
            default_concurrency=cpu_count,
        ),
    ]
