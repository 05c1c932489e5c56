"""The systems the benchmarks compare: kernel, Celery and Dramatiq, on one broker.

Each peer is an app module written into the run's directory (the same task bodies for
all: a no-op that counts itself in Redis, a 50 ms sleep that does too, an echo for
round trips, and for kernel and Celery a sum for chord bodies), a worker command line
per pool, and a client that publishes or calls. Their settings are the documented ones,
listed here and printed with the results:

- kernel: defaults (acks late, prefetch multiplier 4), results off unless measured;
- Celery 5: defaults, ``--without-mingle --without-gossip --without-heartbeat`` (its
  docs' advice for throughput), results off unless measured;
- Dramatiq 2: defaults (the Redis broker, prefetch by its own rules), processes and
  threads matched to the other pools' concurrency.

Brokers (:func:`urls`): ``redis`` (results in Redis), ``amqp`` (RabbitMQ; results in
Redis) and ``sqlite``, where each peer uses its own server-less option: kernel its
embedded SQLite transport and result store, Celery kombu's ``sqla+sqlite`` transport and
its ``db+sqlite`` results (the SQLite option Celery's docs name for local development);
Dramatiq has no SQLite broker and sits that one out.

Completion is counted the same way for all, whatever the broker: every no-op or sleep
task increments one Redis key (``INCR``, about 0.05 ms), which the harness polls.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

COUNTER = "bench:done"
QUEUE = "bench"
BROKERS = ("redis", "amqp", "sqlite")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
#: Queues the peers declare on RabbitMQ (Dramatiq adds its delay and dead-letter
#: queues), deleted before every measurement so each starts empty and none meets a
#: declaration with other arguments.
AMQP_QUEUES = (QUEUE, f"{QUEUE}.DQ", f"{QUEUE}.XQ")

#: The task bodies, the same for kernel and Celery (both decorate with ``@app.task``).
APP_TASKS = """
@app.task(name="bench.noop")
def noop(i):
    counter.incr("{counter}")

@app.task(name="bench.sleep")
def sleep(seconds):
    time.sleep(seconds)
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
import time
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
import time
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
import time
import redis
import dramatiq
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

URL = os.environ["BENCH_BROKER"]
if URL.startswith("amqp"):
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    # pika names the default vhost "/%2F" where kombu writes "//"
    broker = RabbitmqBroker(url=URL[:-2] + "/%2F" if URL.endswith("//") else URL)
else:
    from dramatiq.brokers.redis import RedisBroker
    broker = RedisBroker(url=URL)
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

@dramatiq.actor(queue_name="{queue}", max_retries=0)
def sleep(seconds):
    time.sleep(seconds)
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
    "dramatiq": "defaults (its Redis or RabbitMQ broker)",
}


def urls(broker: str, peer: str, workdir: Path, redis_url: str) -> tuple[str, str] | None:
    """(broker URL, results URL) of ``peer`` on ``broker``; None if it has no such broker."""
    if broker == "redis":
        return redis_url, redis_url
    if broker == "amqp":
        return AMQP_URL, redis_url
    if broker != "sqlite":
        raise ValueError(f"unknown broker {broker!r}: one of {', '.join(BROKERS)}")
    if peer == "kernel":  # one file holds the queue and the results, as by default
        return (f"sqlite:///{workdir}/kernel.sqlite3",) * 2
    if peer == "celery":
        return (
            f"sqla+sqlite:///{workdir}/celery-broker.sqlite3",
            f"db+sqlite:///{workdir}/celery-results.sqlite3",
        )
    return None


def write_modules(workdir: Path) -> None:
    for module, source in MODULES.values():
        text = textwrap.dedent(source).format(queue=QUEUE, counter=COUNTER)
        (workdir / f"{module}.py").write_text(text)


def worker_command(peer: str, pool: str, concurrency: int) -> list[str]:
    """The worker of ``peer`` with ``pool`` ("prefork", "solo", "threads", "gevent")
    and ``concurrency`` tasks at once, on ``QUEUE``, logging warnings only."""
    python = sys.executable
    if peer == "kernel":
        return [python, "-m", "kernel", "-A", "benchkernel", "worker", "-P", pool,
                "-c", str(concurrency), "-Q", QUEUE, "-l", "WARNING"]  # fmt: skip
    if peer == "celery":
        return [python, "-m", "celery", "-A", "benchcelery", "worker", "-P", pool,
                "-c", str(concurrency), "-Q", QUEUE, "-l", "WARNING", "--without-mingle",
                "--without-gossip", "--without-heartbeat"]  # fmt: skip
    # Dramatiq: processes for prefork/solo, threads for threads, greenlets for gevent
    # (its dramatiq-gevent command).
    processes, threads = {
        "prefork": (concurrency, 1),
        "solo": (1, 1),
        "threads": (1, concurrency),
        "gevent": (1, concurrency),
    }[pool]
    command = [python, "-m", "dramatiq"]
    if pool == "gevent":
        command = [str(Path(python).with_name("dramatiq-gevent"))]
    return [*command, "benchdramatiq", "--processes", str(processes),
            "--threads", str(threads), "--queues", QUEUE]  # fmt: skip


#: Client code run in a subprocess: publish N no-op tasks, print the seconds it took.
PUBLISH = {
    "kernel": "from benchkernel import noop\nsend = lambda i: noop.delay(i)",
    "celery": "from benchcelery import noop\nsend = lambda i: noop.delay(i)",
    "dramatiq": "from benchdramatiq import noop\nsend = lambda i: noop.send(i)",
}

#: Client code run in a subprocess: publish N sleep tasks (``seconds`` each).
PUBLISH_SLEEP = {
    "kernel": "from benchkernel import sleep\nsend = lambda i: sleep.delay(SLEEP)",
    "celery": "from benchcelery import sleep\nsend = lambda i: sleep.delay(SLEEP)",
    "dramatiq": "from benchdramatiq import sleep\nsend = lambda i: sleep.send(SLEEP)",
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
