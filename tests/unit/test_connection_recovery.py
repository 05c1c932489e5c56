"""Broker connection loss: the worker reconnects and publishing retries (or says why not).

Worker tests run a real Worker in a thread on the memory transport and make its
connection fail the way a broker that went away does (``drain_events`` and acks raising
kombu's ``OperationalError``). Start-up and publishing tests use a real AMQP client
(kombu's pyamqp transport) against a closed port, so the connection is really refused.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from typing import Any

import kombu
import pytest
from kombu.exceptions import OperationalError

from kernel import hookimpl
from kernel.app import App, publish_retry_delay
from kernel.config import Settings
from kernel.exceptions import BrokerConnectionError, ConfigurationError, PublishError
from kernel.plugins.manager import PluginManager
from kernel.plugins.specs import TransportSpec
from kernel.testing.pytest_plugin import start_worker, stop_worker
from kernel.worker.worker import Worker

TIMEOUT = 5.0
WORKER_THREAD = "kernel-test-worker"


@pytest.fixture(autouse=True)
def quick_reconnects(monkeypatch):
    """Reconnection waits of 10-50 ms instead of 0.5-5 s."""
    monkeypatch.setattr(Worker, "reconnect_delay", 0.01)
    monkeypatch.setattr(Worker, "reconnect_delay_max", 0.05)


@pytest.fixture
def kernel_config():
    return {
        "task_dead_letter_queue": f"dead.{uuid.uuid4().hex[:12]}",
        "broker_connection_max_retries": None,
    }


@pytest.fixture
def tasks(kernel_app):
    class Tasks:
        ran: list = []
        started = threading.Event()
        release = threading.Event()

        @kernel_app.task
        def add(x, y):
            Tasks.ran.append(("add", x, y))
            return x + y

        @kernel_app.task
        def slow():
            Tasks.ran.append(("slow",))
            Tasks.started.set()
            Tasks.release.wait(TIMEOUT)
            return "done"

    return Tasks


class BrokerFaults:
    """Makes one connection the worker opens fail like a broker that went away.

    ``index`` picks the connection among those the worker thread opens: 0 is the task
    connection, 1 the remote-control one. ``fail(n)`` makes the next ``n`` receives
    fail, ``refuse(n)`` the next ``n`` connection attempts; while ``down`` is set every
    receive fails; while ``acks_down`` is set every acknowledgement fails. With
    ``close_channel`` the first failure also closes the connection's channels, as a
    broker dropping them would.
    """

    def __init__(self, app: App, monkeypatch: Any, index: int = 0) -> None:
        self.index = index
        self.down = threading.Event()
        self.acks_down = threading.Event()
        self.close_channel = False
        self.failed_receives = 0
        self._failures_left = 0
        self._refusals_left = 0
        self._lock = threading.Lock()
        self._opened: list[Any] = []
        self._channels: list[Any] = []
        real = app.connection

        def connection(*args: Any, **kwargs: Any) -> Any:
            conn = real(*args, **kwargs)
            if threading.current_thread().name == WORKER_THREAD:
                self._opened.append(conn)
                if len(self._opened) - 1 == self.index:
                    self._wrap(conn)
            return conn

        monkeypatch.setattr(app, "connection", connection)

    def fail(self, count: int) -> None:
        with self._lock:
            self._failures_left = count

    def refuse(self, count: int) -> None:
        with self._lock:
            self._refusals_left = count

    def _should_refuse(self) -> bool:
        with self._lock:
            if self._refusals_left > 0:
                self._refusals_left -= 1
                return True
        return False

    def _should_fail(self) -> bool:
        with self._lock:
            if self._failures_left > 0:
                self._failures_left -= 1
                return True
        return self.down.is_set()

    def _wrap(self, conn: Any) -> None:
        real_drain, real_channel = conn.drain_events, conn.channel
        real_ensure = conn.ensure_connection

        def ensure_connection(*args: Any, **kwargs: Any) -> Any:
            if self._should_refuse():
                raise OperationalError("injected: connection refused")
            return real_ensure(*args, **kwargs)

        def drain_events(**kwargs: Any) -> Any:
            if self._should_fail():
                self.failed_receives += 1
                if self.close_channel:
                    self.close_channel = False
                    for channel in self._channels:
                        channel.close()
                raise OperationalError("injected: the broker went away")
            return real_drain(**kwargs)

        def channel() -> Any:
            made = real_channel()
            real_ack = made.basic_ack

            def basic_ack(*args: Any, **kwargs: Any) -> Any:
                if self.acks_down.is_set():
                    raise OperationalError("injected: the broker went away")
                return real_ack(*args, **kwargs)

            made.basic_ack = basic_ack
            self._channels.append(made)
            return made

        conn.drain_events = drain_events
        conn.channel = channel
        conn.ensure_connection = ensure_connection


class WorkerRun:
    """A worker started in a thread whose ``start()`` error (if any) is kept."""

    def __init__(self, app: App, **options: Any) -> None:
        options.setdefault("pool", "solo")
        options.setdefault("concurrency", 1)
        self.worker = Worker(app, install_signal_handlers=False, **options)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=WORKER_THREAD, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.start()
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.thread.join(TIMEOUT * 2)
        assert not self.thread.is_alive(), "the worker did not stop"


def wait_until(predicate: Any, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def logged(caplog: Any, text: str, level: int | None = None) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if text in r.getMessage() and (level is None or r.levelno == level)
    ]


def waiting_messages(app: App) -> int:
    """Messages left in the app's default queue (the memory broker is process-wide)."""
    with kombu.Connection("memory://") as connection:
        channel = connection.channel()
        try:
            declared = channel.queue_declare(queue=app.conf.task_default_queue, passive=True)
        finally:
            channel.close()
    return declared.message_count


