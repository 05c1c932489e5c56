"""The Redis result backend against the real Redis: the backend contract, and what
Redis adds (key TTLs, pub/sub wake-ups, Celery's chord keys, URLs, key prefixes)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from kernel_redis import urls
from kernel_redis.backend import RedisBackend, RedisBackendUnavailable

from kernel import states
from kernel.app import App
from kernel.exceptions import ConfigurationError, TimeoutError
from kernel.plugins.manager import PluginManager
from kernel.result import AsyncResult, GroupResult
from kernel.testing.contracts import BackendContract
from kernel.testing.contracts.backend import _Chord


@pytest.fixture(scope="module")
def plugins() -> PluginManager:
    return PluginManager().load()


def make_app(url: str, plugins: PluginManager, **settings: Any) -> App:
    transport_options = settings.pop("transport_options", None)
    if transport_options is not None:
        settings["result_backend_transport_options"] = transport_options
    return App("redis-backend-test", broker="memory://", backend=url, plugins=plugins, **settings)


def broker_roundtrip(
    url: str, plugins: PluginManager, settings: dict | None = None, **transport_options: Any
) -> None:
    """A message published through broker ``url`` comes back, through kernel's channel."""
    from kernel_redis.transport import LeasedChannel
    from kombu import Exchange, Queue

    app = App(
        "redis-broker-url-test",
        broker=url,
        backend="cache+memory://",
        plugins=plugins,
        **(settings or {}),
    )
    app.conf.broker_transport_options = transport_options
    name = f"url-{new_id()}"
    queue = Queue(name, Exchange(name), routing_key=name)
    try:
        with app.connection() as connection:
            channel = connection.default_channel
            assert isinstance(channel, LeasedChannel), type(channel)
            connection.Producer(serializer="json").publish(
                "hello", exchange=queue.exchange, routing_key=name, declare=[queue]
            )
            deadline = time.monotonic() + 5
            while (message := queue(channel).get(no_ack=False)) is None:
                assert time.monotonic() < deadline, f"nothing came back through {url}"
                time.sleep(0.02)
            assert message.payload == "hello"
            message.ack()
    finally:
        app.close()


@pytest.fixture
def app(redis_db, plugins) -> Iterator[App]:
    app = make_app(redis_db, plugins)
    yield app
    app.close()


@pytest.fixture
def raw(redis_db) -> Iterator[redis.Redis]:
    """A plain client on the test database, to look at what the backend wrote."""
    client = redis.Redis.from_url(redis_db)
    yield client
    client.close()


def new_id() -> str:
    return str(uuid.uuid4())


class _WorkerLikeChord(_Chord):
    """Reports header tasks as a worker does: with their ``group_index`` and the value
    the task returned.

    Celery's Redis protocol orders a chord's values by that index (it is in every
    header message) and hands the body the values reported, not re-read ones; the
    contract's stand-in request leaves the index out and reports some parts without
    their value.
    """

    def request(self, task_id: str) -> SimpleNamespace:
        request = super().request(task_id)
        request.group_index = self.header_ids.index(task_id)
        return request

    def report(self, index: int, value: Any = None, state: str = states.SUCCESS) -> None:
        if value is None and state == states.SUCCESS:
            value = self.backend.get_task_meta(self.header_ids[index])["result"]
        super().report(index, value, state)


class TestRedisBackend(BackendContract):
    cross_process = True

    @pytest.fixture
    def backend_url(self, redis_db):
        return redis_db

    @pytest.fixture
    def chord(self, backend_app, backend) -> Any:
        @backend_app.task(name="backend_contract.chord_body")
        def chord_body(values):
            return values

        return lambda size, **options: _WorkerLikeChord(backend_app, backend, size, **options)

    def test_part_of_a_chord_the_backend_does_not_know_fails_the_body(self):
        pytest.skip(
            "Celery's Redis chord protocol: a Celery client writes the chord's size only "
            "before its last header message, so earlier parts of a chord not known yet are "
            "normal; see test_parts_reported_before_the_size_is_written_count"
        )


# -- storage --------------------------------------------------------------------------


