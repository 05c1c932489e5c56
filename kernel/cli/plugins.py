"""``kernel plugins`` and ``kernel report``: what is installed and configured."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import click

from kernel.cli.main import KernelGroup, load_app, plugin_options
from kernel.plugins.specs import CAPABILITY_KINDS


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


@click.command()
@plugin_options
def plugins() -> None:
    """List loaded plugins: origin, capabilities, hooks, and load errors."""
    manager = KernelGroup.manager
    assert manager is not None
    for info in manager.describe():
        origin = (
            "builtin"
            if info.builtin
            else (f"{info.distribution} {info.version}" if info.distribution else "module")
        )
        click.echo(f"{info.name}  ({origin})")
        if info.capabilities:
            click.echo(f"    provides: {', '.join(info.capabilities)}")
        lifecycle = [
            h
            for h in info.hooks
            if h.removeprefix("kernel_") not in CAPABILITY_KINDS and h != "kernel_commands"
        ]
        if lifecycle:
            click.echo(f"    hooks:    {', '.join(lifecycle)}")
    if manager.failures:
        click.echo("")
        click.echo("load errors:")
        for failure in manager.failures:
            click.echo(f"    {failure.describe()}")


@click.command()
@plugin_options
@click.pass_context
def report(ctx: click.Context) -> None:
    """Versions and settings, for bug reports (passwords hidden)."""
    from kernel.plugins.manager import redact_url

    app = load_app(ctx)
    click.echo(
        f"kernel {_version('taskkernel')} on Python {sys.version.split()[0]} "
        f"({platform.platform()})"
    )
    for dist in ("kombu", "billiard", "pluggy", "stevedore", "attrs", "click"):
        click.echo(f"  {dist} {_version(dist)}")
    click.echo(f"app: {app.main or '__main__'} with {len(app.tasks)} task(s)")
    click.echo(f"broker_url: {redact_url(app.conf.broker_url)}")
    click.echo(f"result_backend: {redact_url(app.conf.result_backend or 'disabled')}")
    manager = KernelGroup.manager
    if manager is not None:
        click.echo("plugins: " + ", ".join(p.name for p in manager.describe()))


COMMANDS = [plugins, report]