# ---------------------------------------------------------------- worker run loop


def test_worker_keeps_consuming_after_broker_connection_loss(
    kernel_app, tasks, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="kernel.worker.worker")
    faults = BrokerFaults(kernel_app, monkeypatch)
    worker, thread = start_worker(kernel_app)
    try:
        assert tasks.add.delay(1, 1).get(timeout=TIMEOUT) == 2
        faults.fail(3)
        during = tasks.add.delay(2, 2)
        assert wait_until(lambda: logged(caplog, "broker connection restored"))
        after = tasks.add.delay(3, 3)
        assert during.get(timeout=TIMEOUT) == 4
        assert after.get(timeout=TIMEOUT) == 6
    finally:
        stop_worker(worker, thread)
    assert faults.failed_receives == 3
    assert sorted(tasks.ran) == [("add", 1, 1), ("add", 2, 2), ("add", 3, 3)]
    lost = logged(caplog, "broker connection lost", logging.WARNING)
    assert len(lost) == 1
    assert "injected: the broker went away" in lost[0].getMessage()
    assert "memory://" in lost[0].getMessage()
    restored = logged(caplog, "broker connection restored", logging.INFO)
    assert len(restored) == 1
    assert "without the broker" in restored[0].getMessage()
    assert waiting_messages(kernel_app) == 0


def test_task_finishing_during_outage_is_acknowledged_once_the_broker_is_back(
    kernel_app, tasks, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="kernel.worker.worker")
    faults = BrokerFaults(kernel_app, monkeypatch)
    worker, thread = start_worker(kernel_app, pool="threads", concurrency=2)
    try:
        result = tasks.slow.delay()
        assert tasks.started.wait(TIMEOUT)
        faults.down.set()
        faults.acks_down.set()
        assert wait_until(lambda: logged(caplog, "broker connection lost"))
        tasks.release.set()  # finishes while the broker is unreachable
        # Held back at once while the worker knows the broker is down, or after the ack
        # failed when the task finished during a reconnection attempt.
        assert wait_until(
            lambda: (
                logged(caplog, "acknowledged once the connection is back")
                or logged(caplog, "could not acknowledge its message")
            )
        )
        assert result.get(timeout=TIMEOUT) == "done"
        faults.acks_down.clear()
        faults.down.clear()
        assert wait_until(lambda: logged(caplog, "settled 1 message(s) held back"))
    finally:
        stop_worker(worker, thread)
    assert tasks.ran == [("slow",)]
    assert waiting_messages(kernel_app) == 0  # acknowledged: it will not run again


