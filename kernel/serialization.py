"""Serializers and compressors from plugins, registered with kombu's registries.

kombu encodes and decodes message bodies; this module feeds it the formats plugins
provide and turns ``accept_content`` (names or content types) into content types.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kombu import compression, serialization

from kernel.exceptions import ConfigurationError
from kernel.plugins.specs import SerializerSpec, resolve


class Serialization:
    """The serializers an app can use, by name and by content type."""

    def __init__(self, manager: Any) -> None:
        self.by_name: dict[str, SerializerSpec] = {}
        self.by_content_type: dict[str, SerializerSpec] = {}
        for spec in manager.serializers():
            serialization.register(
                spec.name,
                resolve(spec.dumps),
                resolve(spec.loads),
                content_type=spec.content_type,
                content_encoding=spec.content_encoding,
            )
            self.by_name[spec.name] = spec
            self.by_content_type[spec.content_type] = spec
        for spec in manager.specs("compressors"):
            compression.register(
                resolve(spec.compress),
                resolve(spec.decompress),
                spec.content_encoding,
                aliases=[spec.name],
            )

    def serializer_spec(self, name: str) -> SerializerSpec:
        try:
            return self.by_name[name]
        except KeyError:
            known = ", ".join(sorted(self.by_name))
            raise ConfigurationError(
                f"no serializer named {name!r}; choose one of: {known}, "
                "or load a plugin that provides it"
            ) from None

    def accepted_types(self, accept: Iterable[str]) -> set[str]:
        """Content types for ``accept_content`` entries (names or content types)."""
        types = set()
        for entry in accept:
            if entry in self.by_name:
                types.add(self.by_name[entry].content_type)
            elif "/" in entry:
                types.add(entry)
            else:
                raise ConfigurationError(
                    f"accept_content entry {entry!r} is neither a serializer name "
                    f"({', '.join(sorted(self.by_name))}) nor a content type"
                )
        return types
