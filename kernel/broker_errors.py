"""Errors about reaching the broker (they need kombu, which :mod:`kernel.exceptions`
does not import; import them from either module)."""

from __future__ import annotations

from typing import Any

from kombu.exceptions import OperationalError

from kernel.exceptions import KernelError


class PublishError(KernelError, OperationalError):
    """A task message could not be sent to the broker, so the task was not queued.

    Raised by ``apply_async``/``send_task`` once ``task_publish_retry_policy`` is used
    up (or at the first failure with ``retry=False``); the message names the broker,
    the number of attempts and the cause, which is also the ``__cause__``. It is a
    ``kombu.exceptions.OperationalError`` too, which is what Celery code catches.
    """

    __module__ = "kernel.exceptions"  # its public name, in tracebacks and pickles

    def __init__(self, message: str, *, task_id: str | None = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.attempts = attempts


class BrokerConnectionError(KernelError):
    """A worker could not connect, or reconnect, to its broker and gave up.

    See ``broker_connection_retry``, ``broker_connection_retry_on_startup`` and
    ``broker_connection_max_retries``.
    """

    __module__ = "kernel.exceptions"


def broker_connection_errors(connection: Any) -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the broker is unreachable or went away" for a kombu
    ``connection``: its transport's ``connection_errors``, kombu's ``OperationalError``
    (what ``ensure_connection`` raises) and the built-in ``ConnectionError``."""
    errors = (*connection.connection_errors, OperationalError, ConnectionError)
    return tuple(dict.fromkeys(errors))


def describe_broker_error(exc: BaseException) -> str:
    """``Type: message`` of a connection error, looking through kombu's wrapping
    (``OperationalError`` from ``ensure_connection``) to the transport's own error."""
    cause = exc.__cause__ if type(exc) is OperationalError else None
    shown = cause if cause is not None else exc
    return f"{type(shown).__name__}: {shown}"
