"""Remote control: commands broadcast to running workers (``app.control``).

Commands travel through kombu's process mailbox ("pidbox"): a fanout exchange named
``<control_exchange>.pidbox`` (``celery.pidbox`` by default, Celery's) to which every
worker binds a queue of its own, ``<hostname>.celery.pidbox``. Messages are JSON
``{"method", "arguments", "destination", ...}``; a caller that wants answers adds
``reply_to`` and a ``ticket``, and each worker replies ``{hostname: reply}`` to the
caller's reply queue. The method names and arguments are Celery's, so a kernel
client can revoke a task on a Celery worker and a Celery client on a kernel worker.

A broadcast reaches only the workers running at that moment: a worker that starts
later never sees it (see ``kernel worker --statedb`` for revokes that must survive a
restart).
"""

from __future__ import annotations

import logging
import signal as signal_module
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from kombu.pidbox import Mailbox

if TYPE_CHECKING:
    from kernel.app import App

log = logging.getLogger(__name__)

#: The signal ``terminate=True`` sends unless told otherwise (Celery's default).
TERM_SIGNAL = "SIGTERM"

#: Queue arguments as Celery declares them (``control_queue_ttl`` 300 s,
#: ``control_queue_expires`` 10 s); the SQLite transport honours them, memory ignores them.
QUEUE_TTL = 300.0
QUEUE_EXPIRES = 10.0


def mailbox_for(app: App) -> Mailbox:
    """The app's mailbox, unbound: ``mailbox_for(app)(connection)`` binds it."""
    return Mailbox(
        app.conf.control_exchange,
        type="fanout",
        accept=["json"],
        serializer="json",
        queue_ttl=QUEUE_TTL,
        queue_expires=QUEUE_EXPIRES,
        reply_queue_ttl=QUEUE_TTL,
        reply_queue_expires=QUEUE_EXPIRES,
    )


def signal_number(value: Any) -> int:
    """The number of a signal given as ``"SIGKILL"``, ``"KILL"``, ``"kill"`` or ``9``."""
    if isinstance(value, signal_module.Signals):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return int(signal_module.Signals(value))
        except ValueError:
            pass
    elif isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit():
            return signal_number(int(name))
        if not name.startswith("SIG"):
            name = f"SIG{name}"
        member = signal_module.Signals.__members__.get(name)
        if member is not None:
            return int(member)
    raise ValueError(
        f"unknown signal {value!r}; valid signals here: "
        f"{', '.join(sorted(signal_module.Signals.__members__))}"
    )


def signal_name(value: Any) -> str:
    """The canonical name (``"SIGKILL"``) of a signal given as for :func:`signal_number`."""
    return signal_module.Signals(signal_number(value)).name


def task_id_list(task_id: Any) -> list[str]:
    """One task id or several (strings or result handles) as a list of unique strings."""
    if isinstance(task_id, (str, bytes)) or not isinstance(task_id, Iterable):
        task_id = [task_id]
    ids: dict[str, None] = {}
    for item in task_id:
        if isinstance(item, bytes):
            item = item.decode()
        elif item is not None and not isinstance(item, str) and hasattr(item, "id"):
            item = item.id  # an AsyncResult
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"a task id must be a non-empty string, got {item!r}")
        ids[item] = None
    if not ids:
        raise ValueError("no task id given: pass an id or a non-empty list of ids")
    return list(ids)


def _destination_list(destination: Any) -> list[str] | None:
    if destination is None:
        return None
    names = [destination] if isinstance(destination, str) else list(destination)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(
            f"destination must be a worker name (e.g. 'kernel@host') or a non-empty list "
            f"of them, got {destination!r}"
        )
    return names


def _positive_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