def test_result_key_is_celerys_and_expires_after_result_expires(redis_db, plugins, raw):
    app = make_app(redis_db, plugins, result_expires=120)
    try:
        task_id = new_id()
        app.backend.store_result(task_id, {"n": 1}, states.SUCCESS)
        key = f"celery-task-meta-{task_id}"
        assert raw.exists(key)
        assert 115_000 <= raw.pttl(key) <= 120_000
    finally:
        app.close()


def test_result_without_expiry_has_no_ttl(redis_db, plugins, raw):
    app = make_app(redis_db, plugins, result_expires=None)
    try:
        task_id = new_id()
        app.backend.store_result(task_id, 1, states.SUCCESS)
        assert raw.ttl(f"celery-task-meta-{task_id}") == -1
    finally:
        app.close()


def test_saved_group_is_under_celerys_taskset_key_with_a_ttl(app, raw):
    group_id, member = new_id(), new_id()
    GroupResult(group_id, [AsyncResult(member, app)]).save(app.backend)
    key = f"celery-taskset-meta-{group_id}"
    assert raw.exists(key)
    assert 0 < raw.ttl(key) <= 86400
    assert app.backend.restore_group(group_id).results == [AsyncResult(member, app)]


def test_global_keyprefix_prefixes_every_key_as_celery_does(redis_db, plugins, raw):
    app = make_app(redis_db, plugins, transport_options={"global_keyprefix": "tenant1"})
    try:
        task_id, group_id = new_id(), new_id()
        app.backend.store_result(task_id, "mine", states.SUCCESS)
        GroupResult(group_id, [AsyncResult(task_id, app)]).save(app.backend)
        assert raw.exists(f"tenant1_celery-task-meta-{task_id}")
        assert raw.exists(f"tenant1_celery-taskset-meta-{group_id}")
        assert not raw.exists(f"celery-task-meta-{task_id}")
        assert app.backend.get_task_meta(task_id)["result"] == "mine"
        assert AsyncResult(task_id, app).get(timeout=5) == "mine"
    finally:
        app.close()
    other = make_app(redis_db, plugins, transport_options={"global_keyprefix": "tenant2:"})
    try:
        assert other.backend.get_task_meta(task_id)["status"] == states.PENDING
    finally:
        other.close()


def test_cleanup_leaves_expiry_to_redis(app):
    assert app.backend.cleanup() == 0


def test_backend_used_after_fork_opens_its_own_connections(app):
    task_id = new_id()
    app.backend.get_task_meta(task_id)  # the parent connects first
    parent_pool = app.backend.client.connection_pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: store through the inherited backend object
        try:
            ok = app.backend.client.connection_pool is not parent_pool
            app.backend.store_result(task_id, "from the child", states.SUCCESS)
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1", "the child reused the parent's connection pool"
    os.close(read)
    assert status == 0
    assert app.backend.get_task_meta(task_id)["result"] == "from the child"
    assert app.backend.client.connection_pool is parent_pool


# -- waiting --------------------------------------------------------------------------


def test_get_is_woken_by_the_published_result_not_by_polling(app):
    backend = app.backend
    backend.recheck_interval = 30.0  # a missed message would now cost 30 s
    task_id = new_id()
    stored_at: list[float] = []

    def store() -> None:
        stored_at.append(time.monotonic())
        backend.store_result(task_id, "woken", states.SUCCESS)

    timer = threading.Timer(0.3, store)
    timer.start()
    try:
        assert AsyncResult(task_id, app).get(timeout=10) == "woken"
        latency = time.monotonic() - stored_at[0]
    finally:
        timer.join(10)
    print(f"pub/sub get latency: {latency * 1000:.1f} ms")
    assert latency < 1.0, f"get() returned {latency:.2f}s after the result was stored"


def test_wait_ignores_unready_states_published_before_the_result(app):
    backend, task_id = app.backend, new_id()

    def progress_then_done() -> None:
        backend.mark_as_started(task_id, {"hostname": "w1"})
        backend.store_result(task_id, {"current": 1}, "PROGRESS")
        backend.mark_as_done(task_id, "finished")

    timer = threading.Timer(0.1, progress_then_done)
    timer.start()
    try:
        meta = backend.wait_for(task_id, timeout=10)
    finally:
        timer.join(10)
    assert meta["status"] == states.SUCCESS and meta["result"] == "finished"


