"""Tasks for the ``kernel worker`` subprocesses of the Redis worker and fault tests.

Broker and result backend come from ``KERNEL_BROKER_URL`` / ``KERNEL_RESULT_BACKEND``.
Every task records what it did in the Redis named by ``WORKER_TASKS_RECORD`` (kept
apart from the broker, so a test can restart the broker's Redis and still count):

- the hash ``record:<kind>`` maps a token to how many times ``<kind>`` happened to it
  (``run``, ``start``, ``end``, ``exit``), so executions are counted exactly;
- the list ``record:events`` holds one JSON object per event, ``{kind, token, at, pid,
  eta, delivery_count}``: ``at`` is ``time.time()`` inside the task, ``eta`` the ETA the
  worker gave the task (epoch seconds, or None), ``delivery_count`` how many earlier
  deliveries of its message counted as attempts (``x-delivery-count``), when known.
"""

from __future__ import annotations

import json
import os
import time

import redis

from kernel import App

app = App("worker_tasks")

#: Prefix of every key this module writes.
PREFIX = "record:"
EVENTS = f"{PREFIX}events"

_clients: dict[int, redis.Redis] = {}


def record_client() -> redis.Redis:
    """This process's client of the record store (a forked pool child makes its own)."""
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        client = _clients[pid] = redis.Redis.from_url(os.environ["WORKER_TASKS_RECORD"])
    return client


def record(kind: str, token: str, eta: object = None, delivery_count: int | None = None) -> None:
    event = {
        "kind": kind,
        "token": token,
        "at": time.time(),
        "pid": os.getpid(),
        "eta": eta.timestamp() if eta is not None else None,
        "delivery_count": delivery_count,
    }
    with record_client().pipeline(transaction=False) as pipe:
        pipe.hincrby(f"{PREFIX}{kind}", token, 1)
        pipe.rpush(EVENTS, json.dumps(event))
        pipe.execute()


@app.task
def add(x, y):
    return x + y


@app.task
def fail(message):
    raise ValueError(message)


@app.task
def count(token, seconds=0.0):
    """One ``run`` per execution (what the exactly-once and restart tests count), then
    ``seconds`` of work."""
    record("run", token)
    if seconds:
        time.sleep(seconds)
    return token


@app.task(bind=True)
def stamp(self, token):
    """Record when it ran and the ETA its message carried."""
    record("run", token, self.request.eta)
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


@app.task
def exit_always(token, code):
    """A poison message: ``os._exit`` on every delivery (no exception, no cleanup), so
    a solo worker dies with the message and a prefork pool loses its child."""
    record("exit", token)
    os._exit(code)
