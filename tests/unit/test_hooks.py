"""Every hook in hookspecs.py is called where its docstring says, and documented."""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import pytest

from kernel import App, hookimpl
from kernel.plugins import hookspecs
from kernel.plugins.manager import PluginManager
from kernel.plugins.specs import (
    ComponentSpec,
    ControlCommandSpec,
    SchedulerSpec,
)
from kernel.testing.pytest_plugin import start_worker, stop_worker

ROOT = Path(__file__).resolve().parents[2]
HOOK_NAMES = sorted(name for name in dir(hookspecs) if name.startswith("kernel_"))


class Recorder:
    """A plugin that records the lifecycle hooks it sees, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    @hookimpl
    def kernel_configure(self, app):
        self.calls.append(("configure", {"app": app}))

    @hookimpl
    def kernel_before_task_publish(self, app, name, body, headers, properties, routing):
        headers["x-traced-by"] = "recorder"
        self.calls.append(("before_publish", {"name": name, "queue": routing["queue"]}))

    @hookimpl
    def kernel_after_task_publish(self, app, name, task_id, routing):
        self.calls.append(("after_publish", {"task_id": task_id}))

    @hookimpl
    def kernel_task_prerun(self, task, task_id, args, kwargs, request):
        self.calls.append(("prerun", {"task_id": task_id, "args": args}))

    @hookimpl
    def kernel_task_postrun(self, task, task_id, args, kwargs, retval, state, request):
        self.calls.append(("postrun", {"state": state, "retval": retval}))

    @hookimpl
    def kernel_task_success(self, task, result, request):
        self.calls.append(
            ("success", {"result": result, "header": request.headers.get("x-traced-by")})
        )

    @hookimpl
    def kernel_task_failure(self, task, task_id, exception, traceback, request):
        self.calls.append(("failure", {"exception": exception, "traceback": traceback}))

    @hookimpl
    def kernel_task_retry(self, task, request, reason):
        self.calls.append(("retry", {"reason": reason}))

    @hookimpl
    def kernel_task_revoked(self, task, request, terminated, expired):
        self.calls.append(("revoked", {"expired": expired, "id": request.id}))

    @hookimpl(wrapper=True)
    def kernel_task_execute(self, request):
        self.calls.append(("execute_before", {"id": request.id}))
        outcome = yield
        self.calls.append(("execute_after", {"outcome": outcome}))
        return outcome

    @hookimpl
    def kernel_worker_init(self, worker):
        self.calls.append(("worker_init", {}))

    @hookimpl
    def kernel_worker_ready(self, worker):
        self.calls.append(("worker_ready", {}))

    @hookimpl
    def kernel_worker_shutdown(self, worker):
        self.calls.append(("worker_shutdown", {}))


@pytest.fixture
def recorder_app():
    recorder = Recorder()
    manager = PluginManager().load(environ={"KERNEL_PLUGIN_AUTOLOAD": "0"})
    manager.register(recorder, "recorder")
    unique = uuid.uuid4().hex[:8]
    app = App(
        "hooks",
        broker="memory://",
        backend=f"cache+memory://{unique}",
        task_default_queue=f"hooks.{unique}",
        plugins=manager,
    )
    yield app, recorder
    app.close()


def test_lifecycle_hooks_run_in_order_around_a_successful_task(recorder_app):
    app, recorder = recorder_app

    @app.task
    def add(x, y):
        return x + y

    worker, thread = start_worker(app)
    result = add.delay(1, 2)
    assert result.get(timeout=10) == 3
    stop_worker(worker, thread)
    names = recorder.names()
    assert names[:3] == ["configure", "worker_init", "worker_ready"]
    task_part = [
        n for n in names if n not in ("configure", "worker_init", "worker_ready", "worker_shutdown")
    ]
    assert task_part == [
        "before_publish",
        "after_publish",
        "prerun",
        "execute_before",
        "execute_after",
        "success",
        "postrun",
    ]
    assert names[-1] == "worker_shutdown"
    calls = dict(recorder.calls)
    assert calls["success"] == {"result": 3, "header": "recorder"}  # header added on publish
    assert calls["postrun"] == {"state": "SUCCESS", "retval": 3}
    assert calls["execute_after"] == {"outcome": 3}


def test_failure_hook_gets_the_exception_and_traceback(recorder_app):
    app, recorder = recorder_app

    @app.task
    def broken():
        raise OSError("disk on fire")

    result = broken.apply()
    assert result.failed()
    calls = dict(recorder.calls)
    assert isinstance(calls["failure"]["exception"], OSError)
    assert "disk on fire" in calls["failure"]["traceback"]
    assert calls["postrun"]["state"] == "FAILURE"


def test_retry_hook_sees_the_reason(recorder_app):
    app, recorder = recorder_app

    @app.task(bind=True, max_retries=1)
    def flaky(self):
        if self.request.retries == 0:
            raise self.retry(exc=TimeoutError("slow"), countdown=0)
        return "second time lucky"

    assert flaky.apply().get() == "second time lucky"
    assert isinstance(dict(recorder.calls)["retry"]["reason"], TimeoutError)


def test_revoked_hook_fires_for_an_expired_task(recorder_app):
    app, recorder = recorder_app

    @app.task
    def late():
        return "ran"

    result = late.apply_async(expires=0.01)
    time.sleep(0.05)  # let it expire before a worker exists
    worker, thread = start_worker(app)
    try:
        deadline = time.monotonic() + 10
        while result.state != "REVOKED" and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop_worker(worker, thread)
    assert result.state == "REVOKED"
    assert dict(recorder.calls)["revoked"] == {"expired": True, "id": result.id}
    assert "prerun" not in recorder.names()


def test_route_task_hook_chooses_the_queue(recorder_app):
    app, _ = recorder_app

    class Router:
        @hookimpl
        def kernel_route_task(self, app, name, args, kwargs, options):
            return {"queue": "routed-by-plugin"} if name.endswith("video") else None

    app.plugins.register(Router(), "router")
    seen = []

    class Watch:
        @hookimpl
        def kernel_after_task_publish(self, app, name, task_id, routing):
            seen.append((name, routing["queue"]))

    app.plugins.register(Watch(), "watch")
    app.send_task("proj.video", ())
    app.send_task("proj.audio", ())
    assert seen == [("proj.video", "routed-by-plugin"), ("proj.audio", app.conf.task_default_queue)]


def test_worker_components_start_in_requires_order_and_stop_in_reverse(recorder_app):
    app, _ = recorder_app
    events = []

    def component(name):
        class Component:
            def __init__(self, worker):
                self.worker = worker

            def start(self):
                events.append(f"start {name}")

            def stop(self):
                events.append(f"stop {name}")

        return Component

    class Components:
        @hookimpl
        def kernel_worker_components(self):
            return [
                ComponentSpec("metrics", component("metrics"), requires=["heartbeat"]),
                ComponentSpec("heartbeat", component("heartbeat"), requires=["consumer"]),
            ]

    app.plugins.register(Components(), "components")
    worker, thread = start_worker(app)
    stop_worker(worker, thread)
    assert events == ["start heartbeat", "start metrics", "stop metrics", "stop heartbeat"]


def test_worker_process_init_runs_in_each_prefork_child(tmp_path):
    marker = tmp_path / "children"

    class ChildInit:
        @hookimpl
        def kernel_worker_process_init(self, worker, pid):
            with open(marker, "a") as handle:
                handle.write(f"{pid} {os.getpid()}\n")

    manager = PluginManager().load(environ={"KERNEL_PLUGIN_AUTOLOAD": "0"})
    manager.register(ChildInit(), "child-init")
    url = f"sqlite:///{tmp_path}/k.sqlite3"
    app = App("children", broker=url, backend=url, plugins=manager)
    worker, thread = start_worker(app, pool="prefork", concurrency=2)
    try:
        deadline = time.monotonic() + 15
        while (
            not marker.exists() or len(marker.read_text().splitlines()) < 2
        ) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop_worker(worker, thread)
        app.close()
    lines = [line.split() for line in marker.read_text().splitlines()]
    assert len(lines) == 2
    assert all(pid == own and int(pid) != os.getpid() for pid, own in lines)


def test_scheduler_and_control_command_registrations_are_listed_and_found():
    class Extras:
        @hookimpl
        def kernel_schedulers(self):
            return [SchedulerSpec("cron-db", "my_pkg.scheduler:Scheduler")]

        @hookimpl
        def kernel_control_commands(self):
            return [ControlCommandSpec("ping_twice", lambda worker: "pong pong", kind="inspect")]

    manager = PluginManager().load(environ={"KERNEL_PLUGIN_AUTOLOAD": "0"})
    manager.register(Extras(), "extras")
    assert manager.named("schedulers", "cron-db").factory == "my_pkg.scheduler:Scheduler"
    assert manager.named("control_commands", "ping_twice").kind == "inspect"
    listed = {info.name: info.capabilities for info in manager.describe()}
    assert "scheduler:cron-db" in listed["extras"]
    assert "control command:ping_twice" in listed["extras"]


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hook_has_a_reference_entry_in_the_plugin_docs(hook):
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert re.search(rf"^#+ .*`?{hook}`?", docs, re.MULTILINE), f"docs/plugins.md lacks {hook}"


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hook_is_implemented_by_code_the_suite_runs(hook):
    """Implemented in a test, the example plugin, or a builtin that every test uses."""
    places = list((ROOT / "tests").rglob("test_*.py"))
    places += list((ROOT / "plugins").rglob("*.py"))
    places += list((ROOT / "kernel" / "plugins" / "builtin").glob("*.py"))
    assert any(f"def {hook}(" in path.read_text() for path in places), (
        f"nothing the test suite runs implements {hook}"
    )


def test_a_raising_prerun_or_revoked_hook_does_not_stop_tasks_or_the_worker(recorder_app):
    app, _ = recorder_app

    class Broken:
        @hookimpl
        def kernel_task_prerun(self, task, task_id, args, kwargs, request):
            raise RuntimeError("prerun plugin bug")

        @hookimpl
        def kernel_task_revoked(self, task, request, terminated, expired):
            raise RuntimeError("revoked plugin bug")

    app.plugins.register(Broken(), "broken")

    @app.task
    def echo(value):
        return value

    expired = echo.apply_async(("late",), expires=0.01)
    time.sleep(0.05)
    worker, thread = start_worker(app)
    try:
        assert echo.delay("ran").get(timeout=10) == "ran"
        deadline = time.monotonic() + 10
        while expired.state != "REVOKED" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert expired.state == "REVOKED"
        assert thread.is_alive()
    finally:
        stop_worker(worker, thread)


def test_component_with_unmet_requirement_fails_before_the_worker_starts(recorder_app):
    from kernel.exceptions import ConfigurationError
    from kernel.worker.worker import Worker

    app, recorder = recorder_app

    class Needy:
        @hookimpl
        def kernel_worker_components(self):
            return [ComponentSpec("exporter", object, requires=["metrics-server"])]

    app.plugins.register(Needy(), "needy")
    worker = Worker(app, pool="solo", install_signal_handlers=False)
    with pytest.raises(ConfigurationError, match="metrics-server"):
        worker.start()
    assert worker.pool is None  # nothing was started
    assert "worker_ready" not in recorder.names()
