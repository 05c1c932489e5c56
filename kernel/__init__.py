"""kernel: a distributed task queue as a small pluggable kernel, wire-compatible with Celery.

The public API. Everything else is internal unless documented as plugin API
(``kernel.plugins.specs``, ``kernel.plugins.hookspecs``, ``kernel.testing``).
"""

from kernel import states
from kernel.app import App
from kernel.canvas import Signature, signature
from kernel.plugins.hookspecs import hookimpl
from kernel.result import AsyncResult, EagerResult
from kernel.task import Task, current_task

__all__ = [
    "App",
    "AsyncResult",
    "EagerResult",
    "Signature",
    "Task",
    "current_task",
    "hookimpl",
    "signature",
    "states",
]

__version__ = "0.1.0"
