"""The SQLite transport: the transport contract, plus leases, crashes and many processes."""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import kombu
import pytest
from kombu import Exchange, Queue

from kernel.control import QUEUE_EXPIRES, QUEUE_TTL
from kernel.exceptions import ConfigurationError
from kernel.plugins.builtin import sqlite_messages
from kernel.plugins.builtin.sqlite_messages import SCHEMA_VERSION
from kernel.plugins.builtin.sqlite_transport import Transport, database_path
from kernel.testing.contracts import TransportContract
from kernel.testing.contracts.transport import FEATURES

TRANSPORT = "kernel.plugins.builtin.sqlite_transport:Transport"
REPO = Path(__file__).resolve().parents[2]


class TestSQLiteTransport(TransportContract):
    transport = TRANSPORT
    transport_options = {"visibility_timeout": 2}
    features = FEATURES

    @pytest.fixture
    def transport_url(self, tmp_path):
        return f"sqlite:///{tmp_path}/broker.db"


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/broker.db"


@pytest.fixture
def connect(url):
    connections = []

    def connect(**options):
        connection = kombu.Connection(url, transport=Transport, transport_options=options)
        connection.connect()
        connections.append(connection)
        return connection

    yield connect
    for connection in connections:
        connection.release()


def make_queue(name="work"):
    return Queue(name, Exchange("tasks", "direct"), routing_key=name)


def publish(connection, queue, body, **kwargs):
    connection.Producer(serializer="json").publish(
        body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue], **kwargs
    )


def get(connection, queue, timeout=5.0):
    bound = queue(connection.default_channel)
    deadline = time.monotonic() + timeout
    while True:
        message = bound.get()
        if message is not None or time.monotonic() >= deadline:
            return message
        time.sleep(0.01)


def spawn(script, *args):
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def read_line(process, timeout):
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        process.kill()
        pytest.fail(f"child printed nothing within {timeout} s: {process.stderr.read()}")
    return process.stdout.readline().strip()


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


def count_rows(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM kernel_messages").fetchone()[0]


# -- URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite://", "kernel.sqlite3"),
        ("sqlite:///", "kernel.sqlite3"),
        ("sqlite:///rel/x.db", "rel/x.db"),
        ("sqlite:////abs/x.db", "/abs/x.db"),
    ],
)
def test_database_path_follows_sqlalchemy_url_convention(url, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    connection = kombu.Connection(url, transport=Transport)
    path = database_path(connection.virtual_host, connection.hostname)
    assert path == os.path.join(str(tmp_path), expected)


def test_url_with_hostname_raises_configuration_error_naming_the_slashes():
    with pytest.raises(ConfigurationError, match="three slashes.*four"):
        database_path("x.db", "foo")
    with pytest.raises(ConfigurationError, match="'foo'"):
        kombu.Connection("sqlite://foo/x.db", transport=Transport).connect()


def test_path_transport_option_overrides_url_and_creates_directories(tmp_path, url):
    path = tmp_path / "nested" / "dir" / "other.db"
    with kombu.Connection(url, transport=Transport, transport_options={"path": str(path)}) as c:
        publish(c, make_queue(), "hello")
        assert c.transport.path == str(path)
    assert count_rows(path) == 1


# -- leases ------------------------------------------------------------------------------


def test_lease_is_renewed_while_consumer_lives(connect):
    holder, other = connect(visibility_timeout=1), connect(visibility_timeout=1)
    queue = make_queue()
    publish(holder, queue, "long task")
    message = get(holder, queue)

    # Three visibility timeouts pass; renewal keeps the message away from `other`.
    assert get(other, queue, timeout=3.0) is None
    message.ack()
    assert get(other, queue, timeout=0.2) is None


def test_killed_consumer_message_is_redelivered_after_visibility_timeout(connect, url):
    queue = make_queue()
    publish(connect(), queue, "survives")
    child = spawn(
        """
        import sys, time, kombu
        from kombu import Exchange, Queue
        from kernel.plugins.builtin.sqlite_transport import Transport
        conn = kombu.Connection(sys.argv[1], transport=Transport,
                                transport_options={"visibility_timeout": 1})
        queue = Queue("work", Exchange("tasks", "direct"), routing_key="work")
        message = None
        deadline = time.monotonic() + 10
        while message is None and time.monotonic() < deadline:
            message = queue(conn.default_channel).get()
            time.sleep(0.01)
        print("held", message and message.payload, flush=True)
        time.sleep(60)
        """,
        url,
    )
    try:
        assert read_line(child, timeout=15) == "held survives"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=5)
        child.stdout.close()
        child.stderr.close()

    other = connect(visibility_timeout=1)
    message = get(other, queue, timeout=4.0)
    assert message is not None, "the dead consumer's message never came back"
    assert message.payload == "survives"
    assert message.headers["x-delivery-count"] == 1
    assert message.delivery_info["redelivered"] is True
    message.ack()


