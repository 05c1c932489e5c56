"""The canvas end to end: chain, group, chord, chunks, map, starmap, callbacks,
``Task.replace`` and nested canvases, run by real ``kernel worker`` processes on the
SQLite broker and result backend.

The client knows the tasks by name only (``broker.app.signature(...)``), as a client
that does not import the workers' code would.
"""

from __future__ import annotations

import pytest

from kernel import GroupResult, chain, chord, chunks, group, states, xmap, xstarmap
from kernel.exceptions import ChordError

from .conftest import Broker, wait_until

pytestmark = pytest.mark.integration

APP = "canvas_tasks"
TIMEOUT = 30.0


def sig(broker: Broker, name: str, *args, **kwargs):
    """A signature of ``canvas_tasks.<name>`` built from its name alone."""
    return broker.app.signature(f"{APP}.{name}", args=args, kwargs=kwargs)


def lines(broker: Broker, kind: str, token: str | None = None) -> list[list[str]]:
    """Record lines ``kind token ...`` split into fields."""
    found = [r.split() for r in broker.records() if r.startswith(kind + " ")]
    return [f for f in found if token is None or f[1] == token]


def block_worker(broker: Broker, token: str):
    """Occupy one worker slot with ``gate(token)`` until :func:`release` is called."""
    blocker = sig(broker, "gate", token).apply_async()
    wait_until(lambda: lines(broker, "start", token), TIMEOUT, f"gate {token} to start")
    return blocker


def release(broker: Broker, token: str) -> None:
    """Let ``gate(token)`` finish (see ``canvas_tasks.gate``)."""
    (broker.record_path.parent / f"gate-{token}").touch()


def wait_known_revoked(broker: Broker, task_ids: list[str]) -> None:
    """Wait until a worker says it holds every id of ``task_ids`` as revoked."""

    def known() -> bool:
        replies = broker.app.control.inspect(timeout=1.0).revoked()
        return any(set(task_ids) <= set(ids) for ids in replies.values())

    wait_until(known, TIMEOUT, "the worker to record the revoke", interval=0.2)


# ---------------------------------------------------------------------------- primitives


