"""Result expiry for every backend: ``Backend.cleanup()``, the ``kernel cleanup``
command and the builtin task ``celery.backend_cleanup``; and ``result_extended`` in
the key-value backends."""

from __future__ import annotations

import sys
import uuid

import pytest

from kernel import App, states
from kernel.backends.base import Backend
from kernel.cli.main import main
from kernel.plugins import manager as manager_module
from kernel.task import Context


@pytest.fixture(autouse=True)
def _restore_default_plugin_manager():
    """`main()` installs a process-wide plugin manager; put the old one back."""
    saved = manager_module._default
    yield
    manager_module.set_default_manager(saved)


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/results.sqlite3"


def new_id() -> str:
    return str(uuid.uuid4())


def test_the_default_cleanup_deletes_nothing():
    assert Backend(None, "none://").cleanup() == 0


def test_sqlite_cleanup_deletes_expired_results_only(url, kernel_plugins):
    short = App(
        "short", broker="memory://", backend=url, result_expires=1e-6, plugins=kernel_plugins
    )
    long = App("long", broker="memory://", backend=url, result_expires=3600, plugins=kernel_plugins)
    try:
        gone, kept = new_id(), new_id()
        short.backend.store_result(gone, 1, states.SUCCESS)
        long.backend.store_result(kept, 2, states.SUCCESS)
        assert long.backend.cleanup() == 1
        assert long.backend.get_task_meta(kept)["result"] == 2
    finally:
        short.close()
        long.close()


def run_kernel(capsys, monkeypatch, tmp_path, *args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, capsys.readouterr().out


def test_kernel_cleanup_command_runs_the_backends_cleanup(
    capsys, monkeypatch, tmp_path, url, kernel_plugins
):
    (tmp_path / "cleanup_app.py").write_text(
        f"from kernel import App\napp = App('cleanup_app', broker='memory://', backend={url!r})\n"
    )
    short = App(
        "short", broker="memory://", backend=url, result_expires=1e-6, plugins=kernel_plugins
    )
    try:
        short.backend.store_result(new_id(), 1, states.SUCCESS)
    finally:
        short.close()
    code, out = run_kernel(capsys, monkeypatch, tmp_path, "-A", "cleanup_app", "cleanup")
    sys.modules.pop("cleanup_app", None)
    assert code == 0
    assert "deleted 1 expired result(s) (older than 86400s)" in out


def test_kernel_cleanup_says_when_results_never_expire(capsys, monkeypatch, tmp_path, url):
    (tmp_path / "forever_app.py").write_text(
        "from kernel import App\n"
        f"app = App('forever_app', broker='memory://', backend={url!r}, result_expires=None)\n"
    )
    code, out = run_kernel(capsys, monkeypatch, tmp_path, "-A", "forever_app", "cleanup")
    sys.modules.pop("forever_app", None)
    assert code == 0
    assert "results never expire" in out


def test_backend_cleanup_is_a_builtin_task_of_every_app(url, kernel_plugins):
    app = App("tasks", broker="memory://", backend=url, plugins=kernel_plugins)
    short = App(
        "short", broker="memory://", backend=url, result_expires=1e-6, plugins=kernel_plugins
    )
    try:
        short.backend.store_result(new_id(), 1, states.SUCCESS)
        app.finalize()
        assert app.tasks["celery.backend_cleanup"].apply().get() == 1
    finally:
        app.close()
        short.close()


@pytest.mark.parametrize("backend_url", ["cache+memory://", "sqlite"])
def test_result_extended_stores_the_request_fields(backend_url, url, kernel_plugins):
    backend_url = url if backend_url == "sqlite" else backend_url
    app = App(
        "ext", broker="memory://", backend=backend_url, result_extended=True, plugins=kernel_plugins
    )
    try:
        task_id = new_id()
        request = Context(
            id=task_id,
            task="proj.add",
            args=(1, 2),
            kwargs={"k": 3},
            hostname="w1@host",
            retries=2,
            delivery_info={"routing_key": "math"},
        )
        app.backend.mark_as_done(task_id, 3, request=request)
        meta = app.backend.get_task_meta(task_id)
    finally:
        app.close()
    assert meta["result"] == 3
    assert (meta["name"], meta["args"], meta["kwargs"]) == ("proj.add", [1, 2], {"k": 3})
    assert (meta["worker"], meta["retries"], meta["queue"]) == ("w1@host", 2, "math")


def test_without_result_extended_no_request_fields_are_stored(url, kernel_plugins):
    app = App("plain", broker="memory://", backend=url, plugins=kernel_plugins)
    try:
        task_id = new_id()
        app.backend.mark_as_done(task_id, 3, request=Context(id=task_id, task="proj.add"))
        assert "name" not in app.backend.get_task_meta(task_id)
    finally:
        app.close()


def test_result_extended_records_a_started_task_given_its_request(url, kernel_plugins):
    app = App("ext", broker="memory://", backend=url, result_extended=True, plugins=kernel_plugins)
    try:
        task_id = new_id()
        request = Context(id=task_id, task="proj.slow", args=(5,), hostname="w2@host")
        app.backend.mark_as_started(task_id, {"hostname": "w2@host"}, request=request)
        meta = app.backend.get_task_meta(task_id)
    finally:
        app.close()
    assert meta["status"] == states.STARTED
    assert (meta["name"], meta["args"], meta["worker"]) == ("proj.slow", [5], "w2@host")
