"""``rpc://``: results sent back as messages to the client that sent the task.

Celery's rpc:// backend, on the wire: a client names its reply queue in the
``reply_to`` property of every task message it sends; the worker publishes each state
of the task (STARTED, RETRY, SUCCESS, FAILURE, ...) to that queue through the default
exchange, as Celery's result document (``task_id, status, result, traceback,
children, date_done``) with ``correlation_id`` set to the task id. Kernel and Celery
clients and workers therefore mix freely.

What it means for users:

- Only the process that sent a task can read its result, and each result is read
  once. The client keeps what it read in memory (:mod:`kernel_amqp.rpc_cache`), so
  ``state``, ``get()`` and groups work on it. ``forget()`` drops it there.
- One reply queue per client process (``kernel.reply.<uuid>``), shared by its
  threads: any thread may wait for a task another thread sent. (Celery uses one per
  thread.) It is durable, and results are persistent by default, so a RabbitMQ
  restart loses none. RabbitMQ deletes the queue once unused for ``queue_expires``
  (a day by default), whatever ``result_expires`` is.
- The steps of a canvas (chain steps, ``link`` callbacks and errbacks) sent by a
  running task inherit its reply queue, so a chain started by a client reports every
  step to that client. Any other task sent from inside a task reports to the sending
  process's own reply queue, so ``inner.delay().get()`` inside a task works.
- No chords (no shared store to count them), and saved groups
  (``GroupResult.save()``) live in the saving process only.

URL options: ``rpc://?persistent=false`` sends results as transient messages (faster,
lost if RabbitMQ restarts before they are read); ``rpc://?queue_expires=3600`` deletes
reply queues unused for an hour (default: a day).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kernel import states
from kernel.app import publish_retry_delay
from kernel.backends import document
from kernel.backends.base import Backend
from kernel.exceptions import (
    ConfigurationError,
    PublishError,
    TimeoutError,
    broker_connection_errors,
    describe_broker_error,
)
from kernel.plugins.manager import redact_url
from kernel.result import GroupResult, result_from_tuple
from kernel.task import current_request
from kernel_amqp import replies
from kernel_amqp.queues import REPLY_QUEUE_PREFIX
from kernel_amqp.rpc_cache import ResultCache
from kernel_amqp.rpc_channel import ReplyReader, ReplySender, ResultNotSent, reply_queue

log = logging.getLogger(__name__)

__all__ = ["RPCBackend", "ResultNotSent"]

#: Broker schemes rpc:// works with: results travel as AMQP messages.
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
#: Default seconds a reply queue may stay unused before RabbitMQ deletes it (the
#: ``queue_expires`` URL option).
DEFAULT_QUEUE_EXPIRES = 86400.0
#: Longest wait for replies in one read, so a waiting thread re-checks its deadline.
READ_STEP = 1.0


def _url_options(url: str) -> dict[str, Any]:
    query = parse_qs(urlsplit(url).query)
    unknown = set(query) - {"persistent", "queue_expires"}
    if unknown:
        raise ConfigurationError(
            f"unknown rpc:// option(s) {sorted(unknown)} in {url!r}; the options are "
            "persistent=true|false and queue_expires=<seconds>"
        )
    queue_expires = DEFAULT_QUEUE_EXPIRES
    if "queue_expires" in query:
        text = query["queue_expires"][-1]
        try:
            queue_expires = float(text)
        except ValueError:
            queue_expires = -1.0
        if not queue_expires > 0:
            raise ConfigurationError(
                f"rpc:// queue_expires must be a number of seconds above 0, got {text!r}"
            )
    persistent = True
    if "persistent" in query:
        value = query["persistent"][-1].lower()
        if value not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigurationError(f"rpc:// persistent must be true or false, got {value!r}")
        persistent = value in ("true", "1", "yes")
    return {"persistent": persistent, "queue_expires": queue_expires}


def _signature_fields(raw: Any) -> tuple[str | None, str | None]:
    """(task name, task id) of a signature, as a dict or an object."""
    if isinstance(raw, dict):
        options = raw.get("options") or {}
        return raw.get("task"), options.get("task_id")
    options = getattr(raw, "options", None) or {}
    return getattr(raw, "name", None) or getattr(raw, "task", None), options.get("task_id")


def is_canvas_step(running: Any, headers: dict) -> bool:
    """True when the message about to be sent is the running task's retry or a step of
    its canvas (its ``link`` callbacks or errbacks, its chain's next step, its chord
    callback): those report to the client that sent the task or started the canvas.
    Anything else a task sends is its own, and its results come back to this process's
    reply queue."""
    steps: list[Any] = []
    steps.extend(getattr(running, "callbacks", None) or [])
    steps.extend(getattr(running, "errbacks", None) or [])
    chain = getattr(running, "chain", None) or []
    if chain:
        steps.append(chain[-1])
    chord = getattr(running, "chord", None)
    if chord:
        steps.append(chord)
    task_id, name = headers.get("id"), headers.get("task")
    if task_id is not None and task_id == getattr(running, "id", None):
        return True  # a retry of the running task: its message, its client
    for step in steps:
        step_name, step_id = _signature_fields(step)
        if step_id is not None:
            if step_id == task_id:
                return True
        elif step_name is not None and step_name == name:
            return True
    return False


class RPCBackend(Backend):
    """Results as messages to the sending client's reply queue (see the module)."""

    supports_chords = False

    def __init__(self, app: Any, url: str) -> None:
        super().__init__(app, url)
        broker = str(app.conf.broker_url or "")
        scheme = broker.split("://", 1)[0].lower()
        if scheme not in AMQP_SCHEMES:
            raise ConfigurationError(
                f"the rpc:// result backend sends results as messages through an AMQP "
                f"broker, and broker_url is {broker.split('://', 1)[0]!r}; use an "
                "amqp:// broker (RabbitMQ), or another result backend"
            )
        options = _url_options(url)
        self.persistent = options["persistent"]
        #: Seconds a reply queue may stay unused before RabbitMQ deletes it (bounded
        #: whatever ``result_expires`` is, so reply queues of clients gone never pile up).
        self.queue_expires = options["queue_expires"]
        self._setup_lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        """(Re)create the per-process state: a new process gets its own reply queue."""
        self._pid = os.getpid()
        self.reply_queue_name = f"{REPLY_QUEUE_PREFIX}{uuid.uuid4()}"
        self._queue = reply_queue(self.reply_queue_name, self.queue_expires)
        self.cache = ResultCache(self.expires)
        accept = self.app.serialization.accepted_types(
            self.app.conf.result_accept_content or self.app.conf.accept_content
        )
        broker = self.app.conf.broker_url
        self._reader = ReplyReader(
            self.connection, self._queue, accept, self._on_reply, self.cache, broker
        )
        self._sender = ReplySender(self.connection, broker)
        self._queue_declared_at: float | None = None

    def connection(self) -> Any:
        """A broker connection for replies, without heartbeats: the reader and the
        senders are idle for long stretches, with nobody to send or check heartbeats,
        and RabbitMQ would close them (every send or read would then first reconnect)."""
        connection = self.app.connection()
        connection.heartbeat = 0
        connection.transport_options = {**(connection.transport_options or {}), "heartbeat": 0}
        return connection

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            with self._setup_lock:
                if os.getpid() != self._pid:
                    self._start()  # the parent's connections are not ours to use

    @property
    def expires(self) -> float | None:
        return self.app.conf.result_expires

    # -- the client's side -----------------------------------------------------------

    def on_task_publish(self, headers: dict, properties: dict) -> None:
        """Before a task message is sent: ask for its result on our reply queue, or,
        inside a task, on the reply queue of the task running (chains report back to
        the client that started them)."""
        if properties.get("reply_to"):
            return
        running = current_request()
        reply_to = getattr(running, "reply_to", None) if running is not None else None
        if reply_to and is_canvas_step(running, headers):
            properties["reply_to"] = reply_to
            return
        self._check_process()
        if not headers.get("ignore_result"):  # no result is coming: no queue needed yet
            self._ensure_reply_queue(headers.get("id"))
        properties["reply_to"] = self.reply_queue_name

    def _ensure_reply_queue(self, task_id: str | None = None) -> None:
        """Declare the reply queue before the first task goes out (a result sent to a
        queue that does not exist is dropped), and again now and then: RabbitMQ deletes
        it after ``queue_expires`` unused. Connection failures are retried as
        ``task_publish_retry_policy`` says, then raise ``PublishError``."""
        declared = self._queue_declared_at
        refresh = max(self._queue.expires or 0, 60.0) / 2
        if declared is not None and time.monotonic() - declared < refresh:
            return
        conf = self.app.conf
        policy = conf.task_publish_retry_policy
        attempts = 0
        while True:
            attempts += 1
            connection = self.app.connection()
            errors = broker_connection_errors(connection)
            try:
                with connection:
                    connection.ensure_connection(max_retries=0)
                    self._queue(connection.default_channel).declare()
                break
            except errors as exc:
                limit = policy.get("max_retries")
                if not conf.task_publish_retry or (limit is not None and attempts > limit):
                    raise PublishError(
                        f"could not declare the rpc:// reply queue {self.reply_queue_name!r} on "
                        f"broker {redact_url(conf.broker_url)}: {describe_broker_error(exc)} "
                        f"(gave up after {attempts} attempt(s)); the task was not sent. Check "
                        "that the broker is running and reachable",
                        task_id=task_id,
                        attempts=attempts,
                    ) from exc
                delay = publish_retry_delay(policy, attempts)
                log.warning(
                    "rpc: could not declare reply queue %s (%s); retry %d in %.2fs",
                    self.reply_queue_name,
                    describe_broker_error(exc),
                    attempts,
                    delay,
                )
                time.sleep(delay)
        self._queue_declared_at = time.monotonic()

    def _on_reply(self, body: Any, message: Any) -> None:
        properties = message.properties or {}
        task_id = properties.get("correlation_id") or (
            body.get("task_id") if isinstance(body, dict) else None
        )
        if not isinstance(body, dict) or "status" not in body or not task_id:
            log.warning(
                "rpc: ignoring a message on reply queue %s that is not a result (%r)",
                self.reply_queue_name,
                body if len(repr(body)) < 200 else f"{repr(body)[:200]}...",
            )
            return
        meta = {**document.pending(task_id), **body, "task_id": task_id}
        self.cache.put(meta)

    def get_task_meta(self, task_id: str) -> dict:
        self._check_process()
        meta = self.cache.get(task_id)
        if meta is None or meta["status"] not in states.READY_STATES:
            self._reader.poll(0.0, sync=True)
            meta = self.cache.get(task_id)
        return meta if meta is not None else document.pending(task_id)

    def get_task_metas(self, task_ids: Any) -> list[dict]:
        self._check_process()
        ids = list(task_ids)
        if any(
            (meta := self.cache.get(task_id)) is None or meta["status"] not in states.READY_STATES
            for task_id in ids
        ):
            self._reader.poll(0.0, sync=True)
        return [self.cache.get(task_id) or document.pending(task_id) for task_id in ids]

    def wait_for(
        self, task_id: str, timeout: float | None = None, interval: float | None = None
    ) -> dict:
        """Wait for the task's final state, woken by its arrival (no polling:
        ``interval`` is not used)."""
        self._check_process()
        deadline = None if timeout is None else time.monotonic() + timeout
        synced = False
        while True:
            meta = self.cache.get(task_id)
            if meta is not None and meta["status"] in states.READY_STATES:
                return meta
            remaining = READ_STEP if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                status = meta["status"] if meta is not None else states.PENDING
                raise TimeoutError(
                    f"task {task_id} still {status} after {timeout}s; raise the timeout, or "
                    "check a worker consumes its queue (with rpc:// only the process that "
                    "sent a task receives its result)"
                )
            self._reader.poll(min(remaining, READ_STEP), sync=not synced)
            synced = True

    def forget(self, task_id: str) -> None:
        """Drop what this client received of the task, including replies still on
        their way in the queue (there is nothing stored elsewhere to delete)."""
        self._check_process()
        self._reader.poll(0.0, sync=True)
        self.cache.forget(task_id)

    def cleanup(self) -> int:
        return self.cache.prune()

    # -- the worker's side -----------------------------------------------------------

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
    ) -> dict:
        """Send the state to the reply queue of the task's message."""
        self._check_process()
        children = list(getattr(request, "children", None) or [])
        meta = document.build(task_id, state, self.prepare_value(result), traceback, children)
        reply_to, correlation_id = self._destination(task_id, request)
        if reply_to is None:  # nobody asked: keep it for this process's own readers
            self._ensure_reply_queue()
            reply_to, correlation_id = self.reply_queue_name, task_id
        publish: dict[str, Any] = {
            "serializer": self.app.conf.result_serializer,
            "delivery_mode": 2 if self.persistent else 1,
        }
        if self.expires is not None:
            publish["expiration"] = self.expires
        self._sender.send(meta, reply_to, correlation_id or task_id, **publish)
        return meta

    def _destination(self, task_id: str, request: Any) -> tuple[str | None, str | None]:
        """(reply queue, correlation id) of ``task_id``'s message: from the request
        given, the task running in this thread, or the messages this process consumed."""
        candidates = [request]
        running = current_request()
        if running is not None and getattr(running, "id", None) == task_id:
            candidates.append(running)
        for candidate in candidates:
            reply_to = getattr(candidate, "reply_to", None) if candidate is not None else None
            if reply_to:
                return reply_to, getattr(candidate, "correlation_id", None) or task_id
        noted = replies.lookup(task_id)
        if noted is not None:
            return noted
        return None, None

    def mark_as_started(self, task_id: str, meta: dict | None = None, request: Any = None) -> dict:
        return self.store_result(task_id, meta or {}, states.STARTED, request=request)

    def mark_as_revoked(self, task_id: str, reason: str = "revoked", request: Any = None) -> dict:
        from kernel.exceptions import TaskRevokedError

        return self.store_result(task_id, TaskRevokedError(reason), states.REVOKED, request=request)

    # -- groups (this process only) ---------------------------------------------------

    def save_group(self, group_id: str, group_result: GroupResult) -> GroupResult:
        self.cache.save_group(group_id, group_result.as_tuple())
        return group_result

    def restore_group(self, group_id: str) -> GroupResult | None:
        stored = self.cache.group(group_id)
        if stored is None:
            return None
        restored = result_from_tuple(stored, self.app)
        if not isinstance(restored, GroupResult):
            restored = GroupResult(restored.id, [restored], app=self.app)
        restored._backend = self
        return restored

    def delete_group(self, group_id: str) -> None:
        self.cache.delete_group(group_id)

    def close(self) -> None:
        self._reader.close()
        self._sender.close()
