"""Helpers of the RabbitMQ tests: the broker seen directly, worker subprocesses, the
record of what their tasks did, and RabbitMQ itself stopped and started.

- :class:`Broker`: a plain py-amqp view of RabbitMQ (queue lengths, messages, deletes)
  that bypasses the transport under test, and names queues and exchanges for one test,
  deleting them afterwards.
- :class:`Cluster`: ``kernel worker`` subprocesses running ``amqp_tasks`` on a queue of
  the test's own, a kernel client app sending to it, and the record of executions.
- :class:`RabbitMQ`: ``rabbitmqctl stop_app`` / ``start_app``, to restart the broker
  under load.

Waits poll a condition against a deadline (:func:`wait_until`); nothing sleeps blind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import amqp
import attrs

from kernel import App
from kernel.testing import processes
from kernel.testing.processes import wait_until

TESTS_DIR = Path(__file__).parent
#: This test run's mark: every broker name the tests create starts with ``kt<RUN>``.
RUN = uuid.uuid4().hex[:8]


def report(config: Any, line: str) -> None:
    """Show ``line`` in the pytest output although output is captured: a number the
    test measures but does not assert on."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\n{line}")


class Broker:
    """RabbitMQ through plain py-amqp (not the transport under test)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self._connection: amqp.Connection | None = None

    def name(self, what: str = "q") -> str:
        """A fresh name of this run, deleted (as a queue and as an exchange) afterwards."""
        name = f"kt{RUN}.{what}.{uuid.uuid4().hex[:8]}"
        self.track(queue=name, exchange=name)
        return name

    def track(self, queue: str | None = None, exchange: str | None = None) -> None:
        if queue:
            self.queues.append(queue)
        if exchange:
            self.exchanges.append(exchange)

    def channel(self) -> Any:
        if self._connection is None or not self._connection.connected:
            parts = urlsplit(self.url)
            self._connection = amqp.Connection(
                f"{parts.hostname}:{parts.port or 5672}",
                userid=unquote(parts.username or "guest"),
                password=unquote(parts.password or "guest"),
            )
            self._connection.connect()
        return self._connection.channel()

    def exists(self, queue: str) -> bool:
        channel = self.channel()
        try:
            channel.queue_declare(queue, passive=True)
            return True
        except amqp.NotFound:
            return False
        finally:
            if channel.is_open:
                channel.close()

    def count(self, queue: str) -> int:
        """Ready messages in ``queue`` (0 when it does not exist)."""
        channel = self.channel()
        try:
            return channel.queue_declare(queue, passive=True).message_count
        except amqp.NotFound:
            return 0
        finally:
            if channel.is_open:
                channel.close()

    def consumers(self, queue: str) -> int:
        channel = self.channel()
        try:
            return channel.queue_declare(queue, passive=True).consumer_count
        except amqp.NotFound:
            return 0
        finally:
            if channel.is_open:
                channel.close()

    def take(self, queue: str) -> list[Any]:
        """Every message waiting in ``queue``, removed."""
        channel = self.channel()
        taken = []
        try:
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                taken.append(message)
        finally:
            channel.close()
        return taken

    def delete_delay_topology(self, prefix: str) -> None:
        from kernel_amqp import delayed

        channel = self.channel()
        for level in range(delayed.BITS):
            channel.queue_delete(delayed.level_name(level, prefix))
            channel.exchange_delete(delayed.level_name(level, prefix))
        channel.exchange_delete(delayed.delivery_exchange(prefix))
        channel.close()

    def delete_unused_delay_topology(self, prefix: str | None, own: list[str]) -> None:
        """Delete a delay topology that others may share (Celery's unprefixed one) as
        far as nobody else uses it. First the queues and exchanges named ``own`` (ours,
        bound to it), then the delivery exchange and the levels upwards (level ``n`` is
        bound to ``n - 1``): a queue only if empty, an exchange only if
        nothing is bound to it; what somebody else uses stays."""
        from kernel_amqp import delayed

        def attempt(operation: Callable[[Any], Any]) -> None:
            channel = self.channel()
            try:
                operation(channel)
            except (amqp.exceptions.PreconditionFailed, amqp.NotFound):
                pass  # in use by somebody else, or gone: the broker closed the channel
            finally:
                if channel.is_open:
                    channel.close()

        for name in own:
            attempt(lambda channel, name=name: channel.queue_delete(name))
            attempt(lambda channel, name=name: channel.exchange_delete(name))
        delivery = delayed.delivery_exchange(prefix)
        attempt(lambda channel: channel.exchange_delete(delivery, if_unused=True))
        for level in range(delayed.BITS):
            name = delayed.level_name(level, prefix)
            attempt(
                # RabbitMQ 3.10's quorum queues refuse if_empty/if_unused: look first
                lambda channel, name=name: self._delete_if_idle(channel, name)
            )
            attempt(lambda channel, name=name: channel.exchange_delete(name, if_unused=True))

    @staticmethod
    def _delete_if_idle(channel: Any, queue: str) -> None:
        try:
            declared = channel.queue_declare(queue, passive=True)
        except amqp.NotFound:
            return
        if declared.message_count == 0 and declared.consumer_count == 0:
            channel.queue_delete(queue)

    def close(self) -> None:
        try:
            channel = self.channel()
            for queue in dict.fromkeys(self.queues):
                channel.queue_delete(queue)
            for exchange in dict.fromkeys(self.exchanges):
                channel.exchange_delete(exchange)
            channel.close()
        finally:
            if self._connection is not None:
                try:
                    self._connection.close()
                except Exception:
                    pass
                self._connection = None


class RabbitMQ:
    """The local RabbitMQ node, through ``rabbitmqctl`` (needs the node's cookie: root
    or the rabbitmq user)."""

    CTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"

    @classmethod
    def unavailable(cls) -> str | None:
        """Why the node cannot be controlled here, or None."""
        if not os.path.exists(cls.CTL):
            return "rabbitmqctl is not installed"
        try:
            done = subprocess.run(
                [cls.CTL, "-q", "status"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"rabbitmqctl status failed: {exc}"
        if done.returncode != 0:
            return f"rabbitmqctl status failed: {done.stderr.strip() or done.stdout.strip()}"
        return None

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        done = subprocess.run(
            [self.CTL, "-q", *args], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {' '.join(args)} failed: {done.stderr or done.stdout}"
            )

    def stop_app(self) -> None:
        self._run("stop_app")

    def start_app(self) -> None:
        self._run("start_app")
        self._run("await_startup")

    def close_all_connections(self, reason: str = "test") -> None:
        self._run("close_all_connections", reason)


@attrs.frozen
class Event:
    """One execution event recorded by a task of ``amqp_tasks``."""

    kind: str
    token: str
    at: float
    pid: int
    eta: float | None
    delivery_count: int | None


class Records:
    """What tasks did, written by ``amqp_tasks`` as JSON lines, one file per process."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def events(self, kind: str | None = None, token: str | None = None) -> list[Event]:
        found = []
        for path in sorted(self.directory.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    event = Event(**json.loads(line))
                except ValueError:  # a line being written right now
                    continue
                if (kind is None or event.kind == kind) and (token is None or event.token == token):
                    found.append(event)
        return sorted(found, key=lambda event: event.at)

    def counts(self, kind: str = "run") -> Counter[str]:
        return Counter(event.token for event in self.events(kind))


class WorkerProcess(processes.WorkerProcess):
    """kernel's worker subprocess (:class:`kernel.testing.processes.WorkerProcess`), run
    in the tests' directory; with ``command``, another program (a Celery worker) run
    the same way, ready when its log shows ``ready_marker``."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        command: list[str] | None = None,
        ready_marker: str = " ready: ",
    ) -> None:
        self.ready_marker = ready_marker
        #: How to tell it is ready when its log does not say (see Cluster.worker).
        self.ready_check: Callable[[], bool] | None = None
        if command is None:
            super().__init__(args, env, log_path, cwd=TESTS_DIR, name=name)
            return
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*command, *args],
            cwd=TESTS_DIR,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tail(self, lines: int = processes.LOG_TAIL) -> str:
        return f"--- {self.name}:\n{super().tail(lines)}"

    def wait_ready(self, consuming: Callable[[], bool] | None = None) -> WorkerProcess:
        """Wait for the ready line of its log, or for ``consuming()`` (quiet workers)."""

        def ready() -> bool:
            if consuming() if consuming is not None else self.ready_marker in self.log():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker {self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            return False

        wait_until(ready, processes.START_TIMEOUT, f"worker {self.name} to be ready")
        return self


class Cluster:
    """Workers and a client of one test, on queues and a mailbox of the test's own."""

    def __init__(
        self,
        tmp_path: Path,
        url: str,
        delay_prefix: str,
        broker: Broker,
        options: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        self.tmp_path = tmp_path
        self.url = url
        self.broker = broker
        self.queue = broker.name("tasks")
        self.dead_letter_queue = broker.name("dead")
        self.control = broker.name("control")
        broker.track(exchange=f"{self.control}.pidbox", queue=None)
        broker.track(exchange=f"reply.{self.control}.pidbox")
        self.transport_options = {"delayed_delivery_prefix": delay_prefix, **(options or {})}
        self.records = Records(tmp_path / "records")
        self.settings = {
            "task_default_queue": self.queue,
            "task_dead_letter_queue": self.dead_letter_queue,
            "control_exchange": self.control,
            **settings,
        }
        self.env = {
            **os.environ,
            "KERNEL_BROKER_URL": url,
            "KERNEL_RESULT_BACKEND": "rpc://",
            "KERNEL_BROKER_TRANSPORT_OPTIONS": json.dumps(self.transport_options),
            "AMQP_TASKS_RECORD": str(self.records.directory),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])
            ),
            "PYTHONUNBUFFERED": "1",
            **{
                f"KERNEL_{key.upper()}": value if isinstance(value, str) else json.dumps(value)
                for key, value in self.settings.items()
            },
        }
        self.app = self.client()
        self.workers: list[WorkerProcess] = []

    def client(self, **settings: Any) -> App:
        """A kernel client app on this cluster's queue (rpc:// results)."""
        app = App(
            f"client-{RUN}",
            broker=self.url,
            backend="rpc://",
            broker_transport_options=dict(self.transport_options),
            **{**self.settings, **settings},
        )
        return app

    def worker(
        self, *options: str, loglevel: str = "INFO", wait: bool = True, env: dict | None = None
    ) -> WorkerProcess:
        """Start ``kernel -A amqp_tasks worker <options>``. A worker logging below
        INFO is ready when the broker counts one more consumer of the queue."""
        name = f"w{len(self.workers) + 1}"
        args = ["-A", "amqp_tasks", "worker", "-l", loglevel, "-n", f"{name}@%h", *options]
        process = WorkerProcess(
            name, args, {**self.env, **(env or {})}, self.tmp_path / f"{name}.log"
        )
        self.workers.append(process)
        if loglevel not in ("DEBUG", "INFO"):
            expected = len(self.workers)
            process.ready_check = lambda: self.broker.consumers(self.queue) >= expected
        return process.wait_ready(process.ready_check) if wait else process

    def logs(self) -> str:
        return "\n".join(worker.tail(30) for worker in self.workers)

    def close(self) -> None:
        for process in self.workers:
            process.stop()
        backend = self.app._backend
        if backend is not None and hasattr(backend, "reply_queue_name"):
            self.broker.track(queue=backend.reply_queue_name)
        self.app.close()