def test_wait_finds_a_result_stored_without_a_publish(app, raw):
    backend = app.backend
    backend.recheck_interval = 0.2
    task_id = new_id()
    timer = threading.Timer(
        0.1,
        raw.set,
        (f"celery-task-meta-{task_id}", backend._encode({"status": "SUCCESS", "result": 7})),
    )
    timer.start()
    try:
        meta = backend.wait_for(task_id, timeout=10)
    finally:
        timer.join(10)
    assert meta["result"] == 7


def test_many_waiters_are_each_woken(app):
    backend = app.backend
    task_ids = [new_id() for _ in range(20)]
    results: dict[str, Any] = {}

    def wait(task_id: str) -> None:
        results[task_id] = backend.wait_for(task_id, timeout=20)["result"]

    threads = [threading.Thread(target=wait, args=(t,)) for t in task_ids]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    for n, task_id in enumerate(task_ids):
        backend.store_result(task_id, n, states.SUCCESS)
    for thread in threads:
        thread.join(30)
    assert results == {task_id: n for n, task_id in enumerate(task_ids)}


def test_waits_in_a_thread_share_one_pubsub_connection(app):
    backend = app.backend
    first, second = new_id(), new_id()
    backend.store_result(first, 1, states.SUCCESS)
    backend.store_result(second, 2, states.SUCCESS)
    assert backend.wait_for(first, timeout=10)["result"] == 1
    pubsub = backend._listeners.pubsub
    connection = pubsub.connection
    assert backend.wait_for(second, timeout=10)["result"] == 2
    # Not a new connection per wait (a TCP connect and handshake each time).
    assert backend._listeners.pubsub is pubsub and pubsub.connection is connection
    backend.close()  # closes it; the next wait opens another
    assert backend.wait_for(first, timeout=10)["result"] == 1
    assert backend._listeners.pubsub is not pubsub


def test_a_late_message_for_an_earlier_channel_is_not_taken_for_the_result(app, raw):
    backend = app.backend
    earlier, waited = new_id(), new_id()
    backend.store_result(earlier, "earlier", states.SUCCESS)
    assert backend.wait_for(earlier, timeout=10)["result"] == "earlier"
    # As if the earlier channel's result were published again before the unsubscribe
    # took effect: still subscribed to it, and its message waits on the connection.
    earlier_channel = backend._key(f"celery-task-meta-{earlier}")
    backend._pubsub().subscribe(earlier_channel)
    raw.publish(earlier_channel, backend._encode({"status": "SUCCESS", "result": "wrong"}))

    timer = threading.Timer(0.2, backend.store_result, (waited, "right", states.SUCCESS))
    timer.start()
    try:
        assert backend.wait_for(waited, timeout=10)["result"] == "right"
    finally:
        timer.join(10)


def test_ten_thousand_member_group_is_read_back_in_order(app):
    backend = app.backend
    task_ids = [new_id() for _ in range(10_000)]
    for start in range(0, len(task_ids), 1000):
        with backend.client.pipeline(transaction=False) as pipe:
            for n, task_id in enumerate(task_ids[start : start + 1000], start):
                meta = {"status": "SUCCESS", "result": n, "traceback": None, "children": []}
                pipe.set(f"celery-task-meta-{task_id}", backend._encode(meta), ex=600)
            pipe.execute()
    group = GroupResult(new_id(), [AsyncResult(t, app) for t in task_ids], app=app)
    started = time.monotonic()
    values = group.get(timeout=60)
    elapsed = time.monotonic() - started
    print(f"10,000-member GroupResult.get: {elapsed:.3f} s")
    assert values == list(range(10_000))


# -- chords (Celery's Redis keys) -------------------------------------------------------


def _header_request(group_id: str, task_id: str, index: int, body: dict) -> SimpleNamespace:
    return SimpleNamespace(
        id=task_id, group=group_id, group_index=index, chord=body, root_id=task_id
    )


def _body(app: App, queue: str) -> dict:
    return dict(app.signature("redis_test.body", options={"task_id": new_id(), "queue": queue}))


