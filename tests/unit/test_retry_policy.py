"""Retries: backoff maths, the autoretry policy, ``retry()`` limits, eager and in-process runs."""

from __future__ import annotations

import random
import time

import pytest

from kernel import hookimpl, states
from kernel.backends.document import decode_exception, encode_exception
from kernel.exceptions import Ignore, MaxRetriesExceededError, Reject, Retry
from kernel.retry_policy import RetryPolicy, backoff_delay
from kernel.task import Task

TIMEOUT = 10.0


# ----------------------------------------------------------------------- backoff maths


def test_backoff_without_jitter_doubles_the_factor_at_each_retry():
    delays = [backoff_delay(n, 0.5, 600, jitter=False) for n in range(5)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_backoff_is_capped_by_backoff_max():
    assert backoff_delay(10, 1, 600, jitter=False) == 600
    assert backoff_delay(3, 2, 5, jitter=False) == 5


def test_backoff_with_jitter_stays_between_zero_and_the_capped_delay():
    rng = random.Random(1234)
    for retries in range(12):
        bound = min(30, 0.2 * 2**retries)
        delays = [backoff_delay(retries, 0.2, 30, jitter=True, rng=rng) for _ in range(200)]
        assert all(0 <= delay <= bound for delay in delays)
        # full jitter: spread over the whole range, not bunched at the bound
        assert min(delays) < 0.25 * bound
        assert max(delays) > 0.75 * bound


def test_backoff_survives_retry_counts_too_large_for_a_float():
    assert backoff_delay(5000, 1, 600, jitter=False) == 600


def test_zero_backoff_max_means_no_delay():
    assert backoff_delay(4, 1, 0, jitter=True) == 0


# ----------------------------------------------------------------------- the policy


def test_task_options_default_to_no_autoretry(kernel_app):
    @kernel_app.task
    def plain():
        return 1

    assert plain.autoretry_for == ()
    assert plain.dont_autoretry_for == ()
    assert plain.retry_kwargs == {}
    assert plain.retry_backoff is False
    assert plain.retry_backoff_max == 600
    assert plain.retry_jitter is True
    assert plain.max_retries == 3


def test_task_decorator_sets_retry_options(kernel_app):
    @kernel_app.task(
        autoretry_for=[OSError],
        dont_autoretry_for=(FileNotFoundError,),
        retry_kwargs={"max_retries": 5},
        retry_backoff=2,
        retry_backoff_max=60,
        retry_jitter=False,
    )
    def fetch():
        return 1

    assert fetch.autoretry_for == (OSError,)  # a list is accepted and kept as a tuple
    assert fetch.dont_autoretry_for == (FileNotFoundError,)
    assert fetch.retry_kwargs == {"max_retries": 5}
    assert (fetch.retry_backoff, fetch.retry_backoff_max, fetch.retry_jitter) == (2, 60, False)


def test_retry_backoff_true_is_a_factor_of_one_second(kernel_app):
    @kernel_app.task(autoretry_for=(OSError,), retry_backoff=True, retry_jitter=False)
    def fetch():
        return 1

    policy = RetryPolicy.for_task(fetch)
    assert [policy.retry_options(n)["countdown"] for n in range(4)] == [1, 2, 4, 8]


def test_backoff_countdown_is_capped_and_jittered_within_bounds(kernel_app):
    @kernel_app.task(autoretry_for=(OSError,), retry_backoff=3, retry_backoff_max=20)
    def fetch():
        return 1

    policy = RetryPolicy.for_task(fetch)
    rng = random.Random(7)
    for retries in range(8):
        countdown = policy.retry_options(retries, rng)["countdown"]
        assert 0 <= countdown <= min(20, 3 * 2**retries)


def test_backoff_replaces_a_countdown_in_retry_kwargs_as_in_celery(kernel_app):
    @kernel_app.task(autoretry_for=(OSError,), retry_backoff=True, retry_kwargs={"countdown": 7})
    def fetch():
        return 1

    policy = RetryPolicy.for_task(fetch)
    assert 0 <= policy.retry_options(5)["countdown"] <= 32


def test_retry_kwargs_are_passed_on_beside_the_backoff_countdown(kernel_app):
    @kernel_app.task(
        autoretry_for=(OSError,),
        retry_backoff=0.5,
        retry_jitter=False,
        retry_kwargs={"max_retries": 5, "queue": "slow"},
    )
    def fetch():
        return 1

    options = RetryPolicy.for_task(fetch).retry_options(2)
    assert options == {"max_retries": 5, "queue": "slow", "countdown": 2.0}
    assert fetch.retry_kwargs == {"max_retries": 5, "queue": "slow"}  # not changed


def test_without_backoff_the_delay_is_left_to_retry(kernel_app):
    @kernel_app.task(autoretry_for=(OSError,), retry_kwargs={"max_retries": 1})
    def fetch():
        return 1

    assert RetryPolicy.for_task(fetch).retry_options(0) == {"max_retries": 1}


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (ConnectionError("down"), True),
        (ValueError("bad"), True),
        (FileNotFoundError("gone"), False),  # in dont_autoretry_for
        (Retry("again"), False),
        (Reject("bad input"), False),
        (Ignore(), False),
        (MaxRetriesExceededError("enough"), False),
    ],
)
def test_which_exceptions_autoretry(kernel_app, raised, expected):
    @kernel_app.task(autoretry_for=(Exception,), dont_autoretry_for=(FileNotFoundError,))
    def fetch():
        return 1

    assert RetryPolicy.for_task(fetch).should_retry(raised) is expected


