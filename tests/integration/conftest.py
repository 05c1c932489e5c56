"""Real ``kernel worker`` processes on the embedded SQLite broker, driven like a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kernel import App

PROJECT = Path(__file__).parent / "project"
START_TIMEOUT = 30.0


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05
) -> object:
    """Poll ``predicate`` until truthy; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class WorkerProcess:
    """A ``kernel worker`` subprocess in its own session, with its log in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernel", *args],
            cwd=PROJECT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> WorkerProcess:
        def ready() -> bool:
            if " ready: " in self.log():  # it may already have finished, that is fine
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            return False

        wait_until(ready, START_TIMEOUT, "the worker to be ready")
        return self

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill_group(self) -> None:
        """SIGKILL the worker and its pool children, as a crash would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill_group()
        else:
            try:  # children of a worker that died may linger
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


class Broker:
    """One SQLite file for broker and results, plus a record file tasks append to."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.url = f"sqlite:///{tmp_path}/kernel.sqlite3"  # tmp_path is absolute: 4 slashes
        self.record_path = tmp_path / "record.txt"
        self.env = {
            **os.environ,
            "KERNEL_BROKER_URL": self.url,
            "KERNEL_RESULT_BACKEND": self.url,
            "ITASKS_RECORD": str(self.record_path),
            "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
        }
        self.app = App("client", broker=self.url, backend=self.url)
        self.workers: list[WorkerProcess] = []
        self._count = 0

    def worker(
        self,
        *options: str,
        visibility_timeout: float = 30.0,
        plugins: tuple[str, ...] = (),
        app: str = "itasks",
        wait: bool = True,
    ) -> WorkerProcess:
        """Start ``kernel -A <app> worker <options>``; ``app`` is a module in ``project/``."""
        self._count += 1
        args = [f"--plugin={p}" for p in plugins]
        args += [
            "-A",
            app,
            "worker",
            "-l",
            "INFO",
            "-n",
            f"w{self._count}@%h",
            "--visibility-timeout",
            str(visibility_timeout),
            *options,
        ]
        process = WorkerProcess(args, self.env, self.tmp_path / f"worker{self._count}.log")
        self.workers.append(process)
        return process.wait_ready() if wait else process

    def records(self) -> list[str]:
        if not self.record_path.exists():
            return []
        return self.record_path.read_text().splitlines()

    def close(self) -> None:
        for process in self.workers:
            process.stop()
        self.app.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    instance = Broker(tmp_path)
    yield instance
    instance.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
