"""Tasks for the worker-controls integration tests (limits, revocation, recycling)."""

import os
import time

from kernel import App
from kernel.exceptions import SoftTimeLimitExceeded

app = App("limits_tasks")


def _record(line: str) -> None:
    # O_APPEND writes of one short line are atomic: safe from many processes.
    fd = os.open(os.environ["ITASKS_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _sleep(seconds: float) -> None:
    """Sleep in short steps, so signals and injected exceptions land promptly."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)


@app.task
def pid(token):
    _record(f"pid {token} {os.getpid()}")
    return os.getpid()


@app.task
def sleeper(token, seconds):
    """Runs ``seconds``; records whether a soft time limit interrupted it."""
    _record(f"start {token} {os.getpid()} {time.time()}")
    try:
        _sleep(seconds)
    except SoftTimeLimitExceeded:
        _record(f"soft {token} {os.getpid()} {time.time()}")
        return "cleaned up"
    _record(f"end {token} {os.getpid()} {time.time()}")
    return "finished"


@app.task(acks_late=False)
def early_ack(token):
    """Acknowledged when handed to the pool: never queued ahead of a busy child."""
    _record(f"start {token} {os.getpid()} {time.time()}")
    return token


@app.task(soft_time_limit=1)
def soft_limited(token, seconds):
    """The task's own soft limit; does not catch it, so it fails."""
    _record(f"start {token} {os.getpid()} {time.time()}")
    _sleep(seconds)
    _record(f"end {token} {os.getpid()} {time.time()}")


@app.task(time_limit=1)
def hard_limited(token, seconds):
    _record(f"start {token} {os.getpid()} {time.time()}")
    _sleep(seconds)
    _record(f"end {token} {os.getpid()} {time.time()}")


@app.task(rate_limit="10/s")
def limited(token):
    _record(f"limited {token} {time.time()}")
    return token


@app.task
def unlimited(token):
    _record(f"unlimited {token} {time.time()}")
    return token


_hoard = []


@app.task
def grow_memory(kib):
    """Keep ``kib`` KiB alive in this process (for --max-memory-per-child)."""
    _hoard.append(bytearray(kib * 1024))
    _record(f"grow {os.getpid()}")
    return os.getpid()
