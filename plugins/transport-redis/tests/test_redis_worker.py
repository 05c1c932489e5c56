"""End to end on Redis: `kernel worker` processes with the Redis broker and backend.

The Redis counterparts of ``tests/integration/test_worker_sqlite.py`` and
``test_eta_expiry.py``: real worker subprocesses (tasks in ``worker_tasks``), a kernel
client app, and assertions on what a user sees (results, how often a task ran, when)
and on what Redis holds (the queue's list, its delayed set, the ``unacked`` hash).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
from harness import RedisCluster, report, wait_until

pytestmark = pytest.mark.integration

#: How late an ETA task may start, as in the SQLite suite.
ETA_LATENESS = 1.0
#: kombu's priority steps: the queue ``celery`` is the lists ``celery`` (step 0) and
#: ``celery\x06\x16<step>``.
PRIORITY_STEPS = (0, 3, 6, 9)
SEPARATOR = "\x06\x16"


def ready_in_list(cluster: RedisCluster, queue: str = "celery") -> int:
    """Messages waiting in the lists of ``queue`` (every priority step)."""
    keys = [queue if step == 0 else f"{queue}{SEPARATOR}{step}" for step in PRIORITY_STEPS]
    return sum(int(cluster.broker.llen(key)) for key in keys)


def delayed_in_set(cluster: RedisCluster, queue: str = "celery") -> int:
    return int(cluster.broker.zcard(f"{queue}{SEPARATOR}delayed"))


def held_by_consumers(cluster: RedisCluster) -> int:
    """Deliveries not acknowledged yet: what workers hold."""
    return int(cluster.broker.hlen("unacked"))


@pytest.mark.parametrize(
    ("pool", "explicit_plugin"),
    [("prefork", True), ("solo", False)],
    ids=["prefork-plugin-option", "solo-autoloaded"],
)
def test_worker_runs_tasks_and_clients_are_woken_by_pubsub(
    cluster: RedisCluster, pool: str, explicit_plugin: bool
):
    concurrency = ["-c", "2"] if pool == "prefork" else []
    worker = cluster.worker("-P", pool, *concurrency, explicit_plugin=explicit_plugin)
    assert cluster.app.send_task("worker_tasks.add", (2, 3)).get(timeout=20) == 5
    # Polling the key only after a minute: a get() answered sooner was woken by pub/sub.
    cluster.app.backend.recheck_interval = 60.0
    slow = cluster.app.send_task("worker_tasks.slow", ("woken", 1.0))
    assert slow.state == "PENDING"
    started = time.monotonic()
    assert slow.get(timeout=20) == "woken"
    assert time.monotonic() - started < 10
    failed = cluster.app.send_task("worker_tasks.fail", ("kaput",))
    with pytest.raises(ValueError, match="kaput"):
        failed.get(timeout=20)
    assert failed.state == "FAILURE"
    assert "raise ValueError(message)" in failed.traceback
    many = [cluster.app.send_task("worker_tasks.add", (i, i)) for i in range(20)]
    assert [r.get(timeout=20) for r in many] == [2 * i for i in range(20)]
    assert cluster.broker.exists(f"celery-task-meta-{slow.id}")  # Celery's key layout
    (plugins_line,) = [line for line in worker.log().splitlines() if "plugins:" in line]
    assert "redis" in plugins_line
    if explicit_plugin:
        assert "hello" not in plugins_line  # only --plugin loaded it: autoload was off


def test_task_running_past_the_visibility_timeout_runs_once_with_two_workers(
    cluster: RedisCluster,
):
    workers = [cluster.worker("-P", "solo", visibility_timeout=2, wait=False) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    result = cluster.app.send_task("worker_tasks.slow", ("long", 7.0))
    wait_until(lambda: cluster.counts("start"), 15, "the long task to start")
    # The other worker consumes meanwhile (and sweeps expired leases): it could steal.
    assert cluster.app.send_task("worker_tasks.add", (1, 1)).get(timeout=15) == 2
    assert result.get(timeout=30) == "long"
    assert cluster.counts("start") == {"long": 1}
    assert cluster.counts("end") == {"long": 1}
    assert held_by_consumers(cluster) == 0
    for worker in workers:
        assert worker.alive
        assert "went back to their queues" not in worker.log()


def test_eta_task_waits_in_redis_across_a_worker_restart_and_runs_once_on_time(
    cluster: RedisCluster,
):
    first = cluster.worker("-P", "prefork", "-c", "1")
    sent_at = time.time()
    result = cluster.app.send_task("worker_tasks.stamp", ("eta",), countdown=5.0)
    due = sent_at + 5.0

    def waits_in_redis() -> None:
        assert delayed_in_set(cluster) == 1, "the ETA message should be in the delayed set"
        assert ready_in_list(cluster) == 0, "the ETA message should not be in the queue"
        assert held_by_consumers(cluster) == 0, "no worker should hold the ETA message"

    # One delayed_poll_interval (0.5 s): the consuming worker looks at the set meanwhile.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        waits_in_redis()
        time.sleep(0.05)  # sampling the broker's state while the worker consumes
    first.signal(signal.SIGTERM)
    assert first.wait_exit(15) == 0
    assert "warm shutdown" in first.log()
    assert "returned" not in first.log()  # it held nothing to hand back
    waits_in_redis()
    assert not cluster.events()
    cluster.worker("-P", "prefork", "-c", "1")
    ready_at = time.time()  # on a loaded machine it may only be ready after the ETA
    if ready_at < due - 0.5:  # not yet due: still in the set, though a worker consumes
        waits_in_redis()
    assert result.get(timeout=20) == "eta"
    (run,) = cluster.events("run")
    assert run.eta == pytest.approx(due, abs=0.5)
    assert run.at >= run.eta, f"ran {run.eta - run.at:.3f}s before its ETA"
    late = run.at - max(run.eta, ready_at)
    assert late <= ETA_LATENESS, f"ran {late:.3f}s after its ETA (or the worker's start)"
    assert delayed_in_set(cluster) == 0
    assert cluster.counts() == {"eta": 1}


PRODUCER = textwrap.dedent("""
    import sys
    from kernel import App

    url, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    app = App("producer", broker=url, backend=url)
    for i in range(count):
        app.send_task("worker_tasks.count", (f"{name}-{i}",))
    app.close()
