"""Real ``kernel worker`` processes on Redis, and a Redis server a test may stop.

- :class:`~kernel.testing.processes.WorkerProcess` (kernel's): one worker subprocess.
- :class:`RedisCluster`: the broker and result backend URL, the record store that
  ``worker_tasks`` writes to, a kernel client app, and the workers of one test.
- :class:`RedisServer`: a ``redis-server`` of the test's own, with an fsync-always
  append-only file, that can be stopped (SIGTERM or SIGKILL) and started again on the
  same port and directory, keeping its data.

Waits poll a condition against a deadline (:func:`wait_until`); nothing sleeps blind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import redis

from kernel import App
from kernel.testing.processes import WorkerProcess, wait_until

TESTS_DIR = Path(__file__).parent
#: Seconds a redis-server has to answer PING after it was started.
REDIS_START_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.frozen
class Event:
    """One event recorded by a task of ``worker_tasks`` (see its docstring)."""

    kind: str
    token: str
    at: float
    pid: int
    eta: float | None
    delivery_count: int | None


class RedisCluster:
    """Workers of one test on ``broker_url`` (also the result backend), recording their
    tasks' executions in the Redis of ``record_url``."""

    def __init__(self, tmp_path: Path, broker_url: str, record_url: str | None = None) -> None:
        self.tmp_path = tmp_path
        self.url = broker_url
        self.record_url = record_url or broker_url
        self.env = {
            **os.environ,
            "KERNEL_BROKER_URL": self.url,
            "KERNEL_RESULT_BACKEND": self.url,
            "WORKER_TASKS_RECORD": self.record_url,
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
        }
        self.app = App("client", broker=self.url, backend=self.url)
        self.records = redis.Redis.from_url(self.record_url)
        self.broker = redis.Redis.from_url(self.url)
        self.workers: list[WorkerProcess] = []

    def worker(
        self,
        *options: str,
        visibility_timeout: float | None = None,
        loglevel: str = "INFO",
        explicit_plugin: bool = False,
        wait: bool = True,
    ) -> WorkerProcess:
        """Start ``kernel -A worker_tasks worker <options>``; ``explicit_plugin`` turns
        entry-point autoloading off and names the plugin with ``--plugin redis``."""
        name = f"w{len(self.workers) + 1}"
        args = ["-A", "worker_tasks", "worker", "-l", loglevel, "-n", f"{name}@%h"]
        env = self.env
        if explicit_plugin:
            env = {**env, "KERNEL_PLUGIN_AUTOLOAD": "0"}
            args += ["--plugin", "redis"]
        if visibility_timeout is not None:
            args += ["--visibility-timeout", str(visibility_timeout)]
        process = WorkerProcess(
            [*args, *options], env, self.tmp_path / f"{name}.log", cwd=TESTS_DIR, name=name
        )
        self.workers.append(process)
        return process.wait_ready() if wait else process

    # -- what the tasks recorded -------------------------------------------------------

    def counts(self, kind: str = "run") -> Counter[str]:
        """How many times each token had a ``kind`` event."""
        stored = self.records.hgetall(f"record:{kind}")
        return Counter({key.decode(): int(value) for key, value in stored.items()})

    def events(self, kind: str | None = None, token: str | None = None) -> list[Event]:
        found = []
        for raw in self.records.lrange("record:events", 0, -1):
            event = Event(**json.loads(raw))
            if (kind is None or event.kind == kind) and (token is None or event.token == token):
                found.append(event)
        return found

    def close(self) -> None:
        for process in self.workers:
            process.stop()
        self.app.close()
        self.records.close()
        self.broker.close()


class RedisServer:
    """A ``redis-server`` of one test: its own port and directory, an append-only file
    fsynced at every write, no snapshots. :meth:`stop` and :meth:`start` again keep the
    port, the directory and so the data."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self._starts = 0

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        """Start (or start again) and wait until it answers PING with its data loaded."""
        assert not self.running, "this redis-server is already running"
        self._starts += 1
        log = open(self.directory / f"redis-{self._starts}.log", "wb")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--dir",
                    str(self.directory),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()  # the child has its own descriptor
        wait_until(self._answers, REDIS_START_TIMEOUT, f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"redis-server on port {self.port} exited with {self.proc.returncode}:\n"
                + self.log()
            )
        client = self.client()
        try:
            return bool(client.ping())  # LOADING (an error) until the AOF is replayed
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """SIGTERM: Redis flushes its append-only file and exits; SIGKILL: it dies, and
        what it fsynced (every write, here) is what it has when started again."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, signum: int = signal.SIGTERM) -> RedisServer:
        self.stop(signum)
        return self.start()

    def log(self) -> str:
        return (self.directory / f"redis-{self._starts}.log").read_text(errors="replace")


def report(config: Any, line: str) -> None:
    """Show ``line`` in the pytest output even though output is captured (timings,
    duplicates): a result the test measures but does not assert on."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\n{line}")
