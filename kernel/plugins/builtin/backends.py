"""Builtin result backends: SQLite (embedded default) and in-process memory."""

from kernel.plugins.hookspecs import hookimpl
from kernel.plugins.specs import BackendSpec


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
