"""Automatic retries: which exceptions retry a task, and how long to wait before each retry.

A task declares its policy with options (``autoretry_for``, ``dont_autoretry_for``,
``retry_kwargs``, ``retry_backoff``, ``retry_backoff_max``, ``retry_jitter``); when its
body raises, :meth:`kernel.task.Task.run_with_context` asks the :class:`RetryPolicy`
whether to call ``task.retry(exc=...)`` and with which options. Everything here is pure:
sending the retry is the task's business.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import attrs
from billiard.exceptions import Terminated

from kernel.exceptions import Ignore, MaxRetriesExceededError, Reject, Retry

#: Exceptions that end a run on purpose: autoretry never retries them. ``Terminated``
#: (billiard's) is how a revoke with ``terminate=True`` stops a running task.
NEVER_AUTORETRIED: tuple[type[BaseException], ...] = (
    Retry,
    Reject,
    Ignore,
    MaxRetriesExceededError,
    Terminated,
)

#: What ``retry_kwargs`` may hold: ``task.retry()`` parameters and the routing/encoding
#: options it passes on to ``send_task``. ``exc`` and ``throw`` are autoretry's own.
RETRY_KWARGS_KEYS = frozenset(
    {
        "countdown",
        "eta",
        "max_retries",
        "args",
        "kwargs",
        "queue",
        "routing_key",
        "exchange",
        "exchange_type",
        "priority",
        "headers",
        "serializer",
        "compression",
    }
)


def backoff_delay(
    retries: int,
    factor: float,
    maximum: float,
    jitter: bool,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``retries + 1``: ``factor * 2**retries``.

    The delay is capped at ``maximum``. With ``jitter`` ("full jitter") it is a random
    value between 0 and that capped delay, so many tasks failing together do not all
    come back at the same moment.
    """
    try:
        delay = factor * 2.0**retries
    except OverflowError:  # thousands of retries with max_retries=None
        delay = math.inf
    delay = min(maximum, delay)
    if jitter:
        delay = (rng or random).uniform(0.0, delay)
    return max(0.0, delay)


def _owner(task: Any) -> str:
    name = getattr(task, "name", "") or getattr(task, "__name__", "") or repr(task)
    return f"task {name}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_seconds(owner: str, option: str, value: Any, example: str) -> float:
    if not _is_number(value):
        raise TypeError(
            f"{owner}: {option} must be a number of seconds, got {value!r}; write {example}"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{owner}: {option} must be a finite number of seconds >= 0, got {value!r}; "
            f"write {example}"
        )
    return float(value)


def _check_max_retries(owner: str, option: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}: {option} must be an int or None (retry for ever), got {value!r}")
    if value < 0:
        raise ValueError(f"{owner}: {option} must be >= 0 or None (retry for ever), got {value}")
    return value


def _exception_classes(owner: str, option: str, value: Any) -> tuple[type[Exception], ...]:
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or not all(
        isinstance(item, type) and issubclass(item, Exception) for item in value
    ):
        raise TypeError(
            f"{owner}: {option} must be a tuple of exception classes, got {value!r}; "
            f"write {option}=(ConnectionError,) (note the comma for one class)"
        )
    for item in value if option == "autoretry_for" else ():
        if issubclass(item, NEVER_AUTORETRIED):
            raise ValueError(
                f"{owner}: {option} lists {item.__name__}, which ends a run on purpose "
                "(retry, reject, ignore, retries exhausted, terminated) and is never retried; "
                "remove it"
            )
    return value


