"""RabbitMQ fixtures of the plugin's tests.

Every name a test run creates on the broker starts with this run's own prefix
(:data:`amqp_harness.RUN`), so runs never share queues, exchanges or delay
topologies, and whatever a test created is deleted afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from amqp_harness import RUN, Broker, Cluster

from kernel import App
from kernel.testing.pytest_plugin import start_worker, stop_worker
from kernel.testing.services import require_service


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """``amqp://guest:guest@127.0.0.1:5672//``, or the test is skipped (or fails under
    ``KERNEL_REQUIRE_SERVICES=1``) when RabbitMQ does not answer."""
    host, port = require_service("rabbitmq")
    return f"amqp://guest:guest@{host}:{port}//"


@pytest.fixture(scope="session")
def delay_prefix(rabbitmq_url: str) -> Iterator[str]:
    """This run's own delay topology (``<prefix>_celery_delayed_*``), deleted at the end."""
    prefix = f"kt{RUN}"
    yield prefix
    Broker(rabbitmq_url).delete_delay_topology(prefix)


@pytest.fixture
def broker(rabbitmq_url: str) -> Iterator[Broker]:
    """Direct access to RabbitMQ; queues and exchanges named through it (``name()``)
    are deleted after the test."""
    instance = Broker(rabbitmq_url)
    yield instance
    instance.close()


@pytest.fixture
def make_cluster(
    tmp_path: Path, rabbitmq_url: str, delay_prefix: str, broker: Broker
) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(options=..., **settings)``: worker subprocesses, a client app and
    the record of executed tasks, on queues of the test's own; every worker is stopped
    (its process group killed) at teardown."""
    made: list[Cluster] = []

    def make(options: dict[str, Any] | None = None, **settings: Any) -> Cluster:
        directory = tmp_path / f"cluster{len(made)}"
        directory.mkdir()
        instance = Cluster(directory, rabbitmq_url, delay_prefix, broker, options, **settings)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.close()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    """A cluster with the default options (classic queues)."""
    return make_cluster()


@pytest.fixture
def make_app(rabbitmq_url: str, delay_prefix: str, broker: Broker) -> Iterator[Callable[..., App]]:
    """``make_app(options=..., **settings)``: a kernel app on RabbitMQ with rpc://
    results and a default queue of the test's own."""
    apps: list[App] = []

    def make(options: dict[str, Any] | None = None, **settings: Any) -> App:
        queue = settings.pop("task_default_queue", None) or broker.name("default")
        control = broker.name("control")
        broker.track(exchange=f"{control}.pidbox")
        broker.track(exchange=f"reply.{control}.pidbox")
        app = App(
            "routing",
            broker=rabbitmq_url,
            backend="rpc://",
            broker_transport_options={"delayed_delivery_prefix": delay_prefix, **(options or {})},
            task_default_queue=queue,
            control_exchange=control,
            **settings,
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        if app._backend is not None and hasattr(app._backend, "reply_queue_name"):
            broker.track(queue=app._backend.reply_queue_name)
        app.close()


@pytest.fixture
def workers() -> Iterator[Callable[..., Any]]:
    """``workers(app, queues=[...], **options)`` starts a worker thread; all are stopped
    at teardown."""
    started: list[tuple[Any, threading.Thread]] = []

    def start(app: App, **options: Any) -> Any:
        options.setdefault("pool", "threads")
        options.setdefault("concurrency", 2)
        worker, thread = start_worker(app, **options)
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        stop_worker(worker, thread)
