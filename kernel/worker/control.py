"""The worker's end of remote control: its mailbox queue and the command handlers.

``ControlNode(worker).start(connection)`` opens a channel of its own on the worker's
connection and consumes the node's queue, ``<hostname>.<control_exchange>.pidbox``,
bound to the fanout exchange every client broadcasts to (see :mod:`kernel.control`).
The worker's ``connection.drain_events()`` then delivers control messages in its main
thread, between task messages, so handlers may touch worker state without locks.

Handlers are plain functions ``handler(worker, **arguments) -> reply`` kept in a
registry: the builtins below (Celery's names and arguments), then every plugin's
``kernel_control_commands``. A reply is any JSON value; by convention
``{"ok": ...}`` or ``{"error": ...}``. A handler that raises never stops the worker:
the error is logged and sent back as ``{"error": "..."}``.

The worker object must provide ``hostname``, ``app``, ``revoked`` (a
:class:`kernel.worker.state.RevokedTasks`), ``revoke_tasks(ids, terminate, signal)``,
``set_rate_limit(task_name, rate)`` and ``stats()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kombu.pidbox import Node

from kernel.control import TERM_SIGNAL, mailbox_for, signal_name, signal_number, task_id_list
from kernel.plugins.specs import resolve

log = logging.getLogger(__name__)

Handler = Callable[..., Any]


# --------------------------------------------------------------------- builtin commands


def revoke(
    worker: Any,
    task_id: Any = None,
    terminate: bool = False,
    signal: Any = None,
    **_extra: Any,
) -> dict:
    """Forget tasks that have not started; with ``terminate``, stop running ones."""
    ids = task_id_list(task_id)
    # The signal matters only when terminating; a Celery client may send None.
    try:
        signum = signal_number(signal or TERM_SIGNAL) if terminate else signal_number(TERM_SIGNAL)
    except ValueError as exc:  # e.g. a signal another OS has: still revoke the ids
        log.warning("revoke: %s; terminating with SIGTERM instead", exc)
        signum = signal_number(TERM_SIGNAL)
    found = list(worker.revoke_tasks(ids, bool(terminate), signum) or [])
    if terminate:
        log.info("revoked task(s) %s, terminating with %s", ", ".join(ids), signal_name(signum))
    else:
        log.info("revoked task(s) %s", ", ".join(ids))
    if terminate:
        if not found:
            return {"ok": "terminate: tasks unknown"}
        return {"ok": f"terminate: {', '.join(found)}"}
    return {"ok": f"tasks {', '.join(ids)} flagged as revoked"}


def terminate(worker: Any, task_id: Any = None, signal: Any = None, **_extra: Any) -> dict:
    """Celery's ``terminate`` command: revoke with ``terminate=True``."""
    return revoke(worker, task_id, terminate=True, signal=signal)


def rate_limit(worker: Any, task_name: str = "", rate_limit: Any = None, **_extra: Any) -> dict:
    """Change the rate limit of one task type on this worker."""
    try:
        answer = worker.set_rate_limit(task_name, rate_limit)
    except ValueError as exc:
        return {"error": str(exc)}
    return answer if answer is not None else {"ok": "new rate limit set successfully"}


def ping(worker: Any, **_extra: Any) -> dict:
    return {"ok": "pong"}


def stats(worker: Any, **_extra: Any) -> Any:
    return worker.stats()


def revoked(worker: Any, **_extra: Any) -> list[str]:
    """The revoked ids this worker remembers (Celery's ``revoked`` inspect command)."""
    return list(worker.revoked.ids())


BUILTIN_COMMANDS: dict[str, Handler] = {
    "revoke": revoke,
    "terminate": terminate,
    "rate_limit": rate_limit,
    "ping": ping,
    "stats": stats,
    "revoked": revoked,
    "dump_revoked": revoked,  # Celery's older name
}


# --------------------------------------------------------------------- the node


