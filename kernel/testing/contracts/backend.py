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

Groups (``save_group``/``restore_group``/``delete_group``) are tested on every
backend. The chord tests run when ``backend.supports_chords`` is true and are skipped
with the reason otherwise. They report header tasks the way a worker does (store the
result, then ``on_chord_part_return(request, state, result)``) and read the chord's
body message back from the app's in-process memory broker, in a queue of the test's
own; the cross-process chord test starts ``chord_processes`` Python processes that each
report the same last parts at once and say how many bodies they sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import kombu
import pytest

from kernel import states
from kernel.app import App
from kernel.exceptions import ChordError, TaskRevokedError, TimeoutError
from kernel.plugins.manager import PluginManager
from kernel.result import AsyncResult, GroupResult
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


CHORD_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import sys
    import time
    from pathlib import Path
    from types import SimpleNamespace

    import kombu

    from kernel.app import App
    from kernel.plugins.manager import PluginManager

    url, spec_path, ready_path, go_path = sys.argv[1:5]
    spec = json.loads(Path(spec_path).read_text())
    app = App("backend-contract-chord", broker="memory://", backend=url,
              plugins=PluginManager().load())
    backend = app.backend
    backend.get_task_meta(spec["part_ids"][0])  # connect before the start signal
    Path(ready_path).touch()
    deadline = time.monotonic() + 60
    while not os.path.exists(go_path):
        if time.monotonic() > deadline:
            sys.exit("no start signal within 60s")
        time.sleep(0.005)
    for part_id in spec["part_ids"]:
        request = SimpleNamespace(id=part_id, group=spec["group_id"], chord=spec["body"],
                                  root_id=None)
        backend.on_chord_part_return(request, "SUCCESS", None)
    sent = 0
    with app.connection() as connection:
        queue = kombu.Queue(spec["queue"], routing_key=spec["queue"])(connection.default_channel)
        while queue.get(no_ack=True) is not None:
            sent += 1
    print(sent)
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


