"""The canvas: signature dicts in Celery's layout, and chain, group, chord, map, chunks
and replace run by a real in-process worker (memory broker, memory results)."""

from __future__ import annotations

import json
import time

import pytest

from kernel import GroupResult, chain, chord, group, signature, states
from kernel.canvas import maybe_signature
from kernel.exceptions import ChordError, ConfigurationError
from kernel.testing.pytest_plugin import start_worker, stop_worker

TIMEOUT = 10.0
SIX_KEYS = {"task", "args", "kwargs", "options", "subtask_type", "immutable"}


@pytest.fixture
def tasks(kernel_app):
    class Tasks:
        @kernel_app.task
        def add(x, y):
            return x + y

        @kernel_app.task
        def mul(x, y):
            return x * y

        @kernel_app.task
        def tsum(values):
            return sum(values)

        @kernel_app.task
        def identity(value):
            return value

        @kernel_app.task
        def boom(*args):
            raise ValueError("boom")

        @kernel_app.task(bind=True)
        def replaced(self, x):
            return self.replace(Tasks.add.s(x, 100))

        @kernel_app.task(bind=True)
        def replaced_by_group(self, x):
            return self.replace(group(Tasks.add.s(x, 1), Tasks.add.s(x, 2)))

    return Tasks


@pytest.fixture
def worker(kernel_app, tasks):
    instance, thread = start_worker(kernel_app, pool="threads", concurrency=4)
    yield instance
    stop_worker(instance, thread)


# ---------------------------------------------------------------------------- as data


def test_signature_dict_has_celerys_six_keys_and_survives_json(tasks):
    sig = tasks.add.s(2, 2).set(countdown=1)
    assert set(sig) == SIX_KEYS
    back = signature(json.loads(json.dumps(sig)))
    assert back == sig and back.options == {"countdown": 1}


def test_signature_takes_options_as_a_dict_and_as_keywords(kernel_app):
    sig = kernel_app.signature(
        "remote.task", (1,), options={"queue": "a", "priority": 3}, queue="b", immutable=True
    )
    assert sig.options == {"queue": "b", "priority": 3}
    assert sig.immutable and list(sig.args) == [1]
    assert signature("remote.task", options={"countdown": 5}).options == {"countdown": 5}


def test_partial_arguments_prepend_args_and_new_kwargs_win(tasks):
    sig = tasks.add.s(2).set(queue="a")
    clone = sig.clone((1,), {"z": 3}, queue="b")
    assert clone.args == [1, 2] and clone.kwargs == {"z": 3}
    assert clone.options["queue"] == "b" and sig.options["queue"] == "a"
    immutable = tasks.add.si(1, 1)
    assert immutable.clone((9,)).args == [1, 1]


@pytest.mark.parametrize(
    ("build", "kind"),
    [
        (lambda t: chain(t.add.s(1, 2), t.add.s(3)), chain),
        (lambda t: group(t.add.s(1, 2), t.add.s(3, 4)), group),
        (lambda t: chord([t.add.s(1, 2)], t.tsum.s()), chord),
    ],
)
def test_canvas_types_rebuild_from_their_dicts(tasks, build, kind):
    original = build(tasks)
    rebuilt = maybe_signature(json.loads(json.dumps(original)))
    assert type(rebuilt) is kind
    assert json.loads(json.dumps(rebuilt)) == json.loads(json.dumps(original))


def test_nested_chains_flatten_and_pipe_composes(tasks):
    composed = tasks.add.s(1, 1) | (tasks.add.s(2) | tasks.add.s(3)) | tasks.mul.s(2)
    assert isinstance(composed, chain)
    assert [t.name for t in composed.tasks] == [tasks.add.name] * 3 + [tasks.mul.name]


def test_map_and_chunks_are_immutable_builtin_signatures(tasks):
    assert tasks.add.map([1, 2])["task"] == "celery.map"
    chunked = tasks.add.chunks([(1, 2), (3, 4), (5, 6)], 2)
    assert chunked["task"] == "celery.chunks" and chunked.immutable
    assert [len(part.kwargs["it"]) for part in chunked.group().tasks] == [2, 1]


# ---------------------------------------------------------------------------- running


def test_chain_passes_each_result_on(kernel_app, tasks, worker):
    result = (tasks.add.s(1, 2) | tasks.add.s(3) | tasks.mul.s(10)).delay()
    assert result.get(timeout=TIMEOUT) == 60


def test_chain_with_immutable_step_ignores_the_previous_result(kernel_app, tasks, worker):
    result = chain(tasks.add.s(1, 2), tasks.add.si(5, 5)).apply_async()
    assert result.get(timeout=TIMEOUT) == 10


