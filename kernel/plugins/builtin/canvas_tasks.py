"""Builtin tasks the canvas sends by name, with Celery's names and arguments.

``celery.map``, ``celery.starmap`` and ``celery.chunks`` run ``task.map(...)``,
``task.starmap(...)`` and ``task.chunks(...)``; ``celery.accumulate`` is the body of a
task replaced by a group. Every app registers them (through the same
``kernel_configure`` hook a plugin would use), so a kernel worker runs them when a
Celery client sends them, and the reverse.
"""

from __future__ import annotations

from typing import Any

from kernel.plugins.hookspecs import hookimpl


def _inner(app: Any, task: Any) -> Any:
    from kernel.canvas import maybe_signature

    return maybe_signature(task, app).type


def register(app: Any) -> None:
    if "celery.map" in app.tasks:
        return

    @app.task(name="celery.map", typing=False)
    def map_(task: Any, it: list) -> list:
        run = _inner(app, task)
        return [run(item) for item in it]

    @app.task(name="celery.starmap", typing=False)
    def starmap(task: Any, it: list) -> list:
        run = _inner(app, task)
        return [run(*item) for item in it]

    @app.task(name="celery.chunks", typing=False)
    def chunks(task: Any, it: list, n: int) -> Any:
        from kernel.canvas import chunks as chunks_sig

        return chunks_sig(task, it, n, app=app).group().apply_async().as_tuple()

    @app.task(name="celery.accumulate", typing=False)
    def accumulate(*args: Any, **kwargs: Any) -> Any:
        index = kwargs.get("index")
        return args[index] if index is not None else args


@hookimpl
def kernel_configure(app: Any) -> None:
    register(app)
