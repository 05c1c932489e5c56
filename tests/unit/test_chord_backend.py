"""The chord hook of kernel's key-value backends, beyond the backend contract."""

from __future__ import annotations

import sqlite3
import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from kombu import Queue

from kernel import states
from kernel.app import App
from kernel.backends import document
from kernel.backends.base import Backend, KeyValueBackend
from kernel.backends.sqlite import SQLiteBackend
from kernel.exceptions import ChordError, ConfigurationError
from kernel.result import AsyncResult, GroupResult
from kernel.testing.pytest_plugin import start_worker, stop_worker


class PlainStore(KeyValueBackend):
    """A key-value backend without the atomic primitives chords need."""

    def __init__(self, app: Any, url: str) -> None:
        super().__init__(app, url)
        self.data: dict[str, Any] = {}

    def get(self, key):
        return self.data.get(key)

    def set(self, key, value, expires):
        self.data[key] = value

    def delete(self, key):
        self.data.pop(key, None)


def new_id() -> str:
    return str(uuid.uuid4())


def body_signature(name: str = "chords.tsum", **options: Any) -> dict:
    return {
        "task": name,
        "args": [],
        "kwargs": {},
        "options": {"task_id": new_id(), **options},
        "subtask_type": None,
        "immutable": False,
    }


def report(backend: Any, group_id: str, body: dict, task_id: str, state: str) -> None:
    request = SimpleNamespace(id=task_id, group=group_id, chord=body, root_id=None)
    backend.on_chord_part_return(request, state, None)


def finish_all(backend: Any, group_id: str, body: dict, values: dict[str, Any]) -> None:
    for task_id, value in values.items():
        backend.store_result(task_id, value, states.SUCCESS)
        report(backend, group_id, body, task_id, states.SUCCESS)