def test_restore_on_close_takes_back_the_delivery_count(connect):
    queue = make_queue()
    first = connect()
    publish(first, queue, "prefetched")
    assert get(first, queue).headers["x-delivery-count"] == 0
    first.release()  # warm shutdown: handed back unstarted

    second = connect()
    message = get(second, queue)
    assert message.headers["x-delivery-count"] == 0
    message.reject(requeue=True)  # a rejection is an attempt
    assert get(second, queue).headers["x-delivery-count"] == 1


def test_ack_after_lease_lost_to_another_consumer_warns_and_keeps_message(connect, caplog):
    queue = make_queue()
    slow = connect(visibility_timeout=0.3)
    publish(slow, queue, "contested")
    stale = get(slow, queue)
    slow.default_channel._stop_renewer()  # as if the process had stalled

    fast = connect(visibility_timeout=30)
    fresh = get(fast, queue, timeout=3.0)
    assert fresh is not None
    with caplog.at_level(logging.WARNING):
        stale.ack()
    assert "no longer holds" in caplog.text
    fresh.ack()
    assert get(fast, queue, timeout=0.2) is None


def test_no_ack_get_removes_message_at_once(connect):
    queue = make_queue()
    connection = connect()
    publish(connection, queue, "fire and forget")
    message = queue(connection.default_channel).get(no_ack=True)
    assert message.payload == "fire and forget"
    connection.release()
    assert get(connect(), queue, timeout=0.2) is None


