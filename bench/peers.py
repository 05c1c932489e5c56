"""The systems the benchmarks compare, on Redis: kernel, Celery and Dramatiq.

Each peer is an app module written into the run's directory (the same task bodies for
all: a no-op that counts itself in Redis, an echo for round trips, and for kernel and
Celery a sum for chord bodies), a worker
command line per pool, and a client that publishes or calls. Their settings are the
documented ones, listed here and printed with the results:

- kernel: defaults (acks late, prefetch multiplier 4), results off unless measured;
- Celery 5: defaults, ``--without-mingle --without-gossip --without-heartbeat`` (its
  docs' advice for throughput), results off unless measured;
- Dramatiq 2: defaults (the Redis broker, prefetch by its own rules), processes and
  threads matched to the other pools' concurrency.

Completion is counted the same way for all: every no-op task increments one Redis key
(``INCR``, about 0.05 ms), which the harness polls.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

COUNTER = "bench:done"
QUEUE = "bench"

#: The task bodies, the same for kernel and Celery (both decorate with ``@app.task``).
APP_TASKS = """
@app.task(name="bench.noop")
def noop(i):
    counter.incr("{counter}")

@app.task(name="bench.echo")
def echo(i):
    return i

@app.task(name="bench.total")
def total(values):
    return sum(values)
"""

KERNEL = """
import os
import redis
from kernel import App

URL = os.environ["BENCH_BROKER"]
RESULTS = os.environ.get("BENCH_RESULTS") or None
app = App("benchkernel", broker=URL, backend=RESULTS, task_ignore_result=RESULTS is None,
          task_default_queue="{queue}")
counter = redis.Redis.from_url(os.environ["BENCH_COUNTER"])
"""

CELERY = """
import os
import redis
from celery import Celery

URL = os.environ["BENCH_BROKER"]
RESULTS = os.environ.get("BENCH_RESULTS") or None
app = Celery("benchcelery", broker=URL, backend=RESULTS)
app.conf.task_ignore_result = RESULTS is None
app.conf.task_default_queue = "{queue}"
app.conf.worker_hijack_root_logger = False
counter = redis.Redis.from_url(os.environ["BENCH_COUNTER"])
"""

DRAMATIQ = """
import os
import redis
import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

broker = RedisBroker(url=os.environ["BENCH_BROKER"])
# The Results middleware only where results are measured, as for the other peers; the
# echo actor's store_results option exists only with it.
ECHO_OPTIONS = {{}}
if os.environ.get("BENCH_RESULTS"):
    broker.add_middleware(Results(backend=RedisBackend(url=os.environ["BENCH_RESULTS"])))
    ECHO_OPTIONS["store_results"] = True
dramatiq.set_broker(broker)
counter = redis.Redis.from_url(os.environ["BENCH_COUNTER"])

@dramatiq.actor(queue_name="{queue}", max_retries=0)
def noop(i):
    counter.incr("{counter}")

@dramatiq.actor(queue_name="{queue}", max_retries=0, **ECHO_OPTIONS)
def echo(i):
    return i
"""

MODULES = {
    "kernel": ("benchkernel", KERNEL + APP_TASKS),
    "celery": ("benchcelery", CELERY + APP_TASKS),
    "dramatiq": ("benchdramatiq", DRAMATIQ),
}

#: What each peer runs with, printed with the results.
SETTINGS = {
    "kernel": "defaults (acks late, prefetch x4)",
    "celery": "defaults, --without-mingle --without-gossip --without-heartbeat",
    "dramatiq": "defaults (Redis broker)",
}


def write_modules(workdir: Path) -> None:
    for module, source in MODULES.values():
        text = textwrap.dedent(source).format(queue=QUEUE, counter=COUNTER)
        (workdir / f"{module}.py").write_text(text)


def worker_command(peer: str, pool: str, concurrency: int) -> list[str]:
    """The worker of ``peer`` with ``pool`` ("prefork", "solo", "threads") and
    ``concurrency`` tasks at once, on ``QUEUE``, logging warnings only."""
    python = sys.executable
    if peer == "kernel":
        return [python, "-m", "kernel", "-A", "benchkernel", "worker", "-P", pool,
                "-c", str(concurrency), "-Q", QUEUE, "-l", "WARNING"]  # fmt: skip
    if peer == "celery":
        return [python, "-m", "celery", "-A", "benchcelery", "worker", "-P", pool,
                "-c", str(concurrency), "-Q", QUEUE, "-l", "WARNING", "--without-mingle",
                "--without-gossip", "--without-heartbeat"]  # fmt: skip
    # Dramatiq: processes for prefork/solo, threads for threads.
    processes, threads = {
        "prefork": (concurrency, 1),
        "solo": (1, 1),
        "threads": (1, concurrency),
    }[pool]
    return [python, "-m", "dramatiq", "benchdramatiq", "--processes", str(processes),
            "--threads", str(threads), "--queues", QUEUE]  # fmt: skip


#: Client code run in a subprocess: publish N no-op tasks, print the seconds it took.
PUBLISH = {
    "kernel": "from benchkernel import noop\nsend = lambda i: noop.delay(i)",
    "celery": "from benchcelery import noop\nsend = lambda i: noop.delay(i)",
    "dramatiq": "from benchdramatiq import noop\nsend = lambda i: noop.send(i)",
}

#: Client code: one round trip (send, wait for the result) of ``echo``.
ROUND_TRIP = {
    "kernel": "from benchkernel import echo\ncall = lambda i: echo.delay(i).get(timeout=30)",
    "celery": "from benchcelery import echo\ncall = lambda i: echo.delay(i).get(timeout=30)",
    "dramatiq": (
        "from benchdramatiq import echo\n"
        "call = lambda i: echo.send(i).get_result(block=True, timeout=30000)"
    ),
}

#: Client code: a chord of N echo tasks with a sum as its body, timed from the call to
#: the body's result (kernel and Celery only: Dramatiq has no chord).
CHORD = {
    "kernel": "from kernel import chord\nfrom benchkernel import echo, total",
    "celery": "from celery import chord\nfrom benchcelery import echo, total",
}
