"""Finding plugins: entry points (through stevedore) and dotted module paths.

This is the only module that imports stevedore. It returns what it found and what
failed; the manager decides what to register.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import attrs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kernel.plugins"


@attrs.frozen
class FoundPlugin:
    """A plugin object ready to register, with where it came from."""

    name: str
    plugin: Any
    distribution: str | None = None
    version: str | None = None


@attrs.frozen
class LoadFailure:
    """A plugin that could not be loaded: which one, from where, and why."""

    name: str
    distribution: str | None
    version: str | None
    error: str

    def describe(self) -> str:
        origin = f" ({self.distribution} {self.version})" if self.distribution else ""
        return f"plugin {self.name!r}{origin} failed to load: {self.error}"


def _distributions() -> dict[str, tuple[str | None, str | None]]:
    """Entry-point name -> (distribution, version); stevedore's cache drops this."""
    from importlib.metadata import entry_points as metadata_entry_points

    found: dict[str, tuple[str | None, str | None]] = {}
    for entry_point in metadata_entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(entry_point, "dist", None)
        if dist is not None:
            found.setdefault(entry_point.name, (dist.metadata["Name"], dist.version))
    return found


def _describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def entry_points(
    only: set[str] | None = None,
) -> tuple[list[FoundPlugin], list[LoadFailure]]:
    """Load plugins advertised in the ``kernel.plugins`` entry-point group.

    ``only`` restricts loading to those entry-point names (used when autoloading
    is off and the user named plugins explicitly).
    """
    from stevedore import ExtensionManager

    failures: list[LoadFailure] = []
    origins = _distributions()

    def on_failure(_manager: Any, entry_point: Any, exc: BaseException) -> None:
        dist, version = origins.get(entry_point.name, (None, None))
        failures.append(LoadFailure(entry_point.name, dist, version, _describe_exception(exc)))

    def wanted(ext: Any) -> bool:
        return only is None or ext.name in only

    if only is not None and not only:
        return [], []
    manager = ExtensionManager(
        namespace=ENTRY_POINT_GROUP,
        invoke_on_load=False,
        on_load_failure_callback=on_failure,
    )
    found = []
    for ext in manager.extensions:
        if not wanted(ext):
            continue
        dist, version = origins.get(ext.name, (None, None))
        found.append(FoundPlugin(ext.name, ext.plugin, dist, version))
    if only is not None:
        failures = [f for f in failures if f.name in only]
    return found, failures


def entry_point_names() -> set[str]:
    """Names in the ``kernel.plugins`` group, without importing the plugins."""
    from importlib.metadata import entry_points as metadata_entry_points

    return {ep.name for ep in metadata_entry_points(group=ENTRY_POINT_GROUP)}


def module(path: str) -> FoundPlugin | LoadFailure:
    """Import a plugin given as a dotted module path (``--plugin my_pkg.plugin``)."""
    try:
        mod = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name and path.startswith(exc.name):
            return LoadFailure(
                path,
                None,
                None,
                "no installed plugin has that name and no module of that name can be "
                "imported; see `kernel plugins` for installed plugins",
            )
        return LoadFailure(path, None, None, _describe_exception(exc))
    except Exception as exc:  # any import-time error is the plugin's, report it
        return LoadFailure(path, None, None, _describe_exception(exc))
    return FoundPlugin(path, mod)
