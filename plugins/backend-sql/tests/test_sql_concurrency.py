"""8 processes store 10,000 results at once: no deadlock escapes, no row is lost.

Each writer is a separate (forked) process with its own engine, as prefork pool
processes are; they start storing at the same moment and report how long they took
and how many transactions the backend had to run again (deadlocks, lock timeouts).
The numbers are printed (``pytest -s``), never asserted.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kernel import App, states
from kernel.task import Context

pytestmark = pytest.mark.integration

PROCESSES = 8
RESULTS = 10_000


class CountRetries(logging.Handler):
    """Counts the backend's "retrying" log records (DEBUG for deadlocks and lock
    timeouts, WARNING for lost connections)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retry" in record.getMessage():
            self.retries += 1


def write_results(url: str, prefix: str, writer: int, count: int, ready: Any, go: Any, out: Any):
    """One writer process: connect, say so, wait for the start, store ``count`` results
    as a worker does (with ``result_extended``), report time and retries."""
    try:
        counter = CountRetries()
        logger = logging.getLogger("kernel_sql.database")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(counter)
        app = App("sql-writer", broker="memory://", backend=url, result_extended=True)
        backend = app.backend
        backend.get_task_meta(f"{prefix}-warm-up")  # connect (and create tables) first
        ready.set()
        if not go.wait(60):
            raise RuntimeError("no start signal within 60s")
        started = time.monotonic()
        for n in range(count):
            task_id = f"{prefix}-{writer}-{n}"
            request = Context(id=task_id, task="bench.store", args=(writer, n), hostname="w")
            backend.mark_as_done(task_id, [writer, n], request=request)
        elapsed = time.monotonic() - started
        app.close()
        out.put({"writer": writer, "seconds": elapsed, "retries": counter.retries})
    except BaseException as exc:  # reported by the test
        out.put({"writer": writer, "error": repr(exc)})


@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_eight_processes_store_ten_thousand_results_without_losing_one(
    dialect, request, tmp_path: Path
):
    scratch = request.getfixturevalue(
        {"postgresql": "postgres_run", "mariadb": "mariadb_run"}[dialect]
    )
    prefix = uuid.uuid4().hex
    per_writer = RESULTS // PROCESSES
    # Forked from this process: separate processes with engines of their own, as
    # prefork pool processes are, without each importing everything again.
    context = multiprocessing.get_context("fork")
    go, out = context.Event(), context.Queue()
    readies = [context.Event() for _ in range(PROCESSES)]
    writers = [
        context.Process(
            target=write_results,
            args=(scratch.url, prefix, writer, per_writer, readies[writer], go, out),
        )
        for writer in range(PROCESSES)
    ]
    for writer in writers:
        writer.start()
    try:
        for ready in readies:
            assert ready.wait(60), "a writer process did not connect within 60s"
        started = time.monotonic()
        go.set()
        reports = [out.get(timeout=180) for _ in writers]
        elapsed = time.monotonic() - started
    finally:
        for writer in writers:
            writer.join(10)
            if writer.is_alive():
                writer.kill()
                writer.join()
    failures = [r["error"] for r in reports if "error" in r]
    assert failures == [], f"writers failed: {failures}"

    app = App("sql-concurrency-check", broker="memory://", backend=scratch.url)
    try:
        ids = [f"{prefix}-{w}-{n}" for w in range(PROCESSES) for n in range(per_writer)]
        metas = app.backend.get_task_metas(ids)
    finally:
        app.close()
    lost = [m["task_id"] for m in metas if m["status"] != states.SUCCESS]
    assert lost == [], f"{len(lost)} results lost, e.g. {lost[:3]}"
    wrong = [
        m["task_id"]
        for m in metas
        if m["result"] != [int(p) for p in m["task_id"].rsplit("-", 2)[1:]]
    ]
    assert wrong == []
    retries = sum(r["retries"] for r in reports)
    slowest = max(r["seconds"] for r in reports)
    print(
        f"\n{dialect}: {RESULTS} results from {PROCESSES} processes in {elapsed:.2f}s "
        f"({RESULTS / elapsed:.0f}/s; slowest writer {slowest:.2f}s); "
        f"transactions retried: {retries}"
    )
