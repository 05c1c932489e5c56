"""Builtin result backends: SQLite (embedded default) and in-process memory; and the
builtin task ``celery.backend_cleanup``, which deletes expired results."""

from typing import Any

from kernel.plugins.hookspecs import hookimpl
from kernel.plugins.specs import BackendSpec

#: Celery's name for the task that deletes expired results (its beat schedules it).
CLEANUP_TASK = "celery.backend_cleanup"


@hookimpl
def kernel_result_backends():
    return [
        BackendSpec(
            name="sqlite",
            schemes=["sqlite"],
            factory="kernel.backends.sqlite:SQLiteBackend",
            features={"cross_process", "chords"},
        ),
        BackendSpec(
            name="memory",
            schemes=["cache+memory", "memory"],
            factory="kernel.backends.memory:MemoryBackend",
            features={"chords"},
        ),
    ]


def register_cleanup_task(app: Any) -> None:
    """Register ``celery.backend_cleanup`` on ``app``: it runs ``app.backend.cleanup()``
    in a worker and returns how many results it deleted. A periodic scheduler sends it
    by name, as Celery's beat does; ``kernel cleanup`` does the same from a shell."""
    if CLEANUP_TASK in app.tasks:
        return

    @app.task(name=CLEANUP_TASK)
    def backend_cleanup() -> int:
        return app.backend.cleanup()


@hookimpl
def kernel_configure(app: Any) -> None:
    register_cleanup_task(app)
