"""The builtin serializers against the serializer contract."""

from __future__ import annotations

from kernel.testing.contracts import SerializerContract


class TestJSONSerializer(SerializerContract):
    serializer_name = "json"


class TestPickleSerializer(SerializerContract):
    serializer_name = "pickle"