def test_failed_acknowledgement_is_sent_again_after_reconnecting(
    kernel_app, tasks, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="kernel.worker.worker")
    faults = BrokerFaults(kernel_app, monkeypatch)
    worker, thread = start_worker(kernel_app)
    try:
        faults.acks_down.set()
        assert tasks.add.delay(4, 4).get(timeout=TIMEOUT) == 8
        assert wait_until(lambda: logged(caplog, "could not acknowledge its message"))
        faults.acks_down.clear()
        assert wait_until(lambda: logged(caplog, "settled 1 message(s) held back"))
        assert tasks.add.delay(5, 5).get(timeout=TIMEOUT) == 10
    finally:
        stop_worker(worker, thread)
    assert tasks.ran == [("add", 4, 4), ("add", 5, 5)]
    assert len(logged(caplog, "broker connection lost", logging.WARNING)) == 1
    assert waiting_messages(kernel_app) == 0


def test_consumer_moves_to_a_new_channel_when_its_channel_was_closed(
    kernel_app, tasks, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="kernel.worker.worker")
    faults = BrokerFaults(kernel_app, monkeypatch)
    worker, thread = start_worker(kernel_app)
    try:
        assert tasks.add.delay(1, 2).get(timeout=TIMEOUT) == 3
        faults.close_channel = True
        faults.fail(2)
        assert wait_until(lambda: logged(caplog, "consuming on a new channel"))
        assert tasks.add.delay(3, 4).get(timeout=TIMEOUT) == 7
    finally:
        stop_worker(worker, thread)
    assert tasks.ran == [("add", 1, 2), ("add", 3, 4)]
    assert len(logged(caplog, "broker connection restored")) == 1


def test_worker_gives_up_after_max_retries_and_its_messages_stay_queued(
    kernel_app, tasks, monkeypatch, caplog
):
    kernel_app.conf.broker_connection_max_retries = 3
    faults = BrokerFaults(kernel_app, monkeypatch)
    run = WorkerRun(kernel_app)
    assert run.worker.ready.wait(TIMEOUT)
    faults.down.set()
    assert wait_until(lambda: faults.failed_receives > 0)
    pending = tasks.add.delay(6, 6)  # sent during the outage: never received
    run.join()
    assert isinstance(run.error, BrokerConnectionError)
    message = str(run.error)
    assert "could not reconnect to broker memory://" in message
    assert "in 3 attempts" in message
    assert "injected: the broker went away" in message
    assert "broker_connection_max_retries" in message
    assert run.worker.stopped.is_set()
    assert logged(caplog, "could not reconnect to broker", logging.ERROR)
    assert waiting_messages(kernel_app) == 1
    faults.down.clear()
    worker, thread = start_worker(kernel_app)  # a new worker gets the message
    try:
        assert pending.get(timeout=TIMEOUT) == 12
    finally:
        stop_worker(worker, thread)
    assert tasks.ran == [("add", 6, 6)]


def test_worker_stops_on_connection_loss_when_broker_connection_retry_is_off(
    kernel_app, tasks, monkeypatch
):
    kernel_app.conf.broker_connection_retry = False
    faults = BrokerFaults(kernel_app, monkeypatch)
    run = WorkerRun(kernel_app)
    assert run.worker.ready.wait(TIMEOUT)
    faults.fail(1)
    run.join()
    assert isinstance(run.error, BrokerConnectionError)
    assert "broker_connection_retry is False" in str(run.error)


def test_remote_control_reconnects_after_losing_its_connection(
    kernel_app, tasks, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="kernel.worker.worker")
    BrokerFaults(kernel_app, monkeypatch, index=1).fail(4)
    hostname = f"w-{uuid.uuid4().hex[:8]}@test"
    worker, thread = start_worker(kernel_app, hostname=hostname)
    try:
        assert wait_until(lambda: logged(caplog, "remote control connection restored"))
        assert kernel_app.control.ping(destination=[hostname], timeout=TIMEOUT) == [
            {hostname: {"ok": "pong"}}
        ]
        assert tasks.add.delay(1, 1).get(timeout=TIMEOUT) == 2
    finally:
        stop_worker(worker, thread)
    assert len(logged(caplog, "remote control connection lost", logging.WARNING)) == 1
    assert not logged(caplog, "reading control messages failed")


def test_remote_control_connects_later_when_it_cannot_at_start(
    kernel_app, tasks, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="kernel.worker.worker")
    BrokerFaults(kernel_app, monkeypatch, index=1).refuse(3)
    hostname = f"w-{uuid.uuid4().hex[:8]}@test"
    worker, thread = start_worker(kernel_app, hostname=hostname)
    try:
        assert wait_until(lambda: logged(caplog, "remote control connection restored"))
        assert kernel_app.control.ping(destination=[hostname], timeout=TIMEOUT) == [
            {hostname: {"ok": "pong"}}
        ]
    finally:
        stop_worker(worker, thread)
    assert not logged(caplog, "remote control is unavailable")