def _sent_messages(app: App, queue_name: str) -> list[Any]:
    """Take every message waiting in ``queue_name`` of the app's broker."""
    messages = []
    with app.connection() as connection:
        queue = kombu.Queue(queue_name, routing_key=queue_name)(connection.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            messages.append(message)
    return messages


class _Chord:
    """A chord applied to the backend under test, with helpers that play the worker."""

    def __init__(
        self, app: App, backend: Any, size: int, link_error: bool = False, apply: bool = True
    ) -> None:
        self.app, self.backend = app, backend
        self.group_id = str(uuid.uuid4())
        self.header_ids = [str(uuid.uuid4()) for _ in range(size)]
        self.body_id = str(uuid.uuid4())
        self.queue = f"backend-contract.{uuid.uuid4().hex}"
        self.errback_queue = f"{self.queue}.errbacks"
        options: dict[str, Any] = {"task_id": self.body_id, "queue": self.queue}
        if link_error:
            options["link_error"] = [
                {
                    "task": "backend_contract.on_chord_error",
                    "args": [],
                    "kwargs": {},
                    "options": {"queue": self.errback_queue},
                    "subtask_type": None,
                    "immutable": False,
                }
            ]
        self.body = {
            "task": "backend_contract.chord_body",
            "args": [],
            "kwargs": {},
            "options": options,
            "subtask_type": None,
            "immutable": False,
        }
        if apply:
            self.backend.apply_chord(self.group_id, list(self.header_ids), self.body)

    def request(self, task_id: str) -> SimpleNamespace:
        return SimpleNamespace(
            id=task_id, group=self.group_id, chord=self.body, root_id=self.header_ids[0]
        )

    def finish(self, index: int, value: Any = None, state: str = states.SUCCESS) -> None:
        """Store header task ``index``'s outcome, as the worker does, and report it."""
        task_id = self.header_ids[index]
        if value is None:
            value = index
        self.backend.store_result(task_id, value, state)
        self.report(index, value, state)

    def report(self, index: int, value: Any = None, state: str = states.SUCCESS) -> None:
        self.backend.on_chord_part_return(self.request(self.header_ids[index]), state, value)

    def bodies(self) -> list[Any]:
        return _sent_messages(self.app, self.queue)

    def errbacks(self) -> list[Any]:
        return _sent_messages(self.app, self.errback_queue)


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
    #: Threads, and processes (``cross_process`` backends), reporting a chord's last parts
    #: at once.
    chord_threads: int = 8
    chord_processes: int = 4

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

    # -- groups -------------------------------------------------------------------------

    def test_saved_group_is_restored_with_its_members_in_order(self, backend_app, backend):
        group_id = self.new_id()
        member_ids = [self.new_id() for _ in range(5)]
        saved = GroupResult(group_id, [AsyncResult(i, backend_app) for i in member_ids])
        backend.save_group(group_id, saved)

        restored = backend.restore_group(group_id)
        assert isinstance(restored, GroupResult)
        assert restored.id == group_id
        assert [r.id for r in restored.results] == member_ids
        assert restored == saved

    def test_restored_group_reads_its_members_results(self, backend_app, backend):
        group_id, member_ids = self.new_id(), [self.new_id(), self.new_id()]
        GroupResult(group_id, [AsyncResult(i, backend_app) for i in member_ids]).save(backend)
        for n, member_id in enumerate(member_ids):
            backend.store_result(member_id, n * 10, states.SUCCESS)

        restored = GroupResult.restore(group_id, app=backend_app, backend=backend)
        assert restored.get(timeout=self.wait_timeout) == [0, 10]

    def test_nested_group_is_restored_as_a_group_inside_the_group(self, backend_app, backend):
        group_id, inner_id, first, second = (self.new_id() for _ in range(4))
        inner = GroupResult(inner_id, [AsyncResult(second, backend_app)])
        backend.save_group(
            group_id, GroupResult(group_id, [AsyncResult(first, backend_app), inner])
        )

        restored = backend.restore_group(group_id)
        assert restored.results[0] == AsyncResult(first, backend_app)
        assert isinstance(restored.results[1], GroupResult)
        assert restored.results[1].id == inner_id
        assert [r.id for r in restored.results[1].results] == [second]

    def test_restore_of_an_unknown_group_is_none(self, backend):
        assert backend.restore_group(self.new_id()) is None

    def test_deleted_group_is_not_restored(self, backend_app, backend):
        group_id = self.new_id()
        backend.save_group(
            group_id, GroupResult(group_id, [AsyncResult(self.new_id(), backend_app)])
        )
        backend.delete_group(group_id)
        assert backend.restore_group(group_id) is None

    def test_saved_group_disappears_after_result_expires(self, backend_url, backend_plugins):
        app = self.make_app(backend_url, backend_plugins, result_expires=self.expires_after)
        try:
            group_id = self.new_id()
            app.backend.save_group(
                group_id, GroupResult(group_id, [AsyncResult(self.new_id(), app)])
            )
            assert app.backend.restore_group(group_id) is not None
            gone = _wait_until(
                lambda: app.backend.restore_group(group_id) is None, self.expiry_timeout
            )
            assert gone, f"group still restorable {self.expiry_timeout}s after it expired"
        finally:
            app.close()

    def test_many_results_are_read_in_the_order_asked(self, backend):
        task_ids = [self.new_id() for _ in range(1200)]
        for n, task_id in enumerate(task_ids[::2]):
            backend.store_result(task_id, n, states.SUCCESS)

        metas = backend.get_task_metas(task_ids)
        assert [m["task_id"] for m in metas] == task_ids
        assert [m["result"] for m in metas[::2]] == list(range(600))
        assert {m["status"] for m in metas[1::2]} == {states.PENDING}

    # -- chords -------------------------------------------------------------------------

    @pytest.fixture
    def chord(self, backend_app, backend) -> Any:
        """Builds chords: ``chord(size)`` applies one and returns a handle."""
        if not backend.supports_chords:
            pytest.skip(f"{type(backend).__name__}.supports_chords is False")

        @backend_app.task(name="backend_contract.chord_body")
        def chord_body(values):
            return values

        return lambda size, **options: _Chord(backend_app, backend, size, **options)

    def test_chord_body_is_sent_with_the_header_values_in_member_order(self, chord):
        c = chord(3)
        for index, value in [(2, "c"), (0, "a")]:
            c.finish(index, value)
            assert c.bodies() == [], "the body was sent before every header task finished"
        c.finish(1, "b")

        [message] = c.bodies()
        args, kwargs, _embed = message.decode()
        assert args == [["a", "b", "c"]]
        assert message.headers["id"] == c.body_id
        assert message.headers["task"] == "backend_contract.chord_body"
        assert message.headers["parent_id"] == c.header_ids[1]
        assert message.headers["root_id"] == c.header_ids[0]

    def test_chord_part_reported_twice_is_counted_once(self, chord):
        c = chord(2)
        c.finish(0)
        c.report(0)  # the same header task, redelivered and run again
        assert c.bodies() == [], "a duplicate report counted as another header task"

        c.finish(1)
        assert len(c.bodies()) == 1

    def test_late_duplicate_report_after_the_chord_fired_sends_nothing(self, chord, backend):
        c = chord(2)
        c.finish(0)
        c.finish(1)
        assert len(c.bodies()) == 1

        c.report(0)
        c.report(1)
        assert c.bodies() == []
        assert backend.get_task_meta(c.body_id)["status"] == states.PENDING

    def test_chord_body_is_sent_once_when_threads_report_the_last_parts_at_once(
        self, chord, backend
    ):
        c = chord(self.chord_threads * 2)
        for index in range(self.chord_threads):
            c.finish(index)
        last = list(range(self.chord_threads, self.chord_threads * 2))
        for index in last:  # stored before anyone reports, as by workers finishing together
            backend.store_result(c.header_ids[index], index, states.SUCCESS)
        start = threading.Barrier(self.chord_threads, timeout=self.wait_timeout)
        errors: list[BaseException] = []

        def report_all(offset: int) -> None:
            try:
                start.wait()
                # every thread reports every last part (redeliveries), each in its own order
                for index in last[offset:] + last[:offset]:
                    c.report(index)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [
            threading.Thread(target=report_all, args=(n,)) for n in range(self.chord_threads)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.wait_timeout * 3)
        assert not any(t.is_alive() for t in threads), "reporting threads did not finish"
        assert errors == []

        bodies = c.bodies()
        assert len(bodies) == 1, f"the chord body was sent {len(bodies)} times"
        assert bodies[0].decode()[0] == [list(range(self.chord_threads * 2))]

    def test_chord_body_is_sent_once_when_processes_report_the_last_parts_at_once(
        self, chord, backend, backend_url, tmp_path
    ):
        if not self.cross_process:
            pytest.skip(f"{type(self).__name__}.cross_process is False")
        processes = self.chord_processes
        c = chord(processes * 2)
        for index in range(processes):
            c.finish(index)
        last = list(range(processes, processes * 2))
        for index in last:
            backend.store_result(c.header_ids[index], index, states.SUCCESS)
        go = tmp_path / "go"
        children = []
        for n in range(processes):
            order = last[n:] + last[:n]
            spec = tmp_path / f"chord-{n}.json"
            spec.write_text(
                json.dumps(
                    {
                        "group_id": c.group_id,
                        "body": c.body,
                        "queue": c.queue,
                        "part_ids": [c.header_ids[i] for i in order],
                    }
                )
            )
            ready = tmp_path / f"ready-{n}"
            children.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        CHORD_PROCESS_SCRIPT,
                        backend_url,
                        str(spec),
                        str(ready),
                        str(go),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        try:
            all_ready = _wait_until(
                lambda: all((tmp_path / f"ready-{n}").exists() for n in range(processes)), 60
            )
            go.touch()
            outputs = [child.communicate(timeout=60) for child in children]
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        assert all_ready, "the reporting processes did not start within 60s"
        for child, (_out, err) in zip(children, outputs, strict=True):
            assert child.returncode == 0, f"reporting process failed:\n{err}"
        sent = [int(out.strip() or 0) for out, _err in outputs]
        assert sum(sent) == 1, f"bodies sent per process: {sent}"

    def test_failed_header_task_fails_the_body_with_a_chord_error_naming_it(
        self, chord, backend_app, backend
    ):
        c = chord(3, link_error=True)
        c.finish(0)
        exc, text = _failure()
        backend.mark_as_failure(c.header_ids[1], exc, text)
        c.report(1, exc, states.FAILURE)
        c.finish(2)

        assert c.bodies() == [], "the body was sent although a header task failed"
        meta = backend.get_task_meta(c.body_id)
        assert meta["status"] == states.FAILURE
        assert meta["result"]["exc_type"] == "ChordError"
        assert meta["result"]["exc_module"] == "celery.exceptions"
        expected = f"Dependency {c.header_ids[1]} raised ContractError('disk full', 28)"
        assert meta["result"]["exc_message"] == [expected]
        with pytest.raises(ChordError, match="Dependency"):
            AsyncResult(c.body_id, backend_app).get(timeout=self.wait_timeout)

        [errback] = c.errbacks()
        assert errback.headers["task"] == "backend_contract.on_chord_error"
        assert errback.decode()[0] == [c.body_id]

    def test_revoked_header_task_fails_the_body(self, chord, backend):
        c = chord(2)
        backend.mark_as_revoked(c.header_ids[0], "revoked")
        c.report(0, None, states.REVOKED)
        c.finish(1)

        assert c.bodies() == []
        meta = backend.get_task_meta(c.body_id)
        assert meta["status"] == states.FAILURE
        assert meta["result"]["exc_type"] == "ChordError"
        assert c.header_ids[0] in meta["result"]["exc_message"][0]

    def test_part_of_a_chord_the_backend_does_not_know_fails_the_body(self, chord, backend):
        c = chord(2, apply=False)  # never applied here, or its group expired
        c.finish(0)

        meta = backend.get_task_meta(c.body_id)
        assert meta["status"] == states.FAILURE
        assert meta["result"]["exc_message"] == [f"GroupResult {c.group_id} no longer exists"]
        assert c.bodies() == []
