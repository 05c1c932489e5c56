"""The plugin module named by the entry point in ``pyproject.toml``.

It shows the two kinds of hook: a capability hook (``kernel_commands`` adds
``kernel hello``) and a lifecycle hook (``kernel_task_success`` logs a greeting each
time a task succeeds). Keep heavy imports inside functions so loading stays cheap.
"""

from __future__ import annotations

import logging

import click

from kernel import hookimpl

log = logging.getLogger(__name__)


@click.command()
@click.option("--name", default="world", show_default=True, help="Who to greet.")
def hello(name: str) -> None:
    """Say hello (a command added by the example plugin)."""
    click.echo(f"hello, {name}! (from the kernel-example-hello plugin)")


@hookimpl
def kernel_commands():
    return [hello]


@hookimpl
def kernel_task_success(task, result, request):
    log.info("hello plugin: %s[%s] succeeded", task.name, request.id)