def test_forked_child_publishes_on_its_own_database_connection(connect):
    queue = make_queue()
    connection = connect()
    publish(connection, queue, "from parent")
    parent_db = connection.transport.database.connection()

    pid = os.fork()
    if pid == 0:  # child: reuse the inherited kombu connection, as a pool child might
        try:
            own = connection.transport.database.connection() is not parent_db
            publish(connection, queue, "from child")
            os._exit(0 if own else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    received = sorted(get(connection, queue).payload for _ in range(2))
    assert received == ["from child", "from parent"]


# -- sharing through the database ----------------------------------------------------------


def test_bindings_declared_by_one_connection_route_messages_of_another(connect):
    declaring, publishing = connect(), connect()
    exchange = Exchange("broadcast", "fanout")
    queues = [Queue(name, exchange) for name in ("a", "b")]
    for queue in queues:
        queue(declaring.default_channel).declare()

    # `publishing` has its own kombu broker state and never declared the exchange.
    publishing.default_channel.basic_publish(
        publishing.default_channel.prepare_message('"hi"', content_type="application/json"),
        exchange="broadcast",
        routing_key="",
    )
    for queue in queues:
        assert get(declaring, queue).payload == "hi"


def test_messages_from_several_producer_processes_are_received_exactly_once(tmp_path, url):
    stop = tmp_path / "stop"
    consumer_script = """
        import json, os, sys, kombu
        from kombu import Exchange, Queue
        from kernel.plugins.builtin.sqlite_transport import Transport
        received = []
        def on_message(body, message):
            received.append(body)
            message.ack()
        queue = Queue("stress", Exchange("stress", "direct"), routing_key="stress")
        with kombu.Connection(sys.argv[1], transport=Transport) as conn:
            with conn.Consumer(queue, callbacks=[on_message]):
                print("ready", flush=True)
                while True:
                    try:
                        conn.drain_events(timeout=0.2)
                    except TimeoutError:
                        if os.path.exists(sys.argv[2]):
                            break
        print(json.dumps(received), flush=True)
        """
    producer_script = """
        import sys, kombu
        from kombu import Exchange, Queue
        from kernel.plugins.builtin.sqlite_transport import Transport
        queue = Queue("stress", Exchange("stress", "direct"), routing_key="stress")
        with kombu.Connection(sys.argv[1], transport=Transport) as conn:
            producer = conn.Producer(serializer="json")
            for n in range(int(sys.argv[3])):
                producer.publish(f"{sys.argv[2]}-{n}", exchange=queue.exchange,
                                 routing_key="stress", declare=[queue])
        """
    consumers = [spawn(consumer_script, url, stop) for _ in range(2)]
    try:
        for consumer in consumers:
            assert read_line(consumer, timeout=15) == "ready"
        producers = [spawn(producer_script, url, name, 200) for name in "xyz"]
        for producer in producers:
            _, errors = producer.communicate(timeout=20)
            assert producer.returncode == 0, errors
        path = tmp_path / "broker.db"
        wait_until(lambda: count_rows(path) == 0, 20, "draining 600 messages")
        stop.touch()
        outputs = [consumer.communicate(timeout=10) for consumer in consumers]
    finally:
        for consumer in consumers:
            if consumer.poll() is None:
                consumer.kill()
                consumer.communicate()

    received = collections.Counter()
    for (stdout, errors), consumer in zip(outputs, consumers, strict=True):
        assert consumer.returncode == 0, errors
        received.update(json.loads(stdout.splitlines()[-1]))
    expected = {f"{name}-{n}" for name in "xyz" for n in range(200)}
    assert set(received) == expected, "messages lost"
    assert max(received.values()) == 1, "messages delivered twice"


# -- bad data ----------------------------------------------------------------------------


def test_undecodable_row_is_skipped_with_warning_and_next_message_delivered(
    connect, tmp_path, caplog
):
    queue = make_queue()
    connection = connect()
    queue(connection.default_channel).declare()
    path = tmp_path / "broker.db"
    with sqlite3.connect(path) as db:
        bad_id = db.execute(
            "INSERT INTO kernel_messages (queue, priority, deliver_at, payload, created_at) "
            "VALUES ('work', 0, 0, '{not json', 0)"
        ).lastrowid
    publish(connection, queue, "good")

    with caplog.at_level(logging.WARNING):
        message = get(connection, queue)
    assert message.payload == "good"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"row {bad_id}" in warnings[0].getMessage()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT id FROM kernel_dead_messages").fetchall() == [(bad_id,)]
    message.ack()


# -- claims stay cheap -------------------------------------------------------------------


def explain(db, statements):
    """The EXPLAIN QUERY PLAN details of the queries among traced ``statements``."""
    queries = [s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]
    assert queries, f"no query traced among {statements}"
    return [row[3] for sql in queries for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]


class VMSteps:
    """Counts the SQLite virtual machine instructions a connection runs: work, not time."""

    def __init__(self, db):
        self.db, self.count = db, 0

    def __enter__(self):
        self.db.set_progress_handler(self._step, 1)
        return self

    def __exit__(self, *exc_info):
        self.db.set_progress_handler(None, 1)

    def _step(self):
        self.count += 1


def test_ready_message_is_found_among_20000_delayed_and_leased_rows_through_the_index(connect):
    queue = make_queue()
    connection = connect()
    queue(connection.default_channel).declare()
    db = connection.transport.database.connection()
    now = time.time()
    with connection.transport.database.transaction() as writer:
        writer.executemany(
            "INSERT INTO kernel_messages (queue, priority, deliver_at, payload, created_at, "
            "lease_owner, lease_until) VALUES ('work', ?, ?, '{\"properties\": {}}', ?, ?, ?)",
            [(9, now + 3600, now, None, None)] * 20000  # delayed, at a higher priority
            + [(0, now - 1, now, "someone else", now + 3600)] * 1000,  # held elsewhere
        )
    statements = []
    db.set_trace_callback(statements.append)
    try:
        with VMSteps(db) as empty_poll:
            assert get(connection, queue, timeout=0) is None
        publish(connection, queue, "ready")
        with VMSteps(db) as claim:
            message = get(connection, queue, timeout=0)
    finally:
        db.set_trace_callback(None)

    assert message is not None and message.payload == "ready"
    message.ack()
    # Reading the 21000 rows it must skip would take over 100000 instructions.
    assert empty_poll.count < 2000
    assert claim.count < 2000
    plan = explain(db, statements)
    assert any("USING INDEX kernel_messages_visible" in detail for detail in plan), plan
    # Only the one-row ``level`` subquery is scanned, never a table.
    assert {d for d in plan if d.startswith("SCAN")} <= {"SCAN level", "SCAN CONSTANT ROW"}, plan


def test_version_1_database_is_migrated_in_place_and_keeps_its_messages(connect, tmp_path):
    queue = make_queue()
    holder = connect()
    publish(holder, queue, "held")
    assert get(holder, queue).payload == "held"
    publish(holder, queue, "later", headers={"x-deliver-at": time.time() + 3600})
    publish(holder, queue, "ready")
    path = tmp_path / "broker.db"

    def make_version_1():
        with sqlite3.connect(path) as db:  # what version 1 of the transport left behind
            db.executescript(
                "DROP INDEX kernel_messages_visible;"
                "CREATE INDEX kernel_messages_claim ON kernel_messages (queue, priority DESC, id);"
                "DROP TABLE kernel_queue_limits;"
                "UPDATE kernel_schema SET version = 1 WHERE component = 'transport';"
            )

    make_version_1()
    message = get(connect(), queue)
    assert message.payload == "ready"
    assert get(connect(), queue, timeout=0.2) is None  # neither "held" nor "later"

    make_version_1()
    connect()  # migrating twice, as racing processes may, is harmless
    with sqlite3.connect(path) as db:
        version = db.execute("SELECT version FROM kernel_schema WHERE component = 'transport'")
        assert version.fetchone() == (SCHEMA_VERSION,)
        indexes = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
    assert "kernel_messages_visible" in indexes
    assert "kernel_messages_claim" not in indexes
    message.ack()


# -- publishing --------------------------------------------------------------------------


def test_binding_added_by_another_connection_routes_the_next_publish(connect):
    publishing, declaring = connect(), connect()
    first = Queue("first", Exchange("tasks", "direct"), routing_key="key")
    second = Queue("second", Exchange("tasks", "direct"), routing_key="key")
    publish(publishing, first, "one")
    second(declaring.default_channel).declare()
    publish(publishing, first, "two")

    assert [get(publishing, first).payload for _ in range(2)] == ["one", "two"]
    assert get(publishing, second).payload == "two"
    assert get(publishing, second, timeout=0.2) is None


def test_unroutable_direct_publish_goes_to_the_dead_letter_queue(connect):
    connection = connect(deadletter_queue="undeliverable")
    exchange = Exchange("tasks", "direct")
    exchange(connection.default_channel).declare()
    with pytest.warns(UserWarning, match="No queues bound"):
        connection.Producer(serializer="json").publish(
            "lost", exchange=exchange, routing_key="nobody"
        )
    assert get(connection, Queue("undeliverable"), timeout=1).payload == "lost"


# -- queue limits: x-expires and x-message-ttl -------------------------------------------


def rows(path, sql, *parameters):
    with sqlite3.connect(path) as db:
        return db.execute(sql, parameters).fetchall()


def queue_traces(path, name):
    """Every row the database holds for queue ``name``, table by table."""
    return {
        "queue": rows(path, "SELECT name FROM kernel_queues WHERE name = ?", name),
        "bindings": rows(path, "SELECT exchange FROM kernel_bindings WHERE queue = ?", name),
        "messages": rows(path, "SELECT id FROM kernel_messages WHERE queue = ?", name),
        "limits": rows(path, "SELECT name FROM kernel_queue_limits WHERE name = ?", name),
    }


def broadcast(connection, exchange, body):
    connection.Producer(serializer="json").publish(body, exchange=exchange)


def test_unused_expiring_queue_is_deleted_by_a_fanout_publish_while_a_polled_one_survives(
    connect, tmp_path
):
    path = tmp_path / "broker.db"
    exchange = Exchange("bcast", "fanout")
    idle = Queue("idle", exchange, queue_arguments={"x-expires": 200})
    polled = Queue("polled", exchange, expires=0.2)  # kombu sends x-expires=200
    declaring = connect()
    for queue in (idle, polled):
        queue(declaring.default_channel).declare()
    broadcast(declaring, exchange, "before")

    consumer = connect()
    deadline = time.monotonic() + 0.3  # past x-expires, polling `polled` meanwhile
    received = []
    while time.monotonic() < deadline:
        message = polled(consumer.default_channel).get(no_ack=True)
        if message is not None:
            received.append(message.payload)
        time.sleep(0.02)
    broadcast(connect(), exchange, "after")

    assert received == ["before"]
    assert queue_traces(path, "idle") == {"queue": [], "bindings": [], "messages": [], "limits": []}
    assert rows(path, "SELECT exchange FROM kernel_bindings WHERE queue = 'polled'") == [("bcast",)]
    assert get(consumer, polled).payload == "after"


def test_consumer_busy_for_longer_than_x_expires_keeps_its_queue(connect):
    exchange = Exchange("bcast", "fanout")
    queue = Queue("busy", exchange, expires=0.2)
    consuming = connect()
    received = []
    with consuming.Consumer(queue, callbacks=[lambda body, message: received.append(body)]):
        time.sleep(0.4)  # a long task in the main thread: no polls
        broadcast(connect(), exchange, "revoke")
        deadline = time.monotonic() + 3
        while not received and time.monotonic() < deadline:
            try:
                consuming.drain_events(timeout=0.1)
            except TimeoutError:
                pass
    assert received == ["revoke"]


def test_dead_pidbox_node_queue_is_deleted_by_a_later_broadcast(connect, tmp_path):
    path = tmp_path / "broker.db"
    celery_values = kombu.pidbox.Mailbox(
        "celery", type="fanout", queue_ttl=QUEUE_TTL, queue_expires=QUEUE_EXPIRES
    )
    celery_values.Node("alive", channel=connect().default_channel).listen()
    short = kombu.pidbox.Mailbox("celery", type="fanout", queue_ttl=1, queue_expires=0.2)
    worker = connect()
    short.Node("killed", channel=worker.default_channel).listen()
    worker.default_channel.limited.close()  # its keeper stops, as in a SIGKILLed worker
    short(connect()).cast(["alive", "killed"], "ping")
    assert len(queue_traces(path, "killed.celery.pidbox")["messages"]) == 1
    time.sleep(0.3)

    short(connect()).cast(["alive", "killed"], "ping")

    limits = "SELECT name, expires, message_ttl FROM kernel_queue_limits ORDER BY name"
    assert rows(path, limits) == [("alive.celery.pidbox", QUEUE_EXPIRES, QUEUE_TTL)]
    assert queue_traces(path, "killed.celery.pidbox") == {
        "queue": [],
        "bindings": [],
        "messages": [],
        "limits": [],
    }
    assert rows(path, "SELECT queue FROM kernel_messages") == [("alive.celery.pidbox",)] * 2


def test_consumed_queue_deleted_under_its_consumer_is_declared_again_with_its_bindings(
    connect, caplog
):
    exchange = Exchange("bcast", "fanout")
    queue = Queue("node", exchange, expires=0.2)
    consuming, other = connect(), connect()
    received = []
    with consuming.Consumer(queue, callbacks=[lambda body, message: received.append(body)]):
        other.default_channel.queue_delete("node")
        deadline = time.monotonic() + 3
        with caplog.at_level(logging.WARNING):
            while "declaring it again" not in caplog.text and time.monotonic() < deadline:
                try:
                    consuming.drain_events(timeout=0.05)
                except TimeoutError:
                    pass
        assert "queue 'node' was deleted while this channel consumed it" in caplog.text
        broadcast(other, exchange, "still reached")
        while not received and time.monotonic() < deadline:
            try:
                consuming.drain_events(timeout=0.1)
            except TimeoutError:
                pass
    assert received == ["still reached"]


def test_message_older_than_x_message_ttl_is_not_delivered_and_is_removed(connect, tmp_path):
    queue = Queue("short-lived", Exchange("tasks", "direct"), "short-lived", message_ttl=0.2)
    publish(connect(), queue, "stale")
    time.sleep(0.3)
    producer = connect().Producer(serializer="json")
    producer.publish("fresh", exchange=queue.exchange, routing_key=queue.routing_key)

    consumer = connect()  # never declared it: learns the TTL from the database
    assert get(consumer, queue).payload == "fresh"
    assert get(consumer, queue, timeout=0.1) is None
    assert rows(tmp_path / "broker.db", "SELECT COUNT(*) FROM kernel_messages") == [(1,)]


def test_fanout_publish_removes_messages_older_than_their_queue_ttl(connect, tmp_path):
    exchange = Exchange("bcast", "fanout")
    listener = Queue("listener", exchange, message_ttl=0.2)
    listener(connect().default_channel).declare()
    broadcast(connect(), exchange, "stale")
    time.sleep(0.3)
    broadcast(connect(), exchange, "fresh")

    assert count_rows(tmp_path / "broker.db") == 1  # nobody polled: the publish removed it
    assert get(connect(), listener).payload == "fresh"


def test_queue_without_arguments_is_untouched_by_expiry(connect, tmp_path):
    path = tmp_path / "broker.db"
    exchange = Exchange("bcast", "fanout")
    declaring = connect()
    Queue("plain", exchange)(declaring.default_channel).declare()
    Queue("expiring", exchange, expires=0.1, message_ttl=100)(declaring.default_channel).declare()
    with sqlite3.connect(path) as db:  # published long ago
        db.execute(
            "INSERT INTO kernel_messages (queue, priority, deliver_at, payload, created_at) "
            "VALUES ('plain', 0, 0, ?, 0)",
            (json.dumps({"body": '"ancient"', "properties": {}, "headers": {}}),),
        )
    time.sleep(0.2)
    broadcast(connect(), exchange, "new")

    assert queue_traces(path, "expiring")["queue"] == []
    plain = queue_traces(path, "plain")
    assert (plain["queue"], plain["bindings"], plain["limits"]) == ([("plain",)], [("bcast",)], [])
    assert len(plain["messages"]) == 2


def test_polls_write_nothing_for_plain_queues_and_mark_expiring_ones_once_an_interval(
    connect, monkeypatch
):
    monkeypatch.setattr(sqlite_messages, "USE_MARK_INTERVAL", 0.2)  # instead of 1 s
    connection = connect()
    plain = make_queue("plain")
    expiring = Queue("expiring", Exchange("tasks", "direct"), "expiring", expires=10)
    for queue in (plain, expiring):
        queue(connection.default_channel).declare()
    db = connection.transport.database.connection()

    def writes_of_polls(queue):
        statements = []
        db.set_trace_callback(statements.append)
        try:
            for _ in range(20):
                assert queue(connection.default_channel).get() is None
        finally:
            db.set_trace_callback(None)
        return [s.split(" SET ")[0] for s in statements if not s.lstrip().startswith("SELECT")]

    assert writes_of_polls(plain) == []
    assert writes_of_polls(expiring) == []  # the declaration was a use
    time.sleep(0.25)
    assert writes_of_polls(expiring) == ["UPDATE kernel_queue_limits"]
    assert writes_of_polls(plain) == []


def test_version_2_database_gains_queue_limits_and_keeps_its_queues(connect, tmp_path):
    path = tmp_path / "broker.db"
    queue = make_queue()
    publish(connect(), queue, "kept")

    def make_version_2():
        with sqlite3.connect(path) as db:  # what version 2 of the transport left behind
            db.executescript(
                "DROP TABLE kernel_queue_limits;"
                "UPDATE kernel_schema SET version = 2 WHERE component = 'transport';"
            )

    make_version_2()
    migrated = connect()
    Queue("reply", Exchange("reply", "direct"), "reply", expires=10)(
        migrated.default_channel
    ).declare()
    assert get(migrated, queue).payload == "kept"
    with sqlite3.connect(path) as db:  # a version 2 process opened the file since
        db.execute("UPDATE kernel_schema SET version = 2 WHERE component = 'transport'")
    connect()  # migrating again, as racing processes may, keeps the limits

    version = "SELECT version FROM kernel_schema WHERE component = 'transport'"
    assert rows(path, version) == [(SCHEMA_VERSION,)]
    limits = "SELECT name, expires, message_ttl FROM kernel_queue_limits"
    assert rows(path, limits) == [("reply", 10.0, None)]
    assert rows(path, "SELECT name FROM kernel_queues ORDER BY name") == [("reply",), ("work",)]


def test_bad_x_expires_is_refused_naming_the_queue_and_the_value(connect):
    bad = Queue("bad", Exchange("tasks", "direct"), "bad", queue_arguments={"x-expires": 0})
    with pytest.raises(ConfigurationError, match=r"queue 'bad': argument x-expires=0 must be"):
        bad(connect().default_channel).declare()


# -- polling -----------------------------------------------------------------------------


def test_empty_polls_pause_1_ms_after_a_delivery_doubling_up_to_polling_interval(connect, pauses):
    connection = connect(polling_interval=0.008)
    queue = make_queue()
    received = []
    with connection.Consumer([queue], callbacks=[lambda body, m: (received.append(body), m.ack())]):
        publish(connection, queue, "first")
        connection.drain_events(timeout=5)
        assert received == ["first"]
        pauses.clear()
        with pytest.raises(TimeoutError):
            connection.drain_events(timeout=0.1)
        assert pauses[:5] == [0.001, 0.002, 0.004, 0.008, 0.008]
        assert max(pauses) <= 0.008

        publish(connection, queue, "second")
        connection.drain_events(timeout=5)
        pauses.clear()
        with pytest.raises(TimeoutError):
            connection.drain_events(timeout=0.02)
        assert pauses[:2] == [0.001, 0.002], "a delivery starts the pauses over"