def test_chain_passes_each_result_on_and_an_immutable_step_ignores_it(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    flow = chain(sig(broker, "add", 1, 2), sig(broker, "add", 10), sig(broker, "mul", 3))
    assert flow.apply_async().get(timeout=TIMEOUT) == (1 + 2 + 10) * 3
    with_immutable = chain(
        sig(broker, "add", 1, 2),
        broker.app.signature(f"{APP}.add", args=(5, 5), immutable=True),
        sig(broker, "mul", 2),
    )
    assert with_immutable.apply_async().get(timeout=TIMEOUT) == (5 + 5) * 2


def test_group_results_come_back_in_member_order(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    result = group(sig(broker, "add", i, i) for i in range(20)).apply_async()
    assert isinstance(result, GroupResult)
    assert result.get(timeout=TIMEOUT) == [2 * i for i in range(20)]
    assert result.completed_count() == 20 and result.successful()


def test_chord_body_gets_the_header_results_in_order(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    header = [sig(broker, "identity", i) for i in range(12)]
    result = chord(header, sig(broker, "identity")).apply_async()
    assert result.get(timeout=TIMEOUT) == list(range(12))


def test_chunks_map_and_starmap_run_through_the_builtin_tasks(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    parts = chunks(sig(broker, "add"), [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10)], 2)
    assert parts.apply_async().get(timeout=TIMEOUT) == [[3, 7], [11, 15], [19]]
    mapped = xmap(sig(broker, "identity"), [1, 2, 3], app=broker.app)
    assert mapped.apply_async().get(timeout=TIMEOUT) == [1, 2, 3]
    starmapped = xstarmap(sig(broker, "mul"), [(2, 3), (4, 5)], app=broker.app)
    assert starmapped.apply_async().get(timeout=TIMEOUT) == [6, 20]


def test_link_callback_gets_the_result(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    task = sig(broker, "add", 20, 22)
    task.link(sig(broker, "record"))
    assert task.apply_async().get(timeout=TIMEOUT) == 42
    wait_until(lambda: lines(broker, "run", "42"), TIMEOUT, "the link callback to run")


def test_link_error_errbacks_receive_the_failed_task(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    task = sig(broker, "fail", "boom")
    task.link_error(sig(broker, "record_failure"))  # new style: (request, exc, traceback)
    task.link_error(sig(broker, "record_failed_id"))  # old style: (task_id,)
    result = task.apply_async()
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=TIMEOUT)
    wait_until(
        lambda: lines(broker, "errback-request") and lines(broker, "errback"),
        TIMEOUT,
        "both errbacks to run",
    )
    assert lines(broker, "errback-request") == [["errback-request", result.id, "ValueError"]]
    assert lines(broker, "errback") == [["errback", result.id]]


def test_replace_inside_a_chain_takes_over_the_id_and_passes_its_result_on(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    flow = chain(sig(broker, "add", 1, 2), sig(broker, "replace_with_add"), sig(broker, "mul", 2))
    assert flow.apply_async().get(timeout=TIMEOUT) == (3 + 100) * 2
    ((_, replaced_id),) = lines(broker, "replaced")
    assert broker.app.AsyncResult(replaced_id).get(timeout=TIMEOUT) == 103


def test_result_children_of_a_task_that_sent_a_group(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    result = sig(broker, "spawn_group", 3).apply_async()
    assert result.get(timeout=TIMEOUT) == "spawned"
    (child,) = result.children
    assert isinstance(child, GroupResult)
    assert child.get(timeout=TIMEOUT) == [0, 2, 4]


# ---------------------------------------------------------------------------- nesting


def test_chain_of_a_group_of_a_chord_and_a_chain_then_a_body(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    inner_chord = chord([sig(broker, "add", 1), sig(broker, "add", 2)], sig(broker, "tsum"))
    inner_chain = chain(sig(broker, "add", 3), sig(broker, "mul", 2))
    flow = chain(
        sig(broker, "add", 1, 1),  # 2, given to both members of the group
        group(inner_chord, inner_chain),  # [(2+1) + (2+2), (2+3) * 2] = [7, 10]
        sig(broker, "tsum"),
    )
    assert flow.apply_async().get(timeout=TIMEOUT) == 17


def test_chord_whose_header_holds_a_chain_and_a_group(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    header = [
        chain(sig(broker, "add", 1, 1), sig(broker, "mul", 3)),  # 6
        group(sig(broker, "add", 2, 2), sig(broker, "add", 3, 3)),  # [4, 6]
        sig(broker, "add", 10, 10),  # 20
    ]
    result = chord(header, sig(broker, "identity")).apply_async()
    assert result.get(timeout=TIMEOUT) == [6, [4, 6], 20]


def test_chain_of_a_chord_whose_header_holds_a_chain_and_a_chord(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    header = [
        chain(sig(broker, "add", 1, 1), sig(broker, "mul", 3)),  # 6
        chord([sig(broker, "add", i, i) for i in range(3)], sig(broker, "tsum")),  # 6
        sig(broker, "add", 10, 10),  # 20
    ]
    flow = chain(chord(header, sig(broker, "identity")), sig(broker, "tsum"))
    assert flow.apply_async().get(timeout=TIMEOUT) == 6 + 6 + 20


def test_chord_of_chords_inside_a_chain(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    inner = [
        chord([sig(broker, "add", i, i) for i in range(3)], sig(broker, "tsum"))  # 6
        for _ in range(2)
    ]
    flow = chain(chord(inner, sig(broker, "tsum")), sig(broker, "mul", 10))  # (6 + 6) * 10
    assert flow.apply_async().get(timeout=TIMEOUT) == 120


# ---------------------------------------------------------------------------- scale


def test_500_task_chord_across_two_prefork_workers_fires_its_body_once(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    header = [sig(broker, "add_and_record", i, i) for i in range(500)]
    result = chord(header, sig(broker, "record_sum", token="big")).apply_async()
    expected = sum(2 * i for i in range(500))
    assert result.get(timeout=60) == expected
    # A second body would have been queued by now: these run after it.
    followers = group(sig(broker, "identity", i) for i in range(8)).apply_async()
    assert followers.get(timeout=TIMEOUT) == list(range(8))
    assert [f[:3] for f in lines(broker, "body", "big")] == [["body", "big", str(expected)]]
    parts = lines(broker, "part")
    assert sorted(int(f[1]) for f in parts) == list(range(500))
    assert {int(f[3]) for f in parts} == {w.proc.pid for w in broker.workers}


def test_10000_task_group_results_read_back_in_order(broker: Broker):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    result = group(sig(broker, "identity", i) for i in range(10_000)).apply_async()
    # Sending takes ~15 s and running ~5 s on two idle cores; the rest is slack.
    values = result.get(timeout=75)
    assert values == list(range(10_000))


# ---------------------------------------------------------------------------- failures


def test_failed_header_task_fails_the_body_with_chord_error_and_runs_its_errback(
    broker: Broker,
):
    broker.worker("-P", "prefork", "-c", "2", app=APP)
    body = sig(broker, "record_sum", token="never")
    body.link_error(sig(broker, "record_failed_id"))
    header = [sig(broker, "add", 1, 1), sig(broker, "fail", "boom"), sig(broker, "add", 2, 2)]
    result = chord(header, body).apply_async()
    failed_id = result.parent.results[1].id
    with pytest.raises(ChordError, match=failed_id):
        result.get(timeout=TIMEOUT)
    assert result.state == states.FAILURE
    wait_until(lambda: lines(broker, "errback"), TIMEOUT, "the body's errback to run")
    assert lines(broker, "errback") == [["errback", result.id]]
    assert sig(broker, "identity", "after").apply_async().get(timeout=TIMEOUT) == "after"
    assert not lines(broker, "body")


def test_revoked_header_task_fails_the_body_with_chord_error(broker: Broker):
    broker.worker("-P", "prefork", "-c", "1", app=APP)
    blocker = block_worker(broker, "busy")
    header = [sig(broker, "add", i, i) for i in range(3)]
    result = chord(header, sig(broker, "record_sum", token="never")).apply_async()
    revoked_id = result.parent.results[1].id
    broker.app.AsyncResult(revoked_id).revoke()
    wait_known_revoked(broker, [revoked_id])
    release(broker, "busy")
    assert blocker.get(timeout=TIMEOUT) == "busy"
    with pytest.raises(ChordError, match=revoked_id):
        result.get(timeout=TIMEOUT)
    assert broker.app.AsyncResult(revoked_id).state == states.REVOKED
    assert not lines(broker, "body")


def test_failed_header_task_calls_the_bodys_request_errback_with_the_chord_error(
    broker: Broker,
):
    broker.worker("-P", "prefork", "-c", "1", app=APP)
    body = sig(broker, "record_sum", token="never")
    body.link_error(sig(broker, "record_failure"))
    header = [sig(broker, "add", 1, 1), sig(broker, "fail", "boom")]
    result = chord(header, body).apply_async()
    with pytest.raises(ChordError):
        result.get(timeout=TIMEOUT)
    # One slot: the errback, run or sent before the body failed, is done before this.
    assert sig(broker, "identity", "after").apply_async().get(timeout=TIMEOUT) == "after"
    assert lines(broker, "errback-request") == [["errback-request", result.id, "ChordError"]]


# ---------------------------------------------------------------------------- revoking


def test_revoked_group_members_waiting_behind_a_busy_worker_never_run(broker: Broker):
    broker.worker("-P", "prefork", "-c", "1", app=APP)
    blocker = block_worker(broker, "busy")
    result = group(sig(broker, "record", f"member{i}") for i in range(5)).apply_async()
    result.revoke()
    wait_known_revoked(broker, [r.id for r in result.results])
    release(broker, "busy")
    assert blocker.get(timeout=TIMEOUT) == "busy"
    wait_until(
        lambda: all(r.state == states.REVOKED for r in result.results),
        TIMEOUT,
        "every member to be REVOKED",
    )
    assert sig(broker, "record", "after").apply_async().get(timeout=TIMEOUT) == "after"
    assert [f[1] for f in lines(broker, "run")] == ["after"]
