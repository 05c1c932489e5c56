"""kernel against Celery and Dramatiq on one broker, side by side in one run (``make bench``).

Scenarios (each repeated with the peers interleaved, kernel, Celery, Dramatiq, then
again; reported as medians and as ratios kernel/peer):

- ``throughput``: N no-op tasks published by one client (publish rate), then drained
  by a worker started afterwards, prefork with concurrency 2 (Dramatiq: 2 processes x
  1 thread); tasks/s from the first task done to the last. Also the worker's peak RSS
  (main process and its children).
- ``latency``: sequential ``delay().get()`` round trips of an echo task on a solo
  worker (Dramatiq: 1 process x 1 thread) with results stored; p50/p90/p99 ms.
- ``chord``: a chord of ``--chord-size`` echo tasks (default 1,000) with a sum as its
  body, on a prefork worker of concurrency 2 with results stored; seconds from the
  call to the body's result (kernel and Celery; Dramatiq has no chord).
- ``io``: ``--io-tasks`` tasks (default 2,000) that each sleep ``--io-sleep`` seconds
  (default 0.05), published first, then drained by a worker with ``--io-concurrency``
  (default 100) threads, then again with as many greenlets (gevent; Dramatiq through
  its ``dramatiq-gevent`` command); tasks/s from the first task done to the last.
- ``memory`` (not run by default: long): ``--memory-tasks`` no-op tasks (default
  200,000) drained by a prefork worker of concurrency 2; its RSS (main process plus
  children) once a tenth of them are done and at the end, and the growth between.

Brokers (``--broker``, see ``peers.urls``): ``redis`` (default; results in Redis),
``amqp`` (RabbitMQ on 127.0.0.1:5672; results in Redis) and ``sqlite`` (no server:
kernel's embedded transport and result store against Celery's ``sqla+sqlite`` and
``db+sqlite``; Dramatiq has no SQLite broker). Completion is counted in Redis for all.

Also prints Redis's own ceiling (``redis-benchmark`` LPUSH and RPOP on one
connection). Results go to ``bench/results/`` as JSON lines (the first line describes
the run), a Markdown table and a chart (``latest.md`` and ``latest.png`` are the last
run's). Numbers are printed, never asserted.

Usage: ``uv run --group bench python bench/run.py [--broker redis] [--tasks 20000]
[--round-trips 1000] [--repeat 3] [--scenarios throughput,latency,chord,io,memory]
[--chord-size 1000] [--io-tasks 2000] [--io-sleep 0.05] [--io-concurrency 100]
[--memory-tasks 200000] [--peers kernel,celery,dramatiq]``;
``--report RUN.jsonl`` rebuilds the table and chart of a saved run without measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from peers import (
    AMQP_QUEUES,
    AMQP_URL,
    BROKERS,
    CHORD,
    COUNTER,
    PUBLISH,
    PUBLISH_SLEEP,
    ROUND_TRIP,
    SETTINGS,
    urls,
    worker_command,
    write_modules,
)

RESULTS_DIR = Path(__file__).parent / "results"

PUBLISH_CLIENT = """
import json, sys, time
{setup}
n = int(sys.argv[1])
started = time.perf_counter()
for i in range(n):
    send(i)
print(json.dumps({{"seconds": time.perf_counter() - started}}))
"""

ROUND_TRIP_CLIENT = """
import json, sys, time
{setup}
n = int(sys.argv[1])
for i in range(20):  # warm-up, and the wait for the worker to start
    call(i)
times = []
for i in range(n):
    started = time.perf_counter()
    call(i)
    times.append(time.perf_counter() - started)
