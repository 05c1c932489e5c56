"""Fixtures shared by the unit tests."""

from __future__ import annotations

import threading
import time

import pytest


@pytest.fixture
def pauses(monkeypatch):
    """The pauses (``time.sleep``) this thread sleeps, recorded, and slept."""
    recorded, real_sleep, me = [], time.sleep, threading.get_ident()

    def sleep(seconds):
        if threading.get_ident() == me:
            recorded.append(round(seconds, 6))
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    return recorded