# ---------------------------------------------------------------- a refusing broker


def closed_port() -> int:
    """A local TCP port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class AmqpClientPlugin:
    """kombu's own AMQP client for ``amqp://`` URLs (no broker needed to be refused)."""

    @hookimpl
    def kernel_transports(self):
        return [
            TransportSpec(
                name="test-amqp",
                schemes=["amqp"],
                kombu_transport="kombu.transport.pyamqp:Transport",
            )
        ]


@pytest.fixture
def refusing_app():
    """An app whose broker refuses connections, with a password that must not leak."""
    manager = PluginManager()
    manager.load_builtins()
    manager.register(AmqpClientPlugin(), "test-amqp")
    app = App(
        "refused",
        broker=f"amqp://guest:s3cret@127.0.0.1:{closed_port()}//",
        backend="cache+memory://refused",
        plugins=manager,
        broker_connection_timeout=1.0,
        task_publish_retry_policy={"max_retries": 2, "interval_step": 0.01, "interval_max": 0.01},
    )

    @app.task(name="refused.add")
    def add(x, y):
        return x + y

    yield app
    app.close()


def test_worker_start_gives_up_when_the_broker_refuses_connections(refusing_app, caplog):
    refusing_app.conf.broker_connection_max_retries = 2
    worker = Worker(refusing_app, pool="solo", install_signal_handlers=False)
    with pytest.raises(BrokerConnectionError) as info:
        worker.start()
    message = str(info.value)
    assert "cannot connect to broker amqp://guest:***@127.0.0.1:" in message
    assert "gave up after 3 attempts" in message
    assert "ConnectionRefusedError" in message
    assert "broker_connection_max_retries" in message
    assert "s3cret" not in message
    warnings = logged(caplog, "trying again in", logging.WARNING)
    assert len(warnings) == 2
    assert "guest:***@" in warnings[0].getMessage()
    assert "s3cret" not in caplog.text
    assert worker.stopped.is_set()


def test_worker_start_fails_at_once_without_retry_on_startup(refusing_app, caplog):
    refusing_app.conf.broker_connection_retry_on_startup = False
    worker = Worker(refusing_app, pool="solo", install_signal_handlers=False)
    with pytest.raises(BrokerConnectionError, match="did not retry"):
        worker.start()
    assert not logged(caplog, "trying again in")


def test_stop_interrupts_the_start_up_retries(refusing_app, caplog):
    refusing_app.conf.broker_connection_max_retries = None
    run = WorkerRun(refusing_app)
    assert wait_until(lambda: logged(caplog, "trying again in"))
    run.worker.stop()
    run.join()
    assert run.error is None
    assert run.worker.stopped.is_set()


# ---------------------------------------------------------------- publishing


def test_publish_retries_then_raises_a_clear_error(refusing_app, caplog):
    with pytest.raises(PublishError) as info:
        refusing_app.send_task("refused.add", (1, 2))
    message = str(info.value)
    assert "to broker amqp://guest:***@127.0.0.1:" in message
    assert "gave up after 3 attempt(s)" in message
    assert "ConnectionRefusedError" in message
    assert "broker is running" in message
    assert "task_publish_retry_policy['max_retries']" in message
    assert "s3cret" not in message
    assert info.value.attempts == 3
    assert len(logged(caplog, "could not send task refused.add", logging.WARNING)) == 2


def test_publish_error_is_a_kombu_operational_error(refusing_app):
    with pytest.raises(OperationalError):  # what Celery code catches around delay()
        refusing_app.tasks["refused.add"].delay(1, 2)


def test_publish_with_retry_false_raises_at_once(refusing_app, caplog):
    refusing_app.conf.task_publish_retry_policy = {"max_retries": 50, "interval_max": 10}
    started = time.monotonic()
    with pytest.raises(PublishError) as info:
        refusing_app.tasks["refused.add"].apply_async((1, 2), retry=False)
    assert time.monotonic() - started < 2.0
    assert info.value.attempts == 1
    assert "retries disabled" in str(info.value)
    assert not logged(caplog, "could not send task")


