"""``kernel worker``: start a worker."""

from __future__ import annotations

import logging

import click

from kernel.cli.main import load_app, plugin_options

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise click.BadParameter(
            f"unknown log level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL",
            param_hint="-l/--loglevel",
        )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    logging.basicConfig(level=numeric, format=LOG_FORMAT)


@click.command()
@click.option(
    "-l",
    "--loglevel",
    default="WARNING",
    show_default=True,
    help="Logging level: DEBUG, INFO, WARNING, ERROR, CRITICAL.",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    help="Pool processes/threads (default: CPU count for prefork).",
)
@click.option("-P", "--pool", help="Pool: solo, threads, prefork, or one from a plugin.")
@click.option("-Q", "--queues", help="Comma-separated queues to consume from.")
@click.option("-n", "--hostname", help="Node name, e.g. w1@%h (%h host, %n short host).")
@click.option(
    "--prefetch-multiplier",
    type=click.IntRange(min=0),
    help="Messages reserved per pool slot (0: no limit).",
)
@click.option(
    "--visibility-timeout",
    type=click.FloatRange(min=0.5),
    help="Seconds a dead worker's messages stay leased (SQLite and Redis transports).",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    help="Hard time limit in seconds for tasks that set none (prefork kills the child).",
)
@click.option(
    "--soft-time-limit",
    type=click.FloatRange(min=0, min_open=True),
    help="Soft time limit in seconds: SoftTimeLimitExceeded is raised in the task.",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=1),
    help="Replace a prefork child after this many tasks.",
)
@click.option(
    "--max-memory-per-child",
    type=click.IntRange(min=1),
    help="Replace a prefork child whose resident memory exceeds this many KiB.",
)
@click.option(
    "--autoscale",
    metavar="MAX,MIN",
    help="Grow the pool up to MAX while tasks wait, shrink it back to MIN when idle.",
)
@click.option(
    "-O",
    "optimization",
    type=click.Choice(["fair", "default"]),
    help="Dispatch policy; kernel always hands tasks only to idle slots ('fair').",
)
@click.option(
    "--statedb",
    type=click.Path(dir_okay=False),
    help="File that keeps revoked task ids across restarts.",
)
@plugin_options
@click.pass_context
def worker(
    ctx: click.Context,
    loglevel: str,
    concurrency: int | None,
    pool: str | None,
    queues: str | None,
    hostname: str | None,
    prefetch_multiplier: int | None,
    visibility_timeout: float | None,
    time_limit: float | None,
    soft_time_limit: float | None,
    max_tasks_per_child: int | None,
    max_memory_per_child: int | None,
    autoscale: str | None,
    optimization: str | None,
    statedb: str | None,
) -> None:
    """Start a worker that consumes tasks and runs them."""
    from kernel.exceptions import KernelError
    from kernel.worker.worker import Worker

    setup_logging(loglevel)
    if pool:
        _early_patch(pool)
    app = load_app(ctx)
    if visibility_timeout is not None:
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "visibility_timeout": visibility_timeout,
        }
    if soft_time_limit and time_limit and soft_time_limit >= time_limit:
        raise click.BadParameter(
            f"the soft time limit ({soft_time_limit}s) must be below the hard one "
            f"({time_limit}s), or the task never gets the chance to clean up",
            param_hint="--soft-time-limit",
        )
    settings = {
        "task_time_limit": time_limit,
        "task_soft_time_limit": soft_time_limit,
        "worker_max_tasks_per_child": max_tasks_per_child,
        "worker_max_memory_per_child": max_memory_per_child,
    }
    app.conf.update({name: value for name, value in settings.items() if value is not None})
    if optimization == "default":
        logging.getLogger("kernel.worker").info(
            "-O default: kernel hands tasks only to idle slots, as -O fair does"
        )
    try:
        instance = Worker(
            app,
            hostname=hostname,
            pool=pool,
            concurrency=concurrency,
            queues=[q.strip() for q in queues.split(",") if q.strip()] if queues else None,
            prefetch_multiplier=prefetch_multiplier,
            autoscale=autoscale,
            state_db=statedb,
        )
    except (KernelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(instance.banner())
    instance.start()


def _early_patch(pool: str) -> None:
    """Run a pool's monkey-patching (gevent) before the app and its imports load.

    Only a pool named with -P can patch this early; one chosen by the worker_pool
    setting is known only after the app is imported.
    """
    from kernel.cli.main import KernelGroup
    from kernel.exceptions import KernelError

    try:
        spec = KernelGroup.manager.pool(pool) if KernelGroup.manager else None
    except KernelError as exc:
        raise click.BadParameter(str(exc), param_hint="-P/--pool") from exc
    if spec is not None:
        spec.patch_early()  # done already by kernel.cli.main, unless main was bypassed


COMMANDS = [worker]
