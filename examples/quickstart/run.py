"""Quickstart: start a worker on the embedded SQLite default, send tasks, show results.

Run it with ``make quickstart`` (or ``python examples/quickstart/run.py`` inside the
project's environment). No server is needed: broker and results live in
``examples/quickstart/kernel.sqlite3``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.chdir(HERE)  # the default SQLite file is relative to the working directory

from tasks import add, app, divide, slow_square  # noqa: E402

BATCH = 40


def start_worker() -> subprocess.Popen:
    click.echo("$ kernel -A tasks worker -P prefork -c 2 -l INFO   (in the background)")
    log = open(HERE / "worker.log", "wb")  # noqa: SIM115 - owned by the child's lifetime
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kernel",
            "-A",
            "tasks",
            "worker",
            "-P",
            "prefork",
            "-c",
            "2",
            "-l",
            "INFO",
        ],
        cwd=HERE,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while " ready: " not in (HERE / "worker.log").read_text(errors="replace"):
        if worker.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the worker did not start; see {HERE / 'worker.log'}")
        time.sleep(0.05)
    click.echo("worker ready\n")
    return worker


def main() -> None:
    purged = app.purge()
    if purged:
        click.echo(f"(dropped {purged} message(s) left by an earlier run)")
    worker = start_worker()
    try:
        result = add.delay(2, 3)
        click.echo(f">>> add.delay(2, 3).get()   -> {result.get(timeout=30)}")
        failing = divide.delay(1, 0)
        try:
            failing.get(timeout=30)
        except ZeroDivisionError as exc:
            click.echo(f">>> divide.delay(1, 0).get() -> raised ZeroDivisionError: {exc}")
        click.echo(
            f"    state {failing.state}; remote traceback ends with: "
            f"{failing.traceback.strip().splitlines()[-1]}\n"
        )

        click.echo(f">>> a batch of {BATCH} slow_square tasks")
        results = [slow_square.delay(i) for i in range(BATCH)]
        pending = set(range(BATCH))
        with click.progressbar(length=BATCH, label="    progress") as bar:
            deadline = time.monotonic() + 60
            while pending and time.monotonic() < deadline:
                done = {i for i in pending if results[i].ready()}
                bar.update(len(done))
                pending -= done
                time.sleep(0.05)
        if pending:
            sys.exit(f"{len(pending)} task(s) did not finish in time; see worker.log")
        values = [r.get(timeout=5) for r in results]
        click.echo(f"    sum of squares 0..{BATCH - 1} = {sum(values)}\n")
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
    click.echo(f"worker stopped cleanly (exit code {code}); its log is in {HERE / 'worker.log'}")
    sys.exit(code)


if __name__ == "__main__":
    main()
