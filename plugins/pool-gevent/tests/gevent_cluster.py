"""Gevent worker subprocesses (``kernel worker -P gevent``) on a broker and result
backend of the test's choosing, with the tasks of ``gevent_tasks.py``. A module of its
own (not ``conftest``): another plugin's ``conftest`` may be the one imported by that name."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from kernel import App
from kernel.testing.processes import WorkerProcess

HERE = Path(__file__).parent


class GeventCluster:
    """Workers and a client app on one broker/backend pair; a queue of the test's own."""

    def __init__(self, tmp_path: Path, broker: str, backend: str) -> None:
        self.tmp_path = tmp_path
        self.records = tmp_path / "records"
        self.records.mkdir()
        self.queue = f"gevent-{uuid.uuid4().hex[:10]}"
        self.env = {
            **os.environ,
            "KERNEL_BROKER_URL": broker,
            "KERNEL_RESULT_BACKEND": backend,
            "KERNEL_TASK_DEFAULT_QUEUE": self.queue,
            "GEVENT_RECORDS": str(self.records),
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
        }
        self.app = App("gevent_client", broker=broker, backend=backend)
        self.app.conf.task_default_queue = self.queue
        self.workers: list[WorkerProcess] = []

    def worker(self, *options: str, concurrency: int = 100) -> WorkerProcess:
        index = len(self.workers) + 1
        args = ["-A", "gevent_tasks", "worker", "-P", "gevent", "-c", str(concurrency)]
        args += ["-l", "INFO", "-n", f"g{index}@%h", *options]
        process = WorkerProcess(args, self.env, self.tmp_path / f"worker{index}.log", cwd=HERE)
        self.workers.append(process)
        return process.wait_ready()

    def send(self, name: str, *args, **options):
        return self.app.send_task(f"gevent_tasks.{name}", args, **options)

    def recorded(self, kind: str) -> list[str]:
        """Tokens of the ``kind`` records (start, done), one per event."""
        return [p.name.split(".")[1] for p in self.records.iterdir() if p.name.startswith(kind)]

    def logs(self) -> str:
        return "\n".join(f"--- {w.name} {w.log_path.name}\n{w.tail()}" for w in self.workers)

    def close(self) -> None:
        for process in self.workers:
            process.stop()
        self.app.close()