# ----------------------------------------------------------------------- decoration time


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"autoretry_for": ConnectionError}, TypeError, r"autoretry_for must be a tuple"),
        ({"autoretry_for": ("ConnectionError",)}, TypeError, r"tuple of exception classes"),
        ({"autoretry_for": (KeyboardInterrupt,)}, TypeError, r"tuple of exception classes"),
        ({"autoretry_for": (Reject,)}, ValueError, r"lists Reject.*remove it"),
        ({"autoretry_for": (Retry,)}, ValueError, r"lists Retry.*never retried"),
        ({"dont_autoretry_for": KeyError}, TypeError, r"dont_autoretry_for=\(ConnectionError,\)"),
        ({"retry_backoff": "yes"}, TypeError, r"retry_backoff must be True, False or a number"),
        ({"retry_backoff": -1}, ValueError, r"retry_backoff must be a finite number.*>= 0"),
        ({"retry_backoff": float("inf")}, ValueError, r"retry_backoff must be a finite"),
        ({"retry_backoff_max": -5}, ValueError, r"retry_backoff_max must be.*>= 0"),
        ({"retry_backoff_max": None}, TypeError, r"retry_backoff_max must be a number"),
        ({"retry_jitter": "no"}, TypeError, r"retry_jitter must be True or False"),
        ({"retry_kwargs": [("max_retries", 1)]}, TypeError, r"retry_kwargs must be a dict"),
        ({"retry_kwargs": {"throw": False}}, TypeError, r"\['throw'\] that autoretry cannot"),
        ({"retry_kwargs": {"exc": None}}, TypeError, r"\['exc'\]"),
        ({"retry_kwargs": {"countdown": -1}}, ValueError, r"retry_kwargs\['countdown'\]"),
        ({"retry_kwargs": {"countdown": 1, "eta": 2}}, TypeError, r"both countdown and eta"),
        ({"retry_kwargs": {"max_retries": "5"}}, TypeError, r"must be an int or None"),
        ({"max_retries": -1}, ValueError, r"max_retries must be >= 0 or None"),
        ({"max_retries": 2.5}, TypeError, r"max_retries must be an int or None"),
        ({"default_retry_delay": "soon"}, TypeError, r"default_retry_delay must be a number"),
    ],
)
def test_bad_retry_option_is_refused_when_the_task_is_decorated(kernel_app, options, error, match):
    decorate = kernel_app.task(name="bad.options", **options)

    def function():
        return 1

    with pytest.raises(error, match=match) as raised:
        decorate(function)
    assert "task bad.options" in str(raised.value)
    assert "bad.options" not in kernel_app.tasks


def test_bad_retry_option_on_a_base_class_is_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"task Unreliable: retry_backoff must be True, False"):

        class Unreliable(Task):
            retry_backoff = "exponential"


def test_base_class_retry_options_are_inherited(kernel_app):
    class Patient(Task):
        autoretry_for = (ConnectionError,)
        retry_backoff = 5

    @kernel_app.task(base=Patient)
    def fetch():
        return 1

    assert fetch.autoretry_for == (ConnectionError,)
    assert fetch.retry_backoff == 5


# ----------------------------------------------------------------------- retry() limits


