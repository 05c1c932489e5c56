"""The same tasks on a kernel app and on a Celery app, for the RabbitMQ interop tests.

A ``kernel worker -A amqp_interop_tasks:kernel_app`` and a ``celery -A
amqp_interop_tasks:celery_app worker`` import this module in their own subprocesses;
the test process imports it for the names. Everything comes from the environment
(set by the test's fixtures):

- ``INTEROP_AMQP_URL``: the broker; ``INTEROP_BACKEND``: the result backend of both
  apps (``rpc://`` or a ``redis://`` URL);
- ``INTEROP_KERNEL_QUEUE`` / ``INTEROP_CELERY_QUEUE``: the queue each side consumes, so
  a test decides which side runs a task by where it sends it;
- ``INTEROP_CONTROL``: both apps' remote-control exchange, of this run's own;
- ``INTEROP_KERNEL_OPTIONS``: the kernel app's ``broker_transport_options`` (JSON);
- ``INTEROP_RELEASE_DIR``: where the test creates the file a retried task waits for;
- ``INTEROP_QUORUM_TOPIC``: when set, the Celery app's queue is a quorum queue behind a
  topic exchange (``task_queues``), which turns on Celery's native delayed delivery.

Every task names the side that ran it.
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery

from kernel import App

AMQP_URL = os.environ.get("INTEROP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("INTEROP_BACKEND", "rpc://")
KERNEL_QUEUE = os.environ.get("INTEROP_KERNEL_QUEUE", "interop.kernel")
CELERY_QUEUE = os.environ.get("INTEROP_CELERY_QUEUE", "interop.celery")
CONTROL = os.environ.get("INTEROP_CONTROL", "celery")
RELEASE_DIR = os.environ.get("INTEROP_RELEASE_DIR", "/tmp")
#: Seconds a retried task waits for the test to release its second run.
RELEASE_TIMEOUT = 30


class InteropError(Exception):
    """An application error that is not a builtin: rebuilt only where this module is."""


kernel_app = App(
    "interop_kernel",
    broker=AMQP_URL,
    backend=BACKEND,
    task_default_queue=KERNEL_QUEUE,
    control_exchange=CONTROL,
    broker_transport_options=json.loads(os.environ.get("INTEROP_KERNEL_OPTIONS") or "{}"),
)

celery_app = Celery("interop_celery", broker=AMQP_URL, backend=BACKEND, set_as_current=False)
celery_app.conf.task_default_queue = CELERY_QUEUE
celery_app.conf.control_exchange = CONTROL
celery_app.conf.broker_connection_retry_on_startup = True
if os.environ.get("INTEROP_QUORUM_TOPIC"):
    # Celery 5.5's native delayed delivery: quorum queues behind topic exchanges.
    from kombu import Exchange, Queue

    celery_app.conf.task_queues = [
        Queue(
            CELERY_QUEUE,
            Exchange(CELERY_QUEUE, "topic"),
            routing_key=CELERY_QUEUE,
            queue_arguments={"x-queue-type": "quorum"},
        )
    ]


def register(app: App | Celery, side: str, **options: object) -> None:
    """Define the interop tasks on ``app``; ``side`` is what they report as runner."""

    @app.task(name="interop.describe", bind=True, **options)
    def describe(self, *args, **kwargs):
        request = self.request
        return {
            "ran_on": side,
            "args": list(args),
            "kwargs": kwargs,
            "id": request.id,
            "retries": request.retries,
            "ran_at": time.time(),
        }

    @app.task(name="interop.fail", **options)
    def fail(kind, message):
        if kind == "builtin":
            raise LookupError(message)
        raise InteropError(message)

    @app.task(name="interop.retry_once", bind=True, **options)
    def retry_once(self, release_name):
        """Retries its first run; its second waits until the test creates the release
        file (after seeing RETRY), so that the RETRY state can be read."""
        if self.request.retries == 0:
            raise self.retry(exc=InteropError("first run asks for a retry"), countdown=0)
        path = os.path.join(RELEASE_DIR, release_name)
        deadline = time.monotonic() + RELEASE_TIMEOUT
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"ran_on": side, "retries": self.request.retries, "released": os.path.exists(path)}

    @app.task(name="interop.square", **options)
    def square(x):
        return x * x


register(kernel_app, "kernel")
register(celery_app, "celery", shared=False)
