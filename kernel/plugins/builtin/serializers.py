"""Builtin serializers (kombu's JSON, and pickle for trusted setups) and compressors."""

import bz2
import zlib

from kernel.plugins.hookspecs import hookimpl
from kernel.plugins.specs import CompressorSpec, SerializerSpec


@hookimpl
def kernel_serializers():
    return [
        # kombu's JSON keeps Celery's encoding of datetimes, UUIDs and decimals.
        SerializerSpec(
            name="json",
            content_type="application/json",
            content_encoding="utf-8",
            dumps="kombu.utils.json:dumps",
            loads="kombu.utils.json:loads",
        ),
        SerializerSpec(
            name="pickle",
            content_type="application/x-python-serialize",
            content_encoding="binary",
            dumps="kernel.plugins.builtin.serializers:pickle_dumps",
            loads="kernel.plugins.builtin.serializers:pickle_loads",
            trusted=False,
        ),
    ]


@hookimpl
def kernel_compressors():
    return [
        CompressorSpec("zlib", "application/x-gzip", zlib.compress, zlib.decompress),
        CompressorSpec("bzip2", "application/x-bz2", bz2.compress, bz2.decompress),
    ]


def pickle_dumps(obj):
    import pickle

    return pickle.dumps(obj, protocol=pickle.DEFAULT_PROTOCOL)


def pickle_loads(data):
    import pickle

    return pickle.loads(data if isinstance(data, bytes) else data.encode("latin-1"))