print(json.dumps({{"times": times}}))
"""


CHORD_CLIENT = """
import json, sys, time
{setup}
n = int(sys.argv[1])
assert chord([echo.s(i) for i in range(10)])(total.s()).get(timeout=120) == 45  # warm-up
started = time.perf_counter()
value = chord([echo.s(i) for i in range(n)])(total.s()).get(timeout=1200)
seconds = time.perf_counter() - started
assert value == n * (n - 1) // 2, value
print(json.dumps({{"seconds": seconds}}))
"""


class Bench:
    """One benchmark run: its broker, directory, Redis database (the completion
    counter, and the broker or results where they are Redis), and the measurements."""

    def __init__(self, broker: str, redis_url: str, workdir: Path, out: Path) -> None:
        import redis

        self.broker = broker
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url)
        self.workdir = workdir
        self.out = out
        self.rows: list[dict] = []
        write_modules(workdir)

    def supports(self, peer: str) -> bool:
        return urls(self.broker, peer, self.workdir, self.redis_url) is not None

    def env(self, peer: str, results: bool) -> dict[str, str]:
        found = urls(self.broker, peer, self.workdir, self.redis_url)
        assert found is not None, f"{peer} has no {self.broker} broker"
        broker_url, results_url = found
        return {
            **os.environ,
            "BENCH_BROKER": broker_url,
            "BENCH_COUNTER": self.redis_url,
            "BENCH_RESULTS": results_url if results else "",
            "PYTHONPATH": str(self.workdir),
        }

    def reset(self) -> None:
        """An empty broker and result store, and the completion counter at zero."""
        self.redis.flushdb()
        if self.broker == "sqlite":
            for path in self.workdir.glob("*.sqlite3*"):
                path.unlink()
        elif self.broker == "amqp":
            from kombu import Connection

            with Connection(AMQP_URL) as connection:
                for queue in AMQP_QUEUES:
                    connection.default_channel.queue_delete(queue)

    def client(self, peer: str, template: str, setup: str, argument: int, results: bool) -> dict:
        code = template.format(setup=setup)
        done = subprocess.run(
            [sys.executable, "-c", code, str(argument)],
            cwd=self.workdir,
            env=self.env(peer, results),
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if done.returncode != 0:
            raise RuntimeError(f"client failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def start_worker(self, peer: str, pool: str, concurrency: int, results: bool, label: str):
        log = open(self.workdir / f"{label}.log", "wb")  # noqa: SIM115 - closed in stop
        proc = subprocess.Popen(
            worker_command(peer, pool, concurrency),
            cwd=self.workdir,
            env=self.env(peer, results),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.log = log  # type: ignore[attr-defined]
        return proc

    def client_with_worker(
        self, worker: tuple[str, str, int, str], template: str, setup: str, argument: int
    ) -> dict:
        """Run a client against a fresh database and a worker (peer, pool, concurrency,
        log label) started before it and stopped after it, results on."""
        self.reset()
        peer, pool, concurrency, label = worker
        proc = self.start_worker(peer, pool, concurrency, True, label)
        try:
            return self.client(peer, template, setup, argument, True)
        finally:
            self.stop_worker(proc)

    @staticmethod
    def stop_worker(proc) -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        proc.log.close()

    def record(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.out, "a") as out:
            out.write(json.dumps(row) + "\n")

    # -- scenarios -----------------------------------------------------------------------

    def throughput(self, peer: str, tasks: int, round_: int, timeout: float) -> None:
        label = f"throughput-{peer}-{round_}"
        published, drained = self.drain(peer, PUBLISH[peer], tasks, ("prefork", 2), label, timeout)
        self.record(
            {
                "scenario": "throughput",
                "peer": peer,
                "round": round_,
                "tasks": tasks,
                "publish_per_s": tasks / published,
                **drained,
            }
        )

    def io(self, peer: str, options: argparse.Namespace, round_: int) -> None:
        setup = f"SLEEP = {options.io_sleep!r}\n" + PUBLISH_SLEEP[peer]
        for pool in ("threads", "gevent"):
            label = f"io-{pool}-{peer}-{round_}"
            worker = (pool, options.io_concurrency)
            _, drained = self.drain(peer, setup, options.io_tasks, worker, label, options.timeout)
            drained.pop("peak_rss_mb")
            self.record(
                {
                    "scenario": f"io-{pool}",
                    "peer": peer,
                    "round": round_,
                    "tasks": options.io_tasks,
                    "sleep_s": options.io_sleep,
                    "concurrency": options.io_concurrency,
                    **drained,
                }
            )

    def drain(
        self, peer: str, setup: str, tasks: int, worker: tuple[str, int], label: str, timeout: float
    ) -> tuple[float, dict]:
        """Publish ``tasks`` (``setup`` defines ``send``), then start a worker (pool,
        concurrency) and time it from the first task done to the last: the publishing
        seconds, and ``drain_per_s`` and ``peak_rss_mb`` (or ``error``)."""
        self.reset()
        published = self.client(peer, PUBLISH_CLIENT, setup, tasks, results=False)
        proc = self.start_worker(peer, *worker, False, label)
        first = last = None
        peak = 0.0
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                done = int(self.redis.get(COUNTER) or 0)
                now = time.perf_counter()
                if done and first is None:
                    first = (now, done)
                if done >= tasks:
                    last = now
                    break
                peak = max(peak, tree_rss_mb(proc.pid))
                time.sleep(0.005)
            peak = max(peak, tree_rss_mb(proc.pid))
        finally:
            self.stop_worker(proc)
        drained: dict = {"drain_per_s": None, "peak_rss_mb": round(peak, 1)}
        if first is not None and last is not None and last > first[0]:
            drained["drain_per_s"] = (tasks - first[1]) / (last - first[0])
        else:
            drained["error"] = f"not drained within {timeout}s; see {label}.log"
        return published["seconds"], drained

    def latency(self, peer: str, round_trips: int, round_: int) -> None:
        worker = (peer, "solo", 1, f"latency-{peer}-{round_}")
        measured = self.client_with_worker(worker, ROUND_TRIP_CLIENT, ROUND_TRIP[peer], round_trips)
        times = sorted(t * 1000 for t in measured["times"])
        self.record(
            {
                "scenario": "latency",
                "peer": peer,
                "round": round_,
                "round_trips": round_trips,
                "p50_ms": percentile(times, 50),
                "p90_ms": percentile(times, 90),
                "p99_ms": percentile(times, 99),
            }
        )

    def chord(self, peer: str, size: int, round_: int) -> None:
        if peer not in CHORD:
            return  # Dramatiq has no chord
        worker = (peer, "prefork", 2, f"chord-{peer}-{round_}")
        measured = self.client_with_worker(worker, CHORD_CLIENT, CHORD[peer], size)
        row = {"scenario": "chord", "peer": peer, "round": round_, "size": size}
        self.record({**row, "seconds": measured["seconds"]})

    def memory(self, peer: str, tasks: int, round_: int, timeout: float) -> None:
        self.reset()
        self.client(peer, PUBLISH_CLIENT, PUBLISH[peer], tasks, results=False)
        label = f"memory-{peer}-{round_}"
        proc = self.start_worker(peer, "prefork", 2, False, label)
        early = late = None
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                done = int(self.redis.get(COUNTER) or 0)
                if early is None and done >= tasks // 10:
                    early = tree_rss_mb(proc.pid)
                if done >= tasks:
                    late = tree_rss_mb(proc.pid)
                    break
                time.sleep(0.05)
        finally:
            self.stop_worker(proc)
        row = {"scenario": "memory", "peer": peer, "round": round_, "tasks": tasks}
        if early is not None and late is not None:
            row.update(rss_early_mb=round(early, 1), rss_late_mb=round(late, 1))
            row["growth_mb"] = round(late - early, 1)
        else:
            row["error"] = f"not drained within {timeout}s; see {label}.log"
        self.record(row)


def percentile(values: list[float], p: float) -> float:
    index = min(len(values) - 1, max(0, round(p / 100 * len(values)) - 1))
    return values[index]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (a prefork pool), in MB."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(child) for child in children)
        except (OSError, ValueError):
            continue
    return total / 1024


def redis_ceiling(redis_url: str) -> dict[str, float]:
    """LPUSH and RPOP per second on one connection, from ``redis-benchmark``."""
    if shutil.which("redis-benchmark") is None:
        return {}
    from urllib.parse import urlparse

    parsed = urlparse(redis_url)
    done = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            parsed.hostname or "127.0.0.1",
            "-p",
            str(parsed.port or 6379),
            "-c",
            "1",
            "-n",
            "50000",
            "-q",
            "-t",
            "lpush,rpop",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    ceiling = {}
    for line in done.stdout.replace("\r", "\n").splitlines():
        name, _, rest = line.partition(":")
        if name.strip() in ("LPUSH", "RPOP") and "requests per second" in rest:
            ceiling[name.strip()] = float(rest.split()[0])
    return ceiling


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("taskkernel", "celery", "dramatiq", "kombu", "redis"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, {platform.system()} {platform.release()}"


def median_of(rows: list[dict], scenario: str, peer: str, key: str) -> float | None:
    values = [
        r[key]
        for r in rows
        if r["scenario"] == scenario and r["peer"] == peer and r.get(key) is not None
    ]
    return statistics.median(values) if values else None


def _cell(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"


def report(rows: list[dict], peers: list[str], header: list[str]) -> str:
    lines = [*header, ""]
    metrics = [
        ("throughput", "publish_per_s", "publish, tasks/s", True),
        ("throughput", "drain_per_s", "end to end (drain), tasks/s", True),
        ("throughput", "peak_rss_mb", "worker peak RSS, MB", False),
        ("latency", "p50_ms", "round trip p50, ms", False),
        ("latency", "p90_ms", "round trip p90, ms", False),
        ("latency", "p99_ms", "round trip p99, ms", False),
        ("chord", "seconds", "chord to body result, s", False),
        ("io-threads", "drain_per_s", "I/O-bound, threads pool, tasks/s", True),
        ("io-gevent", "drain_per_s", "I/O-bound, gevent pool, tasks/s", True),
        ("memory", "rss_early_mb", "worker RSS after a tenth of the memory run, MB", False),
        ("memory", "rss_late_mb", "worker RSS at the end of the memory run, MB", False),
        ("memory", "growth_mb", "worker RSS growth over the memory run, MB", False),
    ]
    others = [p for p in peers if p != "kernel"]
    columns = [*peers, *(f"kernel/{p}" for p in others)]
    lines.append("| metric | " + " | ".join(columns) + " |")
    lines.append("| --- |" + " --- |" * len(columns))
    for scenario, key, title, higher_better in metrics:
        values = {p: median_of(rows, scenario, p, key) for p in peers}
        if all(v is None for v in values.values()):
            continue
        cells = [_cell(values[p]) for p in peers]
        for p in others:
            k, o = values.get("kernel"), values[p]
            if k and o:
                ratio = k / o if higher_better else o / k
                cells.append(f"{ratio:.2f}x")
            else:
                cells.append("n/a")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Ratios are kernel's advantage: kernel/peer for rates, peer/kernel for times "
        "and memory (above 1 means kernel is ahead)."
    )
    return "\n".join(lines) + "\n"


#: The chart's bar groups: (scenario, key, label).
CHART_METRICS = [
    ("throughput", "publish_per_s", "publish\n(no-op)"),
    ("throughput", "drain_per_s", "end to end\n(no-op, prefork 2)"),
    ("io-threads", "drain_per_s", "I/O-bound\n(threads)"),
    ("io-gevent", "drain_per_s", "I/O-bound\n(gevent)"),
]


def chart(rows: list[dict], peers: list[str], title: str, path: Path) -> None:
    """A PNG bar chart of tasks/s per peer (medians), by scenario measured in the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        (scenario, key, label)
        for scenario, key, label in CHART_METRICS
        if any(median_of(rows, scenario, p, key) for p in peers)
    ]
    figure, axes = plt.subplots(figsize=(2 + 1.9 * len(metrics), 3.8), dpi=110)
    width = 0.8 / len(peers)
    for index, peer in enumerate(peers):
        values = [median_of(rows, scenario, peer, key) or 0 for scenario, key, _ in metrics]
        positions = [m + (index - (len(peers) - 1) / 2) * width for m in range(len(metrics))]
        bars = axes.bar(positions, values, width, label=peer)
        axes.bar_label(bars, fmt="{:,.0f}", fontsize=7)
    axes.set_xticks(range(len(metrics)), [label for _, _, label in metrics], fontsize=8)
    axes.set_ylabel("tasks/s (higher is better)")
    axes.set_title(title, fontsize=10)
    axes.legend(frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


BROKER_TITLES = {"redis": "Redis", "amqp": "RabbitMQ", "sqlite": "SQLite (no server)"}
SCENARIOS = ("throughput", "latency", "chord", "io", "memory")


def write_outputs(
    rows: list[dict], peers: list[str], header: list[str], stamp: str, broker: str
) -> str:
    """The run's Markdown table and chart, under its stamp and as ``latest``."""
    table = report(rows, peers, header)
    title = f"{', '.join(peers)} on {BROKER_TITLES[broker]} ({stamp})"
    for name in (stamp, "latest"):
        (RESULTS_DIR / f"{name}.md").write_text(table)
        if any(r["scenario"] in ("throughput", "io-threads", "io-gevent") for r in rows):
            chart(rows, peers, title, RESULTS_DIR / f"{name}.png")
    return table


def rebuild(path: Path) -> str:
    """Table and chart of a saved run (its JSON lines), without measuring again."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    run = next((r for r in rows if r["scenario"] == "run"), None)
    if run is None:
        sys.exit(f"{path}: no run description (first line); was it written by bench/run.py?")
    measured = [r for r in rows if r["scenario"] != "run"]
    broker = run.get("broker", "redis")  # runs before --broker were all on Redis
    return write_outputs(measured, run["peers"], run["header"], run["stamp"], broker)


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="redis", choices=BROKERS)
    parser.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/13",
        help="the Redis database the run flushes and counts in (and the broker and "
        "results with --broker redis)",
    )
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scenarios", default="throughput,latency,chord,io")
    parser.add_argument("--chord-size", type=int, default=1000)
    parser.add_argument("--io-tasks", type=int, default=2000)
    parser.add_argument("--io-sleep", type=float, default=0.05)
    parser.add_argument("--io-concurrency", type=int, default=100)
    parser.add_argument("--memory-tasks", type=int, default=200000)
    parser.add_argument("--peers", default="kernel,celery,dramatiq")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--report", type=Path, help="rebuild a saved run's table and chart")
    options = parser.parse_args()
    unknown = set(options.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        names = ", ".join(sorted(unknown))
        parser.error(f"unknown scenario(s) {names}: use {', '.join(SCENARIOS)}")
    return options


def describe(options: argparse.Namespace, peers: list[str], stamp: str) -> list[str]:
    """The run's header: command, machine, versions, broker, settings, Redis's ceiling."""
    found = versions()
    results = {"redis": "Redis", "amqp": "Redis", "sqlite": "each peer's SQLite store"}
    header = [
        f"# Benchmark {stamp}",
        "",
        f"Command: `uv run --group bench python bench/run.py --broker {options.broker} "
        f"--tasks {options.tasks} --round-trips {options.round_trips} "
        f"--repeat {options.repeat} --scenarios {options.scenarios} "
        f"--chord-size {options.chord_size} --io-tasks {options.io_tasks} "
        f"--io-sleep {options.io_sleep} --io-concurrency {options.io_concurrency} "
        f"--memory-tasks {options.memory_tasks} --peers {options.peers}`  ",
        f"Machine: {machine()}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in found.items()) + "  ",
        f"Broker: {BROKER_TITLES[options.broker]} on loopback, results in "
        f"{results[options.broker]}; medians of {options.repeat} interleaved rounds.  ",
        "Settings: " + "; ".join(f"{p}: {SETTINGS[p]}" for p in peers) + ".",
    ]
    ceiling = redis_ceiling(options.redis) if options.broker == "redis" else {}
    if ceiling:
        header.append(
            "Redis ceiling (redis-benchmark, one connection): "
            + ", ".join(f"{k} {v:,.0f}/s" for k, v in ceiling.items())
            + "."
        )
    return header


def measure(bench: Bench, options: argparse.Namespace, scenario: str, peer: str, round_: int):
    if scenario == "throughput":
        bench.throughput(peer, options.tasks, round_, options.timeout)
    elif scenario == "latency":
        bench.latency(peer, options.round_trips, round_)
    elif scenario == "chord":
        bench.chord(peer, options.chord_size, round_)
    elif scenario == "io":
        bench.io(peer, options, round_)
    elif scenario == "memory":
        bench.memory(peer, options.memory_tasks, round_, options.timeout * 10)


def main() -> None:
    options = parse_options()
    if options.report is not None:
        print(rebuild(options.report))
        return
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{stamp}.jsonl"
    with tempfile.TemporaryDirectory(prefix="kernel-bench-") as tmp:
        bench = Bench(options.broker, options.redis, Path(tmp), out)
        peers = [p for p in options.peers.split(",") if bench.supports(p)]
        for skipped in sorted(set(options.peers.split(",")) - set(peers)):
            print(f"{skipped} has no {options.broker} broker: left out of this run")
        header = describe(options, peers, stamp)
        print("\n".join(header), flush=True)
        with open(out, "w") as described:
            run = {"scenario": "run", "stamp": stamp, "peers": peers, "header": header}
            described.write(json.dumps({**run, "broker": options.broker}) + "\n")
        for round_ in range(options.repeat):
            for scenario in options.scenarios.split(","):
                for peer in peers:
                    before = len(bench.rows)
                    measure(bench, options, scenario, peer, round_)
                    for row in bench.rows[before:]:
                        print(json.dumps(row), flush=True)
    table = write_outputs(bench.rows, peers, header, stamp, options.broker)
    print()
    print(table)


if __name__ == "__main__":
    main()
