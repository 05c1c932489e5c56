"""Fixtures of the gevent pool's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gevent_cluster import GeventCluster


@pytest.fixture
def sqlite_cluster(tmp_path: Path) -> Iterator[GeventCluster]:
    url = f"sqlite:///{tmp_path}/kernel.sqlite3"
    cluster = GeventCluster(tmp_path, url, url)
    yield cluster
    cluster.close()
