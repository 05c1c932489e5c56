"""kernel: a distributed task queue as a small pluggable kernel, wire-compatible with Celery.

The public API. Everything else is internal unless documented as plugin API
(``kernel.plugins.specs``, ``kernel.plugins.hookspecs``, ``kernel.testing``).
"""

from kernel import states
from kernel.app import App
from kernel.canvas import Signature, chain, chord, chunks, group, signature, xmap, xstarmap
from kernel.plugins.hookspecs import hookimpl
from kernel.result import AsyncResult, EagerResult, GroupResult
from kernel.task import Task, current_task

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