def test_chord_keys_follow_celerys_layout_while_running_and_after(app, raw):
    backend, group_id = app.backend, new_id()
    header = [new_id() for _ in range(3)]
    body = _body(app, f"q.{uuid.uuid4().hex}")
    backend.apply_chord(group_id, header, body)
    key = f"celery-taskset-meta-{group_id}"
    assert raw.get(f"{key}.s") == b"3"

    backend.store_result(header[1], 20, states.SUCCESS)
    backend.on_chord_part_return(_header_request(group_id, header[1], 1, body), "SUCCESS", 20)
    [(entry, score)] = raw.zrange(f"{key}.j", 0, -1, withscores=True)
    assert backend._decode(entry) == [1, header[1], "SUCCESS", 20]
    assert score == 1.0
    assert raw.smembers(f"{key}.d") == {f"{header[1]}:1".encode()}

    for index in (0, 2):
        backend.store_result(header[index], index * 10, states.SUCCESS)
        backend.on_chord_part_return(
            _header_request(group_id, header[index], index, body), "SUCCESS", index * 10
        )
    assert raw.get(f"{key}.c") == b"done"
    assert not raw.exists(f"{key}.j", f"{key}.d", f"{key}.s", f"{key}.t")


def test_parts_reported_before_the_size_is_written_count(app):
    """Celery's client writes ``.s`` just before its last header message: parts that
    finished earlier are counted when the last one reports."""
    group_id, queue = new_id(), f"q.{uuid.uuid4().hex}"
    header = [new_id() for _ in range(3)]
    body = _body(app, queue)
    backend = app.backend
    for index in (0, 1):
        backend.on_chord_part_return(
            _header_request(group_id, header[index], index, body), "SUCCESS", f"v{index}"
        )
    backend._call(
        "set size",
        lambda client: client.set(f"celery-taskset-meta-{group_id}.s", 3),
    )
    backend.on_chord_part_return(_header_request(group_id, header[2], 2, body), "SUCCESS", "v2")

    [message] = _drain(app, queue)
    assert message.decode()[0] == [["v0", "v1", "v2"]]


def test_chord_whose_firing_worker_died_is_fired_by_the_redelivered_report(app, raw):
    backend, group_id, queue = app.backend, new_id(), f"q.{uuid.uuid4().hex}"
    backend.chord_claim_timeout = 1.0
    header = [new_id() for _ in range(2)]
    body = _body(app, queue)
    backend.apply_chord(group_id, header, body)
    backend.on_chord_part_return(_header_request(group_id, header[0], 0, body), "SUCCESS", 0)
    # The worker completing the chord claimed it, then died before sending the body:
    key = f"celery-taskset-meta-{group_id}"
    request = _header_request(group_id, header[1], 1, body)
    raw.set(f"{key}.c", "dead-worker-token", px=1000)
    backend.on_chord_part_return(request, "SUCCESS", 1)  # counted, the claim held
    started = time.monotonic()
    backend.on_chord_part_return(request, "SUCCESS", 1)  # the redelivered header task
    assert time.monotonic() - started < 5
    [message] = _drain(app, queue)
    assert message.decode()[0] == [[0, 1]]
    assert raw.get(f"{key}.c") == b"done"


def test_a_part_added_to_a_running_chord_is_counted_once_however_often_retried(app, raw):
    backend, group_id = app.backend, new_id()
    backend.apply_chord(group_id, [new_id()], _body(app, f"q.{uuid.uuid4().hex}"))
    added = AsyncResult(new_id(), app)
    backend.add_to_chord(group_id, added)
    backend.add_to_chord(group_id, added)  # e.g. a timed-out call retried
    backend.add_to_chord(group_id, AsyncResult(new_id(), app))
    assert raw.get(f"celery-taskset-meta-{group_id}.t") == b"2"


