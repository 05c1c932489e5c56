"""Connections: URL forms (``amqp://``, ``pyamqp://``, ``amqps://``), TLS verification,
heartbeats, publisher confirms by default, and the plugin's registrations."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator

import pytest
from amqp_harness import Broker, TLSProxy, make_certificates

from kernel import App
from kernel.exceptions import ConfigurationError, PublishError
from kernel.plugins.manager import PluginManager
from kernel.testing.pytest_plugin import start_worker, stop_worker

pytestmark = pytest.mark.integration


def make_app(url: str, broker: Broker, delay_prefix: str, **options) -> App:
    queue = broker.name("conn")
    control = broker.name("control")
    broker.track(exchange=f"{control}.pidbox")
    broker.track(exchange=f"reply.{control}.pidbox")
    return App(
        "connection",
        broker=url,
        backend="rpc://",
        task_default_queue=queue,
        control_exchange=control,
        broker_transport_options={"delayed_delivery_prefix": delay_prefix, **options},
    )


def run_one_task(app: App) -> None:
    @app.task(name="connection.add")
    def add(x, y):
        return x + y

    worker, thread = start_worker(app, pool="threads", concurrency=1)
    try:
        assert add.delay(2, 3).get(timeout=10) == 5
    finally:
        stop_worker(worker, thread)
        if app._backend is not None:
            app.close()


def test_plugin_registers_broker_schemes_and_rpc_backend():
    plugins = PluginManager().load()
    for scheme in ("amqp", "pyamqp"):
        assert plugins.transport_for_url(f"{scheme}://localhost").name == "amqp"
    assert plugins.transport_for_url("amqps://localhost").name == "amqp-tls"
    spec = plugins.transport_for_url("amqp://localhost")
    assert {"priority", "fanout", "delayed_delivery", "redelivery_on_close"} <= spec.features
    assert spec.default_options["confirm_publish"] is True
    assert plugins.backend_for_url("rpc://").name == "rpc"


def test_pyamqp_url_and_publisher_confirms_by_default(rabbitmq_url, broker, delay_prefix):
    app = make_app(rabbitmq_url.replace("amqp://", "pyamqp://"), broker, delay_prefix)
    with app.connection() as connection:
        connection.ensure_connection(max_retries=0)
        assert connection.connection.confirm_publish is True
    run_one_task(app)
    broker.track(queue=app.backend.reply_queue_name)


def test_rpc_backend_needs_an_amqp_broker():
    app = App("rpc-on-sqlite", broker="memory://", backend="rpc://")
    with pytest.raises(ConfigurationError, match="needs|AMQP broker"):
        app.backend  # noqa: B018 - building it is the test


@pytest.fixture
def tls_proxy(tmp_path) -> Iterator[tuple[TLSProxy, dict[str, str]]]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    certificates = make_certificates(tmp_path / "tls")
    proxy = TLSProxy(certificates["cert"], certificates["key"])
    yield proxy, certificates
    proxy.close()


def test_amqps_verifies_the_server_and_runs_tasks_over_tls(tls_proxy, broker, delay_prefix):
    proxy, certificates = tls_proxy
    url = f"amqps://guest:guest@localhost:{proxy.port}//"
    app = make_app(url, broker, delay_prefix, ssl={"ca_certs": certificates["ca"]})
    run_one_task(app)
    broker.track(queue=app.backend.reply_queue_name)


def test_amqps_localhost_verifies_a_certificate_for_the_dns_name_only(
    tmp_path, broker, delay_prefix
):
    """kombu connects to ``localhost`` as ``127.0.0.1``; the name checked is still the
    URL's ``localhost``, so a certificate without ``IP:127.0.0.1`` is accepted."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    certificates = make_certificates(tmp_path / "tls-dns", ip_address=False)
    proxy = TLSProxy(certificates["cert"], certificates["key"])
    try:
        url = f"amqps://guest:guest@localhost:{proxy.port}//"
        app = make_app(url, broker, delay_prefix, ssl={"ca_certs": certificates["ca"]})
        run_one_task(app)
        broker.track(queue=app.backend.reply_queue_name)
        # The same certificate does not pass for a URL that names the address.
        other = make_app(
            f"amqps://guest:guest@127.0.0.1:{proxy.port}//",
            broker,
            delay_prefix,
            ssl={"ca_certs": certificates["ca"]},
        )
        other.conf.task_publish_retry = False
        with pytest.raises(PublishError, match="IP address mismatch|verify failed"):
            other.send_task("connection.add", (1, 1))
        other.close()
    finally:
        proxy.close()


