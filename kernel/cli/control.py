"""``kernel control`` and ``kernel inspect``: remote control of running workers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from kernel.cli.main import load_app, plugin_options


def _destinations(values: tuple[str, ...]) -> list[str] | None:
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return names or None


def _common(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--destination``, ``--timeout`` and ``--json``, shared by every subcommand."""
    function = click.option(
        "--json", "as_json", is_flag=True, help="Print the replies as one JSON object."
    )(function)
    function = click.option(
        "-t",
        "--timeout",
        type=float,
        default=1.0,
        show_default=True,
        help="Seconds to wait for the next reply.",
    )(function)
    function = click.option(
        "-d",
        "--destination",
        multiple=True,
        metavar="NAME[,NAME]",
        help="Only these workers (e.g. kernel@host; repeatable). Default: every worker.",
    )(function)
    return plugin_options(function)


def _call(send: Callable[[], Any]) -> list[dict]:
    from kombu.exceptions import OperationalError

    try:
        return list(send() or [])
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from exc
    except OperationalError as exc:
        raise click.ClickException(f"cannot reach the broker: {exc}") from exc


def _show(replies: list[dict], as_json: bool, timeout: float) -> None:
    """Print one line (or block) per worker; exit 1 when none answered or one failed."""
    merged: dict[str, Any] = {}
    for reply in replies:
        merged.update(reply)
    if as_json:
        click.echo(json.dumps(merged, indent=2, sort_keys=True))
    else:
        for hostname, answer in sorted(merged.items()):
            if isinstance(answer, dict) and set(answer) == {"ok"}:
                click.echo(f"-> {hostname}: OK {answer['ok']}")
            elif isinstance(answer, dict) and set(answer) == {"error"}:
                click.echo(f"-> {hostname}: ERROR {answer['error']}")
            else:
                text = json.dumps(answer, indent=2, sort_keys=True, default=repr)
                click.echo(f"-> {hostname}:")
                for line in text.split("\n"):
                    click.echo(f"   {line}")
    if not merged:
        click.echo(
            f"no worker replied within {timeout:g} s (is one running on this broker, "
            "with the same control_exchange?)",
            err=True,
        )
        sys.exit(1)
    if any(isinstance(answer, dict) and "error" in answer for answer in merged.values()):
        sys.exit(1)


@click.group()
@plugin_options
def control() -> None:
    """Send commands to running workers (revoke tasks, change rate limits, ping)."""


@control.command()
@click.argument("task_ids", nargs=-1, required=True, metavar="TASK_ID...")
@click.option("--terminate", is_flag=True, help="Also stop the tasks if they are running.")
@click.option(
    "-s",
    "--signal",
    "signal_name",
    default="SIGTERM",
    show_default=True,
    help="Signal that --terminate sends (SIGKILL, KILL, 9...).",
)
@_common
@click.pass_context
def revoke(
    ctx: click.Context,
    task_ids: tuple[str, ...],
    terminate: bool,
    signal_name: str,
    destination: tuple[str, ...],
    timeout: float,
    as_json: bool,
) -> None:
    """Revoke tasks: workers will not start them (and stop them with --terminate)."""
    app = load_app(ctx)
    replies = _call(
        lambda: app.control.revoke(
            list(task_ids),
            _destinations(destination),
            terminate=terminate,
            signal=signal_name,
            reply=True,
            timeout=timeout,
        )
    )
    _show(replies, as_json, timeout)


@control.command(name="rate_limit")
@click.argument("task_name")
@click.argument("rate")
@_common
@click.pass_context
def rate_limit(
    ctx: click.Context,
    task_name: str,
    rate: str,
    destination: tuple[str, ...],
    timeout: float,
    as_json: bool,
) -> None:
    """Set the rate limit of task TASK_NAME: RATE is 10/s, 100/m, 1000/h, or 0 for none."""
    app = load_app(ctx)
    replies = _call(
        lambda: app.control.rate_limit(
            task_name, rate, _destinations(destination), reply=True, timeout=timeout
        )
    )
    _show(replies, as_json, timeout)


@control.command()
@_common
@click.pass_context
def ping(ctx: click.Context, destination: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Ask workers to answer; prints each one that did."""
    app = load_app(ctx)
    replies = _call(lambda: app.control.ping(_destinations(destination), timeout=timeout))
    _show(replies, as_json, timeout)


@click.group()
@plugin_options
def inspect() -> None:
    """Ask running workers about themselves (read-only)."""


def _inspect_command(name: str, help_text: str) -> click.Command:
    @click.pass_context
    def command(
        ctx: click.Context, destination: tuple[str, ...], timeout: float, as_json: bool
    ) -> None:
        app = load_app(ctx)
        replies = _call(
            lambda: app.control.broadcast(
                name, {}, _destinations(destination), reply=True, timeout=timeout
            )
        )
        _show(replies, as_json, timeout)

    return inspect.command(name=name, help=help_text)(_common(command))


_inspect_command("ping", "Ask workers to answer; prints each one that did.")
_inspect_command("stats", "Each worker's pool, queues and task counters.")
_inspect_command("revoked", "The revoked task ids each worker remembers.")


COMMANDS = [control, inspect]