def test_group_results_come_back_in_order(kernel_app, tasks, worker):
    result = group(tasks.add.s(i, i) for i in range(20)).apply_async()
    assert isinstance(result, GroupResult)
    assert result.get(timeout=TIMEOUT) == [2 * i for i in range(20)]
    assert result.completed_count() == 20 and result.successful()


def test_chord_body_gets_the_header_results(kernel_app, tasks, worker):
    result = chord(tasks.add.s(i, i) for i in range(10))(tasks.tsum.s())
    assert result.get(timeout=TIMEOUT) == sum(2 * i for i in range(10))


def test_chord_with_an_empty_header_calls_the_body_with_an_empty_list(tasks, worker):
    assert chord([], tasks.tsum.s()).apply_async().get(timeout=TIMEOUT) == 0


def test_failing_header_task_fails_the_body_with_chord_error(kernel_app, tasks, worker):
    result = chord([tasks.add.s(1, 1), tasks.boom.s()], tasks.tsum.s()).apply_async()
    with pytest.raises(ChordError, match="raised ValueError"):
        result.get(timeout=TIMEOUT)
    assert result.state == states.FAILURE


def test_group_inside_a_chain_becomes_a_chord(kernel_app, tasks, worker):
    flow = tasks.add.s(1, 1) | group(tasks.add.s(1), tasks.add.s(2)) | tasks.tsum.s()
    assert flow.delay().get(timeout=TIMEOUT) == (2 + 1) + (2 + 2)


def test_chord_inside_a_chain_passes_its_body_result_on(kernel_app, tasks, worker):
    flow = chain(
        tasks.add.s(1, 1), chord([tasks.add.s(1), tasks.add.s(2)], tasks.tsum.s()), tasks.mul.s(2)
    )
    assert flow.delay().get(timeout=TIMEOUT) == ((2 + 1) + (2 + 2)) * 2


def test_three_levels_of_nesting(kernel_app, tasks, worker):
    inner = chord([tasks.add.s(1, 1), tasks.add.s(2, 2)], tasks.tsum.s())  # 6
    middle = group(inner, chain(tasks.add.s(3, 3), tasks.mul.s(2)))  # [6, 12]
    outer = chain(middle, tasks.tsum.s())  # a chord of a group of a chord and a chain
    assert outer.delay().get(timeout=TIMEOUT) == 18


def test_map_starmap_and_chunks_run_through_the_builtin_tasks(kernel_app, tasks, worker):
    assert tasks.identity.map([1, 2, 3]).delay().get(timeout=TIMEOUT) == [1, 2, 3]
    assert tasks.add.starmap([(1, 2), (3, 4)]).delay().get(timeout=TIMEOUT) == [3, 7]
    parts = tasks.add.chunks([(1, 2), (3, 4), (5, 6)], 2).apply_async()
    assert parts.get(timeout=TIMEOUT) == [[3, 7], [11]]


def test_replace_takes_over_the_task_id(kernel_app, tasks, worker):
    result = (tasks.replaced.s(1) | tasks.mul.s(2)).delay()
    assert result.get(timeout=TIMEOUT) == 202


def test_replace_with_a_group_returns_the_list_of_results(kernel_app, tasks, worker):
    assert tasks.replaced_by_group.delay(10).get(timeout=TIMEOUT) == [11, 12]


