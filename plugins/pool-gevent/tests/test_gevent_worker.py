"""``kernel worker -P gevent`` subprocesses, driven through the broker as users do:
many I/O-bound tasks at once, revocation and time limits inside greenlets, a warm
shutdown with hundreds in flight, and each transport and result backend."""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from gevent_cluster import GeventCluster

from kernel import states
from kernel.testing.processes import wait_until
from kernel.testing.services import require_service

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)


def most_at_once(intervals: list[list[float]]) -> int:
    """The largest number of [start, end] intervals that overlap."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def gather(cluster: GeventCluster, results: list, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    values = []
    for result in results:
        try:
            values.append(result.get(timeout=max(0.1, deadline - time.monotonic())))
        except Exception as exc:
            raise AssertionError(f"{result.id}: {exc!r}\n{cluster.logs()}") from exc
    return values


def test_a_thousand_io_bound_tasks_wait_at_once_on_one_worker(sqlite_cluster):
    """1,000 tasks of 0.5 s each: seconds on -c 1000, where one at a time takes 500 s."""
    sqlite_cluster.worker(concurrency=1000)
    started = time.monotonic()
    results = [sqlite_cluster.send("wait", 0.5) for _ in range(1000)]
    intervals = gather(sqlite_cluster, results, timeout=120)
    elapsed = time.monotonic() - started
    peak = most_at_once(intervals)
    log.warning("gevent -c 1000: 1000 x 0.5 s tasks in %.1f s, %d at once at most", elapsed, peak)
    assert peak >= 500, f"at most {peak} tasks waited at once"


def test_revocation_time_limits_rate_limits_and_retries_inside_greenlets(sqlite_cluster):
    cluster = sqlite_cluster
    cluster.worker(concurrency=50)
    others = [cluster.send("wait", 0.2) for _ in range(20)]
    limited = [cluster.send("limited") for _ in range(50)]
    flaky = cluster.send("flaky", "flaky")
    held = cluster.send("hold", "revoked", 60)
    soft = cluster.send("clean_up", 30, soft_time_limit=0.5)
    hard = cluster.send("stubborn", 30, time_limit=1)
    wait_until(lambda: cluster.recorded("start"), 20, "the task to revoke", explain=cluster.logs)
    held.revoke(terminate=True)
    assert soft.get(timeout=20) == "cleaned up"
    with pytest.raises(Exception) as failure:
        hard.get(timeout=20)
    assert type(failure.value).__name__ == "TimeLimitExceeded"
    wait_until(lambda: held.state == states.REVOKED, 20, "the revoked task", explain=cluster.logs)
    assert cluster.recorded("done") == []  # the revoked task never finished
    assert len(gather(cluster, others, timeout=30)) == 20  # and the pool went on
    assert flaky.get(timeout=20) == 3
    times = sorted(gather(cluster, limited, timeout=30))
    # 20/s with bursts of 20: the 30 after the burst need 1.5 s of tokens.
    assert times[-1] - times[0] >= 1.2, times


def test_a_warm_shutdown_finishes_hundreds_of_running_tasks(sqlite_cluster):
    cluster = sqlite_cluster
    worker = cluster.worker(concurrency=500)
    tokens = [uuid.uuid4().hex for _ in range(300)]
    results = [cluster.send("hold", token, 3) for token in tokens]
    wait_until(
        lambda: len(cluster.recorded("start")) == 300, 60, "300 running", explain=cluster.logs
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(60) == 0, worker.tail()
    assert gather(cluster, results, timeout=30) == ["finished"] * 300
    assert sorted(cluster.recorded("done")) == sorted(tokens)
    assert sorted(cluster.recorded("start")) == sorted(tokens)  # none ran twice


# -- transports and result backends ------------------------------------------------------


@contextmanager
def redis_url() -> Iterator[str]:
    host, port = require_service("redis")
    yield f"redis://{host}:{port}/{1 + os.getpid() % 15}"


@contextmanager
def amqp_url() -> Iterator[str]:
    host, port = require_service("rabbitmq")
    yield f"amqp://guest:guest@{host}:{port}//"


@contextmanager
def postgres_backend() -> Iterator[str]:
    """A schema of its own in the database ``test``, dropped afterwards."""
    host, port = require_service("postgres")
    import psycopg

    schema = f"kernel_gevent_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = dict(host=host, port=port, user="postgres", dbname="test", autocommit=True)
    with psycopg.connect(**admin) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"db+postgresql://postgres@{host}:{port}/test?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(**admin) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextmanager
def mariadb_backend() -> Iterator[str]:
    """A database of its own, dropped afterwards."""
    host, port = require_service("mariadb")
    import pymysql

    name = f"kernel_gevent_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    connection = pymysql.connect(host=host, port=port, user="root", autocommit=True)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}`")
        yield f"db+mysql://root@{host}:{port}/{name}"
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        connection.close()


#: Each transport and each result backend at least once (the SQLite pair is the
#: other tests' default).
COMBINATIONS = {
    "amqp-redis": (amqp_url, redis_url),
    "redis-postgresql": (redis_url, postgres_backend),
    "amqp-mariadb": (amqp_url, mariadb_backend),
}


def _forget_queue(cluster: GeventCluster) -> None:
    """Delete the test's queue from the broker (RabbitMQ keeps durable queues)."""
    with cluster.app.connection() as connection:
        try:
            connection.default_channel.queue_delete(cluster.queue)
        except Exception as exc:  # best effort: the queue is empty and uniquely named
            log.warning("could not delete queue %s: %s", cluster.queue, exc)


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_runs_on_each_transport_and_result_backend(combination, tmp_path):
    broker_of, backend_of = COMBINATIONS[combination]
    with broker_of() as broker, backend_of() as backend:
        cluster = GeventCluster(tmp_path, broker, backend)
        try:
            cluster.worker(concurrency=200)
            results = [cluster.send("wait", 0.3) for _ in range(200)]
            intervals = gather(cluster, results, timeout=60)
            assert most_at_once(intervals) >= 100
        finally:
            cluster.close()
            _forget_queue(cluster)
