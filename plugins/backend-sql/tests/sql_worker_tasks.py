"""Tasks run by the ``kernel worker`` subprocesses of the SQL backend tests.

Broker and result backend come from ``KERNEL_BROKER_URL`` and
``KERNEL_RESULT_BACKEND``. Tasks append ``<kind> <token> ...`` lines to the file
``SQL_TEST_RECORD``; ``hold`` waits until the test creates ``release-<token>`` next
to it, so that every header task of a chord finishes at the same moment.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kernel import App

app = App("sql_worker_tasks")

#: Seconds ``hold`` waits for its release before failing.
HOLD_TIMEOUT = 60.0


def _record(line: str) -> None:
    # O_APPEND writes of one short line are atomic: safe from many processes.
    fd = os.open(os.environ["SQL_TEST_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@app.task
def add(x, y, token=None):
    if token:
        _record(f"ran {token} {os.getpid()}")
    return x + y


@app.task
def fail(message):
    raise ValueError(message)


@app.task
def hold(value, token):
    """A chord header task: says it started, then returns once released."""
    _record(f"start {token} {os.getpid()}")
    release = Path(os.environ["SQL_TEST_RECORD"]).parent / f"release-{token}"
    deadline = time.monotonic() + HOLD_TIMEOUT
    while not release.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"hold({value}, {token}) was never released")
        time.sleep(0.002)
    return value


@app.task
def record_body(values, token):
    """A chord body: records each run, with the values it got."""
    _record(f"body {token} {os.getpid()} {','.join(str(v) for v in values)}")
    return sum(values)
