"""Throughput of a worker draining a queue: kernel against Celery, same broker, same run.

For each system and pool (see ``harness.py`` for how both are set up):

1. publish N no-op task messages to a fresh queue,
2. start the worker and wait until it says it is ready,
3. time from ready until no message is left (all acknowledged).

Usage: ``uv run python bench/throughput.py [--tasks 2000] [--pools solo,threads,prefork]``.
Numbers are printed, never asserted: compare the ratios, not absolute rates.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import drain, require_celery, write_modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--pools", default="solo,threads,prefork")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300)
    options = parser.parse_args()
    require_celery()
    with tempfile.TemporaryDirectory(prefix="kernel-bench-") as tmp:
        workdir = Path(tmp)
        write_modules(workdir)
        print(
            f"{options.tasks} no-op tasks, SQLite transport, concurrency "
            f"{options.concurrency}, results disabled"
        )
        print(f"{'pool':<8} {'kernel tasks/s':>15} {'celery tasks/s':>15} {'kernel/celery':>14}")
        args_of = [(i,) for i in range(options.tasks)]
        for pool in options.pools.split(","):
            rates = {}
            for system in ("kernel", "celery"):
                seconds = drain(
                    system,
                    pool,
                    options.concurrency,
                    workdir,
                    "bench.noop",
                    args_of,
                    options.timeout,
                    f"{system}-{pool}",
                )
                rates[system] = options.tasks / seconds if seconds else None
            k, c = rates["kernel"], rates["celery"]
            ratio = f"{k / c:.2f}x" if k and c else "n/a"
            print(f"{pool:<8} {k or 0:>15.0f} {c or 0:>15.0f} {ratio:>14}")


if __name__ == "__main__":
    main()
