"""The pool contract: what the worker relies on from an execution pool.

Use it from a plugin's tests::

    from kernel.testing.contracts import PoolContract


    class TestGeventPool(PoolContract):
        pool_name = "gevent"
        concurrency = 4

``pool_name`` and ``concurrency`` may be class attributes or fixtures. Each test runs a
real :class:`~kernel.worker.worker.Worker` with the pool in a background thread.
Pools that run tasks in other processes (``separate_processes = True``, like
``prefork``) cannot see results kept in this process's memory, so their tests use an
SQLite broker and result backend in ``tmp_path``; the others use the memory transport
and ``cache+memory://`` results. Tasks meet through files in ``tmp_path``, which every
kind of pool can see, and every wait is bounded.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from kernel import states
from kernel.app import App
from kernel.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from kernel.plugins.manager import PluginManager
from kernel.testing.pytest_plugin import start_worker, stop_worker
from kernel.worker.worker import Worker


class PoolContractError(Exception):
    """Raised by the contract's failing task."""


def _setting(test: object, request: pytest.FixtureRequest, name: str) -> Any:
    """A subclass's class attribute ``name``, else its fixture ``name``."""
    value = getattr(type(test), name, None)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return value
    return request.getfixturevalue(name)


def _wait_for_files(directory: str, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        seen = len(os.listdir(directory))
        if seen >= count or time.monotonic() >= deadline:
            return seen
        time.sleep(0.01)


@attrs.define
class RunningWorker:
    """A worker started for one test; ``stop()`` is a warm shutdown, safe to repeat."""

    worker: Worker
    thread: threading.Thread

    def stop(self) -> None:
        if self.thread.is_alive():
            stop_worker(self.worker, self.thread)


def define_tasks(app: App) -> None:
    """The tasks the contract sends, registered before the pool starts (so forked
    children know them)."""

    @app.task(name="pool_contract.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="pool_contract.fail")
    def fail(message: str) -> None:
        raise PoolContractError(message)

    @app.task(name="pool_contract.rendezvous")
    def rendezvous(directory: str, parties: int, timeout: float) -> int:
        """Arrive, then wait for ``parties`` tasks to arrive; returns how many did."""
        Path(directory, uuid.uuid4().hex).touch()
        return _wait_for_files(directory, parties, timeout)

    @app.task(name="pool_contract.interval")
    def interval(seconds: float) -> list:
        started = time.time()
        time.sleep(seconds)
        return [started, time.time()]

    @app.task(name="pool_contract.hold")
    def hold(marker: str, seconds: float) -> str:
        Path(marker).touch()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:  # short sleeps: interruptions land promptly
            time.sleep(0.02)
        return "finished"

    @app.task(name="pool_contract.clean_up")
    def clean_up(seconds: float) -> str:
        """Catches its soft time limit, as a task that cleans up would."""
        try:
            hold.run(os.devnull, seconds)
        except SoftTimeLimitExceeded:
            return "cleaned up"
        return "finished"


class PoolContract:
    """Behaviour every execution pool provides; subclass as ``TestXxx``."""

    #: The pool's name (``PoolSpec.name``); or provide a fixture.
    pool_name: str | None = None
    #: Tasks the pool runs at once in these tests; or provide a fixture.
    concurrency: int = 2
    #: True when tasks run in other processes (results must cross processes).
    separate_processes: bool = False
    #: Seconds to wait for a task's result.
    result_timeout: float = 20.0

    # -- fixtures -----------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def pool_plugins(cls) -> PluginManager:
        """Plugins the contract's apps use; override to register a plugin by hand."""
        return PluginManager().load()

    @pytest.fixture
    def pool(self, request: pytest.FixtureRequest) -> str:
        return _setting(self, request, "pool_name")

    @pytest.fixture
    def slots(self, request: pytest.FixtureRequest) -> int:
        return _setting(self, request, "concurrency")

    @pytest.fixture
    def pool_app(self, tmp_path: Path, pool_plugins: PluginManager) -> Iterator[App]:
        unique = uuid.uuid4().hex[:12]
        if self.separate_processes:
            url = f"sqlite:///{tmp_path / 'pool-contract.sqlite3'}"
            broker, backend = url, url
        else:
            broker, backend = "memory://", f"cache+memory://{unique}"
        app = App(
            f"pool_contract_{unique}",
            broker=broker,
            backend=backend,
            plugins=pool_plugins,
            task_default_queue=f"pool-contract.{unique}",
        )
        define_tasks(app)
        yield app
        app.close()

    @pytest.fixture
    def running(self, pool_app: App, pool: str, slots: int) -> Iterator[RunningWorker]:
        worker, thread = start_worker(pool_app, pool=pool, concurrency=slots)
        running = RunningWorker(worker, thread)
        yield running
        running.stop()

    def send(self, app: App, name: str, *args: Any, **options: Any) -> Any:
        return app.send_task(f"pool_contract.{name}", args, **options)

    def require(self, app: App, pool: str, control: str) -> None:
        """Skip unless the pool declares ``control`` in its ``PoolSpec.supports``."""
        if control not in app.plugins.pool(pool).supports:
            pytest.skip(f"pool {pool!r} does not declare {control!r} in PoolSpec.supports")

    def wait_for_file(self, path: Path) -> None:
        deadline = time.monotonic() + self.result_timeout
        while not path.exists():
            assert time.monotonic() < deadline, f"{path.name} did not appear"
            time.sleep(0.01)

    # -- results ------------------------------------------------------------------------

    def test_runs_a_task_and_stores_its_result(self, pool_app, running):
        result = self.send(pool_app, "add", 2, 3)
        assert result.get(timeout=self.result_timeout) == 5
        assert result.state == states.SUCCESS

    def test_task_exception_is_stored_as_failure_with_traceback(self, pool_app, running):
        result = self.send(pool_app, "fail", "out of cheese")

        with pytest.raises(PoolContractError, match="out of cheese"):
            result.get(timeout=self.result_timeout)
        assert result.state == states.FAILURE
        assert "PoolContractError" in result.traceback
        assert "raise PoolContractError(message)" in result.traceback

    def test_worker_keeps_running_tasks_after_a_failure(self, pool_app, running):
        failed = self.send(pool_app, "fail", "first")
        assert isinstance(
            failed.get(timeout=self.result_timeout, propagate=False), PoolContractError
        )
        assert self.send(pool_app, "add", 1, 1).get(timeout=self.result_timeout) == 2

    def test_many_tasks_all_complete(self, pool_app, running, slots):
        results = [self.send(pool_app, "add", n, n) for n in range(4 * slots)]
        assert [r.get(timeout=self.result_timeout) for r in results] == [
            2 * n for n in range(4 * slots)
        ]

    # -- concurrency --------------------------------------------------------------------

    def test_runs_as_many_tasks_at_once_as_its_concurrency(
        self, pool_app, running, slots, tmp_path
    ):
        directory = tmp_path / "rendezvous"
        directory.mkdir()
        wait = self.result_timeout / 2
        results = [
            self.send(pool_app, "rendezvous", str(directory), slots, wait) for _ in range(slots)
        ]

        arrived = [r.get(timeout=self.result_timeout) for r in results]
        assert arrived == [slots] * slots, (
            f"tasks saw {arrived} of {slots} parties: the pool did not run {slots} at once"
        )

    def test_never_runs_more_tasks_at_once_than_its_concurrency(self, pool_app, running, slots):
        results = [self.send(pool_app, "interval", 0.2) for _ in range(2 * slots)]
        intervals = [r.get(timeout=self.result_timeout) for r in results]

        overlap = max(sum(1 for s, e in intervals if s <= start < e) for start, _ in intervals)
        assert overlap <= slots

    # -- controls (each only for pools that declare it) -----------------------------------

    def test_soft_time_limit_is_raised_inside_the_task(self, pool_app, pool, running):
        self.require(pool_app, pool, "soft_time_limit")
        result = self.send(pool_app, "clean_up", 30, soft_time_limit=0.5)
        assert result.get(timeout=self.result_timeout) == "cleaned up"

    def test_hard_time_limit_fails_the_task_and_the_pool_goes_on(self, pool_app, pool, running):
        self.require(pool_app, pool, "hard_time_limit")
        result = self.send(pool_app, "hold", os.devnull, 30, time_limit=1)
        with pytest.raises(TimeLimitExceeded):
            result.get(timeout=self.result_timeout)
        assert self.send(pool_app, "add", 2, 2).get(timeout=self.result_timeout) == 4

    def test_revoke_with_terminate_stops_the_running_task(self, pool_app, pool, running, tmp_path):
        self.require(pool_app, pool, "terminate_task")
        marker = tmp_path / "started"
        result = self.send(pool_app, "hold", str(marker), 30)
        self.wait_for_file(marker)
        result.revoke(terminate=True)
        deadline = time.monotonic() + self.result_timeout
        while result.state != states.REVOKED:
            assert time.monotonic() < deadline, f"task still {result.state} after revoke"
            time.sleep(0.02)
        assert self.send(pool_app, "add", 1, 2).get(timeout=self.result_timeout) == 3

    # -- shutdown -----------------------------------------------------------------------

    def test_warm_stop_waits_for_the_running_task(self, pool_app, running, tmp_path):
        marker = tmp_path / "started"
        result = self.send(pool_app, "hold", str(marker), 0.5)
        deadline = time.monotonic() + self.result_timeout
        while not marker.exists():
            assert time.monotonic() < deadline, "the task did not start"
            time.sleep(0.01)

        running.stop()

        assert running.worker.stopped.is_set()
        assert result.state == states.SUCCESS
        assert result.get(timeout=1) == "finished"

    def test_stops_cleanly_when_idle(self, running):
        started = time.monotonic()
        running.stop()
        assert running.worker.stopped.is_set()
        assert time.monotonic() - started < 10
