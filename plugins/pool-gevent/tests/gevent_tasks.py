"""Tasks for the gevent worker tests; broker and backend come from KERNEL_* variables.

Each task records what it did as a file in ``GEVENT_RECORDS`` (one file per event:
safe from a thousand greenlets and from several processes)."""

import os
import time
import uuid
from pathlib import Path

from kernel import App
from kernel.exceptions import SoftTimeLimitExceeded

app = App("gevent_tasks")


def _record(kind: str, token: str) -> None:
    Path(os.environ["GEVENT_RECORDS"], f"{kind}.{token}.{uuid.uuid4().hex[:8]}").touch()


@app.task(name="gevent_tasks.wait")
def wait(seconds, token=None):
    """Waits on I/O (the patched time.sleep); returns when it ran."""
    if token:
        _record("start", token)
    started = time.time()
    time.sleep(seconds)
    if token:
        _record("done", token)
    return [started, time.time()]


@app.task(name="gevent_tasks.hold")
def hold(token, seconds):
    _record("start", token)
    time.sleep(seconds)
    _record("done", token)
    return "finished"


@app.task(name="gevent_tasks.clean_up")
def clean_up(seconds):
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@app.task(name="gevent_tasks.stubborn")
def stubborn(seconds):
    """Catches everything it can; a hard time limit still stops it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except Exception:  # noqa: S110 - the point of the task
            pass
    return "finished"


@app.task(name="gevent_tasks.limited", rate_limit="20/s")
def limited():
    return time.time()


@app.task(name="gevent_tasks.flaky", bind=True, max_retries=3)
def flaky(self, token):
    """Fails its first two runs, then succeeds: retried through the broker."""
    _record("try", token)
    tries = len([p for p in Path(os.environ["GEVENT_RECORDS"]).iterdir() if token in p.name])
    if tries < 3:
        raise self.retry(countdown=0.2, exc=RuntimeError(f"try {tries}"))
    return tries
