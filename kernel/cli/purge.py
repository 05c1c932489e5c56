"""``kernel purge``: delete waiting messages."""

from __future__ import annotations

import click

from kernel.cli.main import load_app, plugin_options


@click.command()
@click.option("-Q", "--queues", help="Comma-separated queues (default: the default queue).")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@plugin_options
@click.pass_context
def purge(ctx: click.Context, queues: str | None, force: bool) -> None:
    """Delete every message waiting in the queues. Running tasks are not affected."""
    app = load_app(ctx)
    names = (
        [q.strip() for q in queues.split(",") if q.strip()]
        if queues
        else [app.conf.task_default_queue]
    )
    if not force:
        click.confirm(
            f"Delete all waiting messages in {', '.join(names)}? This cannot be undone", abort=True
        )
    count = app.purge(names)
    click.echo(f"purged {count} message(s) from {', '.join(names)}")


COMMANDS = [purge]
