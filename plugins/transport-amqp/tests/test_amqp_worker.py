"""End to end on RabbitMQ: ``kernel worker`` processes, rpc:// results, delayed tasks
held by the broker, killed workers and poison messages, and many tasks at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from amqp_harness import Cluster, report, wait_until

from kernel.exceptions import WorkerLostError

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_worker_runs_tasks_and_rpc_results_come_back(cluster: Cluster, pool: str):
    concurrency = ["-c", "2"] if pool == "prefork" else []
    cluster.worker("-P", pool, *concurrency)
    app = cluster.app
    assert app.send_task("amqp_tasks.add", (2, 3)).get(timeout=20) == 5
    failed = app.send_task("amqp_tasks.fail", ("kaput",))
    with pytest.raises(ValueError, match="kaput"):
        failed.get(timeout=20)
    assert failed.state == "FAILURE"
    assert "raise ValueError(message)" in failed.traceback
    many = [app.send_task("amqp_tasks.add", (i, i)) for i in range(50)]
    assert app.GroupResult("g", many).get(timeout=30) == [2 * i for i in range(50)]
    assert all(result.state == "SUCCESS" for result in many)


#: How late a delayed task may start after its ETA: up to a second of rounding up (the
#: broker delays by whole seconds), plus the worker's pick-up on a loaded machine.
ETA_LATENESS = 2.0


def delayed_in_broker(cluster: Cluster) -> int:
    """Messages waiting in this run's delay queues."""
    from kernel_amqp import delayed

    prefix = cluster.transport_options["delayed_delivery_prefix"]
    return sum(
        cluster.broker.count(delayed.level_name(level, prefix)) for level in range(delayed.BITS)
    )


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_countdown_task_waits_in_the_broker_and_runs_once_on_time(make_cluster, queue_type: str):
    cluster = make_cluster(options={"queue_type": queue_type})
    cluster.worker("-P", "solo")
    sent_at = time.time()
    result = cluster.app.send_task("amqp_tasks.stamp", ("eta",), countdown=3.0)
    # In the broker's delay queues: not in the task queue, so not in any worker either.
    wait_until(lambda: delayed_in_broker(cluster) == 1, 5, "the message to enter a delay queue")
    assert cluster.broker.count(cluster.queue) == 0
    assert result.get(timeout=20) == "eta"
    (run,) = cluster.records.events("run")
    assert run.eta == pytest.approx(sent_at + 3.0, abs=0.5)
    assert run.at >= run.eta, f"ran {run.eta - run.at:.3f}s before its ETA"
    assert run.at - run.eta <= ETA_LATENESS, f"ran {run.at - run.eta:.3f}s after its ETA"
    assert delayed_in_broker(cluster) == 0
    assert cluster.records.counts() == {"eta": 1}


@pytest.mark.parametrize("first_delay", [1, None], ids=["delayed", "at-once"])
def test_retry_with_countdown_waits_in_the_broker(make_cluster, first_delay):
    """A delayed task's retry goes back through the delay exchanges it came from (2 s
    more), without the first delay's routing prefix. A task sent at once retries from
    a prefork child, which forked before the worker declared its queues: the child
    learns the worker's routes at start (review 2, finding 5), or its retry would be
    delivered at once and held by the worker."""
    cluster = make_cluster(options={"queue_type": "quorum"})
    cluster.worker("-P", "prefork", "-c", "1")
    sent_at = time.time()
    result = cluster.app.send_task("amqp_tasks.retry_later", ("again", 2), countdown=first_delay)
    wait_until(lambda: cluster.records.counts() == {"again": 1}, 15, "the first run")
    wait_until(lambda: delayed_in_broker(cluster) == 1, 5, "the retry to enter a delay queue")
    assert cluster.broker.count(cluster.queue) == 0
    assert result.get(timeout=20) == {"token": "again", "retries": 1}
    first, second = cluster.records.events("run")
    assert first.at - sent_at >= (first_delay or 0)
    assert second.at - first.at >= 2.0
    assert second.at - first.at <= 2.0 + ETA_LATENESS
    assert second.at >= second.eta


def test_killed_worker_task_is_redelivered_once_at_once(make_cluster, request):
    """RabbitMQ returns a dead connection's unacked messages at once: no lease to
    wait for. The kernel did not see the death: the count stays (the quorum queue's
    delivery limit counts it)."""
    cluster = make_cluster(options={"queue_type": "quorum"})
    release = cluster.tmp_path / "release-crash"
    first = cluster.worker("-P", "prefork", "-c", "1")
    # The task waits for the release file: the first run lasts until it is killed.
    result = cluster.app.send_task("amqp_tasks.hold", ("crash", str(release)))
    wait_until(lambda: cluster.records.counts("start"), 15, "the task to start")
    second = cluster.worker("-P", "prefork", "-c", "1")
    killed_at = time.time()
    first.kill_group()
    wait_until(lambda: cluster.records.counts("start")["crash"] == 2, 30, "the task to start again")
    release.touch()
    assert result.get(timeout=30) == "crash"
    first_run, rerun = cluster.records.events("start", "crash")
    assert rerun.pid != first_run.pid
    assert (first_run.delivery_count, rerun.delivery_count) == (0, 0)
    assert cluster.records.counts("start") == {"crash": 2}
    assert cluster.records.counts("end") == {"crash": 1}
    assert second.alive
    assert cluster.broker.count(cluster.queue) == 0
    report(
        request.config,
        f"amqp: a killed worker's task started again on another worker "
        f"{rerun.at - killed_at:.2f}s after the kill",
    )


