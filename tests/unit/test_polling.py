"""Pauses between polls: short after activity, doubling while nothing comes."""

from __future__ import annotations

from kernel.polling import FIRST_PAUSE, Backoff


def test_pauses_start_at_a_millisecond_double_and_stop_at_the_ceiling():
    pauses = Backoff(0.01)
    assert [pauses.next() for _ in range(6)] == [FIRST_PAUSE, 0.002, 0.004, 0.008, 0.01, 0.01]


def test_reset_starts_again_from_the_first_pause():
    pauses = Backoff(0.05)
    for _ in range(10):
        pauses.next()
    pauses.reset()
    assert pauses.next() == FIRST_PAUSE


def test_a_ceiling_below_the_first_pause_is_the_only_pause():
    assert [Backoff(0.0005).next() for _ in range(2)] == [0.0005, 0.0005]
    zero = Backoff(0)
    assert [zero.next() for _ in range(3)] == [0, 0, 0]


def test_a_fixed_interval_stays_fixed():
    pauses = Backoff(0.2, first=0.2)
    assert [pauses.next() for _ in range(3)] == [0.2, 0.2, 0.2]
