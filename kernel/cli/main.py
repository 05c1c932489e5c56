"""``kernel``: the command-line entry point.

Plugins are loaded before click parses anything (``--plugin``/``--no-plugin`` may
appear anywhere on the line, as with pytest's ``-p``), so plugin commands show up
as subcommands and every command sees the same plugins.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from kernel.plugins.manager import PluginManager, set_default_manager

PLUGIN_FLAGS = {"--plugin": "plugins", "--no-plugin": "blocked"}


def scan_plugin_options(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pick ``--plugin X``/``--plugin=X`` and ``--no-plugin X`` out of ``argv``."""
    found: dict[str, list[str]] = {"plugins": [], "blocked": []}
    args = list(argv)
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            break
        flag, eq, value = arg.partition("=")
        if flag in PLUGIN_FLAGS:
            if not eq:
                index += 1
                value = args[index] if index < len(args) else ""
            for item in value.split(","):
                if item.strip():
                    found[PLUGIN_FLAGS[flag]].append(item.strip())
        index += 1
    return found["plugins"], found["blocked"]


def plugin_options(function: Any) -> Any:
    """Declare ``--plugin``/``--no-plugin`` so they appear in every command's --help.

    Their values were already used by :func:`main` before click ran.
    """
    function = click.option(
        "--no-plugin",
        "no_plugins",
        multiple=True,
        expose_value=False,
        metavar="NAME",
        help="Do not load this plugin (repeatable).",
    )(function)
    return click.option(
        "--plugin",
        "extra_plugins",
        multiple=True,
        expose_value=False,
        metavar="NAME|MODULE",
        help="Load a plugin by entry-point name or dotted module path (repeatable).",
    )(function)


class KernelGroup(click.Group):
    """Adds commands contributed by plugins through ``kernel_commands``."""

    manager: PluginManager | None = None

    def _plugin_commands(self) -> dict[str, click.Command]:
        if self.manager is None:
            return {}
        commands = {}
        for command in self.manager.commands():
            if isinstance(command, click.Command) and command.name not in self.commands:
                commands[command.name] = command
        return commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugin_commands()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or self._plugin_commands().get(name)


@click.group(cls=KernelGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-A",
    "--app",
    "app_spec",
    envvar="KERNEL_APP",
    metavar="MODULE[:ATTR]",
    help="Your app: a module holding an App, module:attribute, or module.app.",
)
@click.option("-b", "--broker", help="Broker URL (overrides the app's broker_url).")
@click.option("--result-backend", help="Result backend URL (overrides result_backend).")
@plugin_options
@click.version_option(package_name="taskkernel", prog_name="kernel")
@click.pass_context
def cli(
    ctx: click.Context, app_spec: str | None, broker: str | None, result_backend: str | None
) -> None:
    """kernel: a distributed task queue. Start with `kernel worker`."""
    ctx.obj = {"app_spec": app_spec, "broker": broker, "result_backend": result_backend}


def load_app(ctx: click.Context) -> Any:
    """The app named by -A (or a default App), with --broker/--result-backend applied."""
    from kernel.app import App
    from kernel.cli.appload import find_app

    options = ctx.find_root().obj or {}
    app = find_app(options["app_spec"]) if options.get("app_spec") else App()
    if options.get("broker"):
        app.conf.broker_url = options["broker"]
    if options.get("result_backend"):
        app.conf.result_backend = options["result_backend"]
    return app


def _register_commands() -> None:
    from kernel.cli import call, cleanup, control, plugins, purge, worker

    for module in (worker, call, purge, cleanup, control, plugins):
        for command in module.COMMANDS:
            cli.add_command(command)


def scan_pool_option(argv: Sequence[str]) -> str | None:
    """The pool a ``kernel worker`` line names with ``-P``/``--pool``, if any."""
    args = list(argv)
    if "worker" not in args:
        return None
    pool = None
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg in ("-P", "--pool"):
            pool = args[index + 1] if index + 1 < len(args) else None
        elif arg.startswith("--pool="):
            pool = arg.partition("=")[2]
        elif arg.startswith("-P") and not arg.startswith("--"):
            pool = arg[2:]
    return pool or None


def _patch_early(args: Sequence[str], manager: PluginManager) -> None:
    """Run the monkey-patching of the pool named with -P (gevent) now, before click
    imports the commands and they import kombu, the transports and the app: patching
    after sockets, ssl and locks are in use breaks them. Nothing but the plugin
    manager has been imported yet. An unknown pool is left to the worker command,
    which says so."""
    from kernel.exceptions import KernelError

    pool = scan_pool_option(args)
    if not pool:
        return
    try:
        spec = manager.pool(pool)
    except KernelError:
        return
    spec.patch_early()


def main(argv: Sequence[str] | None = None) -> Any:
    """Console script ``kernel``."""
    args = list(sys.argv[1:] if argv is None else argv)
    plugins, blocked = scan_plugin_options(args)
    if os.getcwd() not in sys.path:  # --plugin mymodule and -A proj from this directory
        sys.path.insert(0, os.getcwd())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    manager = PluginManager().load(plugins=plugins, blocked=blocked)
    set_default_manager(manager)
    KernelGroup.manager = manager
    _patch_early(args, manager)
    _register_commands()
    from kernel.exceptions import KernelError

    try:
        return cli.main(args=args, prog_name="kernel")
    except KernelError as exc:  # configuration and plugin errors: one line, no traceback
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
