"""Retries end to end: `kernel worker` processes (prefork) on the SQLite broker.

Timings are asserted as bounds, never as exact values: a retry may run late on a busy
machine, but never before its countdown, and its countdown stays within the backoff.
"""

from __future__ import annotations

import re
import time
from itertools import pairwise

import attrs
import pytest

from kernel.exceptions import MaxRetriesExceededError

from .conftest import Broker, wait_until

pytestmark = pytest.mark.integration

TIMEOUT = 30.0
#: How early a retry may seem to run: timestamps are floats and ISO strings (µs).
CLOCK_TOLERANCE = 0.02
#: Time between an attempt's start and the retry() it ends with (recording, storing RETRY).
RETRY_CALL_SLACK = 0.75
#: How late a retry may run after its eta on a loaded 2-core CI machine.
LATE_SLACK = 5.0


@attrs.frozen
class Attempt:
    retries: int
    header: int
    started: float
    eta: float | None
    state_seen: str


def attempts(broker: Broker, token: str) -> list[Attempt]:
    """The attempts of the task called with ``token``, in the order they ran."""
    found = []
    for line in broker.records():
        fields = line.split()
        if fields[:2] != ["attempt", token]:
            continue
        retries, header, started, eta, state = fields[2:]
        found.append(
            Attempt(
                int(retries), int(header), float(started), None if eta == "-" else float(eta), state
            )
        )
    return sorted(found, key=lambda attempt: attempt.started)


@pytest.fixture
def worker(broker: Broker):
    return broker.worker("-P", "prefork", "-c", "2", app="retry_tasks")


def test_backoff_retries_wait_the_doubling_countdown(broker: Broker, worker):
    result = broker.app.send_task("retry_tasks.backoff", ("b1", 3))

    assert result.get(timeout=TIMEOUT) == "b1"
    runs = attempts(broker, "b1")
    assert [run.retries for run in runs] == [0, 1, 2, 3]
    assert [run.header for run in runs] == [0, 1, 2, 3]  # the message's `retries` header
    for number, (before, after) in enumerate(pairwise(runs)):
        countdown = 0.2 * 2**number  # retry_backoff=0.2, no jitter
        waited = after.started - before.started
        assert countdown - CLOCK_TOLERANCE <= waited <= countdown + LATE_SLACK, number
        chosen = after.eta - before.started  # countdown plus the time to call retry()
        assert countdown - CLOCK_TOLERANCE <= chosen <= countdown + RETRY_CALL_SLACK, number
    assert result.state == "SUCCESS"


def test_jittered_backoff_stays_within_its_bounds(broker: Broker, worker):
    result = broker.app.send_task("retry_tasks.jittered", ("j1", 3))

    assert result.get(timeout=TIMEOUT) == "j1"
    runs = attempts(broker, "j1")
    assert [run.retries for run in runs] == [0, 1, 2, 3]
    for number, (before, after) in enumerate(pairwise(runs)):
        bound = min(1.5, 1.0 * 2**number)  # retry_backoff=1.0, retry_backoff_max=1.5
        chosen = after.eta - before.started
        assert 0 <= chosen <= bound + RETRY_CALL_SLACK, number
        assert after.started >= after.eta - CLOCK_TOLERANCE, number  # not before its eta


def test_states_go_from_started_through_retry_to_success(broker: Broker, worker):
    result = broker.app.send_task("retry_tasks.tracked", ("s1", 2))
    seen: list[str] = []

    def finished() -> bool:
        state = result.state
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "SUCCESS"

    wait_until(finished, TIMEOUT, "the tracked task to succeed", interval=0.01)

    # Every RETRY lasts its 0.5 s countdown, so polling sees each; a short STARTED may
    # be missed, but each attempt saw its own STARTED state.
    assert re.fullmatch(r"(PENDING )?(STARTED )?(RETRY (STARTED )?)+SUCCESS", " ".join(seen)), seen
    runs = attempts(broker, "s1")
    assert [run.retries for run in runs] == [0, 1, 2]
    assert [run.state_seen for run in runs] == ["STARTED"] * 3


def test_each_attempt_sees_the_state_left_by_the_previous_one(broker: Broker, worker):
    result = broker.app.send_task("retry_tasks.backoff", ("p1", 2))

    assert result.get(timeout=TIMEOUT) == "p1"
    assert [run.state_seen for run in attempts(broker, "p1")] == ["PENDING", "RETRY", "RETRY"]


def test_exhausted_autoretry_fails_with_the_original_exception(broker: Broker, worker):
    result = broker.app.send_task("retry_tasks.hopeless", ("h1",))

    with pytest.raises(ConnectionResetError, match=r"^h1: reset by peer on attempt 2$"):
        result.get(timeout=TIMEOUT)
    assert result.state == "FAILURE"
    assert "ConnectionResetError" in result.traceback
    assert [run.retries for run in attempts(broker, "h1")] == [0, 1, 2]  # max_retries=2


def test_max_retries_none_retries_until_the_task_succeeds(broker: Broker, worker):
    result = broker.app.send_task("retry_tasks.stubborn", ("f1", 5))

    assert result.get(timeout=TIMEOUT) == 5  # past the default max_retries of 3
    assert [run.retries for run in attempts(broker, "f1")] == [0, 1, 2, 3, 4, 5]


def test_explicit_retry_waits_its_countdown(broker: Broker, worker):
    started = time.time()
    result = broker.app.send_task("retry_tasks.explicit", ("e1", 2, 0.5))

    assert result.get(timeout=TIMEOUT) == "e1 after 2"
    runs = attempts(broker, "e1")
    assert [run.header for run in runs] == [0, 1, 2]
    assert [run.state_seen for run in runs] == ["PENDING", "RETRY", "RETRY"]
    for before, after in pairwise(runs):
        assert 0.5 - CLOCK_TOLERANCE <= after.started - before.started <= 0.5 + LATE_SLACK
    assert time.time() - started >= 1.0 - CLOCK_TOLERANCE


def test_retry_without_exc_past_max_retries_fails_with_max_retries_exceeded(broker: Broker, worker):
    result = broker.app.send_task("retry_tasks.give_up", ("g1",))

    with pytest.raises(MaxRetriesExceededError) as raised:
        result.get(timeout=TIMEOUT)
    message = str(raised.value)
    assert f"retry_tasks.give_up[{result.id}]" in message
    assert "max_retries=1" in message
    assert [run.retries for run in attempts(broker, "g1")] == [0, 1]
