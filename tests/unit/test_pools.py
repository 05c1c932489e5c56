"""The builtin execution pools against the pool contract."""

from __future__ import annotations

from kernel.testing.contracts import PoolContract


class TestSoloPool(PoolContract):
    pool_name = "solo"
    concurrency = 1


class TestThreadsPool(PoolContract):
    pool_name = "threads"
    concurrency = 4


class TestPreforkPool(PoolContract):
    pool_name = "prefork"
    concurrency = 2
    separate_processes = True
