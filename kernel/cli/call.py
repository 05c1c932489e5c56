"""``kernel call`` and ``kernel result``: send a task by name, read a result."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from kernel.cli.main import load_app, plugin_options


def _json(value: str | None, what: str, kind: type) -> Any:
    if value is None:
        return kind()
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=what) from exc
    if not isinstance(parsed, kind):
        raise click.BadParameter(
            f"must be a JSON {'list' if kind is list else 'object'}, got {type(parsed).__name__}",
            param_hint=what,
        )
    return parsed


def _show(result: Any) -> str:
    try:
        return json.dumps(result)
    except (TypeError, ValueError):
        return repr(result)


@click.command()
@click.argument("name")
@click.option("-a", "--args", "args_json", metavar="JSON", help="Positional args: '[1, 2]'.")
@click.option("-k", "--kwargs", "kwargs_json", metavar="JSON", help="Keyword args: '{\"x\": 1}'.")
@click.option("--countdown", type=float, help="Run no sooner than this many seconds from now.")
@click.option("--expires", type=float, help="Do not run after this many seconds.")
@click.option("-Q", "--queue", help="Queue to send to (default: routing rules).")
@click.option("--priority", type=int, help="Message priority (higher first).")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--timeout", type=float, default=None, help="Seconds --wait waits at most.")
@plugin_options
@click.pass_context
def call(
    ctx: click.Context,
    name: str,
    args_json: str | None,
    kwargs_json: str | None,
    countdown: float | None,
    expires: float | None,
    queue: str | None,
    priority: int | None,
    wait: bool,
    timeout: float | None,
) -> None:
    """Send task NAME; prints its id (or its result with --wait)."""
    app = load_app(ctx)
    args = _json(args_json, "--args", list)
    kwargs = _json(kwargs_json, "--kwargs", dict)
    options = {
        k: v
        for k, v in {
            "countdown": countdown,
            "expires": expires,
            "queue": queue,
            "priority": priority,
        }.items()
        if v is not None
    }
    task = app.tasks.get(name)
    try:
        result = (
            task.apply_async(args, kwargs, **options)
            if task is not None
            else app.send_task(name, args, kwargs, **options)
        )
    except TypeError as exc:  # arguments that do not fit the task's signature
        raise click.UsageError(str(exc)) from exc
    if not wait:
        click.echo(result.id)
        return
    from kernel.exceptions import TimeoutError

    try:
        value = result.get(timeout=timeout, propagate=False)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from exc
    if result.failed():
        click.echo(f"{result.id} FAILURE: {value!r}", err=True)
        if result.traceback:
            click.echo(result.traceback, err=True)
        sys.exit(1)
    click.echo(_show(value))


@click.command()
@click.argument("task_id")
@click.option(
    "--traceback", "show_traceback", is_flag=True, help="Show the traceback of a failure."
)
@click.option("--wait", is_flag=True, help="Wait until the task is ready.")
@click.option("--timeout", type=float, default=None, help="Seconds --wait waits at most.")
@plugin_options
@click.pass_context
def result(
    ctx: click.Context, task_id: str, show_traceback: bool, wait: bool, timeout: float | None
) -> None:
    """Show the state and result of task TASK_ID."""
    app = load_app(ctx)
    handle = app.AsyncResult(task_id)
    if wait:
        from kernel.exceptions import TimeoutError

        try:
            handle.get(timeout=timeout, propagate=False)
        except TimeoutError as exc:
            raise click.ClickException(str(exc)) from exc
    state = handle.state
    click.echo(f"{state}: {_show(handle.result)}" if state != "PENDING" else state)
    if show_traceback and handle.traceback:
        click.echo(handle.traceback)


COMMANDS = [call, result]