class Control:
    """Send commands to running workers: ``app.control.revoke(task_id)``.

    Each call opens a connection of its own (or uses ``connection=``) and closes it
    before returning. Calls that ask for replies wait until ``timeout`` seconds pass
    without a new reply (or ``limit`` replies arrived, or every ``destination``
    answered) and return a list of ``{hostname: reply}`` dicts.
    """

    def __init__(self, app: App) -> None:
        self.app = app

    @property
    def mailbox(self) -> Mailbox:
        return mailbox_for(self.app)

    def broadcast(
        self,
        command: str,
        arguments: dict | None = None,
        destination: str | list[str] | None = None,
        connection: Any = None,
        reply: bool = False,
        timeout: float = 1.0,
        limit: int | None = None,
        callback: Callable[[dict], Any] | None = None,
    ) -> list[dict] | None:
        """Send ``command`` with ``arguments`` to every worker, or to ``destination``.

        Returns the replies when ``reply`` is true, else None.
        """
        if not isinstance(command, str) or not command:
            raise ValueError(f"command must be a non-empty string, got {command!r}")
        if arguments is not None and not isinstance(arguments, dict):
            raise TypeError(f"arguments must be a dict, got {type(arguments).__name__}")
        destinations = _destination_list(destination)
        timeout = _positive_timeout(timeout)
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive number of replies, got {limit!r}")
        arguments = dict(arguments or {})
        owned = connection is None
        if owned:
            connection = self.app.connection()
        try:
            if owned:
                connection.ensure_connection(max_retries=3)
            return self._send(
                connection, command, arguments, destinations, reply, timeout, limit, callback
            )
        finally:
            if owned:
                connection.release()

    def _send(
        self,
        connection: Any,
        command: str,
        arguments: dict,
        destination: list[str] | None,
        reply: bool,
        timeout: float,
        limit: int | None,
        callback: Callable[[dict], Any] | None,
    ) -> list[dict] | None:
        mailbox = self.mailbox(connection)
        log.debug("control: %s %s to %s", command, arguments, destination or "every worker")
        if not reply:
            if destination:
                mailbox.cast(destination, command, arguments)
            else:
                mailbox.abcast(command, arguments)
            return None
        if destination:
            replies = mailbox.call(destination, command, arguments, timeout, callback)
        else:
            replies = mailbox.multi_call(command, arguments, timeout, limit, callback)
        return list(replies or [])

    # ----------------------------------------------------------------- commands

    def revoke(
        self,
        task_id: str | Iterable[str],
        destination: str | list[str] | None = None,
        terminate: bool = False,
        signal: str | int = TERM_SIGNAL,
        *,
        connection: Any = None,
        reply: bool = False,
        timeout: float = 1.0,
    ) -> list[dict] | None:
        """Revoke one task or several: workers will not start them.

        With ``terminate=True`` a worker also stops a task that is already running,
        with ``signal`` (a name like ``"SIGKILL"`` or ``"KILL"``, or a number), as far
        as its pool can (prefork kills the child process). Workers record REVOKED.
        """
        ids = task_id_list(task_id)
        arguments = {
            "task_id": ids[0] if len(ids) == 1 else ids,
            "terminate": bool(terminate),
            "signal": signal_name(signal),
        }
        return self.broadcast(
            "revoke",
            arguments,
            destination,
            connection=connection,
            reply=reply,
            timeout=timeout,
        )

    def terminate(
        self,
        task_id: str | Iterable[str],
        destination: str | list[str] | None = None,
        signal: str | int = TERM_SIGNAL,
        **options: Any,
    ) -> list[dict] | None:
        """Revoke and stop running tasks: ``revoke(task_id, terminate=True)``."""
        return self.revoke(task_id, destination, terminate=True, signal=signal, **options)

    def rate_limit(
        self,
        task_name: str,
        rate_limit: str | float | None,
        destination: str | list[str] | None = None,
        *,
        connection: Any = None,
        reply: bool = False,
        timeout: float = 1.0,
    ) -> list[dict] | None:
        """Set the rate limit of task type ``task_name`` on the workers.

        ``rate_limit`` is ``"10/s"``, ``"100/m"``, ``"1000/h"`` or a number of tasks per
        second; None or 0 removes the limit. A worker that does not know the task
        replies with an error.
        """
        if not isinstance(task_name, str) or not task_name:
            raise ValueError(f"task_name must be a task's name, got {task_name!r}")
        if rate_limit is not None and (
            isinstance(rate_limit, bool) or not isinstance(rate_limit, (str, int, float))
        ):
            raise TypeError(
                f"rate_limit must be a string like '10/s', a number or None, got {rate_limit!r}"
            )
        from kernel.worker.ratelimit import parse_rate

        parse_rate(rate_limit)  # a bad format fails here, not on every worker
        return self.broadcast(
            "rate_limit",
            {"task_name": task_name, "rate_limit": rate_limit},
            destination,
            connection=connection,
            reply=reply,
            timeout=timeout,
        )

    def ping(
        self,
        destination: str | list[str] | None = None,
        timeout: float = 1.0,
        *,
        connection: Any = None,
    ) -> list[dict]:
        """Ask workers to answer; returns ``[{hostname: {"ok": "pong"}}, ...]``."""
        replies = self.broadcast(
            "ping", {}, destination, connection=connection, reply=True, timeout=timeout
        )
        return replies or []

    def inspect(self, destination: str | list[str] | None = None, timeout: float = 1.0) -> Inspect:
        """Read-only questions to workers: ``app.control.inspect().stats()``."""
        return Inspect(self, destination, timeout)


class Inspect:
    """Ask workers about themselves; every method returns ``{hostname: reply}``.

    Workers that did not answer within ``timeout`` are absent; an empty dict means
    none answered.
    """

    def __init__(
        self,
        control: Control,
        destination: str | list[str] | None = None,
        timeout: float = 1.0,
    ) -> None:
        self.control = control
        self.destination = _destination_list(destination)
        self.timeout = _positive_timeout(timeout)

    def _request(self, command: str, **arguments: Any) -> dict[str, Any]:
        replies = self.control.broadcast(
            command, arguments, self.destination, reply=True, timeout=self.timeout
        )
        merged: dict[str, Any] = {}
        for item in replies or []:
            merged.update(item)
        return merged

    def ping(self) -> dict[str, Any]:
        return self._request("ping")

    def stats(self) -> dict[str, Any]:
        """Each worker's counters, pool and queues."""
        return self._request("stats")

    def revoked(self) -> dict[str, Any]:
        """Each worker's remembered revoked task ids."""
        return self._request("revoked")
