"""ResultSet and GroupResult: reading many results in order, their tuple form, saving."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from kernel import states
from kernel.app import App
from kernel.backends import document
from kernel.exceptions import TaskRevokedError, TimeoutError
from kernel.result import AsyncResult, GroupResult, ResultSet, result_from_tuple


class MemberError(Exception):
    """Raised by "a member task"."""


def new_id() -> str:
    return str(uuid.uuid4())


def group_of(app: App, size: int, group_id: str | None = None) -> GroupResult:
    return GroupResult(group_id or new_id(), [AsyncResult(new_id(), app) for _ in range(size)])


def store_later(app: App, delay: float, task_id: str, value: object) -> threading.Timer:
    timer = threading.Timer(delay, app.backend.store_result, (task_id, value, states.SUCCESS))
    timer.start()
    return timer


# ----------------------------------------------------------------------- tuples


def test_group_tuple_is_celerys(kernel_app):
    group = GroupResult("g", [AsyncResult("a", kernel_app), AsyncResult("b", kernel_app)])
    assert group.as_tuple() == (("g", None), [(("a", None), None), (("b", None), None)])
    assert json.loads(json.dumps(group.as_tuple())) == [
        ["g", None],
        [[["a", None], None], [["b", None], None]],
    ]


def test_group_rebuilt_from_a_json_tuple_is_an_equal_group(kernel_app):
    group = GroupResult(
        "g",
        [AsyncResult("a", kernel_app), GroupResult("inner", [AsyncResult("b", kernel_app)])],
        parent=AsyncResult("p", kernel_app),
    )
    rebuilt = result_from_tuple(json.loads(json.dumps(group.as_tuple())), kernel_app)

    assert isinstance(rebuilt, GroupResult)
    assert rebuilt == group
    assert rebuilt.parent.id == "p"
    assert isinstance(rebuilt.results[1], GroupResult)


def test_chord_tuple_from_celery_is_a_task_whose_parent_is_the_header_group(kernel_app):
    captured = [["body", [["header", None], [[["h1", None], None], [["h2", None], None]]]], None]
    result = result_from_tuple(captured, kernel_app)

    assert type(result) is AsyncResult and result.id == "body"
    assert isinstance(result.parent, GroupResult)
    assert [r.id for r in result.parent] == ["h1", "h2"]


def test_bare_ids_are_accepted_where_tuples_hold_ids(kernel_app):
    assert result_from_tuple("abc", kernel_app) == AsyncResult("abc", kernel_app)
    assert result_from_tuple(["abc", None], kernel_app).id == "abc"  # kernel's old form


def test_a_long_chain_of_parents_round_trips_without_recursion(kernel_app):
    result = None
    for n in range(5000):
        result = AsyncResult(str(n), kernel_app, parent=result)
    rebuilt = result_from_tuple(result.as_tuple(), kernel_app)

    depth = 0
    while rebuilt is not None:
        assert rebuilt.id == str(4999 - depth)
        rebuilt, depth = rebuilt.parent, depth + 1
    assert depth == 5000


def test_malformed_tuple_is_refused_with_the_value(kernel_app):
    with pytest.raises(ValueError, match="not a result tuple: 42"):
        result_from_tuple(42, kernel_app)


# ----------------------------------------------------------------------- container


def test_group_is_a_sequence_of_its_results(kernel_app):
    group = group_of(kernel_app, 3, group_id="g")
    first, second, third = group.results

    assert len(group) == 3
    assert list(group) == [first, second, third]
    assert group[1] is second
    assert second in group
    assert repr(group) == f"<GroupResult: g [{first.id}, {second.id}, {third.id}]>"
    assert str(group) == "g"


def test_groups_compare_by_id_and_members(kernel_app):
    group = group_of(kernel_app, 2, group_id="g")
    same = GroupResult("g", [AsyncResult(r.id, kernel_app) for r in group])

    assert group == same
    assert group == "g"
    assert group != GroupResult("g", group.results[:1])
    assert group != GroupResult("other", group.results)
    assert len({group, same}) == 1


def test_result_set_adds_and_removes_members(kernel_app):
    first, second = AsyncResult(new_id(), kernel_app), AsyncResult(new_id(), kernel_app)
    results = ResultSet([first])
    results.add(first)
    results.update([first, second])
    assert results.results == [first, second]

    results.remove(first.id)
    results.discard(first)
    assert results.results == [second]
    with pytest.raises(KeyError):
        results.remove(first)
    assert repr(results) == f"<ResultSet: [{second.id}]>"


# ----------------------------------------------------------------------- states


def test_counts_and_states_follow_the_members(kernel_app):
    backend = kernel_app.backend
    group = group_of(kernel_app, 3)
    first, second, third = (r.id for r in group)
    assert not group.ready() and group.waiting()
    assert group.completed_count() == 0

    backend.mark_as_done(first, 1)
    backend.mark_as_failure(second, MemberError("no"))
    assert group.completed_count() == 1
    assert group.failed()
    assert not group.ready()

    backend.mark_as_done(third, 3)
    assert group.ready() and not group.waiting()
    assert not group.successful()
    assert group.completed_count() == 2


def test_group_of_successes_is_successful(kernel_app):
    group = group_of(kernel_app, 2)
    for n, result in enumerate(group):
        kernel_app.backend.mark_as_done(result.id, n)
    assert group.successful() and group.ready() and not group.failed()
    assert group.completed_count() == 2


def test_nested_group_counts_through_its_own_members(kernel_app):
    inner = group_of(kernel_app, 2)
    outer = GroupResult(new_id(), [AsyncResult(new_id(), kernel_app), inner])
    kernel_app.backend.mark_as_done(outer[0].id, 0)
    kernel_app.backend.mark_as_done(inner[0].id, 1)
    assert not outer.ready()

    kernel_app.backend.mark_as_done(inner[1].id, 2)
    assert outer.ready() and outer.successful()
    assert outer.get(timeout=1) == [0, [1, 2]]


# ----------------------------------------------------------------------- get / join


def test_get_returns_values_in_member_order_whatever_order_they_finish_in(kernel_app):
    group = group_of(kernel_app, 4)
    timers = [
        store_later(kernel_app, delay, group[index].id, f"value-{index}")
        for index, delay in [(3, 0.02), (1, 0.05), (0, 0.15), (2, 0.1)]
    ]
    try:
        assert group.get(timeout=5, interval=0.01) == [f"value-{n}" for n in range(4)]
    finally:
        for timer in timers:
            timer.join(5)


def test_join_and_join_native_are_get(kernel_app):
    group = group_of(kernel_app, 2)
    for n, result in enumerate(group):
        kernel_app.backend.mark_as_done(result.id, n)
    assert group.join(timeout=1) == group.join_native(timeout=1) == [0, 1]


def test_timeout_bounds_the_whole_wait_and_names_the_first_member_not_ready(kernel_app):
    group = group_of(kernel_app, 5)
    kernel_app.backend.mark_as_done(group[0].id, 0)

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"member 2 of 5 \({group[1].id}\) not ready"):
        group.get(timeout=0.3, interval=0.02)
    assert time.monotonic() - started < 1.5  # one deadline, not 0.3s per member


def test_first_failed_member_in_order_raises(kernel_app):
    group = group_of(kernel_app, 3)
    kernel_app.backend.mark_as_done(group[0].id, 0)
    kernel_app.backend.mark_as_failure(group[1].id, MemberError("second"))
    kernel_app.backend.mark_as_revoked(group[2].id)

    with pytest.raises(MemberError, match="second"):
        group.get(timeout=1)


def test_get_without_propagate_returns_exceptions_in_place(kernel_app):
    group = group_of(kernel_app, 3)
    kernel_app.backend.mark_as_failure(group[0].id, MemberError("first"))
    kernel_app.backend.mark_as_done(group[1].id, 1)
    kernel_app.backend.mark_as_revoked(group[2].id)

    first, second, third = group.get(timeout=1, propagate=False)
    assert isinstance(first, MemberError) and second == 1
    assert isinstance(third, TaskRevokedError)


def test_callback_receives_each_member_instead_of_a_list(kernel_app):
    group = group_of(kernel_app, 2)
    for n, result in enumerate(group):
        kernel_app.backend.mark_as_done(result.id, n)
    seen = []
    assert group.get(timeout=1, callback=lambda task_id, value: seen.append((task_id, value))) == []
    assert seen == [(group[0].id, 0), (group[1].id, 1)]


def test_ten_thousand_members_are_read_in_order_in_batches(tmp_path, kernel_plugins):
    url = f"sqlite:///{tmp_path / 'results.sqlite3'}"
    app = App("many", broker="memory://", backend=url, plugins=kernel_plugins)
    try:
        group = group_of(app, 10_000)
        with app.backend.database.transaction() as connection:  # stored fast, in one go
            connection.executemany(
                "INSERT INTO kernel_results (key, value, expires_at) VALUES (?, ?, NULL)",
                [
                    (
                        document.result_key(r.id),
                        app.backend._encode(document.build(r.id, states.SUCCESS, n)),
                    )
                    for n, r in enumerate(group)
                ],
            )
        reads = []
        mget = app.backend.mget
        app.backend.mget = lambda keys: reads.append(len(keys)) or mget(keys)

        assert group.get(timeout=30) == list(range(10_000))
        assert len(reads) <= 20, f"{len(reads)} backend reads for 10,000 ready results"
    finally:
        app.close()


def test_get_inside_a_running_task_raises_runtime_error(kernel_app, kernel_worker):
    group = group_of(kernel_app, 1)
    kernel_app.backend.mark_as_done(group[0].id, 1)

    @kernel_app.task
    def waits_on_group(group_tuple):
        return result_from_tuple(group_tuple, kernel_app).get(timeout=1)

    @kernel_app.task
    def waits_on_group_anyway(group_tuple):
        return result_from_tuple(group_tuple, kernel_app).get(
            timeout=1, disable_sync_subtasks=False
        )

    with pytest.raises(RuntimeError, match=f"waits on the result of group {group.id}"):
        waits_on_group.delay(group.as_tuple()).get(timeout=5)
    assert waits_on_group_anyway.delay(group.as_tuple()).get(timeout=5) == [1]


# ----------------------------------------------------------------------- save / revoke


def test_saved_group_is_restored_through_the_app(kernel_app):
    group = group_of(kernel_app, 3).save()

    restored = GroupResult.restore(group.id, app=kernel_app)
    assert restored == group
    restored.delete()
    assert GroupResult.restore(group.id, app=kernel_app) is None


def test_saved_group_is_stored_under_celerys_taskset_key(kernel_app):
    group = group_of(kernel_app, 2).save()

    stored = kernel_app.backend._decode(kernel_app.backend.get(f"celery-taskset-meta-{group.id}"))
    assert stored == {"result": json.loads(json.dumps(group.as_tuple()))}


def test_restore_without_app_or_backend_says_what_to_pass():
    with pytest.raises(TypeError, match="needs app= or backend="):
        GroupResult.restore("g")


def test_forget_deletes_every_members_result(kernel_app):
    group = group_of(kernel_app, 2)
    for result in group:
        kernel_app.backend.mark_as_done(result.id, 1)
    group.forget()
    assert [kernel_app.AsyncResult(r.id).state for r in group] == [states.PENDING] * 2


def test_revoke_sends_one_broadcast_with_every_member(kernel_app, monkeypatch):
    calls = []
    monkeypatch.setattr(
        kernel_app.control, "revoke", lambda task_ids, **options: calls.append((task_ids, options))
    )
    inner = group_of(kernel_app, 2)
    group = GroupResult(new_id(), [AsyncResult(new_id(), kernel_app), inner])

    group.revoke(terminate=True, signal="SIGKILL")

    [(task_ids, options)] = calls
    assert task_ids == [group[0].id, inner[0].id, inner[1].id]
    assert options["terminate"] is True and options["signal"] == "SIGKILL"