def test_the_claim_is_kept_while_a_slow_body_is_sent(app, raw, monkeypatch):
    """A body publish that retries past the claim's life must not let another report
    take the chord over and send the body twice."""
    from kernel.canvas import Signature

    backend, group_id, queue = app.backend, new_id(), f"q.{uuid.uuid4().hex}"
    backend.chord_claim_timeout = 0.3
    header = [new_id()]
    body = _body(app, queue)
    backend.apply_chord(group_id, header, body)
    key = f"celery-taskset-meta-{group_id}.c"
    claims_seen = []
    real = Signature.apply_async

    def slow_publish(self, *args, **kwargs):
        deadline = time.monotonic() + 1.2  # four claim lifetimes
        while time.monotonic() < deadline:
            claims_seen.append(raw.get(key))
            time.sleep(0.05)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Signature, "apply_async", slow_publish)
    backend.on_chord_part_return(_header_request(group_id, header[0], 0, body), "SUCCESS", 0)
    assert claims_seen and None not in claims_seen  # never expired meanwhile
    assert len(set(claims_seen)) == 1
    [message] = _drain(app, queue)
    assert message.decode()[0] == [[0]]
    assert raw.get(key) == b"done"


def test_nested_group_header_gives_the_body_nested_values(app):
    backend, group_id, queue = app.backend, new_id(), f"q.{uuid.uuid4().hex}"
    first, inner_id, second, third = new_id(), new_id(), new_id(), new_id()
    header = GroupResult(
        group_id,
        [
            AsyncResult(first, app),
            GroupResult(inner_id, [AsyncResult(second, app), AsyncResult(third, app)]),
        ],
        app=app,
    )
    body = _body(app, queue)
    backend.apply_chord(group_id, header, body)
    assert backend.restore_group(group_id) is not None
    for task_id, index, value in [(third, 1, "c"), (first, 0, "a"), (second, 0, "b")]:
        backend.store_result(task_id, value, states.SUCCESS)
        backend.on_chord_part_return(
            _header_request(group_id, task_id, index, body), "SUCCESS", value
        )
    [message] = _drain(app, queue)
    assert message.decode()[0] == [["a", ["b", "c"]]]


def _drain(app: App, queue: str) -> list[Any]:
    import kombu

    messages = []
    with app.connection() as connection:
        bound = kombu.Queue(queue, routing_key=queue)(connection.default_channel)
        while (message := bound.get(no_ack=True)) is not None:
            messages.append(message)
    return messages


# -- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://", {"addresses": (("localhost", 6379),), "db": 0}),
        ("redis://h:6380/3", {"addresses": (("h", 6380),), "db": 3}),
        ("redis://:s%40cret@h/2", {"password": "s@cret", "username": None, "db": 2}),
        ("redis://user:pw@h", {"username": "user", "password": "pw"}),
        ("redis://h?db=5&socket_timeout=2.5", {"db": 5, "options": {"socket_timeout": 2.5}}),
        ("redis+socket:///tmp/r.sock?virtual_host=4", {"socket_path": "/tmp/r.sock", "db": 4}),
        (
            "sentinel://a:26379;sentinel://b/1;sentinel://:pw@c:26380",
            {"addresses": (("a", 26379), ("b", 26379), ("c", 26380)), "db": 1, "password": "pw"},
        ),
        ("rediss://h:6380?ssl_cert_reqs=none", {"options": {"ssl_cert_reqs": 0}}),
    ],
)
def test_urls_are_parsed(url, expected):
    parsed = urls.parse(url)
    for name, value in expected.items():
        assert getattr(parsed, name) == value, name


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost:6379", "expected scheme://"),
        ("redis://h:port/0", "port in 'h:port' is not a number"),
        ("redis://h:6379/zero", "database 'zero' is not a number"),
        ("redis://h/0?sockettimeout=1", "unknown option 'sockettimeout'"),
        ("redis://h/0?socket_timeout=soon", "option socket_timeout"),
        ("redis://h/0?ssl_cert_reqs=required", "needs TLS: use rediss://"),
        ("rediss://h/0?ssl_cert_reqs=maybe", "not one of required, optional, none"),
        ("redis+socket://", "socket's absolute path"),
        ("redis+socket://host/x.sock", "socket's absolute path"),
        ("sentinel://a:26379;redis://b:6379", "does not start with sentinel://"),
        ("redis://:pw@h/0?password=pw", "put the password before the host"),
    ],
)
def test_malformed_urls_say_what_is_wrong_with_an_example(url, problem):
    with pytest.raises(urls.InvalidRedisURL) as raised:
        urls.parse(url)
    message = str(raised.value)
    assert problem in message
    assert "for example" in message


