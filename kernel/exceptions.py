"""Exceptions users and plugin authors see.

Every message says what failed, with the offending value, and what to do about it.
"""

from __future__ import annotations

import importlib
from typing import Any

# This module is imported by the plugin manager, which the ``kernel`` command loads
# before a pool's monkey-patching (gevent) runs: it must not import kombu, py-amqp or
# ssl. The names below are imported on first use.
#: Time limits and termination are billiard's classes, as in Celery, so a stored
#: failure names the same exception type whichever side of a Celery/kernel pair ran
#: the task. The broker errors need kombu.
_LAZY = {
    "SoftTimeLimitExceeded": "billiard.exceptions",
    "Terminated": "billiard.exceptions",
    "TimeLimitExceeded": "billiard.exceptions",
    "PublishError": "kernel.broker_errors",
    "BrokerConnectionError": "kernel.broker_errors",
    "broker_connection_errors": "kernel.broker_errors",
    "describe_broker_error": "kernel.broker_errors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kernel.exceptions' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class KernelError(Exception):
    """Base class of every error the kernel raises on purpose."""


class ConfigurationError(KernelError):
    """A setting has a value the kernel cannot use."""


class PluginError(KernelError):
    """A plugin could not be loaded or registered."""


class PluginConflict(PluginError):
    """Two plugins claim the same name or URL scheme."""


class UnknownCapability(KernelError):
    """No loaded plugin provides what the configuration asks for."""


class UnknownTransport(UnknownCapability):
    """No transport serves the broker URL's scheme."""


class UnknownBackend(UnknownCapability):
    """No result backend serves the backend URL's scheme."""


class UnknownPool(UnknownCapability):
    """No pool has the requested name."""


class NotRegistered(KernelError, KeyError):
    """A task name is not registered with the app."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "task not registered"


class ProtocolError(KernelError):
    """A message does not follow Celery's message protocol v2."""


class ContentDisallowed(KernelError):
    """A message's content type is not in ``accept_content``."""


class TimeoutError(KernelError):  # noqa: A001 - Celery's name, users catch it
    """A result did not become ready within the given timeout."""


class WorkerLostError(KernelError):
    """The process running a task died before the task finished."""


class TaskRevokedError(KernelError):
    """The task was revoked and did not run to completion."""


class ChordError(KernelError):
    """A chord's body could not run: a header task failed or was revoked, the chord's
    group was lost, or the body could not be sent.

    The message names the culprit (``Dependency <task id> raised ValueError('boom')``)
    and the original exception is the ``__cause__`` when it is known. Stored as
    Celery's ``celery.exceptions.ChordError``, so Celery clients rebuild it too.
    """


class RemoteException(KernelError):
    """Stand-in for a task's exception whose class cannot be imported here.

    ``exc_type`` and ``exc_module`` name the original class; ``str()`` gives
    its message.
    """

    def __init__(self, exc_type: str, exc_module: str | None, message: str) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.exc_module = exc_module
        self.message = message

    def __str__(self) -> str:
        origin = f"{self.exc_module}.{self.exc_type}" if self.exc_module else self.exc_type
        return f"{origin}: {self.message}"


class ColdShutdown(BaseException):
    """Raised in a solo worker's main thread by a second signal to stop its task at once.

    A BaseException so task code catching ``Exception`` cannot swallow it.
    """


class Reject(KernelError):
    """Raised by a task to reject its message (``requeue=True`` puts it back)."""

    def __init__(self, reason: object = None, requeue: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.requeue = requeue


class Retry(KernelError):  # noqa: N818 - Celery's name, users catch it
    """Raised by ``task.retry()``: the task was sent again and this run ends here."""

    def __init__(
        self, message: str | None = None, exc: BaseException | None = None, when: Any = None
    ) -> None:
        super().__init__(message)
        self.exc = exc
        self.when = when

    def __str__(self) -> str:
        return str(self.args[0]) if self.args and self.args[0] else "retry"


class MaxRetriesExceededError(KernelError):
    """A task asked to be retried more often than its ``max_retries`` allows.

    Raised by ``task.retry()`` called without ``exc=`` (with ``exc=``, that exception is
    raised instead, so the task fails with the error that made it retry). ``exc`` is the
    exception being handled when ``retry()`` was called, if any (also the ``__cause__``);
    ``task_name``, ``task_id``, ``task_args`` and ``task_kwargs`` say which call gave up.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        exc: BaseException | None = None,
        task_name: str | None = None,
        task_id: str | None = None,
        task_args: Any = (),
        task_kwargs: Any = None,
        retries: int | None = None,
        max_retries: int | None = None,
    ) -> None:
        if message is None:
            message = (
                f"task {task_name}[{task_id}] args={tuple(task_args or ())!r} "
                f"kwargs={dict(task_kwargs or {})!r} cannot retry again: it was retried "
                f"{retries} time(s) and max_retries={max_retries}; raise max_retries "
                "(None retries for ever), or pass exc= to retry() to fail with that "
                "exception instead"
            )
        super().__init__(message)
        self.exc = exc
        self.task_name = task_name
        self.task_id = task_id
        self.task_args = task_args
        self.task_kwargs = task_kwargs
        self.retries = retries
        self.max_retries = max_retries


class Ignore(KernelError):
    """Raised by a task so the worker records no state for it."""