def test_link_error_callback_gets_the_request_exception_and_traceback(kernel_app, worker):
    seen = []

    @kernel_app.task
    def on_error(request, exc, traceback):
        seen.append((request.id, type(exc).__name__))

    @kernel_app.task
    def fails():
        raise KeyError("k")

    result = fails.apply_async(link_error=on_error.s())
    with pytest.raises(KeyError):
        result.get(timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT  # it runs right after the failure is stored
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [(result.id, "KeyError")]


def test_chain_steps_after_a_failure_fail_too(kernel_app, tasks, worker):
    flow = chain(tasks.add.s(1, 1), tasks.boom.s(), tasks.add.s(1))
    last = flow.delay()
    with pytest.raises(ValueError, match="boom"):
        last.get(timeout=TIMEOUT)


def test_result_children_list_a_group_sent_from_a_task(kernel_app, tasks, worker):
    @kernel_app.task
    def spawn():
        group(tasks.add.s(1, 1), tasks.add.s(2, 2)).apply_async()
        return "spawned"

    result = spawn.delay()
    assert result.get(timeout=TIMEOUT) == "spawned"
    (child,) = result.children
    assert isinstance(child, GroupResult)
    assert child.get(timeout=TIMEOUT, disable_sync_subtasks=False) == [2, 4]


def test_group_can_be_saved_and_restored(kernel_app, tasks, worker):
    result = group(tasks.add.s(1, 1), tasks.add.s(2, 2)).apply_async()
    result.save()
    restored = GroupResult.restore(result.id, app=kernel_app)
    assert restored.get(timeout=TIMEOUT) == [2, 4]


# ---------------------------------------------------------------------------- errors


def test_chord_on_a_backend_without_chords_fails_at_call_time(kernel_app, tasks):
    kernel_app.conf.result_backend = None
    kernel_app._backend = None  # results disabled: no chord can be counted
    with pytest.raises(ConfigurationError, match="chord"):
        chord([tasks.add.s(1, 1)], tasks.tsum.s()).apply_async()


def test_linking_a_group_says_to_use_a_chord(tasks):
    with pytest.raises(TypeError, match="chord"):
        group(tasks.add.s(1, 1)).link(tasks.tsum.s())


def test_eager_canvas_runs_in_process(kernel_eager_app):
    @kernel_eager_app.task
    def inc(x):
        return x + 1

    assert (inc.s(1) | inc.s() | inc.s()).delay().get() == 4
    assert group(inc.s(i) for i in range(3)).delay().get() == [1, 2, 3]

    @kernel_eager_app.task
    def total(values):
        return sum(values)

    assert chord([inc.s(1), inc.s(2)], total.s()).apply_async().get() == 5


def test_group_inside_a_chord_header_gives_the_body_a_nested_list(kernel_app, tasks, worker):
    header = [group(tasks.add.s(1, 1), tasks.add.s(2, 2)), tasks.add.s(3, 3)]
    result = chord(header, tasks.identity.s()).apply_async()
    assert result.get(timeout=TIMEOUT) == [[2, 4], 6]


def test_group_of_chains_returns_each_chains_result(kernel_app, tasks, worker):
    flow = group(
        chain(tasks.add.s(1, 1), tasks.mul.s(10)), chain(tasks.add.s(2, 2), tasks.mul.s(10))
    )
    assert flow.apply_async().get(timeout=TIMEOUT) == [20, 40]


def test_chord_errback_gets_the_chord_error_naming_the_failed_task(kernel_app, tasks, worker):
    seen = []

    @kernel_app.task
    def on_chord_error(request, exc, traceback):
        seen.append((request.id, type(exc).__name__, str(exc)))

    failing = tasks.boom.s()
    body = tasks.tsum.s()
    body.link_error(on_chord_error.s())
    result = chord([tasks.add.s(1, 1), failing], body).apply_async()
    with pytest.raises(ChordError):
        result.get(timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    ((body_id, kind, message),) = seen
    assert body_id == result.id and kind == "ChordError"
    assert "Dependency" in message and "raised ValueError" in message


def test_replaced_chord_header_task_still_counts_for_its_chord(kernel_app, tasks, worker):
    result = chord([tasks.replaced.s(1), tasks.add.s(2, 2)], tasks.identity.s()).apply_async()
    assert result.get(timeout=TIMEOUT) == [101, 4]


def test_chain_result_parents_and_stored_children_follow_the_steps(kernel_app, tasks, worker):
    last = (tasks.add.s(1, 1) | tasks.add.s(1) | tasks.add.s(1)).delay()
    assert last.get(timeout=TIMEOUT) == 4
    middle = last.parent
    first = middle.parent
    assert first.parent is None
    assert first.get(timeout=TIMEOUT) == 2 and middle.get(timeout=TIMEOUT) == 3
    assert [child.id for child in first.children] == [middle.id]  # stored with the result


def test_chain_with_a_chord_fails_at_call_time_without_chord_support(kernel_app, tasks):
    kernel_app.conf.result_backend = None
    kernel_app._backend = None
    flow = tasks.add.s(1, 1) | group(tasks.add.s(1), tasks.add.s(2)) | tasks.tsum.s()
    with pytest.raises(ConfigurationError, match="chord"):
        flow.delay()


def test_chunk_parts_are_routed_like_their_task(kernel_app, tasks):
    tasks.add.queue = "numbers"
    parts = tasks.add.chunks([(1, 2), (3, 4)], 1).group()
    clones = [part.clone() for part in parts.tasks]
    assert {type(c).__name__ for c in clones} == {"xstarmap"}


def test_calling_a_chain_or_a_group_sends_it_as_celery_does(tasks, worker):
    assert chain(tasks.add.s(1, 2), tasks.mul.s(10))().get(timeout=TIMEOUT) == 30
    assert chain(tasks.add.s(1), tasks.mul.s(10))(2).get(timeout=TIMEOUT) == 30
    assert group(tasks.add.s(1), tasks.add.s(2))(10).get(timeout=TIMEOUT) == [11, 12]
