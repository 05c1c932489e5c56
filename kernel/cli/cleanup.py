"""``kernel cleanup``: delete expired results from the result backend."""

from __future__ import annotations

import click

from kernel.cli.main import load_app, plugin_options


@click.command()
@plugin_options
@click.pass_context
def cleanup(ctx: click.Context) -> None:
    """Delete results and saved groups older than result_expires.

    Backends that keep rows until asked (SQL, SQLite) need this run now and then,
    from cron or a periodic task: the builtin task `celery.backend_cleanup` does the
    same from a worker. Backends whose entries expire by themselves (Redis) delete
    nothing here.
    """
    from kernel.plugins.manager import redact_url

    app = load_app(ctx)
    try:
        removed = app.backend.cleanup()
    finally:
        app.close()
    expires = app.conf.result_expires
    if expires is None:
        click.echo(
            f"result_expires is None: results never expire; nothing deleted from "
            f"{redact_url(str(app.conf.result_backend))}"
        )
        return
    click.echo(
        f"deleted {removed} expired result(s) (older than {expires:g}s) from "
        f"{redact_url(str(app.conf.result_backend))}"
    )


COMMANDS = [cleanup]
