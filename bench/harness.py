"""What the benchmark scripts share: task modules for kernel and Celery, publishing to
the embedded SQLite transport, and timing a worker subprocess while it drains a queue.

Both systems consume the same Celery-protocol messages from the same SQLite transport
(Celery reaches kernel's through ``broker_transport``), with results disabled, so the
difference measured is the worker itself. Numbers are printed, never asserted.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

TRANSPORT = "kernel.plugins.builtin.sqlite_transport:Transport"
QUEUE = "bench"

TASKS_MODULE = """
import os
import time
from kernel import App

URL = os.environ["BENCH_URL"]
app = App("benchtasks", broker=URL, backend=None, task_ignore_result=True)

@app.task(name="bench.noop")
def noop(i):
    return None

@app.task(name="bench.sleep")
def sleep(seconds):
    time.sleep(seconds)
"""

CELERY_MODULE = """
import os
import time
from celery import Celery

app = Celery("celerybench", broker=os.environ["BENCH_URL"])
app.conf.broker_transport = {transport!r}
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False

@app.task(name="bench.noop")
def noop(i):
    return None

@app.task(name="bench.sleep")
def sleep(seconds):
    time.sleep(seconds)
"""


def write_modules(workdir: Path) -> None:
    """The task modules both workers import, in ``workdir``."""
    (workdir / "benchtasks.py").write_text(textwrap.dedent(TASKS_MODULE))
    (workdir / "celerybench.py").write_text(
        textwrap.dedent(CELERY_MODULE.format(transport=TRANSPORT))
    )


def publish(url: str, task: str, args_of: list[tuple]) -> float:
    """Send one ``task`` message per argument tuple; returns the seconds it took."""
    from kernel import App

    app = App("publisher", broker=url, backend=None)
    started = time.perf_counter()
    for args in args_of:
        app.send_task(task, args, queue=QUEUE, ignore_result=True)
    elapsed = time.perf_counter() - started
    app.close()
    return elapsed


def remaining(db_path: Path) -> int:
    """Messages of the queue not yet acknowledged (waiting or being run)."""
    with sqlite3.connect(db_path, timeout=30) as connection:
        return connection.execute(
            "SELECT COUNT(*) FROM kernel_messages WHERE queue = ?", (QUEUE,)
        ).fetchone()[0]


def worker_command(system: str, pool: str, concurrency: int) -> tuple[list[str], str]:
    """The command line of a worker on ``QUEUE``, and the log line that says it is ready."""
    if system == "kernel":
        args = ["-m", "kernel", "-A", "benchtasks", "worker", "-P", pool]
        return [sys.executable, *args, "-c", str(concurrency), "-Q", QUEUE, "-l", "INFO"], (
            " ready: "
        )
    args = ["-m", "celery", "-A", "celerybench", "worker", "-P", pool]
    args += ["-c", str(concurrency), "-Q", QUEUE, "-l", "INFO"]
    args += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    return [sys.executable, *args], " ready."


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident memory of process ``pid`` so far (Linux ``VmHWM``), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


#: Peak RSS (MB) of the worker of each ``drain`` label, read before it is stopped.
PEAK_RSS: dict[str, float | None] = {}


def drain(
    system: str,
    pool: str,
    concurrency: int,
    workdir: Path,
    task: str,
    args_of: list[tuple],
    timeout: float,
    label: str,
) -> float | None:
    """Publish the messages to a fresh SQLite file, start the worker, and return the
    seconds from its ready line until the queue is empty (None if it failed). The
    worker's peak RSS is left in ``PEAK_RSS[label]``."""
    db_path = workdir / f"{label}.sqlite3"
    url = f"sqlite:///{db_path}"
    publish(url, task, args_of)
    env = {**os.environ, "BENCH_URL": url, "PYTHONPATH": str(workdir)}
    command, ready_marker = worker_command(system, pool, concurrency)
    log_path = workdir / f"{label}.log"
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
                print(f"  {label}: worker did not start; see {log_path}")
                return None
            time.sleep(0.01)
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        while remaining(db_path):
            if time.monotonic() > deadline:
                print(f"  {label}: not drained within {timeout}s")
                return None
            time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        PEAK_RSS[label] = peak_rss_mb(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        db_path.unlink(missing_ok=True)


def median(values: list[float | None]) -> float | None:
    measured = [value for value in values if value is not None]
    return statistics.median(measured) if measured else None


def require_celery() -> None:
    try:
        import celery  # noqa: F401
    except ImportError:
        sys.exit("Celery is not installed; it is a dev dependency (uv sync)")
