"""The plugin manager: loads plugins in a documented order and answers lookups.

Loading order (``docs/plugins.md`` repeats it):

1. builtins (``kernel.plugins.builtin.*``),
2. entry points in group ``kernel.plugins`` (unless ``KERNEL_PLUGIN_AUTOLOAD=0``),
3. names in ``KERNEL_PLUGINS`` (comma separated),
4. ``--plugin`` options, each an entry-point name or a dotted module path.

``--no-plugin NAME`` (or ``blocked=``) keeps a plugin from registering. A plugin that
fails to load is reported once and the others keep working. When two plugins claim
the same name or URL scheme, the first loaded keeps it and the second's claim is
reported as a load error naming both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import pluggy

from kernel.exceptions import (
    PluginConflict,
    PluginError,
    UnknownBackend,
    UnknownCapability,
    UnknownPool,
    UnknownTransport,
)
from kernel.plugins import hookspecs, loader
from kernel.plugins.specs import (
    CAPABILITY_KINDS,
    BackendSpec,
    PoolSpec,
    SerializerSpec,
    TransportSpec,
)

log = logging.getLogger(__name__)

BUILTIN_PLUGINS = (
    "kernel.plugins.builtin.transports",
    "kernel.plugins.builtin.backends",
    "kernel.plugins.builtin.serializers",
    "kernel.plugins.builtin.pools",
    "kernel.plugins.builtin.execution",
    "kernel.plugins.builtin.canvas_tasks",
)

#: URL schemes served by plugins of this project, and the extra that installs each.
KNOWN_EXTRAS = {
    "redis": "redis",
    "rediss": "redis",
    "redis+socket": "redis",
    "amqp": "amqp",
    "amqps": "amqp",
    "pyamqp": "amqp",
    "rpc": "amqp",
    "db+postgresql": "sql",
    "db+mysql": "sql",
    "db+sqlite": "sql",
    "gevent": "gevent",
}


@attrs.frozen
class PluginInfo:
    """What ``kernel plugins`` shows about one registered plugin."""

    name: str
    distribution: str | None
    version: str | None
    builtin: bool
    hooks: tuple[str, ...]
    capabilities: tuple[str, ...]


def _kernel_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("taskkernel")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return None


def _env_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def autoload_enabled(environ: dict[str, str] | None = None) -> bool:
    value = (environ if environ is not None else os.environ).get("KERNEL_PLUGIN_AUTOLOAD", "1")
    return value.strip().lower() not in ("0", "false", "no", "off")


def _install_hint(kind: str, scheme: str) -> str:
    extra = KNOWN_EXTRAS.get(scheme)
    if extra:
        return f'install it: pip install "taskkernel[{extra}]"'
    return (
        "install a plugin that provides it, or check the URL; "
        f"`kernel plugins` lists the {kind} available"
    )


class PluginManager:
    """Registry of loaded plugins and the capabilities they provide."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[loader.LoadFailure] = []
        self._origins: dict[str, tuple[str | None, str | None, bool]] = {}
        self._capabilities: dict[str, dict[str, tuple[Any, str]]] = {}
        self._blocked: set[str] = set()
        if os.environ.get("KERNEL_TRACE_PLUGINS", "") not in ("", "0"):
            self.enable_tracing()

    # ----------------------------------------------------------------- loading

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def block(self, name: str) -> None:
        """Keep the plugin called ``name`` from registering (``--no-plugin``)."""
        self._blocked.add(name)
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
            self._capabilities.clear()
        self.pm.set_blocked(name)

    def register(
        self,
        plugin: Any,
        name: str,
        distribution: str | None = None,
        version: str | None = None,
        builtin: bool = False,
    ) -> bool:
        """Register one plugin object; returns False when it is blocked or already present."""
        if name in self._blocked or self.pm.is_blocked(name) or self.pm.has_plugin(name):
            return False
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # pluggy validation errors: wrong hook signature
            self._fail(loader.LoadFailure(name, distribution, version, str(exc)))
            return False
        self._origins[name] = (distribution, version, builtin)
        self._capabilities.clear()
        return True

    def _fail(self, failure: loader.LoadFailure) -> None:
        if failure in self.failures:  # lookups re-collect capabilities; report once
            return
        self.failures.append(failure)
        log.error("%s", failure.describe())

    def load_builtins(self) -> None:
        for module_path in BUILTIN_PLUGINS:
            found = loader.module(module_path)
            if isinstance(found, loader.LoadFailure):
                raise PluginError(f"builtin {found.describe()}")
            short = module_path.rsplit(".", 1)[-1]
            self.register(
                found.plugin, f"builtin.{short}", "taskkernel", _kernel_version(), builtin=True
            )

    def load_entry_points(self, only: set[str] | None = None) -> None:
        found, failures = loader.entry_points(only)
        for failure in failures:
            if failure.name not in self._blocked:
                self._fail(failure)
        for item in found:
            self.register(item.plugin, item.name, item.distribution, item.version)

    def load_named(self, names: Iterable[str]) -> None:
        """Load plugins named by ``--plugin`` or ``KERNEL_PLUGINS``."""
        names = [n for n in names if n not in self._blocked and not self.pm.has_plugin(n)]
        if not names:
            return
        advertised = loader.entry_point_names()
        by_entry_point = {n for n in names if n in advertised}
        if by_entry_point:
            self.load_entry_points(only=by_entry_point)
        for name in names:
            if name in by_entry_point:
                continue
            found = loader.module(name)
            if isinstance(found, loader.LoadFailure):
                self._fail(found)
            else:
                self.register(found.plugin, found.name)

    def load(
        self,
        plugins: Sequence[str] = (),
        blocked: Sequence[str] = (),
        environ: dict[str, str] | None = None,
    ) -> PluginManager:
        """Load everything in the documented order; returns self."""
        env = environ if environ is not None else dict(os.environ)
        for name in blocked:
            self.block(name)
        self.load_builtins()
        if autoload_enabled(env):
            self.load_entry_points()
        self.load_named(_env_list(env.get("KERNEL_PLUGINS")))
        self.load_named(plugins)
        return self

    def enable_tracing(self) -> None:
        """Log every hook call (``KERNEL_TRACE_PLUGINS=1``)."""
        trace_log = logging.getLogger("kernel.plugins.trace")
        trace_log.setLevel(logging.INFO)  # shown even when the CLI logs only warnings

        def before(hook_name: str, _impls: Any, kwargs: dict) -> None:
            trace_log.info("hook %s(%s)", hook_name, ", ".join(sorted(kwargs)))

        def after(_outcome: Any, hook_name: str, _impls: Any, _kwargs: dict) -> None:
            trace_log.debug("hook %s done", hook_name)

        self.pm.add_hookcall_monitoring(before, after)

    # ----------------------------------------------------------------- capabilities

    def _collect(self, kind: str) -> dict[str, tuple[Any, str]]:
        """Map each name and scheme of ``kind`` to (spec, plugin name), first loaded wins."""
        cached = self._capabilities.get(kind)
        if cached is not None:
            return cached
        hook = getattr(self.pm.hook, f"kernel_{kind}")
        table: dict[str, tuple[Any, str]] = {}
        # get_hookimpls() lists in registration (load) order; pluggy calls them reversed.
        for impl in hook.get_hookimpls():  # registration order
            plugin_name = impl.plugin_name
            try:
                specs = list(impl.function() or ())
            except Exception as exc:
                dist, version, _ = self._origins.get(plugin_name, (None, None, False))
                self._fail(
                    loader.LoadFailure(
                        plugin_name, dist, version, f"hook kernel_{kind} raised {exc!r}"
                    )
                )
                continue
            for spec in specs:
                self._add(table, kind, spec, plugin_name)
        self._capabilities[kind] = table
        return table

    def _add(self, table: dict, kind: str, spec: Any, plugin_name: str) -> None:
        keys = [f"name:{getattr(spec, 'name', spec)}"]
        keys += [f"scheme:{s}" for s in getattr(spec, "schemes", ())]
        for key in keys:
            if key in table and table[key][1] != plugin_name:
                owner = table[key][1]
                label, _, value = key.partition(":")
                self._fail(
                    loader.LoadFailure(
                        plugin_name,
                        *self._origins.get(plugin_name, (None, None, False))[:2],
                        str(
                            PluginConflict(
                                f"{kind[:-1].replace('_', ' ')} {label} {value!r} is already "
                                "provided by "
                                f"plugin {owner!r} ({self._describe_origin(owner)}); "
                                f"this claim is ignored, remove one of the two plugins "
                                f"or pass --no-plugin {plugin_name}"
                            )
                        ),
                    )
                )
                return
        for key in keys:
            table[key] = (spec, plugin_name)

    def _describe_origin(self, plugin_name: str) -> str:
        dist, version, builtin = self._origins.get(plugin_name, (None, None, False))
        if builtin:
            return "builtin"
        if dist:
            return f"{dist} {version}"
        return "module"

    def specs(self, kind: str) -> list[Any]:
        """Every distinct spec of a kind, in load order."""
        seen: list[Any] = []
        for spec, _plugin in self._collect(kind).values():
            if not any(spec is s for s in seen):
                seen.append(spec)
        return seen

    def _by_scheme(self, kind: str, url: str) -> Any:
        scheme = url.partition("://")[0].lower() if "://" in url else url.lower()
        entry = self._collect(kind).get(f"scheme:{scheme}")
        return entry[0] if entry else None, scheme

    def transport_for_url(self, url: str) -> TransportSpec:
        spec, scheme = self._by_scheme("transports", url)
        if spec is None:
            raise UnknownTransport(
                f"no transport for {redact_url(url)!r} (scheme {scheme!r}); "
                + _install_hint("transports", scheme)
            )
        return spec

    def backend_for_url(self, url: str) -> BackendSpec:
        spec, scheme = self._by_scheme("result_backends", url)
        if spec is None:
            raise UnknownBackend(
                f"no result backend for {redact_url(url)!r} (scheme {scheme!r}); "
                + _install_hint("result backends", scheme)
            )
        return spec

    def pool(self, name: str) -> PoolSpec:
        entry = self._collect("pools").get(f"name:{name}")
        if entry is None:
            known = ", ".join(sorted(s.name for s in self.specs("pools")))
            hint = (
                f'install it: pip install "taskkernel[{KNOWN_EXTRAS[name]}]"'
                if name in KNOWN_EXTRAS
                else f"choose one of: {known}"
            )
            raise UnknownPool(f"no pool named {name!r}; {hint}")
        return entry[0]

    def serializers(self) -> list[SerializerSpec]:
        return self.specs("serializers")

    def named(self, kind: str, name: str) -> Any:
        entry = self._collect(kind).get(f"name:{name}")
        if entry is None:
            known = ", ".join(sorted(s.name for s in self.specs(kind)))
            raise UnknownCapability(f"no {kind[:-1]} named {name!r}; choose one of: {known}")
        return entry[0]

    def commands(self) -> list[Any]:
        commands: list[Any] = []
        for result in self.pm.hook.kernel_commands():
            commands.extend(result or ())
        return commands

    # ----------------------------------------------------------------- listing

    def describe(self) -> list[PluginInfo]:
        """Every registered plugin with its origin, hooks and capabilities."""
        by_plugin: dict[str, list[str]] = {}
        for kind in CAPABILITY_KINDS:
            for spec, plugin_name in self._collect(kind).values():
                label = f"{kind[:-1].replace('_', ' ')}:{spec.name}"
                if label not in by_plugin.setdefault(plugin_name, []):
                    by_plugin[plugin_name].append(label)
        for impl in self.pm.hook.kernel_commands.get_hookimpls():
            try:
                commands = list(impl.function() or ())
            except Exception:  # reported when the CLI collects commands
                continue
            for command in commands:
                by_plugin.setdefault(impl.plugin_name, []).append(
                    f"command:{getattr(command, 'name', command)}"
                )
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist, version, builtin = self._origins.get(name, (None, None, False))
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            infos.append(
                PluginInfo(name, dist, version, builtin, hooks, tuple(by_plugin.get(name, ())))
            )
        return infos


def redact_url(url: str) -> str:
    """Hide a password in a URL before it goes into a message."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


_default: PluginManager | None = None


def default_manager() -> PluginManager:
    """The process-wide manager, loaded on first use from the environment."""
    global _default
    if _default is None:
        _default = PluginManager().load()
    return _default


def set_default_manager(manager: PluginManager | None) -> None:
    """Install the manager the CLI built from ``--plugin``/``--no-plugin`` (None resets)."""
    global _default
    _default = manager
