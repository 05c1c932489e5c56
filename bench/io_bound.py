"""I/O-bound tasks: the gevent pool against the threads pool, kernel and Celery, same
broker (the embedded SQLite transport), same concurrency, same run.

Each task sleeps (``time.sleep``: a real wait for threads, a cooperative one under
gevent's patching), so the ideal drain time is ``tasks x sleep / concurrency``; what
the pools add to it is overhead. Runs are interleaved (kernel-gevent, kernel-threads,
celery-gevent, celery-threads, then again) and reported as medians.

Usage: ``uv run python bench/io_bound.py [--tasks 2000] [--sleep 0.05]
[--concurrency 200] [--repeat 3] [--no-celery]``. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import PEAK_RSS, drain, median, require_celery, write_modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--sleep", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--no-celery", action="store_true", help="kernel's pools only")
    options = parser.parse_args()
    systems = ["kernel"] if options.no_celery else ["kernel", "celery"]
    if not options.no_celery:
        require_celery()
    runs = [(system, pool) for system in systems for pool in ("gevent", "threads")]
    seconds: dict[tuple[str, str], list[float | None]] = {run: [] for run in runs}
    args_of = [(options.sleep,)] * options.tasks
    with tempfile.TemporaryDirectory(prefix="kernel-bench-") as tmp:
        workdir = Path(tmp)
        write_modules(workdir)
        for round_ in range(options.repeat):
            for system, pool in runs:
                seconds[(system, pool)].append(
                    drain(
                        system,
                        pool,
                        options.concurrency,
                        workdir,
                        "bench.sleep",
                        args_of,
                        options.timeout,
                        f"{system}-{pool}-{round_}",
                    )
                )
    ideal = options.tasks * options.sleep / options.concurrency
    print(
        f"{options.tasks} tasks sleeping {options.sleep * 1000:.0f} ms, SQLite transport, "
        f"concurrency {options.concurrency}, results disabled, median of {options.repeat}; "
        f"ideal drain {ideal:.2f} s"
    )
    print(f"{'worker':<16} {'drain s':>8} {'tasks/s':>8} {'vs ideal':>9} {'peak RSS MB':>12}")
    for system, pool in runs:
        value = median(seconds[(system, pool)])
        if value is None:
            print(f"{system + '/' + pool:<16} {'failed':>8}")
            continue
        rate = options.tasks / value
        rss = median([PEAK_RSS.get(f"{system}-{pool}-{r}") for r in range(options.repeat)])
        print(
            f"{system + '/' + pool:<16} {value:>8.2f} {rate:>8.0f} {value / ideal:>8.2f}x "
            f"{rss or 0:>12.0f}"
        )
    kg, kt = median(seconds[("kernel", "gevent")]), median(seconds[("kernel", "threads")])
    if kg and kt:
        print(f"kernel gevent/threads throughput ratio: {kt / kg:.2f}x")
    if not options.no_celery:
        cg = median(seconds[("celery", "gevent")])
        if kg and cg:
            print(f"kernel/celery throughput ratio, gevent: {cg / kg:.2f}x")


if __name__ == "__main__":
    main()