def test_retry_past_max_retries_without_exc_raises_max_retries_exceeded(kernel_eager_app):
    caught = []

    @kernel_eager_app.task(bind=True, max_retries=1)
    def fetch(self, url, timeout=3):
        try:
            raise ConnectionError(f"refused: {url}")
        except ConnectionError:
            try:
                raise self.retry(countdown=60)
            except MaxRetriesExceededError as error:
                caught.append(error)
                raise

    result = fetch.delay("http://example.invalid", timeout=5)

    assert result.state == states.FAILURE
    assert isinstance(result.result, MaxRetriesExceededError)
    [error] = caught
    assert isinstance(error.exc, ConnectionError)
    assert error.__cause__ is error.exc
    assert error.task_name == fetch.name
    assert error.task_id == result.id
    assert error.task_args == ("http://example.invalid",)
    assert error.task_kwargs == {"timeout": 5}
    assert (error.retries, error.max_retries) == (1, 1)
    message = str(error)
    assert f"{fetch.name}[{result.id}]" in message
    assert "max_retries=1" in message
    assert "pass exc= to retry()" in message


def test_max_retries_exceeded_outside_an_except_block_has_no_cause(kernel_eager_app):
    caught = []

    @kernel_eager_app.task(bind=True, max_retries=0)
    def poll(self):
        try:
            raise self.retry(countdown=60)
        except MaxRetriesExceededError as error:
            caught.append(error)
            raise

    assert poll.delay().state == states.FAILURE
    assert caught[0].exc is None
    assert caught[0].__cause__ is None


def test_retry_past_max_retries_with_exc_raises_that_exception(kernel_eager_app):
    @kernel_eager_app.task(bind=True, max_retries=2)
    def fetch(self):
        try:
            raise ConnectionError(f"refused on attempt {self.request.retries}")
        except ConnectionError as exc:
            raise self.retry(exc=exc, countdown=60) from exc

    result = fetch.delay()

    assert result.state == states.FAILURE
    assert type(result.result) is ConnectionError
    assert str(result.result) == "refused on attempt 2"


def test_max_retries_of_the_call_overrides_the_task_option(kernel_eager_app):
    attempts = []

    @kernel_eager_app.task(bind=True, max_retries=1)
    def fetch(self):
        attempts.append(self.request.retries)
        raise self.retry(countdown=60, max_retries=4)

    assert isinstance(fetch.delay().result, MaxRetriesExceededError)
    assert attempts == [0, 1, 2, 3, 4]


def test_max_retries_exceeded_error_is_rebuilt_from_a_stored_failure():
    error = MaxRetriesExceededError(task_name="t", task_id="1", retries=3, max_retries=3)
    rebuilt = decode_exception(encode_exception(error))
    assert type(rebuilt) is MaxRetriesExceededError
    assert str(rebuilt) == str(error)


def test_eager_retry_with_new_arguments_runs_again_with_them(kernel_eager_app):
    seen = []

    @kernel_eager_app.task(bind=True)
    def count_down(self, n):
        seen.append(n)
        if n:
            raise self.retry(args=(n - 1,), countdown=60)
        return "liftoff"

    assert count_down.delay(3).get() == "liftoff"
    assert seen == [3, 2, 1, 0]


# ----------------------------------------------------------------------- eager autoretry


def test_eager_autoretry_reaches_success_after_failures(kernel_eager_app):
    attempts = []

    @kernel_eager_app.task(bind=True, autoretry_for=(ConnectionError,), retry_backoff=True)
    def fetch(self):
        attempts.append(self.request.retries)
        if self.request.retries < 2:
            raise ConnectionError("down")
        return "fetched"

    started = time.monotonic()
    result = fetch.delay()

    assert result.get() == "fetched"
    assert attempts == [0, 1, 2]
    assert time.monotonic() - started < 5  # eager retries do not wait for countdowns


def test_eager_autoretry_exhausted_fails_with_the_original_exception(kernel_eager_app):
    attempts = []

    @kernel_eager_app.task(
        bind=True, autoretry_for=(ConnectionError,), retry_kwargs={"max_retries": 2}
    )
    def fetch(self):
        attempts.append(self.request.retries)
        raise ConnectionResetError(f"reset on attempt {self.request.retries}")

    result = fetch.delay()

    assert attempts == [0, 1, 2]
    assert result.state == states.FAILURE
    with pytest.raises(ConnectionResetError, match="reset on attempt 2"):
        result.get()
    assert "ConnectionResetError" in result.traceback


def test_autoretry_with_max_retries_none_retries_until_success(kernel_eager_app):
    attempts = []

    @kernel_eager_app.task(
        bind=True, autoretry_for=(ConnectionError,), max_retries=None, retry_kwargs={}
    )
    def fetch(self):
        attempts.append(self.request.retries)
        if self.request.retries < 10:
            raise ConnectionError("down")
        return "up"

    assert fetch.delay().get() == "up"
    assert attempts == list(range(11))