def test_task_publish_retry_setting_off_raises_at_once(refusing_app):
    refusing_app.conf.task_publish_retry = False
    with pytest.raises(PublishError) as info:
        refusing_app.send_task("refused.add", (1, 2))
    assert info.value.attempts == 1


def test_retry_policy_option_overrides_the_setting(refusing_app):
    with pytest.raises(PublishError) as info:
        refusing_app.tasks["refused.add"].apply_async((1, 2), retry_policy={"max_retries": 0})
    assert info.value.attempts == 1
    with pytest.raises(PublishError) as info:
        refusing_app.send_task("refused.add", retry=True, retry_policy={"max_retries": 4})
    assert info.value.attempts == 5


def test_unknown_retry_policy_key_is_refused_before_sending(kernel_app, tasks):
    with pytest.raises(ConfigurationError, match="unknown key.*'max_retry'"):
        tasks.add.apply_async((1, 2), retry_policy={"max_retry": 1})


def test_publish_goes_through_when_the_broker_comes_back(kernel_app, tasks, monkeypatch, caplog):
    kernel_app.conf.task_publish_retry_policy = {"interval_step": 0.01, "interval_max": 0.01}
    real_publish = kombu.Producer.publish
    failures = iter([ConnectionRefusedError(111, "Connection refused")] * 2)

    def flaky_publish(self: Any, *args: Any, **kwargs: Any) -> Any:
        error = next(failures, None)
        if error is not None:
            raise error
        return real_publish(self, *args, **kwargs)

    monkeypatch.setattr(kombu.Producer, "publish", flaky_publish)
    result = tasks.add.delay(2, 3)
    monkeypatch.undo()
    retries = logged(caplog, "could not send task", logging.WARNING)
    assert [
        ("retry 1 of 3" in r.getMessage(), "retry 2 of 3" in r.getMessage()) for r in retries
    ] == [
        (True, False),
        (False, True),
    ]
    worker, thread = start_worker(kernel_app)
    try:
        assert result.get(timeout=TIMEOUT) == 5
    finally:
        stop_worker(worker, thread)
    assert tasks.ran == [("add", 2, 3)]


# ---------------------------------------------------------------- settings


def test_connection_and_publish_retry_settings_default_to_celerys():
    conf = Settings()
    assert conf.broker_connection_retry is True
    assert conf.broker_connection_retry_on_startup is True
    assert conf.broker_connection_max_retries == 100
    assert conf.task_publish_retry is True
    assert conf.task_publish_retry_policy == {
        "max_retries": 3,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.2,
    }


def test_partial_publish_retry_policy_keeps_the_other_defaults():
    conf = Settings()
    conf.update(task_publish_retry_policy={"max_retries": None})
    assert conf.task_publish_retry_policy == {
        "max_retries": None,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.2,
    }
    with pytest.raises(ConfigurationError, match="interval_step"):
        conf.update(task_publish_retry_policy={"interval_step": -1})


def test_publish_retry_delays_follow_kombus_intervals():
    policy = {"interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
    assert [publish_retry_delay(policy, n) for n in (1, 2, 3, 4, 5)] == pytest.approx(
        [0, 0.2, 0.4, 0.5, 0.5]
    )


class HeartbeatConnection:
    """Records what the worker does with a connection that has AMQP heartbeats."""

    def __init__(self, heartbeat: float) -> None:
        self.heartbeat = heartbeat
        self.calls: list[str] = []

    def get_heartbeat_interval(self) -> float:
        """kombu's Connection: the interval negotiated with the broker."""
        return self.heartbeat

    def drain_events(self, timeout: float | None = None) -> None:
        self.calls.append(f"drain {timeout}")
        raise TimeoutError

    def heartbeat_check(self) -> None:
        self.calls.append("heartbeat")


def test_heartbeats_are_read_and_sent_while_every_slot_is_busy():
    """Sending alone is not enough: py-amqp drops a connection it has not read from for
    two intervals, so a worker whose slots are all busy must read as well."""
    busy = HeartbeatConnection(heartbeat=2)
    Worker._keep_heartbeats(busy)
    assert busy.calls == ["drain 0", "heartbeat"]
    without = HeartbeatConnection(heartbeat=0)
    Worker._keep_heartbeats(without)
    assert without.calls == []
