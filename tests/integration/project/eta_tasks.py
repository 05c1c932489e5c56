"""Tasks for the ETA, expiry and crash integration tests (``-A eta_tasks``).

Every task appends one line to the record file named by ``ITASKS_RECORD``:
``<kind> <token> <time.time()> <pid> <eta epoch seconds or ->``, so a test can tell
what ran, how often, where, and when, against the ETA the worker gave the task.
"""

import os
import signal
import time

from kernel import App

app = App("eta_tasks")


def _record(kind: str, token: str, eta: object = None) -> None:
    eta_field = repr(eta.timestamp()) if eta is not None else "-"
    line = f"{kind} {token} {time.time()!r} {os.getpid()} {eta_field}\n"
    # O_APPEND writes of one short line are atomic: safe from many processes.
    fd = os.open(os.environ["ITASKS_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.task(bind=True)
def stamp(self, token):
    """Record when it ran and the ETA its message carried."""
    _record("run", token, self.request.eta)
    return token


@app.task
def slow(token, seconds):
    _record("start", token)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    _record("end", token)
    return token


@app.task
def die_once(token, marker):
    """SIGKILL its own process on the first delivery (``marker`` absent), succeed after."""
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        _record("run", token)
        return token
    os.close(fd)
    _record("die", token)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task
def die_always(token):
    """A poison message: SIGKILL its own process on every delivery."""
    _record("die", token)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task
def exit_process(token, code):
    """``os._exit``: no exception, no cleanup; in a solo or threads pool the worker dies."""
    _record("exit", token)
    os._exit(code)
