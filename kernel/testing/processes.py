"""Real ``kernel worker`` subprocesses for integration tests, kernel's and plugins'.

A test drives workers the way a user does: it starts ``python -m kernel ... worker``
in a session of its own (so a SIGKILL of its process group also takes the pool's
children, as a crash of the host would), waits for the ``ready`` line in its log,
talks to it through the broker, and stops it. Waits poll a condition against a
deadline (:func:`wait_until`); nothing sleeps blind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Seconds a worker subprocess has to log that it is ready.
START_TIMEOUT = 30.0
#: Lines of a worker's log quoted when a wait on it fails.
LOG_TAIL = 60


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.05,
    explain: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until truthy and return its value; fail naming ``what``, with
    ``explain()`` (worker logs, counts) appended."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{explain()}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


class WorkerProcess:
    """A ``kernel`` subprocess (``args`` after ``python -m kernel``) in its own
    session, run in ``cwd`` with ``env``, its output in ``log_path``."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        cwd: Path | str | None = None,
        name: str = "worker",
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernel", *args],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = LOG_TAIL) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> WorkerProcess:
        """Wait for the worker's ``ready`` line (it may have finished since: fine)."""

        def ready() -> bool:
            if " ready: " in self.log():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            return False

        wait_until(ready, timeout, f"{self.name} to be ready")
        return self

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill_group(self) -> None:
        """SIGKILL the worker and its pool children, as a crash of the host would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Warm shutdown, escalating to SIGKILL of the group; children never linger."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:  # a dead worker's pool children may linger; so may a stuck worker
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
