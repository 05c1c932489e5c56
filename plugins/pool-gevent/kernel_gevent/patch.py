"""The monkey-patching a gevent worker needs, run by the ``kernel`` command before it
imports the app (``PoolSpec.early_patch``)."""

from __future__ import annotations


def patch() -> None:
    """Make the standard library cooperative: sockets, ssl, ``time.sleep``, threads
    and locks, ``select``, subprocesses. Every library built on them (kombu, py-amqp,
    redis-py, PyMySQL, ``requests``) then yields to other greenlets while it waits."""
    from gevent import monkey

    monkey.patch_all()


def is_patched() -> bool:
    """True once :func:`patch` (or the user's own ``monkey.patch_all()``) has run."""
    from gevent import monkey

    return bool(monkey.is_module_patched("socket") and monkey.is_module_patched("threading"))