def test_dont_autoretry_for_fails_at_once(kernel_eager_app):
    attempts = []

    @kernel_eager_app.task(
        bind=True, autoretry_for=(OSError,), dont_autoretry_for=(FileNotFoundError,)
    )
    def read(self):
        attempts.append(self.request.retries)
        raise FileNotFoundError("no such file: data.csv")

    result = read.delay()

    assert attempts == [0]
    with pytest.raises(FileNotFoundError, match="data.csv"):
        result.get()


def test_exception_not_in_autoretry_for_fails_at_once(kernel_eager_app):
    attempts = []

    @kernel_eager_app.task(bind=True, autoretry_for=(ConnectionError,))
    def parse(self):
        attempts.append(self.request.retries)
        raise ValueError("not a number: 'x'")

    assert parse.delay().state == states.FAILURE
    assert attempts == [0]


@pytest.mark.parametrize("raised", [Reject("bad input", requeue=False), Ignore()])
def test_reject_and_ignore_are_never_autoretried(kernel_eager_app, raised):
    attempts = []

    @kernel_eager_app.task(bind=True, autoretry_for=(Exception,), max_retries=None)
    def picky(self):
        attempts.append(self.request.retries)
        raise raised

    picky.delay()

    assert attempts == [0]


def test_explicit_retry_inside_an_autoretry_task_is_not_retried_twice(kernel_eager_app):
    attempts = []

    @kernel_eager_app.task(bind=True, autoretry_for=(Exception,), max_retries=1)
    def poll(self):
        attempts.append(self.request.retries)
        raise self.retry(countdown=60)

    result = poll.delay()

    assert attempts == [0, 1]  # MaxRetriesExceededError itself is not autoretried
    assert isinstance(result.result, MaxRetriesExceededError)


def test_calling_an_autoretry_task_directly_does_not_retry(kernel_app):
    @kernel_app.task(autoretry_for=(ConnectionError,))
    def fetch():
        raise ConnectionError("down")

    with pytest.raises(ConnectionError, match="down"):
        fetch()


# ----------------------------------------------------------------------- in a worker


def test_autoretry_in_a_worker_stores_retry_then_success(kernel_app, kernel_worker):
    seen = []

    @kernel_app.task(
        bind=True,
        autoretry_for=(ConnectionError,),
        retry_backoff=0.01,
        retry_jitter=False,
    )
    def fetch(self):
        state = self.AsyncResult(self.request.id).state
        seen.append((self.request.retries, self.request.headers.get("retries"), state))
        if self.request.retries < 2:
            raise ConnectionError("down")
        return "fetched"

    result = fetch.delay()

    assert result.get(timeout=TIMEOUT) == "fetched"
    assert seen == [(0, 0, states.PENDING), (1, 1, states.RETRY), (2, 2, states.RETRY)]
    assert result.state == states.SUCCESS


def test_autoretry_in_a_worker_exhausted_stores_the_original_exception(kernel_app, kernel_worker):
    attempts = []

    @kernel_app.task(
        bind=True, autoretry_for=(ConnectionError,), max_retries=1, retry_kwargs={"countdown": 0}
    )
    def fetch(self):
        attempts.append(self.request.retries)
        raise ConnectionRefusedError("port 5432 refused")

    result = fetch.delay()

    with pytest.raises(ConnectionRefusedError, match="port 5432 refused"):
        result.get(timeout=TIMEOUT)
    assert attempts == [0, 1]
    assert result.state == states.FAILURE


def test_execute_wrappers_see_the_retry_of_an_autoretry(kernel_app, kernel_worker):
    outcomes = []

    class Watch:
        @hookimpl(wrapper=True)
        def kernel_task_execute(self, request):
            try:
                return (yield)
            except BaseException as exc:
                outcomes.append(type(exc).__name__)
                raise

    name = f"watch-{id(kernel_app)}"
    kernel_app.plugins.register(Watch(), name)

    @kernel_app.task(bind=True, autoretry_for=(ConnectionError,), retry_kwargs={"countdown": 0})
    def fetch(self):
        if not self.request.retries:
            raise ConnectionError("down")
        return "ok"

    try:
        assert fetch.delay().get(timeout=TIMEOUT) == "ok"
    finally:
        kernel_app.plugins.pm.unregister(name=name)
    assert outcomes == ["Retry"]