""")


@pytest.mark.timeout(240)
def test_many_tasks_from_four_producers_are_each_run_exactly_once(
    cluster: RedisCluster, request: pytest.FixtureRequest
):
    producers, per_producer = 4, 5000
    total = producers * per_producer
    workers = [cluster.worker("-P", "prefork", "-c", "2", wait=False) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRODUCER, cluster.url, f"p{n}", str(per_producer)],
            env=cluster.env,
        )
        for n in range(producers)
    ]
    try:
        for proc in procs:
            assert proc.wait(120) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    sent = time.monotonic() - started

    def all_run() -> bool:
        for worker in workers:
            assert worker.alive, f"worker {worker.name} died:\n{worker.tail()}"
        return int(cluster.records.hlen("record:run")) >= total

    wait_until(all_run, 150, f"{total} tasks to run", interval=0.2)
    elapsed = time.monotonic() - started
    # Every message acknowledged and none left: no copy can run later.
    wait_until(
        lambda: ready_in_list(cluster) == 0 and held_by_consumers(cluster) == 0,
        30,
        "every message to be acknowledged",
    )
    counts = cluster.counts()
    expected = {f"p{n}-{i}" for n in range(producers) for i in range(per_producer)}
    assert set(counts) == expected
    duplicates = {token: count for token, count in counts.items() if count > 1}
    assert not duplicates
    report(
        request.config,
        f"redis: {total} tasks from {producers} producers run exactly once by 2 prefork "
        f"workers (-c 2) in {elapsed:.1f}s ({total / elapsed:.0f} tasks/s; sending took "
        f"{sent:.1f}s)",
    )
