"""The pool contract for the gevent pool. Not collected by the main test run (whose
process is not monkey-patched): ``test_gevent_pool.py`` runs it in a pytest process
that patches the standard library first, as ``kernel worker -P gevent`` does."""

from kernel.testing.contracts import PoolContract


class TestGeventPool(PoolContract):
    pool_name = "gevent"
    concurrency = 4
