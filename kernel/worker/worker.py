"""The worker: consumes task messages, runs them in a pool, acknowledges after.

Flow of one message (all in the worker's main thread, which owns the connection):

1. ``_on_message`` decodes it; bad messages, unknown tasks and messages delivered
   too many times are dead-lettered with one log line and a FAILURE result.
2. It is *reserved* (prefetched) until the pool has a free slot; reserved messages
   were never started, so a warm shutdown hands them back to the broker.
3. ``_dispatch`` gives it to the pool; the pool reports an Outcome from its own
   thread through a queue, and ``_complete`` acks (or requeues) in this thread.

Shutdown: the first SIGTERM/SIGINT is warm (stop consuming, finish running tasks,
return reserved ones); a second signal or SIGQUIT is cold (stop the pool now and
return every unacknowledged message). Either way no message is lost.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue as queue_module
import signal
import socket
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any

from kombu import Consumer, Queue

from kernel import states
from kernel.exceptions import (
    ColdShutdown,
    ConfigurationError,
    ContentDisallowed,
    NotRegistered,
    ProtocolError,
    WorkerLostError,
)
from kernel.plugins.manager import redact_url as _redact
from kernel.protocol import DELIVERY_COUNT_HEADER, DecodedTask, decode_task
from kernel.worker.execute import call_hook_safely, context_for
from kernel.worker.pools import Job, Pool

log = logging.getLogger(__name__)

DEAD_LETTER_REASON_HEADER = "x-dead-letter-reason"


def expand_hostname(template: str | None) -> str:
    """Expand Celery's ``%h`` (host), ``%n`` (short host), ``%d`` (domain)."""
    host = socket.gethostname()
    short, _, domain = host.partition(".")
    template = template or "kernel@%h"
    if "@" not in template:
        template = f"{template}@%h"
    return template.replace("%h", host).replace("%n", short).replace("%d", domain)


