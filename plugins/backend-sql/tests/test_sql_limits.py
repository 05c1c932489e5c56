"""Values the database refuses for good are not left to make the worker run a task
again and again: extended fields are cut to their columns, and a result too large
for its column is stored as a FAILURE that says what to change."""

from __future__ import annotations

import logging
import uuid

from kernel import App, states
from kernel.task import Context


def new_id() -> str:
    return str(uuid.uuid4())


def test_a_result_too_large_for_its_column_is_stored_as_a_failure_naming_the_fix(
    mariadb_run, caplog
):
    app = App("sql-limits", broker="memory://", backend=mariadb_run.url, database_retry_timeout=2)
    try:
        task_id = new_id()
        with caplog.at_level(logging.ERROR, logger="kernel_sql"):
            meta = app.backend.store_result(task_id, "x" * 70_000, states.SUCCESS)
        assert meta["status"] == states.FAILURE
        stored = app.backend.get_task_meta(task_id)
        assert stored["status"] == states.FAILURE
        assert stored["result"]["exc_type"] == "ResultNotStored"
        message = str(stored["result"]["exc_message"])
        assert "MODIFY result LONGBLOB" in message
        assert task_id in message
        assert any("LONGBLOB" in r.getMessage() for r in caplog.records)
    finally:
        app.close()


def test_extended_fields_longer_than_their_columns_are_cut_to_fit(db):
    app = App("sql-limits", broker="memory://", backend=db.url, result_extended=True)
    try:
        task_id = new_id()
        name, worker, queue = "proj." + "n" * 300, "w" * 300 + "@host", "q" * 300
        request = Context(
            id=task_id,
            task=name,
            args=(1,),
            hostname=worker,
            delivery_info={"routing_key": queue},
        )
        app.backend.store_result(task_id, 3, states.SUCCESS, request=request)
        stored = app.backend.get_task_meta(task_id)
        assert stored["status"] == states.SUCCESS
        assert stored["result"] == 3
        assert stored["name"] == name[:155]
        assert stored["worker"] == worker[:155]
        assert stored["queue"] == queue[:155]
    finally:
        app.close()