def make_certificates(directory: Path, ip_address: bool = True) -> dict[str, str]:
    """A throw-away CA and a server certificate for ``localhost`` and ``127.0.0.1``
    (for ``localhost`` only with ``ip_address=False``), made with the ``openssl``
    command; paths by role (``ca``, ``cert``, ``key``)."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(
            ["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60
        )

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=kernel test CA",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    )
    names = "DNS:localhost,IP:127.0.0.1" if ip_address else "DNS:localhost"
    (directory / "san.ext").write_text(f"subjectAltName={names}\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    )
    return {
        "ca": str(directory / "ca.pem"),
        "cert": str(directory / "server.pem"),
        "key": str(directory / "server.key"),
    }


class TLSProxy:
    """A TLS endpoint in front of RabbitMQ's plain port (the local node has no TLS
    listener): each accepted connection is decrypted and relayed to ``target``."""

    def __init__(
        self, certfile: str, keyfile: str, target: tuple[str, int] = ("127.0.0.1", 5672)
    ) -> None:
        import socket
        import ssl
        import threading

        self.target = target
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certfile, keyfile)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[Any] = []
        threading.Thread(target=self._accept, daemon=True, name="tls-proxy").start()

    def _accept(self) -> None:
        import threading

        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: Any) -> None:
        import select
        import socket
        import ssl

        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):
            client.close()  # e.g. a client that does not trust our CA
            return
        upstream = socket.create_connection(self.target)
        self._sockets += [secure, upstream]
        peers = {secure: upstream, upstream: secure}
        try:
            while not self._closed.is_set():
                readable = [secure] if secure.pending() else []
                if not readable:
                    readable, _, _ = select.select([secure, upstream], [], [], 0.2)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    peers[source].sendall(data)
        except (OSError, ssl.SSLError):
            return
        finally:
            for sock in (secure, upstream):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass
