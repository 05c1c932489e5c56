"""Tasks for the ``kernel worker`` subprocesses of the RabbitMQ tests.

Broker, results, queue and options come from ``KERNEL_*`` environment variables (set
by :class:`amqp_harness.Cluster`). Every task that records writes one JSON line per
event to ``<AMQP_TASKS_RECORD>/<pid>.jsonl``: ``{kind, token, at, pid, eta,
delivery_count}``, where ``at`` is ``time.time()`` in the task, ``eta`` the ETA its
message carried (epoch seconds or None) and ``delivery_count`` the earlier deliveries
of its message that counted as attempts. Appends of one short line are atomic, so the
test reads every process's file while they run.
"""

from __future__ import annotations

import json
import os
import time

from kernel import App

app = App("amqp_tasks")

_files: dict[int, object] = {}


def record(kind: str, token: str, eta: object = None, delivery_count: int | None = None) -> None:
    pid = os.getpid()
    stream = _files.get(pid)
    if stream is None:
        path = os.path.join(os.environ["AMQP_TASKS_RECORD"], f"{pid}.jsonl")
        stream = _files[pid] = open(path, "a", buffering=1)  # noqa: SIM115 - process-long
    event = {
        "kind": kind,
        "token": token,
        "at": time.time(),
        "pid": pid,
        "eta": eta.timestamp() if eta is not None else None,
        "delivery_count": delivery_count,
    }
    stream.write(json.dumps(event) + "\n")


@app.task
def add(x, y):
    return x + y


@app.task
def fail(message):
    raise ValueError(message)


@app.task
def count(token, seconds=0.0):
    """One ``run`` per execution (what the exactly-once tests count), then ``end``
    once its work is done."""
    record("run", token)
    if seconds:
        time.sleep(seconds)
    record("end", token)
    return token


@app.task(bind=True)
def stamp(self, token):
    """Record when it ran, the ETA its message carried and its delivery count."""
    record("run", token, self.request.eta, self.request.delivery_count)
    return token


@app.task(bind=True)
def slow(self, token, seconds):
    """``start``, then ``seconds`` of work, then ``end``: a crash in between shows."""
    record("start", token, delivery_count=self.request.delivery_count)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    record("end", token)
    return token


@app.task(bind=True)
def hold(self, token, release_path, timeout=60.0):
    """``start``, then wait until ``release_path`` exists (the test creates it), then
    ``end``: a run that is killed first never ends. Fails after ``timeout``."""
    record("start", token, delivery_count=self.request.delivery_count)
    deadline = time.monotonic() + timeout
    while not os.path.exists(release_path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release_path} was not created within {timeout}s")
        time.sleep(0.02)
    record("end", token)
    return token


@app.task(bind=True)
def retry_later(self, token, countdown):
    """Retries its first run ``countdown`` seconds later; records each run."""
    record("run", token, self.request.eta, self.request.delivery_count)
    if self.request.retries == 0:
        raise self.retry(countdown=countdown)
    return {"token": token, "retries": self.request.retries}


@app.task
def exit_always(token, code):
    """A poison message: ``os._exit`` on every delivery (no exception, no cleanup)."""
    record("exit", token)
    os._exit(code)
