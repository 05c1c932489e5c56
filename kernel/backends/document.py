"""Celery's stored result document, and exceptions as JSON.

The only module that knows the stored layout::

    {"task_id": ..., "status": "SUCCESS", "result": ..., "traceback": None,
     "children": [], "date_done": "2026-01-01T00:00:00+00:00"}

A failure's ``result`` is ``{"exc_type", "exc_message", "exc_module"}``, as Celery
writes it, so Celery clients read kernel results and the reverse.
"""

from __future__ import annotations

import builtins
import importlib
import logging
import sys
from datetime import datetime, timezone
from typing import Any

from kernel import states
from kernel.exceptions import ChordError, RemoteException, TaskRevokedError, WorkerLostError

log = logging.getLogger(__name__)

KEY_PREFIX = "celery-task-meta-"
GROUP_KEY_PREFIX = "celery-taskset-meta-"

#: kernel exceptions stored under Celery's name, so Celery clients rebuild them as
#: Celery's class; a document naming them reads back as kernel's class here.
WIRE_NAMES: dict[type[BaseException], tuple[str, str]] = {
    ChordError: ("celery.exceptions", "ChordError"),
    TaskRevokedError: ("celery.exceptions", "TaskRevokedError"),
    WorkerLostError: ("billiard.exceptions", "WorkerLostError"),
}
_FROM_WIRE = {name: cls for cls, name in WIRE_NAMES.items()}


def result_key(task_id: str) -> str:
    """The storage key Celery uses for a task's result."""
    return f"{KEY_PREFIX}{task_id}"


def group_key(group_id: str) -> str:
    """The storage key Celery uses for a saved group (``GroupResult.save()``)."""
    return f"{GROUP_KEY_PREFIX}{group_id}"


# Chord bookkeeping of kernel's key-value backends. Celery's workers never read these
# keys (its key-value scheme counts with ``chord-unlock-<group id>``), so they are
# named for kernel alone.


def chord_size_key(group_id: str) -> str:
    """How many header tasks the chord ``group_id`` waits for."""
    return f"kernel-chord-size-{group_id}"


def chord_parts_key(group_id: str) -> str:
    """The set of the chord's header task ids that finished."""
    return f"kernel-chord-parts-{group_id}"


def chord_claim_key(group_id: str) -> str:
    """Set once by the worker that runs the chord's body."""
    return f"kernel-chord-claim-{group_id}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def encode_exception(exc: BaseException) -> dict[str, Any]:
    cls = type(exc)
    exc_module, exc_type = WIRE_NAMES.get(cls, (cls.__module__, cls.__qualname__))
    return {
        "exc_type": exc_type,
        "exc_message": _jsonable(list(exc.args)),
        "exc_module": exc_module,
    }


def _find_exception_class(exc_type: str, exc_module: str | None) -> type | None:
    aliased = _FROM_WIRE.get((exc_module or "", exc_type))
    if aliased is not None:  # whether or not Celery is importable here
        return aliased
    if not exc_module or exc_module == "builtins":
        candidate = getattr(builtins, exc_type, None)
    else:
        module = sys.modules.get(exc_module)
        if module is None:
            try:
                module = importlib.import_module(exc_module)
            except Exception:  # unimportable here: fall back to a stand-in
                return None
        candidate = module
        for part in exc_type.split("."):
            candidate = getattr(candidate, part, None)
    if isinstance(candidate, type) and issubclass(candidate, BaseException):
        return candidate
    return None


def decode_exception(value: Any) -> BaseException:
    """Rebuild an exception from its stored form, or a RemoteException stand-in."""
    if isinstance(value, BaseException):
        return value
    if not isinstance(value, dict) or "exc_type" not in value:
        return RemoteException("Exception", None, str(value))
    exc_type = str(value["exc_type"])
    exc_module = value.get("exc_module")
    message = value.get("exc_message", ())
    args = tuple(message) if isinstance(message, (list, tuple)) else (message,)
    cls = _find_exception_class(exc_type, exc_module)
    if cls is not None:
        try:
            return cls(*args)
        except Exception:  # constructor wants other arguments
            log.debug("could not rebuild %s.%s%r", exc_module, exc_type, args)
    text = " ".join(str(a) for a in args)
    return RemoteException(exc_type, exc_module, text)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def build(
    task_id: str,
    state: str,
    result: Any,
    traceback: str | None = None,
    children: list | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    """A result document; exceptions in ``result`` are encoded."""
    if isinstance(result, BaseException):
        result = encode_exception(result)
    document = {
        "status": state,
        "result": result,
        "traceback": traceback,
        "children": children or [],
        "date_done": now_iso() if state in states.READY_STATES else None,
        "task_id": task_id,
    }
    if extra:
        document.update(extra)
    return document


def pending(task_id: str) -> dict[str, Any]:
    """What an unknown task id reads as: PENDING, like Celery."""
    return {
        "status": states.PENDING,
        "result": None,
        "traceback": None,
        "children": [],
        "date_done": None,
        "task_id": task_id,
    }


def result_value(document: dict[str, Any]) -> Any:
    """The Python value of a document's result: exceptions rebuilt for failure states."""
    value = document.get("result")
    if (
        document.get("status") in states.EXCEPTION_STATES
        and isinstance(value, dict)
        and "exc_type" in value
    ):
        return decode_exception(value)
    return value
