"""Remote control end to end: ``app.control`` clients and ``ControlNode`` on real brokers.

Each node runs in a thread that owns its connection and drains it, as the worker's
main loop does; the worker behind it is a fake that records the calls it receives.
"""

from __future__ import annotations

import queue
import signal
import sqlite3
import threading
import uuid
from typing import Any

import pytest
from kombu import Producer

from kernel import App
from kernel.cli.main import main
from kernel.control import mailbox_for, signal_name, signal_number
from kernel.plugins import manager as manager_module
from kernel.worker.control import ControlNode
from kernel.worker.state import RevokedTasks

TIMEOUT = 5.0


class FakeWorker:
    """The worker interface ControlNode uses, recording every call."""

    def __init__(self, app: App, hostname: str, running: tuple[str, ...] = ()) -> None:
        self.app = app
        self.hostname = hostname
        self.revoked = RevokedTasks()
        self.running = set(running)
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.rates: dict[str, Any] = {}

    def revoke_tasks(self, ids: list[str], terminate: bool, signal: int) -> list[str]:
        self.revoked.add(ids)
        self.calls.put(("revoke", ids, terminate, signal))
        return [task_id for task_id in ids if task_id in self.running]

    def set_rate_limit(self, task_name: str, rate: Any) -> dict:
        if task_name != "known.task":
            raise ValueError(f"unknown task {task_name!r}")
        self.rates[task_name] = rate
        self.calls.put(("rate_limit", task_name, rate))
        return {"ok": "new rate limit set successfully"}

    def stats(self) -> dict:
        return {"hostname": self.hostname, "running": len(self.running)}

    def next_call(self) -> tuple:
        return self.calls.get(timeout=TIMEOUT)


class RunningNode:
    """A ControlNode consuming in a thread of its own until ``stop()``."""

    def __init__(self, worker: FakeWorker, commands: dict | None = None) -> None:
        self.worker = worker
        self.commands = commands
        self.node: ControlNode | None = None
        self.errors: list[BaseException] = []
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"node-{worker.hostname}")

    def __enter__(self) -> RunningNode:
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "the control node did not start"
        if self.errors:
            raise self.errors[0]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the control node did not stop"
        assert not self.errors, f"the node's drain loop raised: {self.errors!r}"

    def _run(self) -> None:
        connection = self.worker.app.connection()
        try:
            self.node = ControlNode(self.worker, self.commands)
            self.node.start(connection)
            self._ready.set()
            while not self._stop.is_set():
                try:
                    connection.drain_events(timeout=0.05)
                except TimeoutError:
                    pass
            self.node.stop()
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self._ready.set()
            connection.release()


@pytest.fixture(params=["sqlite", "memory"])
def broker_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/k.sqlite3"
    return "memory://"