def _backoff_factor(owner: str, value: Any) -> float:
    """``retry_backoff``: False/0 is off, True is a factor of 1 second, a number the factor."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if not _is_number(value):
        raise TypeError(
            f"{owner}: retry_backoff must be True, False or a number of seconds (the factor "
            f"of factor * 2**retries), got {value!r}; write retry_backoff=True or "
            "retry_backoff=2"
        )
    return _check_seconds(owner, "retry_backoff", value, "retry_backoff=True or retry_backoff=2")


def _retry_kwargs(owner: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{owner}: retry_kwargs must be a dict of task.retry() options, got {value!r}; "
            "write retry_kwargs={'max_retries': 5, 'countdown': 2}"
        )
    unknown = sorted(str(key) for key in value if key not in RETRY_KWARGS_KEYS)
    if unknown:
        raise TypeError(
            f"{owner}: retry_kwargs has option(s) {unknown} that autoretry cannot pass to "
            f"task.retry(); valid: {sorted(RETRY_KWARGS_KEYS)}"
        )
    if "countdown" in value and "eta" in value:
        raise TypeError(f"{owner}: retry_kwargs gives both countdown and eta; keep one")
    if value.get("countdown") is not None:
        _check_seconds(owner, "retry_kwargs['countdown']", value["countdown"], "countdown=2")
    if "max_retries" in value:
        _check_max_retries(owner, "retry_kwargs['max_retries']", value["max_retries"])
    return dict(value)


@attrs.frozen
class RetryPolicy:
    """A task's automatic retry options, checked; build it with :meth:`for_task`."""

    #: Exceptions that make the task retry itself.
    autoretry_for: tuple[type[Exception], ...] = ()
    #: Exceptions never retried, even when they match ``autoretry_for``.
    dont_autoretry_for: tuple[type[Exception], ...] = ()
    #: Options for ``task.retry()`` (``max_retries``, ``countdown``...).
    retry_kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    #: Seconds of ``factor * 2**retries``; 0 turns exponential backoff off.
    backoff_factor: float = 0.0
    #: Upper bound of the backoff delay, in seconds.
    backoff_max: float = 600.0
    #: Pick a random delay between 0 and the backoff delay.
    jitter: bool = True

    @classmethod
    def for_task(cls, task: Any) -> RetryPolicy:
        """The policy of a task (class or instance); TypeError/ValueError when an option is bad.

        Also checks ``max_retries`` and ``default_retry_delay``, which ``retry()`` uses.
        """
        owner = _owner(task)
        _check_max_retries(owner, "max_retries", getattr(task, "max_retries", None))
        _check_seconds(
            owner,
            "default_retry_delay",
            getattr(task, "default_retry_delay", 180),
            "default_retry_delay=180",
        )
        jitter = getattr(task, "retry_jitter", True)
        if not isinstance(jitter, bool):
            raise TypeError(f"{owner}: retry_jitter must be True or False, got {jitter!r}")
        return cls(
            autoretry_for=_exception_classes(
                owner, "autoretry_for", getattr(task, "autoretry_for", ())
            ),
            dont_autoretry_for=_exception_classes(
                owner, "dont_autoretry_for", getattr(task, "dont_autoretry_for", ())
            ),
            retry_kwargs=_retry_kwargs(owner, getattr(task, "retry_kwargs", {})),
            backoff_factor=_backoff_factor(owner, getattr(task, "retry_backoff", False)),
            backoff_max=_check_seconds(
                owner,
                "retry_backoff_max",
                getattr(task, "retry_backoff_max", 600),
                "retry_backoff_max=600",
            ),
            jitter=jitter,
        )

    def should_retry(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised by the task body, makes the task retry itself."""
        return (
            bool(self.autoretry_for)
            and isinstance(exc, self.autoretry_for)
            and not isinstance(exc, NEVER_AUTORETRIED)
            and not isinstance(exc, self.dont_autoretry_for)
        )

    def retry_options(self, retries: int, rng: random.Random | None = None) -> dict[str, Any]:
        """Keyword arguments for ``task.retry()`` after ``retries`` earlier retries.

        The backoff replaces a ``countdown`` in ``retry_kwargs``, as in Celery (an
        ``eta`` there still wins); without backoff, the ``countdown`` there applies, and
        without either ``retry()`` waits ``default_retry_delay``.
        """
        options = dict(self.retry_kwargs)
        if self.backoff_factor and "eta" not in options:
            options["countdown"] = backoff_delay(
                retries, self.backoff_factor, self.backoff_max, self.jitter, rng
            )
        return options
