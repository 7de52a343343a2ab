"""Feature reads degrade instead of failing: Redis errors and slowness give the documented defaults with
the reason, and a circuit stops hammering a Redis that is down."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any, cast

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from eta.v1 import eta_pb2
from eta_common import features as F
from eta_common.feature_block import FeatureBlock
from eta_common.online_store import FeatureReading, OnlineStore, RestaurantFeatures
from prediction.config import ONLINE_FEATURES
from prediction.reader import CircuitBreaker, FeatureReader

Degradation = eta_pb2.Degradation
WHERE = (52.52, 13.40)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    def __init__(self) -> None:
        self.calls = 0
        self.fail: Exception | None = None
        self.delay = 0.0

    async def read_block(
        self,
        requests: Sequence[tuple[str, tuple[float, float]]],
        *,
        now_ms: int,
        customer_id: str = "",
        market: str = "",
    ) -> FeatureBlock:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return FeatureBlock.from_features(
            [
                RestaurantFeatures(
                    rid,
                    now_ms,
                    {n: FeatureReading(n, 1.0, True, now_ms - 1000) for n in ONLINE_FEATURES},
                    loc,
                )
                for rid, loc in requests
            ]
        )


def _reader(store: FakeStore, clock: Clock, **kwargs: Any) -> FeatureReader:
    breaker = CircuitBreaker(failures_to_open=2, backoff_seconds=5.0, clock=clock)
    return FeatureReader(cast(OnlineStore, store), timeout_seconds=0.05, breaker=breaker, **kwargs)


def _assert_defaults(block: FeatureBlock) -> None:
    for features in block.restaurants():
        assert set(features.readings) == set(ONLINE_FEATURES)
        for name, reading in features.readings.items():
            assert not reading.present
            default = F.DEFAULTS[name]
            assert reading.value == default or (math.isnan(default) and math.isnan(reading.value))


async def test_a_healthy_store_is_read_once_for_the_whole_batch() -> None:
    store = FakeStore()
    found, degradation = await _reader(store, Clock()).read(
        [("a", WHERE), ("b", WHERE)], now_ms=10_000, budget_seconds=None
    )
    assert degradation is None
    assert found.restaurant_ids == ["a", "b"]
    assert store.calls == 1


async def test_a_failing_store_gives_defaults_flagged_unavailable() -> None:
    store = FakeStore()
    store.fail = RedisConnectionError("connection refused")
    found, degradation = await _reader(store, Clock()).read([("a", WHERE)], now_ms=1, budget_seconds=None)
    assert degradation == Degradation.ONLINE_STORE_UNAVAILABLE
    _assert_defaults(found)


async def test_a_slow_store_is_abandoned_within_the_budget() -> None:
    store = FakeStore()
    store.delay = 5.0
    timeouts: list[float] = []
    reader = _reader(store, Clock(), on_timeout=timeouts.append)
    started = time.monotonic()
    found, degradation = await reader.read([("a", WHERE)], now_ms=1, budget_seconds=None)
    assert time.monotonic() - started < 2.0  # did not wait for the store's 5 s
    assert degradation == Degradation.ONLINE_STORE_TIMEOUT
    assert timeouts == [0.05]  # the client may drop a connection stalled for the Redis timeout
    _assert_defaults(found)


async def test_a_short_client_deadline_bounds_the_read_without_blaming_redis() -> None:
    store = FakeStore()
    store.delay = 5.0
    reader = _reader(store, Clock())  # opens after 2 failures
    for _ in range(4):
        found, degradation = await reader.read([("a", WHERE)], now_ms=1, budget_seconds=0.01)
        assert degradation == Degradation.ONLINE_STORE_TIMEOUT
        _assert_defaults(found)
    assert store.calls == 4  # still tried every time: the circuit did not open
    await reader.read([("a", WHERE)], now_ms=1, budget_seconds=None)  # a full Redis timeout
    await reader.read([("a", WHERE)], now_ms=1, budget_seconds=None)
    _, degradation = await reader.read([("a", WHERE)], now_ms=1, budget_seconds=None)
    assert (store.calls, degradation) == (6, Degradation.ONLINE_STORE_UNAVAILABLE)  # now it is open


async def test_repeated_failures_open_the_circuit_then_one_probe_closes_it() -> None:
    clock, store = Clock(), FakeStore()
    reader = _reader(store, clock)
    store.fail = OSError("unreachable")
    for _ in range(2):
        await reader.read([("a", WHERE)], now_ms=1, budget_seconds=None)
    assert store.calls == 2
    # open: answers from defaults without touching the store
    _, degradation = await reader.read([("a", WHERE)], now_ms=1, budget_seconds=None)
    assert (store.calls, degradation) == (2, Degradation.ONLINE_STORE_UNAVAILABLE)
    clock.now += 5.0  # backoff over: the next call probes
    store.fail = None
    found, degradation = await reader.read([("a", WHERE)], now_ms=1, budget_seconds=None)
    assert (store.calls, degradation) == (3, None)
    assert found.restaurant(0).readings[ONLINE_FEATURES[0]].present
    await reader.read([("a", WHERE)], now_ms=1, budget_seconds=None)
    assert store.calls == 4  # closed again


def test_a_failed_probe_reopens_and_a_cancelled_one_frees_the_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=1, backoff_seconds=5.0, clock=clock)
    breaker.failure()
    assert breaker.is_open
    assert not breaker.allow()
    clock.now += 5.0
    assert breaker.allow()
    assert not breaker.allow()  # only one probe at a time
    breaker.abandon()
    assert breaker.allow()
    breaker.failure()
    assert not breaker.allow()  # reopened for another backoff
    clock.now += 5.0
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open
    assert breaker.allow()
    assert breaker.allow()


async def test_a_cancelled_read_does_not_count_as_a_failure() -> None:
    store = FakeStore()
    store.delay = 5.0
    reader = FeatureReader(
        cast(OnlineStore, store),
        timeout_seconds=10.0,
        breaker=CircuitBreaker(failures_to_open=1, backoff_seconds=5.0, clock=Clock()),
    )
    task = asyncio.ensure_future(reader.read([("a", WHERE)], now_ms=1, budget_seconds=None))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    store.delay = 0.0
    _, degradation = await reader.read([("a", WHERE)], now_ms=1, budget_seconds=None)
    assert degradation is None


async def test_an_unexpected_store_failure_still_gives_an_answer() -> None:
    store = FakeStore()
    store.fail = KeyError("read_restaurant")  # a bug in the read
    found, degradation = await _reader(store, Clock()).read([("a", WHERE)], now_ms=1, budget_seconds=None)
    assert degradation == Degradation.ONLINE_STORE_UNAVAILABLE
    _assert_defaults(found)


async def test_reads_run_concurrently_from_the_first() -> None:
    """Reads call no script (nothing to load first), so nothing serialises them."""

    class Counting(FakeStore):
        def __init__(self) -> None:
            super().__init__()
            self.active = 0
            self.most = 0

        async def read_block(
            self,
            requests: Sequence[tuple[str, tuple[float, float]]],
            *,
            now_ms: int,
            customer_id: str = "",
            market: str = "",
        ) -> FeatureBlock:
            self.active += 1
            self.most = max(self.most, self.active)
            await asyncio.sleep(0.01)
            self.active -= 1
            return await super().read_block(requests, now_ms=now_ms)

    store = Counting()
    reader = FeatureReader(
        cast(OnlineStore, store),
        timeout_seconds=1.0,
        breaker=CircuitBreaker(failures_to_open=3, backoff_seconds=1),
    )
    found = await asyncio.gather(
        *(reader.read([("a", WHERE)], now_ms=1, budget_seconds=None) for _ in range(5))
    )
    assert store.most == 5
    assert all(degradation is None for _features, degradation in found)


class MemoryStore(FakeStore):
    """A store with a no-I/O read (as the client-side cache gives): a hit, a miss (None) or a failure."""

    def __init__(self, memory: str) -> None:
        super().__init__()
        self.memory = memory
        self.memory_calls = 0

    def read_from_memory(
        self,
        requests: Sequence[tuple[str, tuple[float, float]]],
        *,
        now_ms: int,
        customer_id: str = "",
        market: str = "",
    ) -> FeatureBlock | None:
        self.memory_calls += 1
        if self.memory == "error":
            raise ValueError("a bug in the cached read")
        if self.memory == "miss":
            return None
        block = FeatureBlock.from_features(
            [
                RestaurantFeatures(
                    rid, now_ms, {n: FeatureReading(n, 7.0, True, now_ms) for n in ONLINE_FEATURES}, loc
                )
                for rid, loc in requests
            ]
        )
        block.from_rows = len(requests)
        return block


@pytest.mark.parametrize(
    ("memory", "awaited_reads", "value"), [("hit", 0, 7.0), ("miss", 1, 1.0), ("error", 1, 1.0)]
)
async def test_a_read_answered_from_memory_skips_the_round_trip_path(
    memory: str, awaited_reads: int, value: float
) -> None:
    store = MemoryStore(memory)
    found, degradation = await _reader(store, Clock()).read([("a", WHERE)], now_ms=5, budget_seconds=None)
    assert (store.memory_calls, store.calls) == (1, awaited_reads)
    assert degradation is None
    assert found.restaurant(0).readings[ONLINE_FEATURES[0]].value == value


async def test_an_open_circuit_is_not_bypassed_by_the_memory_read() -> None:
    store, clock = MemoryStore("miss"), Clock()
    reader = _reader(store, clock)
    store.fail = ConnectionError("redis down")
    for _ in range(2):  # failures_to_open=2
        await reader.read([("a", WHERE)], now_ms=5, budget_seconds=None)
    store.memory = "hit"
    calls = store.memory_calls
    _, degradation = await reader.read([("a", WHERE)], now_ms=5, budget_seconds=None)
    assert degradation == Degradation.ONLINE_STORE_UNAVAILABLE  # defaults while open, as before
    assert store.memory_calls == calls


async def test_reads_answered_from_memory_keep_sporadic_failures_from_opening_the_circuit() -> None:
    store = MemoryStore("miss")
    reader = _reader(store, Clock())  # failures_to_open=2
    store.fail = ConnectionError("blip")
    await reader.read([("a", WHERE)], now_ms=5, budget_seconds=None)  # one failure
    store.memory, store.fail = "hit", None
    await reader.read([("a", WHERE)], now_ms=5, budget_seconds=None)  # a hit: Redis tracked, alive
    store.memory, store.fail = "miss", ConnectionError("blip")
    await reader.read([("a", WHERE)], now_ms=5, budget_seconds=None)  # another failure, not consecutive
    store.fail = None
    _, degradation = await reader.read([("a", WHERE)], now_ms=5, budget_seconds=None)
    assert degradation is None  # the circuit stayed closed