@pytest.fixture
def make_app(broker_url, kernel_plugins):
    """New App instances on one broker; a mailbox unique to the test (memory is global)."""
    exchange = f"test{uuid.uuid4().hex[:10]}"
    apps: list[App] = []

    def make(**settings: Any) -> App:
        app = App(
            "control",
            broker=broker_url,
            backend=None,
            plugins=kernel_plugins,
            control_exchange=exchange,
            broker_transport_options={"polling_interval": 0.01},
            **settings,
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def client(make_app) -> App:
    """The app that sends commands: a different App instance from the workers'."""
    return make_app()


def test_revoke_from_another_app_reaches_the_worker_with_ids_terminate_and_signal(make_app, client):
    worker = FakeWorker(make_app(), "w1@test")
    with RunningNode(worker):
        client.control.revoke(["id-1", "id-2"], terminate=True, signal="KILL")
        assert worker.next_call() == ("revoke", ["id-1", "id-2"], True, signal.SIGKILL)
        client.control.revoke("id-3")
        assert worker.next_call() == ("revoke", ["id-3"], False, signal.SIGTERM)
    assert worker.revoked.ids() == ["id-1", "id-2", "id-3"]


def test_async_result_revoke_sends_its_id(make_app, client):
    worker = FakeWorker(make_app(), "w1@test", running=("running-id",))
    with RunningNode(worker):
        replies = client.AsyncResult("running-id").revoke(
            terminate=True, signal="SIGINT", wait=True, timeout=0.5
        )
        assert worker.next_call() == ("revoke", ["running-id"], True, signal.SIGINT)
        assert replies == [{"w1@test": {"ok": "terminate: running-id"}}]
        assert client.AsyncResult("other-id").revoke() is None
        assert worker.next_call() == ("revoke", ["other-id"], False, signal.SIGTERM)


def test_revoke_replies_say_what_was_flagged_or_terminated(make_app, client):
    worker = FakeWorker(make_app(), "w1@test")
    with RunningNode(worker):
        flagged = client.control.revoke("a", destination="w1@test", reply=True, timeout=TIMEOUT)
        assert flagged == [{"w1@test": {"ok": "tasks a flagged as revoked"}}]
        unknown = client.control.terminate("b", destination=["w1@test"], reply=True)
        assert unknown == [{"w1@test": {"ok": "terminate: tasks unknown"}}]


def test_ping_gets_a_reply_naming_the_worker(make_app, client):
    worker = FakeWorker(make_app(), "w1@test")
    with RunningNode(worker):
        assert client.control.ping(destination=["w1@test"], timeout=TIMEOUT) == [
            {"w1@test": {"ok": "pong"}}
        ]
        assert client.control.ping(timeout=0.5) == [{"w1@test": {"ok": "pong"}}]


def test_ping_without_workers_returns_no_replies(client):
    assert client.control.ping(timeout=0.2) == []


def test_two_nodes_both_receive_a_broadcast(make_app, client):
    first, second = FakeWorker(make_app(), "w1@test"), FakeWorker(make_app(), "w2@test")
    with RunningNode(first), RunningNode(second):
        client.control.revoke("everywhere")
        assert first.next_call() == ("revoke", ["everywhere"], False, signal.SIGTERM)
        assert second.next_call() == ("revoke", ["everywhere"], False, signal.SIGTERM)
        replies = client.control.broadcast("ping", reply=True, limit=2, timeout=TIMEOUT)
        assert sorted(replies, key=str) == [
            {"w1@test": {"ok": "pong"}},
            {"w2@test": {"ok": "pong"}},
        ]


def test_destination_restricts_a_command_to_one_node(make_app, client):
    first, second = FakeWorker(make_app(), "w1@test"), FakeWorker(make_app(), "w2@test")
    with RunningNode(first), RunningNode(second):
        client.control.revoke("only-w2", destination="w2@test")
        assert second.next_call() == ("revoke", ["only-w2"], False, signal.SIGTERM)
        # Each node handles its messages in order: once w1 answers a later ping, it has
        # seen (and skipped) the revoke.
        assert client.control.ping(["w1@test"], timeout=TIMEOUT) == [{"w1@test": {"ok": "pong"}}]
        assert first.calls.empty()
        assert "only-w2" not in first.revoked


def test_a_raising_handler_replies_with_the_error_and_the_node_keeps_working(
    make_app, client, caplog
):
    def explode(worker, **arguments):
        raise RuntimeError(f"kaboom {arguments}")

    worker = FakeWorker(make_app(), "w1@test")
    with RunningNode(worker, commands={"explode": explode}):
        replies = client.control.broadcast(
            "explode", {"x": 1}, destination=["w1@test"], reply=True, timeout=TIMEOUT
        )
        assert replies == [{"w1@test": {"error": "explode failed: RuntimeError: kaboom {'x': 1}"}}]
        assert client.control.ping(["w1@test"], timeout=TIMEOUT) == [{"w1@test": {"ok": "pong"}}]
    assert "command explode{'x': 1} failed" in caplog.text


def test_a_rate_limit_the_worker_refuses_replies_with_its_message(make_app, client):
    worker = FakeWorker(make_app(), "w1@test")
    with RunningNode(worker):
        refused = client.control.rate_limit(
            "nope.task", "10/s", destination="w1@test", reply=True, timeout=TIMEOUT
        )
        assert refused == [{"w1@test": {"error": "unknown task 'nope.task'"}}]
        accepted = client.control.rate_limit(
            "known.task", "5/m", destination="w1@test", reply=True, timeout=TIMEOUT
        )
        assert accepted == [{"w1@test": {"ok": "new rate limit set successfully"}}]
        assert worker.next_call() == ("rate_limit", "known.task", "5/m")


def test_an_unknown_command_replies_with_an_error(make_app, client, caplog):
    worker = FakeWorker(make_app(), "w1@test")
    with RunningNode(worker):
        replies = client.control.broadcast(
            "no_such_command", destination=["w1@test"], reply=True, timeout=TIMEOUT
        )
    assert replies == [{"w1@test": {"error": "unknown command 'no_such_command' on w1@test"}}]
    assert "unknown command 'no_such_command'" in caplog.text


def test_a_message_that_is_not_a_command_does_not_stop_the_node(make_app, client, caplog):
    worker = FakeWorker(make_app(), "w1@test")
    with RunningNode(worker), client.connection() as connection:
        exchange = mailbox_for(client).exchange
        assert exchange.name == f"{client.conf.control_exchange}.pidbox"
        Producer(connection).publish(["not", "a", "command"], exchange=exchange, declare=[exchange])
        Producer(connection).publish(
            {"method": "revoke", "arguments": {"task_id": "a", "nonsense": 1}},
            exchange=exchange,
        )
        assert client.control.ping(["w1@test"], timeout=TIMEOUT) == [{"w1@test": {"ok": "pong"}}]
    assert "not a command" in caplog.text
    # Extra arguments (Celery clients send some) are ignored, not an error.
    assert worker.next_call() == ("revoke", ["a"], False, signal.SIGTERM)


def test_an_unknown_signal_from_another_client_still_revokes_with_sigterm(make_app, client):
    worker = FakeWorker(make_app(), "w1@test")
    with RunningNode(worker):
        replies = client.control.broadcast(
            "revoke",
            {"task_id": "a", "terminate": True, "signal": "SIGWHATEVER"},
            destination=["w1@test"],
            reply=True,
            timeout=TIMEOUT,
        )
    (answer,) = replies
    assert "ok" in answer["w1@test"]
    assert worker.calls.get(timeout=TIMEOUT) == ("revoke", ["a"], True, signal.SIGTERM)


def test_inspect_gathers_stats_and_revoked_ids_by_worker(make_app, client):
    worker = FakeWorker(make_app(), "w1@test", running=("r",))
    with RunningNode(worker):
        client.control.revoke(["x", "y"], reply=True, destination="w1@test", timeout=TIMEOUT)
        inspect = client.control.inspect(destination="w1@test", timeout=TIMEOUT)
        assert inspect.revoked() == {"w1@test": ["x", "y"]}
        assert inspect.stats() == {"w1@test": {"hostname": "w1@test", "running": 1}}
        assert inspect.ping() == {"w1@test": {"ok": "pong"}}


def test_a_node_ignores_commands_sent_before_it_started(make_app, client):
    worker = FakeWorker(make_app(), "w1@test")
    with RunningNode(worker):
        pass  # creates and binds the node's queue, then removes it
    client.control.revoke("while-stopped")
    with RunningNode(worker):
        client.control.revoke("while-running")
        assert worker.next_call() == ("revoke", ["while-running"], False, signal.SIGTERM)
    assert worker.revoked.ids() == ["while-running"]


def test_a_stopped_node_leaves_no_queue_behind(tmp_path, kernel_plugins):
    url = f"sqlite:///{tmp_path}/k.sqlite3"
    app = App("control", broker=url, backend=None, plugins=kernel_plugins)
    with RunningNode(FakeWorker(app, "w1@test")) as running:
        assert running.node.queue_name == "w1@test.celery.pidbox"
    app.control.revoke("after-stop")
    database = sqlite3.connect(tmp_path / "k.sqlite3")
    assert (
        database.execute("SELECT * FROM kernel_bindings WHERE queue LIKE 'w1@%'").fetchall() == []
    )
    assert database.execute("SELECT COUNT(*) FROM kernel_messages").fetchone() == (0,)
    app.close()


# ------------------------------------------------------------------------ input checks


def test_a_bad_signal_name_is_a_clear_error_naming_the_valid_ones(client):
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'; valid signals here: ") as info:
        client.control.revoke("a", terminate=True, signal="SIGNOPE")
    assert "SIGKILL" in str(info.value) and "SIGTERM" in str(info.value)
    with pytest.raises(ValueError, match="unknown signal 12345"):
        client.AsyncResult("a").revoke(terminate=True, signal=12345)


@pytest.mark.parametrize("given", ["SIGKILL", "KILL", "kill", "9", 9, signal.SIGKILL])
def test_signals_are_accepted_by_name_short_name_or_number(given):
    assert signal_number(given) == signal.SIGKILL
    assert signal_name(given) == "SIGKILL"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.revoke([]), "no task id given"),
        (lambda c: c.revoke(["ok", ""]), "a task id must be a non-empty string, got ''"),
        (lambda c: c.revoke("a", destination=[]), "destination must be a worker name"),
        (lambda c: c.ping(timeout=0), "timeout must be a positive number"),
        (lambda c: c.broadcast(""), "command must be a non-empty string"),
        (lambda c: c.rate_limit("", "1/s"), "task_name must be a task's name"),
        (lambda c: c.rate_limit("t", ["1/s"]), "rate_limit must be a string like '10/s'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_sent(client, call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(client.control)


# ------------------------------------------------------------------------ command line


@pytest.fixture
def restore_default_plugins():
    """`main()` installs a process-wide plugin manager; put the old one back."""
    saved = manager_module._default
    yield
    manager_module.set_default_manager(saved)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def cli_node(tmp_path, kernel_plugins, restore_default_plugins):
    """A node on a SQLite broker with the default mailbox, as `kernel -b URL` reaches it."""
    url = f"sqlite:///{tmp_path}/cli.sqlite3"
    app = App("control", broker=url, backend=None, plugins=kernel_plugins)
    worker = FakeWorker(app, "w1@test", running=("running-id",))
    with RunningNode(worker):
        yield url, worker
    app.close()


def test_cli_ping_prints_each_worker(capsys, cli_node):
    url, _worker = cli_node
    code, out, _ = run_cli(capsys, "-b", url, "control", "ping", "-d", "w1@test", "-t", "5")
    assert (code, out) == (0, "-> w1@test: OK pong\n")


def test_cli_revoke_terminate_sends_the_signal(capsys, cli_node):
    url, worker = cli_node
    revoke = "control revoke running-id other --terminate --signal KILL -d w1@test -t 5"
    code, out, _ = run_cli(capsys, "-b", url, *revoke.split())
    assert (code, out) == (0, "-> w1@test: OK terminate: running-id\n")
    assert worker.next_call() == ("revoke", ["running-id", "other"], True, signal.SIGKILL)


def test_cli_rate_limit_error_reply_exits_non_zero(capsys, cli_node):
    url, _worker = cli_node
    code, out, _ = run_cli(
        capsys, "-b", url, "control", "rate_limit", "nope.task", "3/s", "-d", "w1@test"
    )
    assert (code, out) == (1, "-> w1@test: ERROR unknown task 'nope.task'\n")


def test_cli_inspect_revoked_as_json(capsys, cli_node):
    url, _worker = cli_node
    run_cli(capsys, "-b", url, "control", "revoke", "r1", "-d", "w1@test", "-t", "5")
    code, out, _ = run_cli(
        capsys, "-b", url, "inspect", "revoked", "--json", "-d", "w1@test", "-t", "5"
    )
    assert code == 0
    assert out == '{\n  "w1@test": [\n    "r1"\n  ]\n}\n'


def test_cli_bad_signal_is_a_usage_error(capsys, tmp_path, restore_default_plugins):
    url = f"sqlite:///{tmp_path}/cli.sqlite3"
    code, _, err = run_cli(capsys, "-b", url, "control", "revoke", "x", "--terminate", "-s", "NOPE")
    assert code == 2
    assert "unknown signal 'NOPE'" in err


def test_cli_without_workers_says_none_replied(capsys, tmp_path, restore_default_plugins):
    url = f"sqlite:///{tmp_path}/cli.sqlite3"
    code, out, err = run_cli(capsys, "-b", url, "control", "ping", "-t", "0.2")
    assert (code, out) == (1, "")
    assert "no worker replied within 0.2 s" in err


# ------------------------------------------------------------------------ Celery clients


def test_a_celery_client_revokes_and_pings_through_the_shared_mailbox(tmp_path, kernel_plugins):
    celery = pytest.importorskip("celery")
    url = f"sqlite:///{tmp_path}/shared.sqlite3"
    app = App("control", broker=url, backend=None, plugins=kernel_plugins)
    celery_app = celery.Celery("interop", broker=url, set_as_current=False)
    celery_app.conf.broker_transport = "kernel.plugins.builtin.sqlite_transport:Transport"
    worker = FakeWorker(app, "w1@test", running=("celery-id",))
    try:
        with RunningNode(worker):
            celery_app.control.revoke("celery-id", terminate=True, signal="SIGKILL")
            assert worker.next_call() == ("revoke", ["celery-id"], True, signal.SIGKILL)
            assert celery_app.control.ping(destination=["w1@test"], timeout=TIMEOUT) == [
                {"w1@test": {"ok": "pong"}}
            ]
    finally:
        celery_app.close()
        app.close()