class _Node(Node):
    """kombu's mailbox node (destination matching, replies) with our dispatch."""

    def __init__(self, control: ControlNode, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.control = control

    def handle(self, method: str, arguments: dict | None = None) -> Any:
        return self.control.handle(method, arguments or {})


class ControlNode:
    """Receives the remote-control commands addressed to one worker."""

    def __init__(self, worker: Any, commands: dict[str, Handler] | None = None) -> None:
        self.worker = worker
        self.hostname: str = worker.hostname
        self.commands: dict[str, Handler] = dict(BUILTIN_COMMANDS)
        self.commands.update(self._plugin_commands(worker.app))
        if commands:
            self.commands.update(commands)
        self.channel: Any = None
        self.consumer: Any = None
        self._node: _Node | None = None

    def _plugin_commands(self, app: Any) -> dict[str, Handler]:
        found: dict[str, Handler] = {}
        for spec in app.plugins.specs("control_commands"):
            if spec.name in BUILTIN_COMMANDS:
                log.warning(
                    "control command %r from a plugin ignored: it is a builtin command",
                    spec.name,
                )
                continue
            found[spec.name] = spec.handler
        return found

    @property
    def queue_name(self) -> str:
        return mailbox_for(self.worker.app).get_queue(self.hostname).name

    def start(self, connection: Any) -> None:
        """Consume this node's queue on a new channel of ``connection``.

        Messages waiting in the queue from an earlier run under the same hostname are
        dropped first: a broadcast is for the workers running when it was sent.
        """
        mailbox = mailbox_for(self.worker.app)(connection)
        channel = connection.channel()
        node = _Node(
            self, hostname=self.hostname, state=self.worker, channel=channel, mailbox=mailbox
        )
        try:
            consumer = node.Consumer(
                channel,
                no_ack=True,
                callbacks=[self._on_message],
                on_decode_error=self._on_decode_error,
            )
            stale = channel.queue_purge(self.queue_name)
            if stale:
                log.info("dropped %d control message(s) sent before this worker started", stale)
            consumer.consume()
        except BaseException:
            channel.close()
            raise
        self.channel, self.consumer, self._node = channel, consumer, node
        log.debug("remote control: %s listening on %s", self.hostname, self.queue_name)

    def stop(self) -> None:
        """Stop consuming and remove this node's queue; safe to call twice."""
        consumer, channel = self.consumer, self.channel
        self.consumer = self.channel = self._node = None
        if channel is None:
            return
        try:
            if consumer is not None:
                consumer.cancel()
            # Brokers without auto-delete queues (SQLite, memory) would keep the queue
            # bound, collecting every later broadcast: remove it ourselves.
            for queue in consumer.queues if consumer is not None else []:
                queue.bind(channel).unbind_from(queue.exchange, queue.routing_key)
                queue.bind(channel).delete()
        except Exception as exc:
            log.warning(
                "remote control: could not remove the queue %s of %s: %s",
                self.queue_name,
                self.hostname,
                exc,
            )
        finally:
            try:
                channel.close()
            except Exception as exc:
                log.warning("remote control: closing the channel of %s: %s", self.hostname, exc)

    # ----------------------------------------------------------------- messages

    def _on_message(self, body: Any, message: Any) -> None:
        if self._node is None:
            return
        try:
            if not isinstance(body, dict) or not isinstance(body.get("method"), str):
                log.warning("remote control: ignored a message that is not a command: %r", body)
                return
            self._node.handle_message(body, message)
        except Exception:  # a bad message or a failed reply must never stop the worker
            log.exception(
                "remote control: could not handle command %r",
                body.get("method") if isinstance(body, dict) else body,
            )

    def _on_decode_error(self, message: Any, exc: BaseException) -> None:
        log.warning(
            "remote control: ignored a message that could not be decoded (%s, content type %r): %s",
            type(exc).__name__,
            getattr(message, "content_type", None),
            exc,
        )

    def handle(self, method: str, arguments: dict) -> Any:
        """Run the handler of ``method``; errors become ``{"error": ...}`` replies."""
        handler = self.commands.get(method)
        if handler is None:
            log.warning(
                "remote control: unknown command %r (known: %s)",
                method,
                ", ".join(sorted(self.commands)),
            )
            return {"error": f"unknown command {method!r} on {self.hostname}"}
        try:
            return resolve(handler)(self.worker, **arguments)
        except Exception as exc:
            log.exception("remote control: command %s%r failed", method, arguments)
            return {"error": f"{method} failed: {type(exc).__name__}: {exc}"}
