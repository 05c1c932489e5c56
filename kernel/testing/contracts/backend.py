"""The result backend contract: what the kernel and its users rely on from a backend.

Use it from a plugin's tests::

    import pytest
    from kernel.testing.contracts import BackendContract


    class TestMyBackend(BackendContract):
        cross_process = True  # results stored by one process are read by another

        @pytest.fixture
        def backend_url(self, tmp_path):
            return f"my+db://{tmp_path}/results"

The contract builds ``App(broker="memory://", backend=backend_url, plugins=...)`` and
tests ``app.backend``. Plugins come from ``PluginManager().load()`` (builtins, entry
points, ``KERNEL_PLUGINS``); override the ``backend_plugins`` fixture to register your
plugin another way. The cross-process test starts a fresh Python process that loads
plugins the same way, so it needs your plugin installed (an entry point) or named in
``KERNEL_PLUGINS``.

Every test uses its own task ids (uuid4), and every wait is bounded.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from kernel import states
from kernel.app import App
from kernel.exceptions import TaskRevokedError, TimeoutError
from kernel.plugins.manager import PluginManager
from kernel.result import AsyncResult
from kernel.task import Context

#: The fields of Celery's stored result document.
CELERY_FIELDS = frozenset({"status", "result", "traceback", "children", "date_done", "task_id"})

#: JSON-able values every backend must store and return unchanged.
JSON_VALUES = [
    pytest.param({"answer": 42, "nested": {"list": [1, 2.5, None, True]}}, id="dict"),
    pytest.param([1, "two", 3.0, False, None, [], {}], id="list"),
    pytest.param("ünïcödé ✓ 漢字 🚀", id="unicode"),
    pytest.param(None, id="none"),
    pytest.param(0, id="zero"),
    pytest.param(2**53, id="big-int"),
    pytest.param(-1.5, id="float"),
    pytest.param("", id="empty-string"),
]

CROSS_PROCESS_SCRIPT = textwrap.dedent(
    """
    import os
    import sys

    from kernel.app import App
    from kernel.plugins.manager import PluginManager

    url, task_id = sys.argv[1], sys.argv[2]
    app = App("backend-contract-child", broker="memory://", backend=url,
              plugins=PluginManager().load())
    app.backend.store_result(task_id, {"from": "child", "pid": os.getpid()}, "SUCCESS")
    app.close()
    """
)


class ContractError(Exception):
    """An importable exception class the failure tests store and read back."""


def _failure() -> tuple[BaseException, str]:
    """A raised exception and its real traceback text."""
    try:
        raise ContractError("disk full", 28)
    except ContractError as exc:
        return exc, traceback.format_exc()


def _wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class BackendContract:
    """Behaviour every result backend provides; subclass as ``TestXxx``."""

    #: True when a result stored by one process can be read by another.
    cross_process: bool = False
    #: ``result_expires`` (seconds) used by the expiry test.
    expires_after: float = 0.5
    #: Seconds the expiry test waits for the entry to disappear.
    expiry_timeout: float = 10.0
    #: Seconds to wait for a result that should arrive.
    wait_timeout: float = 10.0
    #: Threads and results per thread of the concurrency test.
    writer_threads: int = 8
    results_per_writer: int = 50

    # -- fixtures -----------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def backend_plugins(cls) -> PluginManager:
        """Plugins the contract's apps use; override to register a plugin by hand."""
        return PluginManager().load()

    def make_app(self, backend_url: str, plugins: PluginManager, **settings: Any) -> App:
        return App(
            "backend-contract", broker="memory://", backend=backend_url, plugins=plugins, **settings
        )

    @pytest.fixture
    def backend_app(self, backend_url: str, backend_plugins: PluginManager) -> Iterator[App]:
        app = self.make_app(backend_url, backend_plugins)
        yield app
        app.close()

    @pytest.fixture
    def backend(self, backend_app: App) -> Any:
        return backend_app.backend

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())

    # -- reading and storing --------------------------------------------------------------

    def test_unknown_task_id_reads_pending(self, backend):
        task_id = self.new_id()
        meta = backend.get_task_meta(task_id)
        assert meta["status"] == states.PENDING
        assert meta["result"] is None
        assert meta["date_done"] is None

    @pytest.mark.parametrize("value", JSON_VALUES)
    def test_success_value_round_trips(self, backend, value):
        task_id = self.new_id()
        backend.store_result(task_id, value, states.SUCCESS)

        meta = backend.get_task_meta(task_id)
        assert meta["status"] == states.SUCCESS
        assert meta["result"] == value

    def test_stored_document_uses_celery_field_names(self, backend):
        task_id = self.new_id()
        backend.store_result(task_id, {"n": 1}, states.SUCCESS)

        meta = backend.get_task_meta(task_id)
        assert set(meta) >= CELERY_FIELDS, f"missing fields {CELERY_FIELDS - set(meta)}"
        assert meta["task_id"] == task_id
        assert meta["status"] == states.SUCCESS
        assert meta["result"] == {"n": 1}
        assert meta["traceback"] is None
        assert meta["children"] == []

    @pytest.mark.parametrize("state", [states.SUCCESS, states.FAILURE, states.REVOKED])
    def test_date_done_is_an_iso_time_for_ready_states(self, backend, state):
        task_id = self.new_id()
        before = datetime.now(timezone.utc)
        value = ValueError("x") if state != states.SUCCESS else 1
        backend.store_result(task_id, value, state)

        date_done = backend.get_task_meta(task_id)["date_done"]
        assert isinstance(date_done, str), f"date_done is {date_done!r}, not an ISO string"
        parsed = datetime.fromisoformat(date_done.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        assert (
            before - timedelta(seconds=5)
            <= parsed
            <= datetime.now(timezone.utc) + timedelta(seconds=5)
        )

    def test_date_done_is_empty_for_unready_states(self, backend):
        task_id = self.new_id()
        backend.store_result(task_id, {"hostname": "w1"}, states.STARTED)
        assert backend.get_task_meta(task_id)["date_done"] is None

    def test_children_recorded_by_the_request_are_stored(self, backend_app, backend):
        task_id, child_id = self.new_id(), self.new_id()
        request = Context(id=task_id, children=[[[child_id, None], None]])
        backend.store_result(task_id, 1, states.SUCCESS, request=request)

        result = AsyncResult(task_id, backend_app)
        assert [child.id for child in result.children] == [child_id]

    # -- failures -----------------------------------------------------------------------

    def test_failure_is_stored_as_exc_type_message_and_module(self, backend):
        task_id = self.new_id()
        exc, text = _failure()
        backend.mark_as_failure(task_id, exc, text)

        meta = backend.get_task_meta(task_id)
        assert meta["status"] == states.FAILURE
        assert meta["result"] == {
            "exc_type": "ContractError",
            "exc_message": ["disk full", 28],
            "exc_module": __name__,
        }
        assert meta["traceback"] == text

    def test_failure_reads_back_as_same_exception_class_with_traceback(self, backend_app, backend):
        task_id = self.new_id()
        exc, text = _failure()
        backend.mark_as_failure(task_id, exc, text)

        result = AsyncResult(task_id, backend_app)
        assert result.failed()
        assert type(result.result) is ContractError
        assert result.result.args == ("disk full", 28)
        assert result.traceback == text
        assert "raise ContractError" in result.traceback
        with pytest.raises(ContractError, match="disk full"):
            result.get(timeout=self.wait_timeout)

    def test_revoked_reads_back_as_task_revoked_error(self, backend_app, backend):
        task_id = self.new_id()
        backend.mark_as_revoked(task_id, "expired")

        result = AsyncResult(task_id, backend_app)
        assert result.state == states.REVOKED
        assert isinstance(result.result, TaskRevokedError)

    # -- states -------------------------------------------------------------------------

    def test_custom_state_with_meta_round_trips(self, backend_app, backend):
        task_id = self.new_id()
        backend.store_result(task_id, {"current": 3, "total": 10}, "PROGRESS")

        meta = backend.get_task_meta(task_id)
        assert meta["status"] == "PROGRESS"
        assert meta["result"] == {"current": 3, "total": 10}
        result = AsyncResult(task_id, backend_app)
        assert result.state == "PROGRESS"
        assert result.info == {"current": 3, "total": 10}
        assert not result.ready()

    def test_overwriting_a_state_keeps_the_latest(self, backend):
        task_id = self.new_id()
        backend.mark_as_started(task_id, {"hostname": "w1"})
        assert backend.get_task_meta(task_id)["status"] == states.STARTED

        backend.mark_as_done(task_id, "done")
        meta = backend.get_task_meta(task_id)
        assert meta["status"] == states.SUCCESS
        assert meta["result"] == "done"

    def test_forget_makes_the_result_pending_again(self, backend):
        task_id = self.new_id()
        backend.store_result(task_id, 1, states.SUCCESS)
        backend.forget(task_id)

        assert backend.get_task_meta(task_id)["status"] == states.PENDING

    def test_forget_of_an_unknown_id_is_harmless(self, backend):
        backend.forget(self.new_id())

    def test_results_disappear_after_result_expires(self, backend_url, backend_plugins):
        app = self.make_app(backend_url, backend_plugins, result_expires=self.expires_after)
        try:
            task_id = self.new_id()
            app.backend.store_result(task_id, "short-lived", states.SUCCESS)
            assert app.backend.get_task_meta(task_id)["status"] == states.SUCCESS

            gone = _wait_until(
                lambda: app.backend.get_task_meta(task_id)["status"] == states.PENDING,
                self.expiry_timeout,
            )
            assert gone, (
                f"result still readable {self.expiry_timeout}s after it expired "
                f"(result_expires={self.expires_after})"
            )
        finally:
            app.close()

    # -- waiting ------------------------------------------------------------------------

    def test_wait_for_pending_id_times_out(self, backend):
        timeout = 0.3
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            backend.wait_for(self.new_id(), timeout=timeout, interval=0.02)
        elapsed = time.monotonic() - started
        assert timeout <= elapsed < timeout + 3

    def test_wait_for_returns_when_another_thread_stores_the_result(self, backend):
        task_id = self.new_id()
        writer = threading.Timer(0.1, backend.store_result, (task_id, "late", states.SUCCESS))
        writer.start()
        try:
            meta = backend.wait_for(task_id, timeout=self.wait_timeout, interval=0.02)
        finally:
            writer.join(self.wait_timeout)
        assert meta["status"] == states.SUCCESS
        assert meta["result"] == "late"

    # -- concurrency --------------------------------------------------------------------

    def test_concurrent_writers_lose_no_result(self, backend):
        prefix = uuid.uuid4().hex
        start = threading.Barrier(self.writer_threads, timeout=self.wait_timeout)
        errors: list[BaseException] = []

        def write(writer: int) -> None:
            try:
                start.wait()
                for n in range(self.results_per_writer):
                    backend.store_result(f"{prefix}-{writer}-{n}", [writer, n], states.SUCCESS)
            except BaseException as exc:  # reported by the test below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(w,)) for w in range(self.writer_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.wait_timeout * 3)
        assert not any(t.is_alive() for t in threads), "writer threads did not finish"
        assert errors == []

        missing = [
            (w, n)
            for w in range(self.writer_threads)
            for n in range(self.results_per_writer)
            if backend.get_task_meta(f"{prefix}-{w}-{n}").get("result") != [w, n]
        ]
        assert missing == []

    # -- processes ----------------------------------------------------------------------

    def test_result_stored_by_another_process_is_read_here(self, backend_url, backend):
        if not self.cross_process:
            pytest.skip(f"{type(self).__name__}.cross_process is False")
        task_id = self.new_id()
        child = subprocess.run(
            [sys.executable, "-c", CROSS_PROCESS_SCRIPT, backend_url, task_id],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert child.returncode == 0, f"child process failed:\n{child.stderr}"

        meta = backend.wait_for(task_id, timeout=self.wait_timeout)
        assert meta["status"] == states.SUCCESS
        assert meta["result"]["from"] == "child"
