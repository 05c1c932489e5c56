"""pytest fixtures for testing kernel apps (loaded automatically through ``pytest11``).

- ``kernel_config``: override it in your conftest to change settings (a dict).
- ``kernel_app``: an App on the in-process memory transport and memory results, with
  a queue of its own so tests do not see each other's messages.
- ``kernel_worker``: a worker running ``kernel_app``'s tasks in a background thread.
- ``kernel_eager_app``: an App with ``task_always_eager`` (tasks run on ``delay()``).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kernel.app import App
from kernel.plugins.manager import PluginManager
from kernel.worker.worker import Worker

WORKER_START_TIMEOUT = 10.0
WORKER_STOP_TIMEOUT = 30.0


@pytest.fixture(scope="session")
def kernel_plugins() -> PluginManager:
    """Plugins for test apps: builtins plus installed ones, loaded once per session."""
    return PluginManager().load()


@pytest.fixture
def kernel_config() -> dict[str, Any]:
    """Settings applied to ``kernel_app``; override this fixture to change them."""
    return {}


@pytest.fixture
def kernel_app(kernel_config: dict[str, Any], kernel_plugins: PluginManager) -> Iterator[App]:
    """An isolated app: memory broker, memory results, a queue unique to the test."""
    unique = uuid.uuid4().hex[:12]
    settings = {
        "broker_url": "memory://",
        "result_backend": f"cache+memory://{unique}",
        "task_default_queue": f"test.{unique}",
        **kernel_config,
    }
    app = App(f"test_{unique}", plugins=kernel_plugins, **settings)
    yield app
    app.close()


@pytest.fixture
def kernel_eager_app(kernel_app: App) -> App:
    """``kernel_app`` with ``task_always_eager``: ``delay()`` runs the task at once."""
    kernel_app.conf.task_always_eager = True
    return kernel_app


def start_worker(
    app: App, pool: str = "solo", concurrency: int = 1, **options: Any
) -> tuple[Worker, threading.Thread]:
    """Start a worker for ``app`` in a thread and wait until it consumes."""
    worker = Worker(
        app, pool=pool, concurrency=concurrency, install_signal_handlers=False, **options
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.start()
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)
            worker.ready.set()

    thread = threading.Thread(target=run, name="kernel-test-worker", daemon=True)
    thread.start()
    if not worker.ready.wait(WORKER_START_TIMEOUT):
        raise TimeoutError(f"test worker did not start within {WORKER_START_TIMEOUT}s")
    if errors:
        raise errors[0]
    return worker, thread


def stop_worker(worker: Worker, thread: threading.Thread) -> None:
    worker.stop()
    thread.join(WORKER_STOP_TIMEOUT)
    if thread.is_alive():
        raise TimeoutError(f"test worker did not stop within {WORKER_STOP_TIMEOUT}s")


@pytest.fixture
def kernel_worker(kernel_app: App) -> Iterator[Worker]:
    """A worker consuming ``kernel_app``'s queue in a background thread (solo pool).

    Define tasks on ``kernel_app`` before requesting this fixture, or at any time:
    the worker looks tasks up when their messages arrive.
    """
    worker, thread = start_worker(kernel_app)
    yield worker
    stop_worker(worker, thread)
