"""Entry point ``sql`` of group ``kernel.plugins``: the SQL result backend.

Registers the ``db+...`` URL schemes. SQLAlchemy and the database drivers are
imported only when an app uses one of these URLs, so installing the plugin costs
nothing to apps that do not.
"""

from __future__ import annotations

from kernel import hookimpl
from kernel.plugins.specs import BackendSpec
from kernel_sql.urls import SCHEMES


@hookimpl
def kernel_result_backends():
    return [
        BackendSpec(
            name="sql",
            schemes=SCHEMES,
            factory="kernel_sql.backend:SQLBackend",
            features={"cross_process", "chords"},
        )
    ]