def test_url_errors_hide_the_password():
    with pytest.raises(urls.InvalidRedisURL) as raised:
        urls.parse("redis://:hunter2@h:x/0")
    assert "hunter2" not in str(raised.value)


def test_bad_backend_url_fails_when_the_backend_is_built(plugins):
    app = make_app("redis://localhost:6379/db0", plugins)
    with pytest.raises(ConfigurationError, match="database 'db0' is not a number"):
        app.backend  # noqa: B018


def test_sentinel_url_without_master_name_is_refused(plugins):
    app = make_app("sentinel://localhost:26379", plugins)
    with pytest.raises(ConfigurationError, match="master_name"):
        app.backend  # noqa: B018


def test_tls_options_come_from_the_url_and_transport_options(plugins):
    app = make_app(
        "rediss://h:6380/0?ssl_ca_certs=/ca.pem",
        plugins,
        transport_options={"ssl_cert_reqs": "optional", "ssl_ca_certs": "/other.pem"},
    )
    options = app.backend.connection_options
    import ssl

    assert options["ssl_cert_reqs"] == ssl.CERT_OPTIONAL
    assert options["ssl_ca_certs"] == "/ca.pem"  # the URL wins


def test_redis_backend_use_ssl_gives_tls_options_below_transport_options(plugins):
    import ssl

    app = make_app(
        "rediss://h:6380/0",
        plugins,
        redis_backend_use_ssl={"ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem"},
        transport_options={"ssl_ca_certs": "/other.pem"},
    )
    options = app.backend.connection_options
    assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert options["ssl_ca_certs"] == "/other.pem"


# -- servers of the tests' own: unreachable Redis, unix socket, sentinel, TLS -----------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A ``redis-server`` of the test's own, stopped at the end."""

    def __init__(self, directory: Path, *arguments: str, config: str = "") -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        config_file = directory / "redis.conf"
        config_file.write_text(config + "\nsave ''\nappendonly no\n")
        self.process = subprocess.Popen(
            ["redis-server", str(config_file), "--dir", str(directory), *arguments],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait(self, ready: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                if ready():
                    return
            except Exception:  # not up yet
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start within 10s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


@pytest.fixture
def own_server(tmp_path) -> Iterator[Any]:
    servers: list[RedisServer] = []

    def start(name: str, *arguments: str, config: str = "") -> RedisServer:
        server = RedisServer(tmp_path / name, *arguments, config=config)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_unreachable_redis_raises_a_clear_error_after_retrying(plugins):
    port = _free_port()
    app = make_app(
        f"redis://:secret@127.0.0.1:{port}/0", plugins, transport_options={"retry_timeout": 1}
    )
    started = time.monotonic()
    with pytest.raises(RedisBackendUnavailable) as raised:
        app.backend.get_task_meta(new_id())
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "secret" not in message
    assert "did not answer for 1.0s" in message
    assert 1.0 <= elapsed < 8
    app.close()


@needs_redis_server
def test_operations_resume_when_redis_comes_back_within_the_retry_time(plugins, own_server):
    port = _free_port()
    app = make_app(f"redis://127.0.0.1:{port}/0", plugins, transport_options={"retry_timeout": 20})
    try:
        starter = threading.Timer(1.0, lambda: own_server("late", "--port", str(port)))
        starter.start()
        task_id = new_id()
        app.backend.store_result(task_id, "stored once Redis was up", states.SUCCESS)
        starter.join()
        assert app.backend.get_task_meta(task_id)["result"] == "stored once Redis was up"
    finally:
        app.close()


@needs_redis_server
def test_unix_socket_url(plugins, own_server, tmp_path):
    path = tmp_path / "redis.sock"
    server = own_server("socket", "--port", "0", "--unixsocket", str(path))
    server.wait(lambda: redis.Redis(unix_socket_path=str(path)).ping())
    app = make_app(f"redis+socket://{path}?db=2", plugins)
    try:
        task_id = new_id()
        app.backend.store_result(task_id, "over the socket", states.SUCCESS)
        client = redis.Redis(unix_socket_path=str(path), db=2)
        assert client.exists(f"celery-task-meta-{task_id}")
        assert AsyncResult(task_id, app).get(timeout=5) == "over the socket"
    finally:
        app.close()
    broker_roundtrip(f"redis+socket://{path}?db=2", plugins)


@needs_redis_server
def test_sentinel_url_finds_the_master(plugins, own_server):
    master_port, sentinel_port = _free_port(), _free_port()
    master = own_server("master", "--port", str(master_port))
    master.wait(lambda: redis.Redis(port=master_port).ping())
    sentinel = own_server(
        "sentinel",
        "--sentinel",
        config=f"port {sentinel_port}\nsentinel monitor kmaster 127.0.0.1 {master_port} 1\n",
    )
    sentinel.wait(
        lambda: redis.Redis(port=sentinel_port).sentinel_get_master_addr_by_name("kmaster")
    )
    app = make_app(
        f"sentinel://127.0.0.1:{_free_port()};sentinel://127.0.0.1:{sentinel_port}/3",
        plugins,
        transport_options={"master_name": "kmaster", "socket_connect_timeout": 1},
    )
    try:
        task_id = new_id()
        app.backend.store_result(task_id, "via sentinel", states.SUCCESS)
        assert redis.Redis(port=master_port, db=3).exists(f"celery-task-meta-{task_id}")
        assert AsyncResult(task_id, app).get(timeout=5) == "via sentinel"
    finally:
        app.close()
    broker_roundtrip(
        f"sentinel://127.0.0.1:{sentinel_port}/3",
        plugins,
        master_name="kmaster",
        socket_connect_timeout=1,
    )


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )

    def run(*arguments: str) -> None:
        subprocess.run(["openssl", *arguments], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(key),
        "-out", str(csr))  # fmt: skip
    extensions = directory / "san.ext"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "1", "-out", str(cert),
        "-extfile", str(extensions))  # fmt: skip
    return ca, cert, key


