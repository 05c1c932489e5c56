"""Real ``kernel worker`` processes on the embedded SQLite broker, driven like a user would."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel import App
from kernel.testing.processes import WorkerProcess, wait_until

__all__ = ["Broker", "WorkerProcess", "wait_until"]

PROJECT = Path(__file__).parent / "project"


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
        process = WorkerProcess(
            args, self.env, self.tmp_path / f"worker{self._count}.log", cwd=PROJECT
        )
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
