"""Real ``kernel worker`` processes storing their results in the SQL backend.

The broker is a SQLite file of the test's own (the embedded transport); the result
backend is the database under test. Workers are subprocesses, as in production:
their pool children open their own connections after the fork.
"""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sql_harness import Cluster, wait_until

from kernel import App, chord, states
from kernel.result import AsyncResult

pytestmark = pytest.mark.integration

TIMEOUT = 60.0
#: Workers (prefork, 2 processes each) whose processes finish a chord's header together.
CHORD_WORKERS = 4
CHORD_PROCESSES = CHORD_WORKERS * 2
CHORD_ROUNDS = 2


@pytest.fixture
def cluster(tmp_path, db) -> Iterator[Cluster]:
    instance = Cluster(tmp_path, db.url, KERNEL_RESULT_EXTENDED="true")
    yield instance
    instance.close()


def sig(app: App, name: str, *args: Any, **kwargs: Any) -> Any:
    return app.signature(f"sql_worker_tasks.{name}", args=args, kwargs=kwargs)


def test_result_reads_back_after_the_worker_that_wrote_it_is_gone(cluster, db):
    [worker] = cluster.start(1, "-P", "solo")
    token = uuid.uuid4().hex
    added = sig(cluster.app, "add", 2, 3, token=token).apply_async()
    failed = sig(cluster.app, "fail", "on purpose").apply_async()
    wait_until(lambda: cluster.records("ran"), TIMEOUT, "the worker to run add()")
    # Once both are done, stop the worker: a warm shutdown, so it exits by itself.
    wait_until(
        lambda: AsyncResult(failed.id, cluster.app).state == states.FAILURE,
        TIMEOUT,
        "fail() to be stored",
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(30) == 0, worker.tail()

    reader = App("sql-test-reader", broker="memory://", backend=db.url, result_extended=True)
    try:
        result = AsyncResult(added.id, reader)
        assert result.get(timeout=10) == 5
        with pytest.raises(ValueError, match="on purpose"):
            AsyncResult(failed.id, reader).get(timeout=10)
        meta = reader.backend.get_task_meta(added.id)
    finally:
        reader.close()
    # result_extended: the worker recorded who ran what, in Celery's columns.
    assert meta["name"] == "sql_worker_tasks.add"
    assert meta["args"] == [2, 3]
    assert meta["kwargs"] == {"token": token}
    assert meta["worker"].startswith("sql1@")
    assert meta["queue"] == "celery"
    assert meta["retries"] == 0

    engine = db.engine()
    try:
        with engine.connect() as connection:
            row = connection.execute(
                sa.text("SELECT status, worker FROM celery_taskmeta WHERE task_id = :id"),
                {"id": added.id},
            ).one()
    finally:
        engine.dispose()
    assert row.status == "SUCCESS"
    assert row.worker == meta["worker"]


def worker_stats(cluster: Cluster) -> list[dict]:
    replies = cluster.app.control.broadcast(
        "stats", reply=True, timeout=3.0, limit=len(cluster.workers)
    )
    return [reply for item in replies or [] for reply in item.values()]


def queue_size(app: App, name: str = "celery") -> int:
    with app.connection() as connection:
        return connection.default_channel.queue_declare(queue=name, passive=True).message_count


def settled(cluster: Cluster, tasks_done: int) -> bool:
    """Every worker answered, is idle and counted ``tasks_done`` successes in all, and
    nothing waits in the queue: any duplicate body would have shown up by now."""
    stats = worker_stats(cluster)
    if len(stats) < len(cluster.workers):
        return False
    idle = all(s["reserved"] == 0 and s["running"] == 0 for s in stats)
    done = sum(s["counts"].get("succeeded", 0) for s in stats)
    return idle and done >= tasks_done and queue_size(cluster.app) == 0


def test_chord_fires_its_body_once_when_its_header_tasks_finish_together(cluster):
    cluster.start(CHORD_WORKERS, "-c", "2", "--prefetch-multiplier", "1")
    tasks_done = 0
    for round_number in range(CHORD_ROUNDS):
        token = f"r{round_number}-{uuid.uuid4().hex[:8]}"
        header = [sig(cluster.app, "hold", n, token) for n in range(CHORD_PROCESSES)]
        result = chord(header)(sig(cluster.app, "record_body", token))
        wait_until(
            lambda token=token: len(cluster.records_of("start", token)) == CHORD_PROCESSES,
            TIMEOUT,
            f"all {CHORD_PROCESSES} header tasks of round {round_number} to be running",
        )
        pids = {line[2] for line in cluster.records_of("start", token)}
        assert len(pids) == CHORD_PROCESSES, f"header tasks shared processes: {pids}"
        cluster.release(token)  # every header task returns at this moment

        assert result.get(timeout=TIMEOUT) == sum(range(CHORD_PROCESSES))
        tasks_done += CHORD_PROCESSES + 1
        wait_until(
            lambda done=tasks_done: settled(cluster, done),
            TIMEOUT,
            "the workers to finish every message",
            interval=0.2,
        )
        bodies = cluster.records_of("body", token)
        assert len(bodies) == 1, f"the body ran {len(bodies)} times:\n{cluster.logs()}"
        assert bodies[0][3] == ",".join(str(n) for n in range(CHORD_PROCESSES))
    assert Counter(line[0] for line in cluster.records())["body"] == CHORD_ROUNDS