@needs_redis_server
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_rediss_url_with_a_verified_certificate(plugins, own_server, tmp_path):
    ca, cert, key = _certificates(tmp_path)
    port = _free_port()
    server = own_server(
        "tls",
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
    )  # fmt: skip

    def ready() -> bool:
        return redis.Redis(port=port, ssl=True, ssl_ca_certs=str(ca)).ping()

    try:
        server.wait(ready)
    except RuntimeError as exc:
        pytest.skip(f"this redis-server has no TLS support: {exc}")
    app = make_app(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}", plugins)
    try:
        task_id = new_id()
        app.backend.store_result(task_id, "over TLS", states.SUCCESS)
        assert AsyncResult(task_id, app).get(timeout=5) == "over TLS"
    finally:
        app.close()
    broker_roundtrip(
        f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}", plugins
    )
    with pytest.raises(ConfigurationError, match=r"needs its TLS options: add \?ssl_cert_reqs"):
        broker_roundtrip(f"rediss://127.0.0.1:{port}/0", plugins)
    use_ssl = {"ssl_cert_reqs": "required", "ssl_ca_certs": str(ca)}
    broker_roundtrip(f"rediss://127.0.0.1:{port}/0", plugins, {"broker_use_ssl": use_ssl})
    untrusted = make_app(
        f"rediss://127.0.0.1:{port}/0", plugins, transport_options={"retry_timeout": 0.5}
    )
    try:
        with pytest.raises(RedisBackendUnavailable, match="certificate verify failed"):
            untrusted.backend.get_task_meta(new_id())
    finally:
        untrusted.close()


def test_wait_for_times_out_with_the_task_state(app):
    task_id = new_id()
    app.backend.mark_as_started(task_id)
    with pytest.raises(TimeoutError, match=f"task {task_id} still STARTED after 0.3s"):
        app.backend.wait_for(task_id, timeout=0.3)


def test_backend_is_the_plugins_for_redis_urls(app):
    assert isinstance(app.backend, RedisBackend)
    assert app.backend.supports_chords
