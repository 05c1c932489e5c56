"""kernel: a distributed task queue as a small pluggable kernel, wire-compatible with Celery.

The public API. Everything else is internal unless documented as plugin API
(``kernel.plugins.specs``, ``kernel.plugins.hookspecs``, ``kernel.testing``).

The names below are imported on first use, not with the package: the ``kernel``
command must be able to run a pool's monkey-patching (gevent) before kombu, the
sockets and the threading primitives the app uses are imported, and importing any
``kernel.*`` module runs this file first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kernel import states
    from kernel.app import App
    from kernel.canvas import (
        Signature,
        chain,
        chord,
        chunks,
        group,
        signature,
        xmap,
        xstarmap,
    )
    from kernel.plugins.hookspecs import hookimpl
    from kernel.result import AsyncResult, EagerResult, GroupResult
    from kernel.task import Task, current_task

#: Public name -> the module that defines it.
_EXPORTS = {
    "App": "kernel.app",
    "AsyncResult": "kernel.result",
    "EagerResult": "kernel.result",
    "GroupResult": "kernel.result",
    "Signature": "kernel.canvas",
    "Task": "kernel.task",
    "chain": "kernel.canvas",
    "chord": "kernel.canvas",
    "chunks": "kernel.canvas",
    "current_task": "kernel.task",
    "group": "kernel.canvas",
    "hookimpl": "kernel.plugins.hookspecs",
    "signature": "kernel.canvas",
    "xmap": "kernel.canvas",
    "xstarmap": "kernel.canvas",
}

__all__ = [
    "App",
    "AsyncResult",
    "EagerResult",
    "GroupResult",
    "Signature",
    "Task",
    "chain",
    "chord",
    "chunks",
    "current_task",
    "group",
    "hookimpl",
    "signature",
    "states",
    "xmap",
    "xstarmap",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "states":
        return importlib.import_module("kernel.states")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kernel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, "states"])