class Worker:
    """Consume from ``queues`` and run tasks of ``app`` in a pool."""

    #: Seconds a drain waits for a message when tasks are (not) running.
    busy_poll = 0.02
    idle_poll = 0.1

    def __init__(
        self,
        app: Any,
        *,
        hostname: str | None = None,
        pool: str | None = None,
        concurrency: int | None = None,
        queues: list[str] | None = None,
        prefetch_multiplier: int | None = None,
        lost_worker_timeout: float = 1.0,
        install_signal_handlers: bool = True,
    ) -> None:
        self.app = app
        app.finalize()
        conf = app.conf
        self.hostname = expand_hostname(hostname)
        self.pool_name = pool or conf.worker_pool
        self.pool_spec = app.plugins.pool(self.pool_name)
        default = self.pool_spec.default_concurrency
        self.concurrency = int(
            concurrency or conf.worker_concurrency or (default() if default else 1)
        )
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        self.queue_names = list(queues or conf.task_queues or [conf.task_default_queue])
        multiplier = (
            conf.worker_prefetch_multiplier if prefetch_multiplier is None else prefetch_multiplier
        )
        self.prefetch_count = self.concurrency * multiplier if multiplier else 0
        self.lost_worker_timeout = lost_worker_timeout
        self.install_signal_handlers = install_signal_handlers
        self.features = app.broker_features()
        self.pool: Pool | None = None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._stop_mode: str | None = None  # None, "warm" or "cold"
        self._completed: queue_module.SimpleQueue = queue_module.SimpleQueue()
        self._reserved: deque[tuple[Any, DecodedTask]] = deque()
        self._scheduled: list[tuple[float, int, Any, DecodedTask]] = []
        self._sequence = itertools.count()
        self._eta_held = 0
        self._inflight: dict[str, tuple[Any, DecodedTask]] = {}
        self._components: list[Any] = []
        self.counts = {"succeeded": 0, "failed": 0, "dead_lettered": 0, "requeued": 0}
        self._report_unsupported_controls()
        self.app.plugins.hook.kernel_worker_init(worker=self)

    def _report_unsupported_controls(self) -> None:
        """Say once, at start-up, which configured controls this pool cannot enforce."""
        conf, tasks = self.app.conf, self.app.tasks.values()
        wanted = {
            "hard_time_limit": (
                "hard time limits (time_limit)",
                conf.task_time_limit or any(t.time_limit for t in tasks),
            ),
            "soft_time_limit": (
                "soft time limits (soft_time_limit)",
                conf.task_soft_time_limit or any(t.soft_time_limit for t in tasks),
            ),
        }
        for control, (label, configured) in wanted.items():
            if configured and control not in self.pool_spec.supports:
                log.warning(
                    "pool %s does not enforce %s; tasks run without them", self.pool_name, label
                )

    # ----------------------------------------------------------------- control

    def stop(self, warm: bool = True) -> None:
        """Ask the worker to stop (thread-safe); a cold request overrides a warm one."""
        if not warm:
            self._stop_mode = "cold"
        elif self._stop_mode is None:
            self._stop_mode = "warm"

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == getattr(signal, "SIGQUIT", None) or self._stop_mode is not None:
            log.warning("%s: cold shutdown, unfinished tasks go back to the queue", name)
            first_cold = self._stop_mode != "cold"
            self.stop(warm=False)
            if first_cold and self.pool_name == "solo" and self._inflight:
                raise ColdShutdown()
        else:
            log.warning(
                "%s: warm shutdown, finishing %d running task(s); send it again "
                "for a cold shutdown",
                name,
                len(self._inflight),
            )
            self.stop(warm=True)

    def _install_signals(self) -> None:
        if (
            not self.install_signal_handlers
            or threading.current_thread() is not threading.main_thread()
        ):
            return
        for name in ("SIGTERM", "SIGINT", "SIGQUIT"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._on_signal)

    # ----------------------------------------------------------------- start / run

    def banner(self) -> str:
        conf = self.app.conf
        plugins = [p.name for p in self.app.plugins.describe() if not p.builtin]
        lines = [
            f"kernel worker {self.hostname}",
            f"  app:         {self.app.main or '__main__'} ({len(self.app.tasks)} tasks)",
            f"  broker:      {_redact(conf.broker_url)}{self._sqlite_note(conf.broker_url)}",
            f"  results:     {_redact(conf.result_backend or 'disabled')}"
            f"{self._sqlite_note(conf.result_backend or '')}",
            f"  pool:        {self.pool_name} (concurrency {self.concurrency})",
            f"  queues:      {', '.join(self.queue_names)}",
            f"  plugins:     {', '.join(plugins) or 'builtins only'}",
        ]
        tasks = sorted(self.app.tasks)
        if tasks:
            lines.append("  tasks:       " + "\n               ".join(tasks))
        return "\n".join(lines)

    @staticmethod
    def _sqlite_note(url: str) -> str:
        if not url.startswith("sqlite:"):
            return ""
        from kernel.plugins.builtin.sqlite_db import path_from_url

        return f"  (file {os.path.abspath(path_from_url(url))})"

    def _component_order(self) -> list[Any]:
        """Plugin components in an order that honours ``requires``; checked before start."""
        pending = {spec.name: spec for spec in self.app.plugins.specs("worker_components")}
        started: set[str] = {"pool", "consumer"}
        order = []
        while pending:
            ready = sorted(n for n, s in pending.items() if set(s.requires) <= started)
            if not ready:
                missing = {n: sorted(set(s.requires) - started) for n, s in pending.items()}
                raise ConfigurationError(
                    f"worker components with unmet requirements: {missing}; install the "
                    "plugins that provide them or remove the components' plugins"
                )
            for name in ready:
                order.append(pending.pop(name))
                started.add(name)
        return order

    def _start_components(self, order: list[Any]) -> None:
        for spec in order:
            component = spec.load()(self)
            component.start()
            self._components.append(component)

    def start(self) -> None:
        """Run until stopped; returns after the shutdown finished."""
        components = self._component_order()
        self._install_signals()
        self.pool = self.pool_spec.load()(self, self.concurrency)
        self.pool.start()
        connection = self.app.connection()
        connection.ensure_connection(max_retries=5)
        channel = connection.channel()
        self._producer = connection.Producer(channel)
        queues = self.app.queues_for(self.queue_names)
        accept = self.app.serialization.accepted_types(self.app.conf.accept_content)
        consumer = Consumer(
            channel,
            queues=queues,
            callbacks=[self._on_message],
            accept=accept,
            on_decode_error=self._on_decode_error,
            prefetch_count=self.prefetch_count or None,
        )
        consumer.consume()
        self._consumer = consumer
        self._start_components(components)
        self.app.plugins.hook.kernel_worker_ready(worker=self)
        log.info(
            "worker %s ready: pool %s x%d, queues %s",
            self.hostname,
            self.pool_name,
            self.concurrency,
            ",".join(self.queue_names),
        )
        self.ready.set()
        cold = False
        try:
            self._run(connection)
            cold = self._stop_mode == "cold"
            if not cold:
                consumer.cancel()
                cold = not self._drain_inflight(connection)
        except ColdShutdown:
            cold = True
        except BaseException as exc:
            log.exception(
                "worker %s failed with task(s) %s running; stopping at once, unfinished "
                "messages go back to the queue",
                self.hostname,
                ", ".join(f"{d.name}[{d.id}]" for _m, d in self._inflight.values()) or "none",
            )
            cold = True
            # The running tasks may be what broke the worker (a task raising SystemExit
            # in a solo pool): count this as a delivery so it cannot loop for ever.
            for message, decoded in list(self._inflight.values()):
                if not message.acknowledged:
                    self._requeue(message, decoded, f"its worker stopped ({exc!r})")
            self._inflight.clear()
            raise
        finally:
            self._shutdown(consumer, channel, connection, cold)

    def _run(self, connection: Any) -> None:
        assert self.pool is not None
        while self._stop_mode is None:
            self._complete_finished()
            self._release_scheduled()
            self._dispatch()
            if self._reserved and len(self._inflight) >= self.pool.limit:
                # Slot-bound: work is waiting and every slot is busy, so the next thing
                # that matters is a task finishing; wait for exactly that event.
                self._wait_completion(self._until_next_eta(self.idle_poll))
                continue
            timeout = self.busy_poll if self._inflight else self.idle_poll
            try:
                connection.drain_events(timeout=timeout)
            except TimeoutError:
                pass

    def _drain_inflight(self, connection: Any) -> bool:
        """Warm shutdown: wait for running tasks; False when the timeout ran out."""
        deadline = time.monotonic() + self.app.conf.worker_shutdown_timeout
        while self._inflight and self._stop_mode != "cold":
            if time.monotonic() >= deadline:
                log.warning(
                    "warm shutdown timed out with %d task(s) running; stopping them, "
                    "their messages return to the queue",
                    len(self._inflight),
                )
                return False
            self._wait_completion(0.1)
        return self._stop_mode != "cold"

    def _shutdown(self, consumer: Any, channel: Any, connection: Any, cold: bool) -> None:
        for component in reversed(self._components):
            try:
                component.stop()
            except Exception:
                log.exception("worker component %r failed to stop", component)
        if self.pool is not None:
            if cold and self._inflight and "terminate" not in self.pool_spec.supports:
                log.warning(
                    "pool %s cannot stop running tasks; waiting for %d of them to finish "
                    "(SIGKILL abandons them: their messages come back after the broker's "
                    "visibility timeout)",
                    self.pool_name,
                    len(self._inflight),
                )
            if cold:
                self.pool.terminate()
            else:
                self.pool.stop()
        self._complete_finished(cold_shutdown=cold)
        returned = len(self._reserved) + len(self._scheduled) + len(self._inflight)
        try:
            consumer.cancel()
        except Exception:
            log.debug("cancelling the consumer failed during shutdown", exc_info=True)
        # Closing the channel hands unacknowledged messages back to the broker.
        channel.close()
        connection.release()
        if returned:
            log.info("returned %d unfinished message(s) to the broker", returned)
        self.app.plugins.hook.kernel_worker_shutdown(worker=self)
        self.app.close()
        self.stopped.set()
        log.info("worker %s stopped (%s shutdown)", self.hostname, "cold" if cold else "warm")

    # ----------------------------------------------------------------- receiving

    def _on_decode_error(self, message: Any, exc: BaseException) -> None:
        if isinstance(exc, ContentDisallowed) or type(exc).__name__ == "ContentDisallowed":
            reason = (
                f"content type {message.content_type!r} is not accepted "
                f"(accept_content={self.app.conf.accept_content}); add it if the "
                "producer is trusted"
            )
        else:
            reason = f"body could not be decoded: {type(exc).__name__}: {exc}"
        headers = message.headers or {}
        task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
        self._reject_bad(message, reason, task_id, ContentDisallowed(reason) if task_id else None)

    def _reject_bad(
        self,
        message: Any,
        reason: str,
        task_id: str | None = None,
        exc: BaseException | None = None,
    ) -> None:
        headers = message.headers or {}
        task_id = task_id or headers.get("id")
        log.error(
            "rejected message %s (task %s): %s; moved to queue %s",
            task_id or "?",
            headers.get("task", "?"),
            reason,
            self.app.conf.task_dead_letter_queue,
        )
        if task_id and exc is not None:
            try:
                self.app.backend.mark_as_failure(task_id, exc)
            except Exception:
                log.exception("could not store the failure of %s", task_id)
        self._dead_letter(message, reason)

    def _dead_letter(self, message: Any, reason: str) -> None:
        queue_name = self.app.conf.task_dead_letter_queue
        headers = dict(message.headers or {})
        headers[DEAD_LETTER_REASON_HEADER] = reason
        try:
            self._producer.publish(
                message.body,
                routing_key=queue_name,
                exchange="",
                content_type=message.content_type or "application/octet-stream",
                content_encoding=message.content_encoding or "binary",
                headers=headers,
                declare=[Queue(queue_name)],
                **{
                    k: v
                    for k, v in (message.properties or {}).items()
                    if k in ("correlation_id", "reply_to", "priority")
                },
            )
        except Exception:
            log.exception("could not dead-letter a message; it stays in its queue")
            message.reject(requeue=True)
            return
        self.counts["dead_lettered"] += 1
        message.ack()

    def _on_message(self, body: Any, message: Any) -> None:
        try:
            self._receive(body, message)
        except Exception:  # a failure here must not stop the worker, nor lose the message
            headers = message.headers or {}
            log.exception(
                "could not take task %s[%s]; returning it to the queue",
                headers.get("task", "?"),
                headers.get("id", "?"),
            )
            if not message.acknowledged:
                message.reject(requeue=True)

    def _receive(self, body: Any, message: Any) -> None:
        try:
            decoded = decode_task(message.headers, message.properties, body)
        except ProtocolError as exc:
            self._reject_bad(message, str(exc))
            return
        except Exception as exc:  # a bad message must never stop the worker
            self._reject_bad(message, f"message could not be read: {type(exc).__name__}: {exc}")
            return
        if decoded.name not in self.app.tasks:
            error = NotRegistered(
                f"task {decoded.name!r} is not registered on worker {self.hostname}; "
                "start the worker with the app that defines it (-A) or add its module "
                "to include=[...]"
            )
            self._reject_bad(message, str(error), decoded.id, error)
            return
        max_deliveries = self.app.conf.task_max_deliveries
        if max_deliveries and decoded.delivery_count >= max_deliveries:
            error = WorkerLostError(
                f"task {decoded.name}[{decoded.id}] was delivered {decoded.delivery_count} "
                "times without finishing (its worker died, it was requeued after an error, "
                f"or it rejected itself with requeue=True); task_max_deliveries="
                f"{max_deliveries}; its message is in queue "
                f"{self.app.conf.task_dead_letter_queue}"
            )
            self._reject_bad(message, str(error), decoded.id, error)
            return
        if self._expired(message, decoded):
            return
        if decoded.eta is not None:
            delay = decoded.eta.timestamp() - time.time()
            if delay > 0:
                heapq.heappush(
                    self._scheduled,
                    (decoded.eta.timestamp(), next(self._sequence), message, decoded),
                )
                self._hold_prefetch_slot(+1)
                return
        self._reserved.append((message, decoded))

    def _until_next_eta(self, limit: float) -> float:
        if not self._scheduled:
            return limit
        return max(0.0, min(limit, self._scheduled[0][0] - time.time()))

    def _hold_prefetch_slot(self, change: int) -> None:
        """Messages held for their ETA do not count against the prefetch window
        (as Celery does), or enough of them would stop the worker receiving."""
        if not self.prefetch_count:
            return
        self._eta_held += change
        self._consumer.qos(prefetch_count=self.prefetch_count + self._eta_held)

    def _expired(self, message: Any, decoded: DecodedTask) -> bool:
        """Revoke (and ack) a task past its ``expires``; checked on receipt and dispatch."""
        if decoded.expires is None or decoded.expires > datetime.now(timezone.utc):
            return False
        log.warning(
            "task %s[%s] expired at %s; not run",
            decoded.name,
            decoded.id,
            decoded.expires.isoformat(),
        )
        self.app.backend.mark_as_revoked(decoded.id, "expired")
        request = context_for(decoded, self.hostname, message.delivery_info)
        call_hook_safely(
            self.app.plugins.hook.kernel_task_revoked,
            task=self.app.tasks[decoded.name],
            request=request,
            terminated=False,
            expired=True,
        )
        message.ack()
        return True

    def _release_scheduled(self) -> None:
        now = time.time()
        while self._scheduled and self._scheduled[0][0] <= now:
            _, _, message, decoded = heapq.heappop(self._scheduled)
            self._reserved.append((message, decoded))
            self._hold_prefetch_slot(-1)

    # ----------------------------------------------------------------- running

    def _dispatch(self) -> None:
        assert self.pool is not None
        while self._reserved and len(self._inflight) < self.pool.limit and self._stop_mode is None:
            message, decoded = self._reserved.popleft()
            if self._expired(message, decoded):
                continue
            if not self.app.tasks[decoded.name].option("acks_late"):
                message.ack()
            tag = message.delivery_tag
            self._inflight[tag] = (message, decoded)
            job = Job(decoded, self.hostname, dict(message.delivery_info or {}))
            self.pool.apply(
                job, lambda outcome, error, tag=tag: self._completed.put((tag, outcome, error))
            )
            self._complete_finished()

    def _wait_completion(self, timeout: float) -> None:
        try:
            item = self._completed.get(timeout=timeout)
        except queue_module.Empty:
            return
        self._complete(*item)
        self._complete_finished()

    def _complete_finished(self, cold_shutdown: bool = False) -> None:
        while True:
            try:
                tag, outcome, error = self._completed.get_nowait()
            except queue_module.Empty:
                return
            if cold_shutdown and error is not None:
                continue  # stopped by us: closing the channel returns it, not counted
            self._complete(tag, outcome, error)

    def _complete(self, tag: str, outcome: Any, error: BaseException | None) -> None:
        entry = self._inflight.pop(tag, None)
        if entry is None:  # already returned to the broker by a failing shutdown
            return
        message, decoded = entry
        try:
            self._settle(message, decoded, outcome, error)
        except Exception:
            log.exception(
                "task %s[%s]: could not settle its message; returning it to the queue",
                decoded.name,
                decoded.id,
            )
            if not message.acknowledged:
                message.reject(requeue=True)

    def _settle(
        self, message: Any, decoded: DecodedTask, outcome: Any, error: BaseException | None
    ) -> None:
        """Ack, requeue or fail one finished message, in the worker's thread."""
        if error is not None:
            self._on_lost(message, decoded, error)
            return
        if outcome.state == states.SUCCESS:
            self.counts["succeeded"] += 1
            log.info(
                "task %s[%s] succeeded in %.3fs: %s",
                outcome.name,
                outcome.task_id,
                outcome.runtime,
                outcome.summary,
            )
        elif outcome.state == states.FAILURE:
            self.counts["failed"] += 1
        if message.acknowledged:
            if outcome.requeue:  # acks_late=False: the message is gone, say so
                log.error(
                    "task %s[%s] was acknowledged before it ran (acks_late=False) and its "
                    "result could not be stored; it is lost. Use acks_late=True to have it "
                    "retried when that happens",
                    decoded.name,
                    decoded.id,
                )
            return
        if outcome.requeue:
            self._requeue(message, decoded, f"requeued ({outcome.summary})")
        elif outcome.reject:
            self._dead_letter(message, "the task rejected its message (Reject, requeue=False)")
        else:
            message.ack()

    def _on_lost(self, message: Any, decoded: DecodedTask, error: BaseException) -> None:
        requeue = self.app.tasks[decoded.name].option("reject_on_worker_lost")
        if message.acknowledged or not requeue:
            lost = WorkerLostError(
                f"task {decoded.name}[{decoded.id}]: the process running it died ({error})"
            )
            log.error("%s; marked FAILURE", lost)
            self.app.backend.mark_as_failure(decoded.id, lost)
            self.counts["failed"] += 1
            if not message.acknowledged:
                message.ack()
            return
        self._requeue(message, decoded, f"the process running it died ({error})")

    def _requeue(self, message: Any, decoded: DecodedTask, reason: str) -> None:
        """Return a message for another attempt, counted against ``task_max_deliveries``."""
        attempt = decoded.delivery_count + 1
        log.warning(
            "task %s[%s]: %s; returning it to the queue (delivery %d of at most %d)",
            decoded.name,
            decoded.id,
            reason,
            attempt,
            self.app.conf.task_max_deliveries,
        )
        self.counts["requeued"] += 1
        if "delivery_count" in self.features:
            message.reject(requeue=True)
            return
        # The transport does not count deliveries: republish a copy that carries the count.
        headers = dict(message.headers or {})
        headers[DELIVERY_COUNT_HEADER] = attempt
        info = message.delivery_info or {}
        self._producer.publish(
            message.body,
            exchange=info.get("exchange", ""),
            routing_key=info.get("routing_key", ""),
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            **{
                k: v
                for k, v in (message.properties or {}).items()
                if k in ("correlation_id", "reply_to", "priority")
            },
        )
        message.ack()

    def stats(self) -> dict:
        return {
            "hostname": self.hostname,
            "pool": self.pool.info() if self.pool else None,
            "reserved": len(self._reserved),
            "running": len(self._inflight),
            "scheduled": len(self._scheduled),
            **self.counts,
        }