def test_amqps_refuses_a_server_it_cannot_verify(tls_proxy, broker, delay_prefix):
    proxy, _certificates = tls_proxy
    app = make_app(f"amqps://guest:guest@localhost:{proxy.port}//", broker, delay_prefix)
    app.conf.task_publish_retry = False
    with pytest.raises(PublishError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        app.send_task("connection.add", (1, 1))
    app.close()


def test_heartbeats_keep_an_idle_worker_connected(rabbitmq_url, broker, delay_prefix, caplog):
    """With ``heartbeat=1`` RabbitMQ drops a connection silent for about 2 s; the
    worker's drain loop sends heartbeats, so an idle worker keeps its connection."""
    app = make_app(rabbitmq_url, broker, delay_prefix, heartbeat=1)

    @app.task(name="connection.add")
    def add(x, y):
        return x + y

    with caplog.at_level(logging.WARNING, logger="kernel.worker.worker"):
        worker, thread = start_worker(app, pool="threads", concurrency=1)
        try:
            assert worker._consumer.channel.connection.heartbeat == 1
            time.sleep(3.5)  # idle past two heartbeat intervals: nothing must happen
            assert add.delay(2, 3).get(timeout=10) == 5
        finally:
            stop_worker(worker, thread)
    assert not [r for r in caplog.records if "connection lost" in r.getMessage()]
    broker.track(queue=app.backend.reply_queue_name)
    app.close()


def test_heartbeats_keep_a_worker_with_every_slot_busy_connected(
    rabbitmq_url, broker, delay_prefix, caplog
):
    """Review 2, finding 3: while every slot is busy and work waits reserved, the worker
    reads and answers heartbeats; with ``heartbeat`` set through the transport options
    (kombu's ``Connection.heartbeat`` stays 0) it did not, and RabbitMQ dropped it."""
    app = make_app(rabbitmq_url, broker, delay_prefix, heartbeat=1)
    runs: list[int] = []

    @app.task(name="connection.busy")
    def busy(x):
        runs.append(x)
        time.sleep(3.5)  # past two heartbeat intervals, with the other message reserved
        return x

    with caplog.at_level(logging.WARNING, logger="kernel.worker.worker"):
        worker, thread = start_worker(app, pool="threads", concurrency=1)
        try:
            first, second = busy.delay(1), busy.delay(2)
            assert first.get(timeout=20) == 1 and second.get(timeout=20) == 2
        finally:
            stop_worker(worker, thread)
    assert not [r for r in caplog.records if "connection lost" in r.getMessage()]
    assert sorted(runs) == [1, 2]  # neither ran twice
    broker.track(queue=app.backend.reply_queue_name)
    app.close()


def test_a_channel_closed_by_rabbitmq_is_survived_without_running_tasks_twice_more(
    rabbitmq_url, broker, delay_prefix, caplog
):
    """Review 2, finding 2: RabbitMQ closes a consumer's channel (406: a delivery past
    ``consumer_timeout``, an unknown delivery tag) and returns its unacknowledged
    messages. The worker must not crash (which republished its running tasks: twice
    queued), but consume again on a new channel and let the broker redeliver."""
    import threading

    app = make_app(rabbitmq_url, broker, delay_prefix)
    app.conf.result_backend = "cache+memory://"
    runs: list[int] = []
    running = threading.Event()

    @app.task(name="connection.slow")
    def slow(x):
        runs.append(x)
        running.set()
        time.sleep(1.0)
        return x

    worker, thread = start_worker(app, pool="threads", concurrency=2)
    original_step = worker._step
    broken: list[bool] = []

    def step(connection):
        if running.is_set() and not broken:  # in the worker's thread, mid-task
            broken.append(True)
            worker._consumer.channel.basic_ack(987654)  # RabbitMQ: 406, channel closed
        return original_step(connection)

    worker._step = step
    try:
        with caplog.at_level(logging.WARNING, logger="kernel.worker.worker"):
            results = [slow.delay(i) for i in range(6)]
            assert [r.get(timeout=30) for r in results] == list(range(6))
            assert thread.is_alive(), "the worker stopped"
    finally:
        stop_worker(worker, thread)
    assert broken
    assert "channel" in caplog.text and "PRECONDITION_FAILED" in caplog.text.upper()
    # The tasks running when the channel closed ran again (RabbitMQ returned them);
    # no task ran more than twice, and each ran.
    assert sorted(set(runs)) == list(range(6))
    assert all(runs.count(x) <= 2 for x in range(6)), runs
    app.close()
