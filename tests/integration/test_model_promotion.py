"""Promotion and hot reload on the real stack: PostgreSQL (history + registry), Redis and the prediction
service as a process polling the registry every second.

While a load loop of concurrent PredictEta calls runs, a better model is trained and promoted: the
replies switch from the old version to the new one, never back, with zero failed calls and no restart.
A worse model is registered but not promoted (the service keeps answering with the promoted one) until it
is forced."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from devstack.stack import LocalStack
from eta.v1 import eta_pb2, eta_pb2_grpc, events_pb2
from eta_common.db.migrate import apply_migrations
from simulator.city import CityConfig, build_city
from simulator.seed import seed_history
from tests.integration.conftest import own_stack, poll_until
from trainer.run import train_and_register

pytestmark = pytest.mark.integration

END_MS = 1_741_564_800_000  # 2025-03-10 00:00 UTC
DAYS = 4.0


@dataclass
class Service:
    stack: LocalStack
    pid: int


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {
        "PREDICTION_MODEL_REFRESH_SECONDS": "1",
        "LOG_FORMAT": "json",
        "OTEL_TRACES_SAMPLER": "always_off",
        "SHUTDOWN_GRACE_SECONDS": "2",
    }

    def prepare(stack: LocalStack) -> None:
        asyncio.run(apply_migrations(stack.database_url))
        asyncio.run(seed_history(stack.database_url, CityConfig(), days=DAYS, end_ms=END_MS, progress=False))

    with own_stack(
        tmp_path_factory, "promotion", services=("prediction",), extra_env=env, prepare=prepare
    ) as stack:
        child = next(p for p in stack.processes if p.name == "prediction")
        yield Service(stack, child.proc.pid)


def _requests() -> Iterator[eta_pb2.PredictEtaRequest]:
    city = build_city(CityConfig())
    n = itertools.count()
    for r, c in zip(itertools.cycle(city.restaurants), itertools.cycle(city.customers), strict=False):
        yield eta_pb2.PredictEtaRequest(
            restaurant_id=r.id,
            restaurant_location=events_pb2.GeoPoint(lat=r.location.lat, lng=r.location.lng),
            customer_location=events_pb2.GeoPoint(lat=c.location.lat, lng=c.location.lng),
            request_id=f"promo-{next(n)}",
        )


@dataclass
class LoadLoop:
    """Concurrent PredictEta callers recording every answer's model version (and every failure)."""

    stub: eta_pb2_grpc.EtaServiceStub
    workers: int = 6
    replies: list[tuple[float, int, str]] = field(default_factory=list)  # (time, worker, version)
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _worker(self, worker: int) -> None:
        requests = _requests()
        while not self.stop.is_set():
            try:
                reply = await self.stub.PredictEta(next(requests), timeout=5)
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            if not (reply.eta_low_minutes <= reply.eta_minutes <= reply.eta_high_minutes):
                self.failures.append(f"unordered range {reply}")
            self.replies.append((time.monotonic(), worker, reply.model_version))

    async def run(self) -> None:
        await asyncio.gather(*(self._worker(w) for w in range(self.workers)))


async def _version(stub: eta_pb2_grpc.EtaServiceStub) -> str:
    reply = await stub.PredictEta(next(_requests()), timeout=5)
    return str(reply.model_version)


async def test_promoted_model_is_picked_up_under_load_without_failures(service: Service) -> None:
    url = service.stack.database_url
    # a deliberately weak first model (3 rounds): below the promotion gate, so it only serves when forced
    first = await train_and_register(
        url, history_days=DAYS, as_of_ms=END_MS, rounds=3, folds=0, version="v-old", force_promote=True
    )
    assert first["promoted"]
    async with grpc.aio.insecure_channel(service.stack.target("prediction")) as channel:
        stub = eta_pb2_grpc.EtaServiceStub(channel)
        await poll_until(lambda: _version(stub), lambda v: v == "v-old", timeout=20)
        loop = LoadLoop(stub)
        task = asyncio.create_task(loop.run())
        await asyncio.sleep(1.0)  # load is running on the old model
        better = await train_and_register(url, history_days=DAYS, as_of_ms=END_MS, version="v-new")
        assert better["promoted"]
        assert better["promotion_reason"].startswith("better")
        promoted_at = time.monotonic()

        def switched(_: object) -> bool:
            recent = [v for t, _, v in loop.replies if t > time.monotonic() - 0.5]
            return bool(recent) and all(v == "v-new" for v in recent)

        await poll_until(lambda: None, switched, timeout=20)
        await asyncio.sleep(1.0)
        loop.stop.set()
        await task
    assert loop.failures == []
    versions = [v for _, _, v in loop.replies]
    assert len(versions) > 200
    assert set(versions) == {"v-old", "v-new"}
    # per caller the version switches once and never back
    for worker in range(loop.workers):
        seq = [v for _, w, v in loop.replies if w == worker]
        first_new = seq.index("v-new")
        assert all(v == "v-old" for v in seq[:first_new])
        assert all(v == "v-new" for v in seq[first_new:])
    switch = min(t for t, _, v in loop.replies if v == "v-new")
    assert switch - promoted_at < 5.0  # refresh every second (+ load time)
    # the same process served throughout (no restart)
    (child,) = [p for p in service.stack.processes if p.name == "prediction"]
    assert child.alive()
    assert child.proc.pid == service.pid


async def test_worse_model_is_not_served_until_forced(service: Service) -> None:
    url = service.stack.database_url
    async with grpc.aio.insecure_channel(service.stack.target("prediction")) as channel:
        stub = eta_pb2_grpc.EtaServiceStub(channel)
        current = await _version(stub)
        assert current == "v-new"
        worse = await train_and_register(
            url, history_days=DAYS, as_of_ms=END_MS, rounds=2, folds=0, version="v-worse"
        )
        assert not worse["promoted"]
        assert worse["metrics"]["model"]["mae"] > worse["metrics"]["incumbent"]["mae"]
        deadline = time.monotonic() + 3.0  # three refresh periods
        while time.monotonic() < deadline:
            assert await _version(stub) == "v-new"
            await asyncio.sleep(0.2)
        forced = await train_and_register(
            url, history_days=DAYS, as_of_ms=END_MS, rounds=2, folds=0, version="v-forced", force_promote=True
        )
        assert forced["promoted"]
        await poll_until(lambda: _version(stub), lambda v: v == "v-forced", timeout=20)
