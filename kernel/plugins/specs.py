"""Registration records that plugins return from capability hooks.

Each record describes one capability and how to build it. Records hold classes,
factories, or lazy ``"package.module:attribute"`` strings -- never live instances --
so nothing heavy is imported until a user actually selects that capability.

These classes are plugin API: third-party plugins construct them, and their fields
are documented in ``docs/plugins.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import attrs

from kernel.exceptions import PluginError


def resolve(target: Any) -> Any:
    """Return ``target``, importing it first when it is a ``"module:attr"`` string."""
    if not isinstance(target, str):
        return target
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise PluginError(
            f"lazy reference {target!r} is not of the form 'package.module:attribute'"
        )
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def _schemes(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    return tuple(s.lower().rstrip(":/") for s in value)


@attrs.frozen
class TransportSpec:
    """A message transport (broker client).

    ``kombu_transport`` is a kombu ``Transport`` class, or a lazy string naming one.
    ``features`` names what the transport supports, from: ``delayed_delivery``
    (holds messages until a not-before time), ``priority``, ``fanout``,
    ``delivery_count`` (sets the ``x-delivery-count`` header on redelivery),
    ``cross_process`` (several processes may share it).

    ``default_options`` are transport options used unless ``broker_transport_options``
    sets them. ``setting_options`` maps a transport option name to the name of a
    kernel setting whose value the app passes as that option (again unless
    ``broker_transport_options`` sets it): how a transport learns settings such as
    ``task_dead_letter_queue`` without reading the app.
    """

    name: str
    schemes: tuple[str, ...] = attrs.field(converter=_schemes)
    kombu_transport: Any
    features: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    default_options: dict[str, Any] = attrs.field(factory=dict)
    setting_options: dict[str, str] = attrs.field(factory=dict)

    def load(self) -> Any:
        return resolve(self.kombu_transport)


@attrs.frozen
class BackendSpec:
    """A result backend.

    ``factory(app, url)`` returns an object implementing ``kernel.backends.base.Backend``.
    ``features`` may name ``chords`` (atomic counters) and ``cross_process``.
    """

    name: str
    schemes: tuple[str, ...] = attrs.field(converter=_schemes)
    factory: Any
    features: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)

    def load(self) -> Callable[..., Any]:
        return resolve(self.factory)


@attrs.frozen
class SerializerSpec:
    """A body serializer, registered with kombu under ``name``.

    ``trusted=False`` marks formats (pickle) that can run code when decoding:
    they are never accepted unless the user lists them in ``accept_content``.
    """

    name: str
    content_type: str
    content_encoding: str
    dumps: Any
    loads: Any
    trusted: bool = True


@attrs.frozen
class CompressorSpec:
    """A body compression method, registered with kombu under ``name``."""

    name: str
    content_encoding: str
    compress: Any
    decompress: Any


@attrs.frozen
class PoolSpec:
    """An execution pool.

    ``factory(worker, concurrency)`` returns a ``kernel.worker.pools.Pool``.
    ``supports`` names what the pool can do, from: ``hard_time_limit``,
    ``soft_time_limit``, ``terminate`` (a cold shutdown stops running tasks),
    ``terminate_task`` (``revoke(terminate=True)`` stops one), ``autoscale``,
    ``max_tasks_per_child``, ``max_memory_per_child``.
    ``early_patch`` is a callable run before anything else is imported
    (gevent-style monkey patching), or None.
    """

    name: str
    factory: Any
    supports: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    early_patch: Any = None
    default_concurrency: Callable[[], int] | None = None

    def load(self) -> Callable[..., Any]:
        return resolve(self.factory)

    def patch_early(self) -> bool:
        """Run ``early_patch`` once per process; True if it has run (now or before)."""
        if self.early_patch is None:
            return False
        if self.name not in _EARLY_PATCHED:
            resolve(self.early_patch)()
            _EARLY_PATCHED.add(self.name)
        return True


#: Pools whose ``early_patch`` ran in this process.
_EARLY_PATCHED: set[str] = set()


@attrs.frozen
class SchedulerSpec:
    """A periodic-task scheduler for ``kernel beat``; ``factory(app, **options)``."""

    name: str
    factory: Any

    def load(self) -> Callable[..., Any]:
        return resolve(self.factory)


@attrs.frozen
class ControlCommandSpec:
    """A remote-control command a worker answers.

    ``handler(worker, **arguments)`` returns a JSON-serialisable reply.
    ``kind`` is ``"inspect"`` (read-only) or ``"control"`` (changes the worker).
    """

    name: str
    handler: Any
    kind: str = attrs.field(default="control")

    @kind.validator
    def _check_kind(self, _attribute: Any, value: str) -> None:
        if value not in ("inspect", "control"):
            raise PluginError(
                f"control command {self.name!r} has kind {value!r}; use 'inspect' or 'control'"
            )


@attrs.frozen
class ComponentSpec:
    """A worker component started with the worker (Celery's "bootstep").

    ``factory(worker)`` returns an object with ``start()`` and ``stop()``.
    ``requires`` names components that must start before this one; builtin
    components are ``consumer`` and ``pool``.
    """

    name: str
    factory: Any
    requires: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def load(self) -> Callable[..., Any]:
        return resolve(self.factory)


#: The capability kinds, in the order ``kernel plugins`` lists them.
CAPABILITY_KINDS: dict[str, type] = {
    "transports": TransportSpec,
    "result_backends": BackendSpec,
    "serializers": SerializerSpec,
    "compressors": CompressorSpec,
    "pools": PoolSpec,
    "schedulers": SchedulerSpec,
    "control_commands": ControlCommandSpec,
    "worker_components": ComponentSpec,
}
