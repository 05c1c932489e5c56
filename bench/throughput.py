"""Throughput of a worker draining a queue: kernel against Celery, same broker, same run.

Both workers consume the same Celery-protocol messages from the embedded SQLite
transport (Celery reaches it through ``broker_transport``), with results disabled,
so the difference is the worker itself. For each system and pool:

1. publish N no-op task messages to a fresh queue,
2. start the worker and wait until it says it is ready,
3. time from ready until no message is left (all acknowledged).

Usage: ``uv run python bench/throughput.py [--tasks 2000] [--pools solo,threads,prefork]``.
Numbers are printed, never asserted: compare the ratios, not absolute rates.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

TRANSPORT = "kernel.plugins.builtin.sqlite_transport:Transport"
QUEUE = "bench"

TASKS_MODULE = """
import os
from kernel import App

URL = os.environ["BENCH_URL"]
app = App("benchtasks", broker=URL, backend=None, task_ignore_result=True)

@app.task(name="bench.noop")
def noop(i):
    return None
"""

CELERY_MODULE = """
import os
from celery import Celery

app = Celery("celerybench", broker=os.environ["BENCH_URL"])
app.conf.broker_transport = {transport!r}
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False

@app.task(name="bench.noop")
def noop(i):
    return None
"""


def publish(url: str, count: int) -> float:
    from kernel import App

    app = App("publisher", broker=url, backend=None)
    started = time.perf_counter()
    for i in range(count):
        app.send_task("bench.noop", (i,), queue=QUEUE, ignore_result=True)
    elapsed = time.perf_counter() - started
    app.close()
    return elapsed


def remaining(db_path: Path) -> int:
    with sqlite3.connect(db_path, timeout=30) as connection:
        return connection.execute(
            "SELECT COUNT(*) FROM kernel_messages WHERE queue = ?", (QUEUE,)
        ).fetchone()[0]


def run_worker(
    system: str, pool: str, concurrency: int, workdir: Path, count: int, timeout: float
) -> float | None:
    db_path = workdir / f"{system}-{pool}.sqlite3"
    url = f"sqlite:///{db_path}"
    publish(url, count)
    env = {**os.environ, "BENCH_URL": url, "PYTHONPATH": str(workdir)}
    if system == "kernel":
        command = [
            sys.executable,
            "-m",
            "kernel",
            "-A",
            "benchtasks",
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-Q",
            QUEUE,
            "-l",
            "INFO",
        ]
        ready_marker = " ready: "
    else:
        celery_pool = {"threads": "threads", "solo": "solo", "prefork": "prefork"}[pool]
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celerybench",
            "worker",
            "-P",
            celery_pool,
            "-c",
            str(concurrency),
            "-Q",
            QUEUE,
            "-l",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
        ]
        ready_marker = " ready."
    log_path = workdir / f"{system}-{pool}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while ready_marker not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"  {system}/{pool}: worker did not start; see {log_path}")
                return None
            time.sleep(0.01)
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        while remaining(db_path):
            if time.monotonic() > deadline:
                print(f"  {system}/{pool}: not drained within {timeout}s")
                return None
            time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--pools", default="solo,threads,prefork")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300)
    options = parser.parse_args()
    try:
        import celery  # noqa: F401
    except ImportError:
        sys.exit("Celery is not installed; it is a dev dependency (uv sync)")
    with tempfile.TemporaryDirectory(prefix="kernel-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "benchtasks.py").write_text(textwrap.dedent(TASKS_MODULE))
        (workdir / "celerybench.py").write_text(
            textwrap.dedent(CELERY_MODULE.format(transport=TRANSPORT))
        )
        print(
            f"{options.tasks} no-op tasks, SQLite transport, concurrency "
            f"{options.concurrency}, results disabled"
        )
        print(f"{'pool':<8} {'kernel tasks/s':>15} {'celery tasks/s':>15} {'kernel/celery':>14}")
        for pool in options.pools.split(","):
            rates = {}
            for system in ("kernel", "celery"):
                seconds = run_worker(
                    system, pool, options.concurrency, workdir, options.tasks, options.timeout
                )
                rates[system] = options.tasks / seconds if seconds else None
            k, c = rates["kernel"], rates["celery"]
            ratio = f"{k / c:.2f}x" if k and c else "n/a"
            print(f"{pool:<8} {k or 0:>15.0f} {c or 0:>15.0f} {ratio:>14}")


if __name__ == "__main__":
    main()
