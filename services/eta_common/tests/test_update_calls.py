"""The update path's script calls, sent two ways — packed and read by the store itself on a single Redis
(``Pipelines._run_calls``), or through a redis-py pipeline as on a cluster — leave the same online state
and report the same changes; a lost script cache is reloaded on the way."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from devstack.infra import ChildProcess
from devstack.synthetic import City, make_city, random_stream
from eta_common.online import writer
from eta_common.online_store import DriverUpdate, OnlineStore, RestaurantUpdate, update_from_event

Update = RestaurantUpdate | DriverUpdate

T0 = 1_800_000_000_000


@pytest.fixture
async def stores(redis_server: ChildProcess) -> AsyncIterator[tuple[OnlineStore, OnlineStore]]:
    direct = OnlineStore.from_url(redis_server.url.rsplit("/", 1)[0] + "/1", city="parity")
    piped = OnlineStore.from_url(redis_server.url.rsplit("/", 1)[0] + "/2", city="parity")
    assert direct._direct  # hiredis is installed: the store packs and sends the calls itself
    piped._direct = False
    await direct.client.flushdb()
    await piped.client.flushdb()
    yield direct, piped
    await direct.close()
    await piped.close()


async def _dump(client: aioredis.Redis) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    async for key in client.scan_iter(count=1000):
        kind = await client.type(key)
        if kind == b"hash":
            out[key] = await client.hgetall(key)
        elif kind == b"zset":
            out[key] = await client.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            out[key] = await client.smembers(key)
        else:
            out[key] = (kind, await client.dump(key))
    return out


def _city_updates(
    seed: int, prefix: str, *, n_restaurants: int, n_drivers: int, orders_per_minute: int
) -> tuple[City, list[Update]]:
    """A simulated city's half hour (10 % duplicates) as online updates, in arrival order."""
    rng = random.Random(seed)
    city = make_city(rng, prefix, (52.52, 13.40), n_restaurants=n_restaurants, n_drivers=n_drivers)
    stream = random_stream(
        rng,
        city,
        start_ms=T0,
        minutes=30,
        orders_per_minute=orders_per_minute,
        late_fraction=0.0,
        duplicate_fraction=0.1,
    )
    return city, [u for u in (update_from_event(s.event) for s in stream) if u is not None]


async def test_direct_calls_leave_the_state_a_pipeline_leaves(
    stores: tuple[OnlineStore, OnlineStore],
) -> None:
    direct, piped = stores
    _, updates = _city_updates(5, "calls", n_restaurants=12, n_drivers=30, orders_per_minute=20)
    assert len(updates) > 500
    for start in range(0, len(updates), 97):
        batch = updates[start : start + 97]
        now = batch[-1].event_ms + 50
        assert await direct.apply(batch, now_ms=now) == await piped.apply(batch, now_ms=now)
    state = await _dump(direct.client)
    assert state == await _dump(piped.client)
    assert any(key.endswith(b":row") for key in state)  # the ready rows were written too


async def test_a_lost_script_cache_is_reloaded(stores: tuple[OnlineStore, OnlineStore]) -> None:
    direct, piped = stores
    stream = random_stream(
        random.Random(6),
        make_city(random.Random(6), "flush", (48.85, 2.35), n_restaurants=3, n_drivers=5),
        start_ms=T0,
        minutes=5,
        orders_per_minute=10,
        late_fraction=0.0,
        duplicate_fraction=0.0,
    )
    updates = [u for u in (update_from_event(s.event) for s in stream) if u is not None]
    half = len(updates) // 2
    for store in (direct, piped):
        await store.apply(updates[:half], now_ms=T0 + 5 * 60_000)
    await direct.client.script_flush()
    for store in (direct, piped):
        await store.apply(updates[half:], now_ms=T0 + 6 * 60_000)
    assert await _dump(direct.client) == await _dump(piped.client)


async def test_a_redis_back_empty_after_refused_connections_gets_its_scripts_reloaded(
    stores: tuple[OnlineStore, OnlineStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis restarting empty refuses connections, then answers NOSCRIPT: the reload still happens
    (a shared attempt count once raised NoScriptError there and ended the aggregator's consume loop)."""
    direct, _ = stores
    _, updates = _city_updates(7, "restart", n_restaurants=3, n_drivers=5, orders_per_minute=10)
    await direct.apply(updates[:10], now_ms=T0 + 60_000)
    await direct.client.script_flush()  # came back empty
    send = direct._send_direct
    refused = 2

    async def flaky(packed: list[bytes]) -> list[Any]:
        nonlocal refused
        if refused:
            refused -= 1
            raise RedisConnectionError("Error 111 connecting. Connection refused.")
        return await send(packed)

    monkeypatch.setattr(direct, "_send_direct", flaky)
    assert len(await direct.apply(updates[10:20], now_ms=T0 + 120_000)) == 10
    assert refused == 0


_BUSY_300_MS = """
local start = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - start[1]) * 1000000 + (now[2] - start[2]) > 300000 then return 1 end
end
"""


async def test_replies_that_do_not_come_time_out_and_the_connection_is_dropped(
    redis_server: ChildProcess,
) -> None:
    store = OnlineStore(aioredis.Redis.from_url(redis_server.url, socket_timeout=0.05), city="slow")
    try:
        with pytest.raises(RedisTimeoutError):
            await store._run_calls(lambda _: [("EVAL", _BUSY_300_MS, 0)])
        await asyncio.sleep(0.4)  # the script ends
        # the late reply went with the dropped connection: the next calls read their own replies
        assert await store._run_calls(lambda _: [("EVAL", "return 7", 0), ("EVAL", "return 8", 0)]) == [7, 8]
    finally:
        await store.close()


async def test_many_restaurants_per_script_call_leave_the_state_one_call_each_leaves(
    stores: tuple[OnlineStore, OnlineStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``apply_restaurant`` serves up to ``RESTAURANTS_PER_CALL`` restaurants per call (updates and the
    row timer's re-materialisations): the same state, flags and due times as one call per restaurant."""
    chunked, single = stores
    city, updates = _city_updates(8, "chunks", n_restaurants=90, n_drivers=60, orders_per_minute=60)
    batch_size = 400
    restaurants_per_batch = [
        len({getattr(u, "restaurant_id", None) for u in updates[i : i + batch_size]} - {None})
        for i in range(0, len(updates), batch_size)
    ]
    assert max(restaurants_per_batch) > 2 * writer.RESTAURANTS_PER_CALL  # several calls per batch
    now = T0
    for start in range(0, len(updates), batch_size):
        batch = updates[start : start + batch_size]
        now = batch[-1].event_ms + 50
        flags = await chunked.apply(batch, now_ms=now)
        with monkeypatch.context() as patch:
            patch.setattr(writer, "RESTAURANTS_PER_CALL", 1)
            assert flags == await single.apply(batch, now_ms=now)
    ids = sorted(city.restaurants)
    later = now + 7 * 60_000
    due = await chunked.materialize(ids, now_ms=later, lookahead_ms=30_000)
    with monkeypatch.context() as patch:
        patch.setattr(writer, "RESTAURANTS_PER_CALL", 1)
        assert due == await single.materialize(ids, now_ms=later, lookahead_ms=30_000)
    state = await _dump(chunked.client)
    assert state == await _dump(single.client)
    assert sum(key.endswith(b":row") for key in state) == len(ids)
