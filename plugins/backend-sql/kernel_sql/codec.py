"""Rows of Celery's task table to and from kernel's result documents.

Celery's database backend keeps the fields of a result in columns, and serialises the
values that are not plain text with the ``result_serializer`` (JSON by default):

- ``result``: the return value, the exception as ``{"exc_type", "exc_message",
  "exc_module"}``, or a custom state's meta;
- ``children``: the list of the children's result tuples, NULL when there are none;
- ``args``/``kwargs`` (``result_extended``): the task's arguments;
- ``date_done``: a naive UTC ``DATETIME``, NULL until the task is ready.

With ``result_serializer = "pickle"`` the same columns hold pickles, exactly as
Celery writes them; they are only read back when pickle is in
``result_accept_content`` (or ``accept_content``), since unpickling runs code.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from kombu.exceptions import ContentDisallowed as RefusedContent
from kombu.serialization import dumps, loads

from kernel.exceptions import ContentDisallowed

log = logging.getLogger(__name__)

PICKLE_CONTENT_TYPE = "application/x-python-serialize"


class Codec:
    """Encodes column values with the app's result serializer and decodes them."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def dumps(self, value: Any) -> bytes:
        _content_type, _encoding, data = dumps(value, serializer=self.app.conf.result_serializer)
        return data.encode("utf-8") if isinstance(data, str) else bytes(data)

    def loads(self, data: bytes | memoryview | None) -> Any:
        """The value of a serialised column; NULL reads as None.

        Rows written by Celery before it honoured ``result_serializer`` hold pickles;
        one is recognised by its first byte and unpickled only if pickle is accepted.
        """
        if data is None:
            return None
        data = bytes(data)
        conf = self.app.conf
        serialization = self.app.serialization
        accept = serialization.accepted_types(conf.result_accept_content or conf.accept_content)
        spec = serialization.serializer_spec(conf.result_serializer)
        try:
            return loads(data, spec.content_type, spec.content_encoding, accept=accept)
        except (ContentDisallowed, RefusedContent):
            raise
        except Exception as exc:
            if not data.startswith(b"\x80") or spec.content_type == PICKLE_CONTENT_TYPE:
                raise
            if PICKLE_CONTENT_TYPE not in accept:
                raise ContentDisallowed(
                    "a stored result is a pickle (written by an old Celery, or with "
                    "result_serializer='pickle'), and pickle is not accepted; add 'pickle' "
                    "to result_accept_content only if every writer of this database is "
                    "trusted"
                ) from exc
            return loads(data, PICKLE_CONTENT_TYPE, "binary", accept=accept)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def to_column_time(moment: datetime, whole_seconds: bool = False) -> datetime:
    """A naive UTC datetime, as Celery stores ``date_done``; ``whole_seconds`` for
    columns without fractions (MySQL's ``DATETIME``), so the stored time is exact."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.replace(microsecond=0) if whole_seconds else moment


def from_column_time(value: Any) -> str | None:
    """``date_done`` as kernel documents hold it: an ISO string in UTC."""
    if value is None:
        return None
    if isinstance(value, str):  # a driver that returns text
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat()


def row_from_document(codec: Codec, meta: dict[str, Any], date_done: datetime | None) -> dict:
    """The base columns for a result document (its exception already encoded)."""
    children = meta.get("children")
    return {
        "status": meta["status"],
        "result": codec.dumps(meta["result"]),
        "traceback": meta.get("traceback"),
        "children": codec.dumps(children) if children else None,
        "date_done": date_done,
    }


def extended_columns(codec: Codec, fields: dict[str, Any]) -> dict[str, Any]:
    """The ``result_extended`` columns for the fields of ``extended_fields(request)``:
    ``args`` and ``kwargs`` serialised, the rest as they are."""
    columns = dict(fields)
    for name in ("args", "kwargs"):
        if columns.get(name) is not None:
            columns[name] = codec.dumps(columns[name])
    return columns


def document_from_row(codec: Codec, row: Any, extended: bool) -> dict[str, Any]:
    """Kernel's result document for a row of the task table."""
    mapping = row._mapping
    meta = {
        "task_id": mapping["task_id"],
        "status": mapping["status"],
        "result": codec.loads(mapping["result"]),
        "traceback": mapping["traceback"],
        "children": (codec.loads(mapping["children"]) if "children" in mapping else None) or [],
        "date_done": from_column_time(mapping["date_done"]),
    }
    if extended:
        meta["name"] = mapping.get("name")
        meta["args"] = codec.loads(mapping.get("args"))
        meta["kwargs"] = codec.loads(mapping.get("kwargs"))
        meta["worker"] = mapping.get("worker")
        meta["retries"] = mapping.get("retries")
        meta["queue"] = mapping.get("queue")
    return meta
