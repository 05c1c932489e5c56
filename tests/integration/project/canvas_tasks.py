"""Tasks for the canvas integration tests; broker and backend come from KERNEL_* env vars.

Tasks that must be observed append one line to the record file (``ITASKS_RECORD``):
``<kind> <token> ...``. ``gate`` holds a worker slot until the test creates the file
``gate-<token>`` next to the record file, so tests block a worker without sleeping.
"""

import os
import time
from pathlib import Path

from kernel import App, group

app = App("canvas_tasks")

#: How long a gate waits for its release before giving up (it then fails).
GATE_TIMEOUT = 90.0


def _record(line: str) -> None:
    # O_APPEND writes of one short line are atomic: safe from many processes.
    fd = os.open(os.environ["ITASKS_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def gate_path(record_path: str | os.PathLike, token: str) -> Path:
    """The file whose creation releases ``gate(token)``."""
    return Path(record_path).parent / f"gate-{token}"


@app.task
def add(x, y):
    return x + y


@app.task
def add_and_record(x, y):
    """``add`` that records which process (and parent worker process) ran it."""
    _record(f"part {x} {os.getpid()} {os.getppid()}")
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def identity(value):
    return value


@app.task
def tsum(values):
    return sum(values)


@app.task
def record(token):
    """Records that it ran; returns its token."""
    _record(f"run {token} {os.getpid()}")
    return token


@app.task
def record_sum(values, token):
    """A chord body that records that it ran, with the sum of its values."""
    total = sum(values)
    _record(f"body {token} {total} {os.getpid()}")
    return total


@app.task
def fail(message):
    raise ValueError(message)


@app.task
def record_failed_id(task_id):
    """An old-style errback: called with the id of the task that failed."""
    _record(f"errback {task_id}")
    return task_id


@app.task
def record_failure(request, exc, traceback):
    """A new-style errback (Celery's): the failed task's request, exception, traceback."""
    _record(f"errback-request {request.id} {type(exc).__name__}")


@app.task
def gate(token):
    """Holds its worker slot until the gate file for ``token`` exists."""
    _record(f"start {token} {os.getpid()}")
    released = gate_path(os.environ["ITASKS_RECORD"], token)
    deadline = time.monotonic() + GATE_TIMEOUT
    while not released.exists():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"gate {token} was not released within {GATE_TIMEOUT}s")
        time.sleep(0.02)
    _record(f"end {token} {os.getpid()}")
    return token


@app.task(bind=True)
def replace_with_add(self, x):
    """Replaced by ``add(x, 100)``: its result, and its place in a chain, go to that."""
    _record(f"replaced {self.request.id}")
    return self.replace(add.s(x, 100))


@app.task
def spawn_group(count):
    """Sends a group from inside a task: it becomes this task's child."""
    group(add.s(i, i) for i in range(count)).apply_async()
    return "spawned"
