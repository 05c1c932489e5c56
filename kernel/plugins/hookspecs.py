"""Every hook a kernel plugin can implement.

A plugin is a module (or object) with functions named after these hooks and
decorated with :data:`kernel.hookimpl`. Builtin capabilities register through these
same hooks. ``docs/plugins.md`` has a runnable example for each hook.

Capability hooks (``kernel_<noun plural>``) return an iterable of spec records from
:mod:`kernel.plugins.specs`; the manager flattens them and rejects duplicates.
Lifecycle hooks (``kernel_<event>``) are called with explicit keyword arguments; a
plugin may accept any subset of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pluggy

PROJECT = "kernel"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- capabilities


@hookspec
def kernel_transports() -> Iterable[Any]:
    """Return :class:`~kernel.plugins.specs.TransportSpec` records.

    Example::

        @hookimpl
        def kernel_transports():
            return [TransportSpec(name="mq", schemes=["mq"],
                                  kombu_transport="my_pkg.transport:Transport")]
    """


@hookspec
def kernel_result_backends() -> Iterable[Any]:
    """Return :class:`~kernel.plugins.specs.BackendSpec` records.

    The factory is called as ``factory(app, url)`` and returns a
    :class:`kernel.backends.base.Backend`.
    """


@hookspec
def kernel_serializers() -> Iterable[Any]:
    """Return :class:`~kernel.plugins.specs.SerializerSpec` records.

    Each is registered with kombu's serialization registry under its name; users
    select it with ``task_serializer`` and allow it with ``accept_content``.
    """


@hookspec
def kernel_compressors() -> Iterable[Any]:
    """Return :class:`~kernel.plugins.specs.CompressorSpec` records (``compression=``)."""


@hookspec
def kernel_pools() -> Iterable[Any]:
    """Return :class:`~kernel.plugins.specs.PoolSpec` records (``kernel worker -P NAME``)."""


@hookspec
def kernel_schedulers() -> Iterable[Any]:
    """Return :class:`~kernel.plugins.specs.SchedulerSpec` records (``kernel beat -S NAME``)."""


@hookspec
def kernel_commands() -> Iterable[Any]:
    """Return ``click.Command`` objects to add to the ``kernel`` command line."""


@hookspec
def kernel_control_commands() -> Iterable[Any]:
    """Return :class:`~kernel.plugins.specs.ControlCommandSpec` records."""


@hookspec
def kernel_worker_components() -> Iterable[Any]:
    """Return :class:`~kernel.plugins.specs.ComponentSpec` records started with a worker."""


# --------------------------------------------------------------------------- app and publishing


@hookspec
def kernel_configure(app: Any) -> None:
    """Called once when an app finalizes its configuration; may read or update ``app.conf``."""


@hookspec(firstresult=True)
def kernel_route_task(app: Any, name: str, args: Any, kwargs: Any, options: dict) -> Any:
    """Return routing options (``{"queue": ...}``) for a task, or None to defer.

    The first plugin returning a value wins; ``task_routes`` applies when none does.
    """


@hookspec
def kernel_before_task_publish(
    app: Any, name: str, body: Any, headers: dict, properties: dict, routing: dict
) -> None:
    """Called just before a task message is sent; may modify ``headers`` and
    ``properties`` (e.g. ``reply_to`` for a result backend that answers by message)
    in place."""


@hookspec
def kernel_after_task_publish(app: Any, name: str, task_id: str, routing: dict) -> None:
    """Called after a task message was handed to the transport."""


# --------------------------------------------------------------------------- task execution


@hookspec
def kernel_task_prerun(task: Any, task_id: str, args: Any, kwargs: Any, request: Any) -> None:
    """Called in the executing process before the task body runs."""


@hookspec
def kernel_task_postrun(
    task: Any, task_id: str, args: Any, kwargs: Any, retval: Any, state: str, request: Any
) -> None:
    """Called in the executing process after the task body returned or raised."""


@hookspec
def kernel_task_success(task: Any, result: Any, request: Any) -> None:
    """Called in the executing process when a task succeeded."""


@hookspec
def kernel_task_failure(
    task: Any, task_id: str, exception: BaseException, traceback: str, request: Any
) -> None:
    """Called in the executing process when a task raised."""


@hookspec
def kernel_task_retry(task: Any, request: Any, reason: Any) -> None:
    """Called when a task asked to be retried."""


@hookspec
def kernel_task_revoked(task: Any, request: Any, terminated: bool, expired: bool) -> None:
    """Called when a task was revoked (or expired) instead of run."""


@hookspec(firstresult=True)
def kernel_task_execute(request: Any) -> Any:
    """Wrap the execution of one task (tracing, metrics).

    The kernel's own implementation runs the task; plugins add wrappers around it.

    Implement as a generator: code before ``yield`` runs before the task, the
    ``yield`` returns the task's outcome (or raises its exception)::

        @hookimpl(wrapper=True)
        def kernel_task_execute(request):
            started = time.monotonic()
            try:
                return (yield)
            finally:
                log.info("%s took %.3fs", request.task, time.monotonic() - started)
    """


# --------------------------------------------------------------------------- worker lifecycle


@hookspec
def kernel_worker_init(worker: Any) -> None:
    """Called when a worker was created, before it connects."""


@hookspec
def kernel_worker_ready(worker: Any) -> None:
    """Called when a worker consumes from its queues."""


@hookspec
def kernel_worker_shutdown(worker: Any) -> None:
    """Called when a worker has stopped."""


@hookspec
def kernel_worker_process_init(worker: Any, pid: int) -> None:
    """Called in each new pool child process (prefork), before it runs a task."""
