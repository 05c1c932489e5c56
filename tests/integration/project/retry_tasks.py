"""Tasks for the retry integration tests; broker and backend come from KERNEL_* env vars.

Each attempt appends one line to the ITASKS_RECORD file:
``attempt <token> <request.retries> <retries header> <time.time()> <eta or -> <own state>``.
"""

import os
import time

from kernel import App

app = App("retry_tasks")


def _record_attempt(task, token):
    request = task.request
    eta = request.eta.timestamp() if request.eta is not None else "-"
    state = task.AsyncResult(request.id).state
    line = (
        f"attempt {token} {request.retries} {request.headers.get('retries')} "
        f"{time.time():.6f} {eta} {state}\n"
    )
    # O_APPEND writes of one short line are atomic: safe from many processes.
    fd = os.open(os.environ["ITASKS_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.task(
    bind=True,
    autoretry_for=(ConnectionError,),
    retry_backoff=0.2,
    retry_jitter=False,
    max_retries=5,
)
def backoff(self, token, failures):
    """Fails ``failures`` times with ConnectionError, then returns ``token``."""
    _record_attempt(self, token)
    if self.request.retries < failures:
        raise ConnectionError(f"{token}: down on attempt {self.request.retries}")
    return token


@app.task(
    bind=True,
    autoretry_for=(ConnectionError,),
    retry_backoff=1.0,
    retry_backoff_max=1.5,
    max_retries=5,
)
def jittered(self, token, failures):
    """Like ``backoff``, with full jitter (the default) and a 1.5 s cap."""
    _record_attempt(self, token)
    if self.request.retries < failures:
        raise ConnectionError(f"{token}: down on attempt {self.request.retries}")
    return token


@app.task(
    bind=True,
    track_started=True,
    autoretry_for=(ConnectionError,),
    retry_kwargs={"countdown": 0.5},
)
def tracked(self, token, failures):
    """Stores STARTED at each attempt (track_started), so the states go
    PENDING, STARTED, RETRY, STARTED, RETRY..., SUCCESS."""
    _record_attempt(self, token)
    if self.request.retries < failures:
        raise ConnectionError(f"{token}: down")
    return token


@app.task(
    bind=True,
    autoretry_for=(ConnectionError,),
    retry_kwargs={"max_retries": 2, "countdown": 0.1},
)
def hopeless(self, token):
    """Always fails: FAILURE with the original exception after 2 retries."""
    _record_attempt(self, token)
    raise ConnectionResetError(f"{token}: reset by peer on attempt {self.request.retries}")


@app.task(
    bind=True,
    autoretry_for=(ConnectionError,),
    max_retries=None,
    retry_kwargs={"countdown": 0},
)
def stubborn(self, token, failures):
    """Retries for ever (max_retries=None); succeeds after ``failures`` failures."""
    _record_attempt(self, token)
    if self.request.retries < failures:
        raise ConnectionError(f"{token}: down")
    return self.request.retries


@app.task(bind=True, max_retries=3)
def explicit(self, token, failures, countdown):
    """Calls ``self.retry(countdown=...)`` itself ``failures`` times."""
    _record_attempt(self, token)
    if self.request.retries < failures:
        try:
            raise TimeoutError(f"{token}: upstream timed out")
        except TimeoutError as exc:
            raise self.retry(exc=exc, countdown=countdown) from exc
    return f"{token} after {self.request.retries}"


@app.task(bind=True, max_retries=1)
def give_up(self, token):
    """Retries without exc= until MaxRetriesExceededError ends it."""
    _record_attempt(self, token)
    raise self.retry(countdown=0)
