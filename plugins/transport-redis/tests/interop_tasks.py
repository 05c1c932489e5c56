"""The same tasks on a kernel app and on a Celery app, for the Redis interop tests.

A ``kernel worker -A interop_tasks:kernel_app`` and a ``celery -A
interop_tasks:celery_app worker`` both import this module, each from its own
subprocess. Both apps use the Redis URL in ``INTEROP_REDIS_URL`` as broker and result
backend, and each consumes a queue of its own, so the tests decide which side runs a
task by the queue they send it to. Every task names the side that ran it.

The test process imports this module too, for the queue names and for
:class:`InteropError`: a failure can be rebuilt as that class only where its module is
imported.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

from kernel import App

#: The queue the kernel worker consumes; its tasks send follow-ups (chord bodies,
#: retries) there too.
KERNEL_QUEUE = "interop.kernel"
#: The queue the Celery worker consumes.
CELERY_QUEUE = "interop.celery"
#: Seconds a retried task waits for the test to release its second run.
RELEASE_TIMEOUT = 30

REDIS_URL = os.environ.get("INTEROP_REDIS_URL", "redis://127.0.0.1:6379/0")


class InteropError(Exception):
    """An application error that is not a builtin: rebuilt only where this module is."""


kernel_app = App(
    "interop_kernel", broker=REDIS_URL, backend=REDIS_URL, task_default_queue=KERNEL_QUEUE
)

celery_app = Celery("interop_celery", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
celery_app.conf.task_default_queue = CELERY_QUEUE


def register(app: App | Celery, side: str, **options: object) -> None:
    """Define the interop tasks on ``app``; ``side`` is what they report as runner.
    ``options`` go to every ``app.task`` (Celery's ``shared=False`` keeps them off
    other Celery apps of the same process)."""

    @app.task(name="interop.describe", bind=True, **options)
    def describe(self, *args, **kwargs):
        request = self.request
        return {
            "ran_on": side,
            "args": list(args),
            "kwargs": kwargs,
            "id": request.id,
            "root_id": request.root_id,
            "parent_id": request.parent_id,
            "retries": request.retries,
        }

    @app.task(name="interop.fail", **options)
    def fail(kind, message):
        if kind == "builtin":
            raise LookupError(message)
        raise InteropError(message)

    @app.task(name="interop.retry_once", bind=True, **options)
    def retry_once(self, release_key):
        """Retries its first run; its second waits until the test pushes on
        ``release_key`` (after seeing RETRY stored), so the RETRY state can be read."""
        if self.request.retries == 0:
            raise self.retry(exc=InteropError("first run asks for a retry"), countdown=0)
        client = redis.Redis.from_url(REDIS_URL)
        try:
            released = client.blpop([release_key], timeout=RELEASE_TIMEOUT) is not None
        finally:
            client.close()
        return {"ran_on": side, "retries": self.request.retries, "released": released}

    @app.task(name="interop.square", **options)
    def square(x):
        return x * x

    @app.task(name="interop.total", **options)
    def total(values):
        return {"ran_on": side, "values": list(values), "sum": sum(values)}


register(kernel_app, "kernel")
register(celery_app, "celery", shared=False)
