"""Unit tests of ``bench_cluster_shards``'s helpers: the slot rule, the slot → shard map and the expected
traffic per key group (``.venv/bin/pytest bench/tests``)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import bench_cluster_shards as S
from eta.v1 import events_pb2
from eta_common import features as F
from eta_common.timeutil import timestamp_from_ms

T0 = 1_700_000_000_000
LATENESS = F.DEFAULT_ALLOWED_LATENESS_MS


def test_crc16_and_key_slot_match_redis() -> None:
    assert S.crc16(b"123456789") == 0x31C3  # the CRC16-CCITT (XModem) check value
    # values from the Redis Cluster specification / CLUSTER KEYSLOT
    assert S.key_slot("somekey") == 11058
    assert S.key_slot("foo") == 12182
    assert S.key_slot("foo{hash_tag}") == S.key_slot("bar{hash_tag}") == 2515
    assert S.key_slot("drv:{berlin}:state") == 4894  # CLUSTER KEYSLOT on a local cluster


def test_hash_tag_rules() -> None:
    assert S.hash_tag("rst:{r1}:meta") == "r1"
    assert S.hash_tag("foo{}{bar}") == "foo{}{bar}"  # empty first tag: the whole key
    assert S.hash_tag("foo{{bar}}zap") == "{bar"
    assert S.hash_tag("foo{bar}{zap}") == "bar"
    assert S.hash_tag("nobraces") == "nobraces"
    assert S.hash_tag("open{only") == "open{only"
    assert S.key_slot("eta:rows:{berlin:3}") == S.key_slot("x{berlin:3}")


def _slot_map() -> S.SlotMap:
    reply = [
        [5461, 10922, [b"127.0.0.1", 7001, b"id1"]],
        [0, 5460, [b"127.0.0.1", 7000, b"id0"]],
        [10923, 16383, [b"127.0.0.1", 7002, b"id2"]],
    ]
    return S.SlotMap.from_cluster_slots(reply, {7000: "a", 7001: "b", 7002: "c"})


def test_slot_map() -> None:
    slots = _slot_map()
    assert slots.shards() == ["a", "b", "c"]
    assert [slots.shard_of(s) for s in (0, 5460, 5461, 10922, 10923, 16383)] == ["a", "a", "b", "b", "c", "c"]
    assert slots.slots_of("a") + slots.slots_of("b") + slots.slots_of("c") == S.SLOTS
    with pytest.raises(KeyError):
        S.SlotMap(((0, 10, "x"),)).shard_of(11)


def _driver(etype: int, ms: int, market: str = "berlin", driver: str = "d1") -> Any:
    return events_pb2.Event(
        driver=events_pb2.DriverEvent(
            event_id=f"e{ms}",
            event_time=timestamp_from_ms(ms),
            driver_id=driver,
            type=etype,  # type: ignore[arg-type]
            location=events_pb2.GeoPoint(lat=52.5, lng=13.4),
            market_id=market,
        )
    )


def _order(etype: int, ms: int, market: str = "berlin") -> Any:
    return events_pb2.Event(
        order=events_pb2.OrderEvent(
            event_id=f"o{ms}",
            event_time=timestamp_from_ms(ms),
            order_id="o1",
            restaurant_id="r1",
            customer_id="c",
            type=etype,  # type: ignore[arg-type]
            restaurant_location=events_pb2.GeoPoint(lat=52.5, lng=13.4),
            customer_location=events_pb2.GeoPoint(lat=52.51, lng=13.41),
            market_id=market,
        )
    )


def _kitchen(etype: int, ms: int) -> Any:
    return events_pb2.Event(
        kitchen=events_pb2.KitchenEvent(
            event_id=f"k{ms}",
            event_time=timestamp_from_ms(ms),
            restaurant_id="r1",
            order_id="o1",
            type=etype,  # type: ignore[arg-type]
            market_id="berlin",
        )
    )


def _apps(event: Any, ingest_ms: int | None = None) -> list[str]:
    ms = _event_ms(event)
    return S.applications(
        event,
        ms + 100 if ingest_ms is None else ingest_ms,
        allowed_lateness_ms=LATENESS,
        default_market="dflt",
    )


def _event_ms(event: Any) -> int:
    kind = event.WhichOneof("payload")
    t = getattr(event, kind).event_time
    return int(t.seconds * 1000 + t.nanos // 1_000_000)


def test_applications_follow_the_aggregator() -> None:
    city, rst = S.city_key("berlin"), S.restaurant_key("r1")
    assert city == "drv:{berlin}:state"
    assert rst == "rst:{r1}:meta"
    D, Od, K = events_pb2.DriverEvent, events_pb2.OrderEvent, events_pb2.KitchenEvent
    assert _apps(_driver(D.ONLINE, T0)) == [city]
    assert _apps(_order(Od.PLACED, T0)) == [rst, city]  # the dispatch backlog too
    assert _apps(_order(Od.CANCELLED, T0)) == [rst, city]
    assert _apps(_order(Od.PICKED_UP, T0)) == [rst]
    assert _apps(_order(Od.DELIVERED, T0)) == []  # no online effect
    assert _apps(_kitchen(K.ORDER_READY, T0)) == [rst]
    assert _apps(_order(Od.PLACED, T0), ingest_ms=T0 + LATENESS + 1) == []  # late: not applied
    assert _apps(_driver(D.ONLINE, T0, market="")) == [S.city_key("dflt")]  # no market: the default
    kept = next(ms for ms in range(T0, T0 + 60_000, 100) if F.ping_kept("d1", ms))
    dropped = next(ms for ms in range(T0, T0 + 60_000, 100) if not F.ping_kept("d1", ms))
    assert _apps(_driver(D.LOCATION, kept)) == [city]
    assert _apps(_driver(D.LOCATION, dropped)) == []  # the keep rule drops it before Redis


def test_expected_traffic_and_shares() -> None:
    D, Od = events_pb2.DriverEvent, events_pb2.OrderEvent
    placed = _order(Od.PLACED, T0)
    records = [(_driver(D.ONLINE, T0 + i), T0 + i + 10) for i in range(3)]
    records += [(placed, T0 + 10), (placed, T0 + 20)]  # a duplicate is applied again
    traffic = S.expected_traffic(records, allowed_lateness_ms=LATENESS, default_market="dflt")
    assert traffic == {S.city_key("berlin"): 5, S.restaurant_key("r1"): 2}
    slots = _slot_map()
    shares = S.shares_by_shard(traffic, slots)
    assert set(shares) == {"a", "b", "c"}
    assert sum(shares.values()) == pytest.approx(1.0)
    city_shard = slots.shard_of(S.key_slot(S.city_key("berlin")))
    rst_shard = slots.shard_of(S.key_slot(S.restaurant_key("r1")))
    expected = {"a": 0.0, "b": 0.0, "c": 0.0}
    expected[city_shard] += 5 / 7
    expected[rst_shard] += 2 / 7
    assert shares == pytest.approx(expected)


def test_commandstats_delta_and_normalized() -> None:
    before = {"cmdstat_evalsha": {"calls": 10, "usec": 100}, "cmdstat_zadd": {"calls": 5, "usec": 9}}
    after = {
        "cmdstat_evalsha": {"calls": 25, "usec": 400},
        "cmdstat_zadd": {"calls": 5, "usec": 9},
        "cmdstat_info": {"calls": 1, "usec": 20},
    }
    assert S.commandstats_delta(before, after) == {"evalsha": (15, 300), "info": (1, 20)}
    assert S.normalized({"a": 1.0, "b": 3.0}) == {"a": 0.25, "b": 0.75}


def test_one_tag_busiest_share() -> None:
    slots = _slot_map()
    rst_a = next(f"r{i}" for i in range(100) if slots.shard_of(S.key_slot(S.restaurant_key(f"r{i}"))) == "a")
    rst_b = next(f"r{i}" for i in range(100) if slots.shard_of(S.key_slot(S.restaurant_key(f"r{i}"))) == "b")
    traffic = {
        S.city_key("m1"): 4.0,
        S.city_key("m2"): 2.0,
        S.restaurant_key(rst_a): 3.0,
        S.restaurant_key(rst_b): 1.0,
    }
    # every city application on one slot, on the shard that also holds the most restaurant traffic
    assert S.one_tag_busiest_share(traffic, slots) == pytest.approx((6 + 3) / 10)


def test_application_costs() -> None:
    def run(cpu: float, background: float, seconds: float, records: int) -> S.Run:
        return S.Run(
            mode="calibration",
            records=records,
            records_per_s=records / seconds,
            seconds=seconds,
            cpu_us={},
            shard_cpu_s={"redis": cpu},
            commands={},
            background_cpu_per_s={"redis": background},
        )

    city, rst = S.city_key("m"), S.restaurant_key("r1")
    # drivers: 1000 city applications (900 in the window: it saw 90 % of the records) for 0.9 s net
    drivers = (run(1.0, 0.01, 10.0, 90), {city: 1000.0}, 100)
    # orders: 100 city applications at the same cost + 400 restaurant applications at 5 ms, all seen
    orders = (run(0.1 * 1.0 + 400 * 0.005 + 0.2, 0.1, 2.0, 50), {city: 100.0, rst: 400.0}, 50)
    costs = S.application_costs([drivers, orders])
    assert costs["city"] == pytest.approx(0.001)
    assert costs["restaurant"] == pytest.approx(0.005)
