"""Tasks used by the integration tests; broker and backend come from KERNEL_* env vars."""

import os
import signal
import time

from kernel import App

app = App("itasks")


def _record(line: str) -> None:
    # O_APPEND writes of one short line are atomic: safe from many processes.
    fd = os.open(os.environ["ITASKS_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@app.task
def add(x, y):
    return x + y


@app.task
def fail(message):
    raise ValueError(message)


@app.task(bind=True)
def progress(self, steps, pause):
    for step in range(steps):
        self.update_state(state="PROGRESS", meta={"done": step, "total": steps})
        time.sleep(pause)
    return steps


@app.task
def record(token):
    _record(f"run {token} {os.getpid()}")
    return token


@app.task
def slow_record(token, seconds):
    _record(f"start {token} {os.getpid()}")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    _record(f"end {token} {os.getpid()}")
    return token


@app.task
def die():
    _record(f"die {os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(reject_on_worker_lost=False)
def die_without_requeue():
    _record(f"die-once {os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)


@app.task
def exit_process():
    _record(f"exit {os.getpid()}")
    raise SystemExit(3)