def _messages(app: App, queue_name: str) -> list[Any]:
    """Take every message waiting in ``queue_name`` of the app's memory broker."""
    messages = []
    with app.connection() as connection:
        queue = Queue(queue_name, routing_key=queue_name)(connection.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            messages.append(message)
    return messages


@pytest.fixture
def sqlite_app(tmp_path, kernel_plugins):
    app = App(
        "chords",
        broker="memory://",
        backend=f"sqlite:///{tmp_path / 'results.sqlite3'}",
        plugins=kernel_plugins,
    )
    yield app
    app.close()


# ----------------------------------------------------------------------- support


def test_builtin_backends_support_chords(kernel_app, sqlite_app):
    assert kernel_app.backend.supports_chords
    assert sqlite_app.backend.supports_chords


def test_backend_without_the_atomic_primitives_does_not_support_chords(kernel_app):
    assert not PlainStore(kernel_app, "plain://").supports_chords
    assert not Backend(kernel_app, "other://").supports_chords


def test_chord_on_an_unsupported_backend_fails_at_once_naming_it_without_password(kernel_app):
    backend = PlainStore(kernel_app, "plain://user:s3cret@db.example:5000/0")

    with pytest.raises(ConfigurationError) as raised:
        backend.apply_chord(new_id(), [new_id()], body_signature())
    message = str(raised.value)
    assert "plain://user:***@db.example:5000/0" in message
    assert "s3cret" not in message
    assert "PlainStore" in message and "sqlite:///" in message


def test_ensure_chords_supported_names_what_needs_them(kernel_app):
    with pytest.raises(ConfigurationError, match="^chunks needs a result backend"):
        PlainStore(kernel_app, "plain://").ensure_chords_supported("chunks")
    kernel_app.backend.ensure_chords_supported()


# ----------------------------------------------------------------------- ChordError


def test_chord_error_is_stored_under_celerys_name():
    encoded = document.encode_exception(ChordError("Dependency x raised ValueError('boom')"))
    assert encoded == {
        "exc_type": "ChordError",
        "exc_message": ["Dependency x raised ValueError('boom')"],
        "exc_module": "celery.exceptions",
    }


def test_chord_error_written_by_celery_reads_back_as_kernels():
    decoded = document.decode_exception(
        {
            "exc_type": "ChordError",
            "exc_message": ["Dependency 4986dd5a raised ValueError('boom')"],
            "exc_module": "celery.exceptions",
        }
    )
    assert type(decoded) is ChordError
    assert str(decoded) == "Dependency 4986dd5a raised ValueError('boom')"


# ----------------------------------------------------------------------- firing


def test_body_runs_on_a_worker_with_the_header_values(kernel_app):
    @kernel_app.task(name="chords.tsum")
    def tsum(values):
        return sum(values)

    backend = kernel_app.backend
    group_id, header = new_id(), [new_id() for _ in range(3)]
    body = body_signature()
    backend.apply_chord(group_id, header, body)
    worker, thread = start_worker(kernel_app)
    try:
        finish_all(backend, group_id, body, dict(zip(header, [1, 2, 3], strict=True)))
        assert AsyncResult(body["options"]["task_id"], kernel_app).get(timeout=10) == 6
    finally:
        stop_worker(worker, thread)


def test_chord_keys_are_gone_once_it_fired_but_the_claim_stays(kernel_app):
    backend = kernel_app.backend
    group_id, header = new_id(), [new_id(), new_id()]
    body = body_signature(queue=f"q.{new_id()}")
    backend.apply_chord(group_id, header, body)
    finish_all(backend, group_id, body, {header[0]: 1, header[1]: 2})

    assert backend.restore_group(group_id) is None
    assert backend.get(document.chord_size_key(group_id)) is None
    assert backend.get(document.chord_parts_key(group_id)) is None
    assert backend.get(document.chord_claim_key(group_id)) == "done"


@pytest.mark.parametrize("size_in_body", [False, True], ids=["applied", "chord_size"])
def test_nested_group_in_the_header_gives_a_nested_list(kernel_app, size_in_body):
    backend = kernel_app.backend
    group_id, first, second, third = (new_id() for _ in range(4))
    header = GroupResult(
        group_id,
        [
            AsyncResult(first, kernel_app),
            GroupResult(
                new_id(), [AsyncResult(second, kernel_app), AsyncResult(third, kernel_app)]
            ),
        ],
    )
    queue = f"q.{new_id()}"
    body = body_signature(queue=queue)
    if size_in_body:  # Celery's chord_size in the body, and the group saved by the client
        body["chord_size"] = 3
        backend.save_group(group_id, header)
    else:
        backend.apply_chord(group_id, header, body)
    finish_all(backend, group_id, body, {third: 3, first: 1, second: 2})

    [message] = _messages(kernel_app, queue)
    assert message.decode()[0] == [[1, [2, 3]]]


def test_body_that_cannot_be_sent_fails_with_a_callback_error(kernel_app):
    backend = kernel_app.backend
    group_id, header = new_id(), [new_id()]
    body = body_signature(not_an_option=True)
    backend.apply_chord(group_id, header, body)
    finish_all(backend, group_id, body, {header[0]: 1})

    body_result = AsyncResult(body["options"]["task_id"], kernel_app)
    with pytest.raises(ChordError, match="^Callback error: TypeError"):
        body_result.get(timeout=1)
    assert "not_an_option" in body_result.traceback


def test_failed_header_fails_a_group_body_and_the_steps_chained_after_the_body(kernel_app):
    backend = kernel_app.backend
    members = [body_signature(), body_signature()]
    after = body_signature()
    body = {
        "task": "celery.group",
        "args": [],
        "kwargs": {"tasks": members},
        "options": {"task_id": new_id(), "chain": [after]},
        "subtask_type": "group",
        "immutable": False,
    }
    group_id, header = new_id(), [new_id()]
    backend.apply_chord(group_id, header, body)
    backend.mark_as_failure(header[0], ValueError("boom"))
    report(backend, group_id, body, header[0], states.FAILURE)

    for sig in [body, *members, after]:
        result = AsyncResult(sig["options"]["task_id"], kernel_app)
        with pytest.raises(ChordError, match=rf"Dependency {header[0]} raised ValueError"):
            result.get(timeout=1)
        assert "ValueError" in result.traceback and "ChordError" in result.traceback


def test_chord_whose_completing_worker_died_fires_when_its_task_is_redelivered(
    kernel_app, monkeypatch
):
    backend = kernel_app.backend
    backend.chord_claim_timeout = 0.2
    group_id, header = new_id(), [new_id(), new_id()]
    queue = f"q.{new_id()}"
    body = body_signature(queue=queue)
    backend.apply_chord(group_id, header, body)
    finish_all(backend, group_id, body, {header[0]: 1})

    backend.store_result(header[1], 2, states.SUCCESS)
    with monkeypatch.context() as patch:  # the worker dies between claiming and sending
        patch.setattr(backend, "_fire_chord", lambda *args: (_ for _ in ()).throw(SystemExit))
        with pytest.raises(SystemExit):
            report(backend, group_id, body, header[1], states.SUCCESS)

    began = time.monotonic()
    report(backend, group_id, body, header[1], states.SUCCESS)  # redelivered at once
    assert time.monotonic() - began >= 0.1  # it waited for the dead worker's claim
    assert len(_messages(kernel_app, queue)) == 1  # then fired the chord itself
    report(backend, group_id, body, header[1], states.SUCCESS)  # later duplicates: nothing
    assert _messages(kernel_app, queue) == []


# ----------------------------------------------------------------------- SQLite storage


def test_sqlite_results_file_of_schema_1_gains_the_chord_tables(tmp_path, kernel_plugins):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.executescript(
            """
            CREATE TABLE kernel_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL);
            CREATE TABLE kernel_results (key TEXT PRIMARY KEY, value BLOB NOT NULL,
                                         expires_at REAL);
            INSERT INTO kernel_schema VALUES ('results', 1);
            """
        )
    app = App("old", broker="memory://", backend=f"sqlite:///{path}", plugins=kernel_plugins)
    try:
        app.backend.store_result("kept", 1, states.SUCCESS)
        assert app.backend.add_to_set("parts", "a", None) == 1
        assert app.AsyncResult("kept").get(timeout=1) == 1
    finally:
        app.close()
    with sqlite3.connect(path) as connection:
        version = connection.execute(
            "SELECT version FROM kernel_schema WHERE component = 'results'"
        ).fetchone()
    assert version == (2,)


def test_sqlite_set_counts_each_member_once_and_starts_again_after_expiry(sqlite_app):
    backend: SQLiteBackend = sqlite_app.backend
    assert backend.add_to_set("parts", "a", 0.2) == 1
    assert backend.add_to_set("parts", "a", 0.2) == 1
    assert backend.add_to_set("parts", "b", 0.2) == 2

    time.sleep(0.3)  # a time-based expiry, not an event to wait for
    assert backend.add_to_set("parts", "c", None) == 1


def test_sqlite_cleanup_deletes_expired_sets(sqlite_app):
    backend: SQLiteBackend = sqlite_app.backend
    backend.add_to_set("expiring", "a", 0.1)
    backend.add_to_set("kept", "a", None)

    time.sleep(0.2)  # a time-based expiry, not an event to wait for
    backend.cleanup()
    connection = backend.database.connection()
    assert connection.execute("SELECT DISTINCT key FROM kernel_sets").fetchall() == [("kept",)]
    assert connection.execute("SELECT key FROM kernel_set_sizes").fetchall() == [("kept",)]


def test_sqlite_set_if_absent_refuses_a_live_value_and_takes_an_expired_one(sqlite_app):
    backend: SQLiteBackend = sqlite_app.backend
    assert backend.set_if_absent("claim", "first", 0.1)
    assert not backend.set_if_absent("claim", "second", 0.1)
    assert backend.get("claim") == "first"

    deadline = time.monotonic() + 5
    while not backend.set_if_absent("claim", "third", None):
        assert time.monotonic() < deadline, "expired value never released"
        time.sleep(0.02)
    assert backend.get("claim") == "third"


def test_a_part_whose_report_failed_is_run_and_reported_again(kernel_app, monkeypatch):
    """The result backend failing to count a header task must not lose the chord: the
    worker returns the message, the task runs again and its report counts."""
    from kernel import chord

    @kernel_app.task(name="chords.double")
    def double(x):
        return 2 * x

    @kernel_app.task(name="chords.total")
    def total(values):
        return sum(values)

    backend = kernel_app.backend
    real = type(backend).on_chord_part_return
    failures = iter([ConnectionError("result backend unreachable")])

    def flaky(self, request, state, result):
        error = next(failures, None)
        if error is not None:
            raise error
        return real(self, request, state, result)

    monkeypatch.setattr(type(backend), "on_chord_part_return", flaky)
    worker, thread = start_worker(kernel_app)
    try:
        result = chord([double.s(1), double.s(2)])(total.s())
        assert result.get(timeout=10) == 6
    finally:
        stop_worker(worker, thread)
    assert worker.counts["requeued"] == 1
    assert next(failures, None) is None  # the failure did happen
