"""RevokedTasks: the worker's bounded, expiring set of revoked ids and its state file."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest

from kernel.config import Settings
from kernel.exceptions import ConfigurationError
from kernel.worker.state import RevokedTasks


class Clock:
    """A settable wall clock (epoch seconds)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_added_ids_are_members_in_revoke_order():
    revoked = RevokedTasks()
    assert revoked.add("a") == ["a"]
    assert revoked.add(["b", "c", "b"]) == ["b", "c"]
    assert "a" in revoked and "c" in revoked
    assert "z" not in revoked
    assert revoked.ids() == ["a", "b", "c"]
    assert len(revoked) == 3


def test_adding_past_max_size_drops_the_oldest_ids():
    revoked = RevokedTasks(max_size=3)
    revoked.add(["a", "b", "c"])
    revoked.add("a")  # revoked again: now the newest
    revoked.add("d")
    assert revoked.ids() == ["c", "a", "d"]
    assert "b" not in revoked


def test_ids_are_forgotten_once_they_expire():
    clock = Clock()
    revoked = RevokedTasks(expires=60, clock=clock)
    revoked.add("old")
    clock.now += 30
    revoked.add("new")
    clock.now += 30
    assert "old" not in revoked
    assert "new" in revoked
    assert revoked.ids() == ["new"]
    clock.now += 30
    assert len(revoked) == 0


def test_revoking_again_restarts_the_expiry():
    clock = Clock()
    revoked = RevokedTasks(expires=60, clock=clock)
    revoked.add("a")
    clock.now += 50
    revoked.add("a")
    clock.now += 50
    assert "a" in revoked


def test_expires_none_keeps_ids_until_the_size_bound():
    clock = Clock()
    revoked = RevokedTasks(expires=None, clock=clock)
    revoked.add("a")
    clock.now += 10 * 365 * 86400
    assert "a" in revoked


def test_a_task_id_must_be_a_non_empty_string():
    with pytest.raises(TypeError, match="non-empty string, got 5"):
        RevokedTasks().add([5])


def test_revoked_ids_survive_a_restart_with_a_state_file(tmp_path):
    path = tmp_path / "worker.state"
    first = RevokedTasks(path=path)
    first.add(["a", "b"])
    first.add("c")
    # No close(): a killed worker loses nothing, every add was written.
    second = RevokedTasks(path=path)
    assert second.ids() == ["a", "b", "c"]
    second.close()
    first.close()


def test_expired_ids_are_dropped_from_the_state_file_on_load(tmp_path):
    path = tmp_path / "worker.state"
    clock = Clock()
    first = RevokedTasks(expires=60, path=path, clock=clock)
    first.add("old")
    clock.now += 45
    first.add("new")
    first.close()
    clock.now += 30
    second = RevokedTasks(expires=60, path=path, clock=clock)
    assert second.ids() == ["new"]
    second.close()
    rows = sqlite3.connect(path).execute("SELECT task_id FROM kernel_revoked").fetchall()
    assert rows == [("new",)]


def test_the_size_bound_applies_to_the_state_file_too(tmp_path):
    path = tmp_path / "worker.state"
    first = RevokedTasks(max_size=2, path=path)
    first.add(["a", "b", "c"])
    first.close()
    assert RevokedTasks(max_size=2, path=path).ids() == ["b", "c"]
    assert RevokedTasks(max_size=1, path=path).ids() == ["c"]


def test_a_state_file_in_a_missing_directory_is_a_clear_error(tmp_path):
    path = tmp_path / "missing" / "worker.state"
    with pytest.raises(ConfigurationError, match="cannot open the worker state file") as info:
        RevokedTasks(path=path)
    assert str(path) in str(info.value)
    assert "--statedb" in str(info.value)


def test_a_state_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "celery.state"
    path.write_bytes(b"this is not sqlite " * 100)
    with pytest.raises(ConfigurationError, match="not a kernel state database") as info:
        RevokedTasks(path=path)
    assert str(path) in str(info.value)


def test_a_directory_as_state_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot open the worker state file"):
        RevokedTasks(path=tmp_path)


def test_settings_give_the_bounds_and_the_state_file(tmp_path):
    conf = Settings()
    assert (conf.worker_revoked_max, conf.worker_revoked_expires) == (50000, 10800.0)
    assert conf.worker_state_db is None
    conf.update(
        worker_revoked_max=7,
        worker_revoked_expires=timedelta(minutes=1),
        worker_state_db=str(tmp_path / "from-settings.state"),
    )
    revoked = RevokedTasks.from_conf(conf)
    assert (revoked.max_size, revoked.expires) == (7, 60.0)
    assert revoked.path == str(tmp_path / "from-settings.state")
    revoked.close()
    override = RevokedTasks.from_conf(conf, path=tmp_path / "flag.state")
    assert override.path == str(tmp_path / "flag.state")
    override.close()


def test_bad_bounds_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="worker_revoked_max must be at least 1"):
        RevokedTasks(max_size=0)
    with pytest.raises(ConfigurationError, match="worker_revoked_expires must be a positive"):
        RevokedTasks(expires=0)