@pytest.mark.parametrize(("pool", "queue_type"), [("prefork", "quorum"), ("prefork", "classic")])
def test_poison_task_is_dead_lettered_after_three_deliveries(make_cluster, pool, queue_type):
    """prefork: each delivery kills a pool child; the worker requeues the message with
    the count raised, which survives the quorum queue's own count."""
    cluster = make_cluster(options={"queue_type": queue_type})
    options = ["-P", pool, "--prefetch-multiplier", "1", "-c", "2"]
    cluster.worker(*options)
    poison = cluster.app.send_task("amqp_tasks.exit_always", ("poison", 7))
    others = [cluster.app.send_task("amqp_tasks.count", (f"ok{i}",)) for i in range(20)]
    with pytest.raises(WorkerLostError, match="delivered 3 times"):
        poison.get(timeout=60)
    assert [r.get(timeout=20) for r in others] == [f"ok{i}" for i in range(20)]
    assert cluster.records.counts("exit") == {"poison": 3}
    assert cluster.records.counts() == {f"ok{i}": 1 for i in range(20)}
    # The failure is stored just before the message is moved: wait for the move.
    wait_until(lambda: cluster.broker.count(cluster.dead_letter_queue) == 1, 10, "the dead letter")
    (dead,) = cluster.broker.take(cluster.dead_letter_queue)
    assert dead.properties["application_headers"]["id"] == poison.id


def test_task_killing_its_solo_worker_is_dead_lettered_by_the_delivery_limit(make_cluster, broker):
    """solo: each delivery kills the whole worker, which the kernel never sees; the
    quorum queue's x-delivery-limit bounds it, and RabbitMQ dead-letters it."""
    dead_letters = broker.name("dlq")
    cluster = make_cluster(
        options={"queue_type": "quorum", "delivery_limit": 2, "dead_letter_queue": dead_letters}
    )
    workers = [
        cluster.worker("-P", "solo", "--prefetch-multiplier", "1", wait=False) for _ in range(4)
    ]
    for worker in workers:
        worker.wait_ready()
    poison = cluster.app.send_task("amqp_tasks.exit_always", ("poison", 7))
    others = [cluster.app.send_task("amqp_tasks.count", (f"ok{i}",)) for i in range(10)]
    assert [r.get(timeout=30) for r in others] == [f"ok{i}" for i in range(10)]
    wait_until(lambda: broker.count(dead_letters) == 1, 30, "the dead letter")
    assert 2 <= cluster.records.counts("exit")["poison"] <= 3  # delivered, returned twice
    (dead,) = broker.take(dead_letters)
    assert dead.properties["application_headers"]["id"] == poison.id


PRODUCER = textwrap.dedent("""
    import json, sys
    from kernel import App

    url, queue, options, name, count = sys.argv[1:6]
    app = App("producer", broker=url, backend=None, task_default_queue=queue,
              broker_transport_options=json.loads(options))
    for i in range(int(count)):
        app.send_task("amqp_tasks.count", (f"{name}-{i}",), ignore_result=True)
    app.close()
""")


@pytest.mark.timeout(240)
def test_twenty_thousand_tasks_from_four_producers_run_exactly_once(
    make_cluster, request: pytest.FixtureRequest
):
    import json

    producers, per_producer = 4, 5000
    total = producers * per_producer
    cluster = make_cluster(options={"queue_type": "quorum"}, task_ignore_result=True)
    workers = [
        cluster.worker("-P", "prefork", "-c", "2", loglevel="WARNING", wait=False) for _ in range(2)
    ]
    for worker in workers:
        worker.wait_ready(worker.ready_check)
    started = time.monotonic()
    options = json.dumps(cluster.transport_options)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PRODUCER,
                cluster.url,
                cluster.queue,
                options,
                f"p{n}",
                str(per_producer),
            ],
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
        return len(cluster.records.counts()) >= total

    wait_until(all_run, 150, f"{total} tasks to run", interval=0.5, explain=cluster.logs)
    elapsed = time.monotonic() - started
    wait_until(lambda: cluster.broker.count(cluster.queue) == 0, 30, "the queue to be empty")
    counts = cluster.records.counts()
    assert set(counts) == {f"p{n}-{i}" for n in range(producers) for i in range(per_producer)}
    duplicates = {token: count for token, count in counts.items() if count > 1}
    assert not duplicates
    report(
        request.config,
        f"amqp: {total} tasks from {producers} producers run exactly once by 2 prefork "
        f"workers (-c 2) on a quorum queue in {elapsed:.1f}s ({total / elapsed:.0f} tasks/s; "
        f"sending took {sent:.1f}s)",
    )
