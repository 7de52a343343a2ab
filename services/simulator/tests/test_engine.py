from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from datetime import UTC, datetime

import pytest

from eta.v1 import events_pb2
from eta_common.features import haversine_km
from ingestion.validation import ValidationLimits, event_id_of, validate_event
from simulator.city import CityConfig
from simulator.engine import OrderOutcome
from simulator.messages import event_ms
from simulator.tests.helpers import DAY_MS, MONDAY, Run, simulate

D = events_pb2.DriverEvent
K = events_pb2.KitchenEvent
OE = events_pb2.OrderEvent


def _hour(ms: int) -> int:
    return datetime.fromtimestamp(ms / 1000, UTC).hour


def _order_timelines(run: Run) -> dict[str, dict[str, list[tuple[int, events_pb2.Event]]]]:
    """order_id → event type name → [(time, event)] over order, kitchen and driver events."""
    out: dict[str, dict[str, list[tuple[int, events_pb2.Event]]]] = defaultdict(lambda: defaultdict(list))
    for event in run.events:
        ms = event_ms(event)
        kind = event.WhichOneof("payload")
        if kind == "order":
            out[event.order.order_id][f"order.{OE.Type.Name(event.order.type)}"].append((ms, event))
        elif kind == "kitchen" and event.kitchen.order_id:
            out[event.kitchen.order_id][f"kitchen.{K.Type.Name(event.kitchen.type)}"].append((ms, event))
        elif kind == "driver" and event.driver.order_id:
            out[event.driver.order_id][f"driver.{D.Type.Name(event.driver.type)}"].append((ms, event))
    return out


def test_same_seed_gives_the_same_stream() -> None:
    a = simulate(CityConfig(seed=7), MONDAY + 11 * 3_600_000, 3 * 3_600_000)
    b = simulate(CityConfig(seed=7), MONDAY + 11 * 3_600_000, 3 * 3_600_000)
    c = simulate(CityConfig(seed=8), MONDAY + 11 * 3_600_000, 3 * 3_600_000)
    assert len(a.events) > 1000
    assert [e.SerializeToString() for e in a.events] == [e.SerializeToString() for e in b.events]
    assert a.sim.outcomes == b.sim.outcomes
    assert [e.SerializeToString() for e in a.events] != [e.SerializeToString() for e in c.events]


def test_layout_depends_on_the_seed_only_and_ids_on_the_whole_run() -> None:
    a = simulate(CityConfig(seed=7), MONDAY + 12 * 3_600_000, 600_000)
    b = simulate(CityConfig(seed=7), MONDAY + 13 * 3_600_000, 600_000)
    c = simulate(CityConfig(seed=7, demand_multiplier=2.0), MONDAY + 12 * 3_600_000, 600_000)
    assert [(r.id, r.location) for r in a.sim.city.restaurants] == [
        (r.id, r.location) for r in b.sim.city.restaurants
    ]
    ids = [{event_id_of(e) for e in run.events} for run in (a, b, c)]
    assert all(ids)
    assert not ids[0] & ids[1]  # another start time
    assert not ids[0] & ids[2]  # another configuration


def test_every_event_is_valid_for_ingestion(day_run: Run) -> None:
    limits = ValidationLimits()
    now = day_run.end_ms + 1
    bad = [(e, v) for e in day_run.events if (v := validate_event(e, now_ms=now, limits=limits))]
    assert bad == []
    ids = [event_id_of(e) for e in day_run.events]
    assert len(set(ids)) == len(ids)


def test_event_times_are_non_decreasing_and_within_the_run(day_run: Run) -> None:
    times = day_run.times()
    assert all(a <= b for a, b in itertools.pairwise(times))
    assert day_run.start_ms <= times[0]
    assert times[-1] <= day_run.end_ms


def test_one_entity_never_has_two_state_events_at_the_same_millisecond(day_run: Run) -> None:
    last_driver: dict[str, int] = {}
    last_status: dict[str, int] = {}
    for event in day_run.events:
        ms = event_ms(event)
        if event.WhichOneof("payload") == "driver":
            assert ms > last_driver.get(event.driver.driver_id, -1)
            last_driver[event.driver.driver_id] = ms
        elif event.WhichOneof("payload") == "kitchen" and event.kitchen.type in (K.OPENED, K.BUSY, K.CLOSED):
            assert ms > last_status.get(event.kitchen.restaurant_id, -1)
            last_status[event.kitchen.restaurant_id] = ms


def test_all_event_kinds_are_produced(day_run: Run) -> None:
    seen = Counter(
        f"{kind}.{type(getattr(e, kind)).Type.Name(getattr(e, kind).type)}"
        for e in day_run.events
        if (kind := e.WhichOneof("payload"))
    )
    expected = {f"driver.{n}" for n in ("ONLINE", "OFFLINE", "LOCATION", "ASSIGNED", "DELIVERED")}
    expected |= {f"kitchen.{n}" for n in ("OPENED", "CLOSED", "BUSY", "ORDER_ACCEPTED", "ORDER_READY")}
    expected |= {f"order.{n}" for n in ("PLACED", "PICKED_UP", "DELIVERED", "CANCELLED")}
    assert expected <= set(seen)
    # pings every 1–2 minutes while online dominate
    assert seen["driver.LOCATION"] > seen["order.PLACED"]


def test_delivered_orders_follow_the_lifecycle(day_run: Run) -> None:
    timelines = _order_timelines(day_run)
    delivered = [t for t in timelines.values() if "order.DELIVERED" in t]
    assert len(delivered) > 300
    for t in delivered:
        for name in (
            "order.PLACED",
            "kitchen.ORDER_ACCEPTED",
            "kitchen.ORDER_READY",
            "driver.ASSIGNED",
            "order.PICKED_UP",
            "order.DELIVERED",
            "driver.DELIVERED",
        ):
            assert len(t[name]) == 1, name
        placed, accepted, ready, picked, done = (
            t[n][0][0]
            for n in (
                "order.PLACED",
                "kitchen.ORDER_ACCEPTED",
                "kitchen.ORDER_READY",
                "order.PICKED_UP",
                "order.DELIVERED",
            )
        )
        assert placed < accepted <= ready <= picked < done
        assert 30_000 <= accepted - placed <= 120_000
        assigned = t["driver.ASSIGNED"][0]
        assert accepted < assigned[0] < picked
        driver = assigned[1].driver.driver_id
        assert t["order.PICKED_UP"][0][1].order.driver_id == driver
        assert t["order.DELIVERED"][0][1].order.driver_id == driver
        assert t["driver.DELIVERED"][0][1].driver.driver_id == driver
        assert t["driver.DELIVERED"][0][0] == done
        p = t["order.PLACED"][0][1].order
        km = haversine_km(
            p.restaurant_location.lat,
            p.restaurant_location.lng,
            p.customer_location.lat,
            p.customer_location.lng,
        )
        assert 0.5 <= km <= 7.0
        assert t["kitchen.ORDER_READY"][0][1].kitchen.HasField("restaurant_location")


def test_a_few_orders_are_cancelled_before_pickup(day_run: Run) -> None:
    timelines = _order_timelines(day_run)
    placed = [t for t in timelines.values() if "order.PLACED" in t]
    cancelled = [t for t in placed if "order.CANCELLED" in t]
    assert 0 < len(cancelled) <= 0.05 * len(placed)
    for t in cancelled:
        assert "order.PICKED_UP" not in t
        assert "order.DELIVERED" not in t
        assert t["order.CANCELLED"][0][0] > t["order.PLACED"][0][0]
        if "kitchen.ORDER_READY" in t:  # cancelled after it was ready
            assert t["kitchen.ORDER_READY"][0][0] <= t["order.CANCELLED"][0][0]
    assert day_run.sim.counters.orders_cancelled == len(cancelled)


def test_drivers_work_shifts_and_only_ping_while_online(day_run: Run) -> None:
    online: dict[str, bool] = defaultdict(bool)
    busy_with: dict[str, str | None] = defaultdict(lambda: None)
    shifts = Counter[str]()
    for event in day_run.events:
        if event.WhichOneof("payload") != "driver":
            continue
        d = event.driver
        if d.type == D.ONLINE:
            if online[d.driver_id]:  # free again after a cancelled order
                assert busy_with[d.driver_id] is not None
            else:
                shifts[d.driver_id] += 1
            online[d.driver_id] = True
            busy_with[d.driver_id] = None
        elif d.type == D.OFFLINE:
            assert online[d.driver_id]
            assert busy_with[d.driver_id] is None
            online[d.driver_id] = False
        elif d.type == D.ASSIGNED:
            assert online[d.driver_id]
            assert busy_with[d.driver_id] is None, "driver assigned twice"
            busy_with[d.driver_id] = d.order_id
        elif d.type == D.DELIVERED:
            assert busy_with[d.driver_id] == d.order_id
            busy_with[d.driver_id] = None
        else:
            assert d.type == D.LOCATION
            assert online[d.driver_id]
    assert len(shifts) >= 0.9 * 60  # most drivers work on a Monday
    assert not any(online.values())  # everyone has gone home by midnight


def test_kitchens_open_at_ten_and_close_at_eleven(day_run: Run) -> None:
    status = [
        e.kitchen
        for e in day_run.events
        if e.WhichOneof("payload") == "kitchen" and e.kitchen.type in (K.OPENED, K.CLOSED)
    ]
    opened = [k for k in status if k.type == K.OPENED and _hour(k.event_time.seconds * 1000) == 10]
    closed = [k for k in status if k.type == K.CLOSED and _hour(k.event_time.seconds * 1000) == 23]
    assert len({k.restaurant_id for k in opened}) == 20
    assert len({k.restaurant_id for k in closed}) == 20
    placed_hours = {
        _hour(event_ms(e))
        for e in day_run.events
        if e.WhichOneof("payload") == "order" and e.order.type == OE.PLACED
    }
    assert placed_hours <= set(range(10, 23))


def test_lunch_and_dinner_peaks_have_more_orders_than_mid_morning() -> None:
    run = simulate(CityConfig(), MONDAY, 3 * DAY_MS)
    per_hour = Counter(
        _hour(event_ms(e))
        for e in run.events
        if e.WhichOneof("payload") == "order" and e.order.type == OE.PLACED
    )
    mid_morning = per_hour[10]
    lunch = (per_hour[12] + per_hour[13]) / 2
    dinner = (per_hour[18] + per_hour[19] + per_hour[20]) / 3
    assert lunch > 1.5 * mid_morning
    assert dinner > 1.5 * mid_morning
    assert per_hour[16] < dinner


def test_weekends_are_busier_than_mondays() -> None:
    monday = simulate(CityConfig(), MONDAY, DAY_MS).sim.counters.orders_placed
    saturday = simulate(CityConfig(), MONDAY + 5 * DAY_MS, DAY_MS).sim.counters.orders_placed
    assert saturday > 1.15 * monday


def test_oracle_is_positive_and_tracks_the_actual_delivery_time(day_run: Run) -> None:
    outcomes = day_run.sim.outcomes
    assert len(outcomes) == day_run.sim.counters.orders_delivered > 300
    oracle = [o.oracle_minutes for o in outcomes]
    actual = [o.actual_minutes for o in outcomes]
    assert min(oracle) > 0
    assert _pearson(oracle, actual) > 0.5
    # unbiased within a few minutes on average, realistic magnitude
    assert abs(sum(actual) / len(actual) - sum(oracle) / len(oracle)) < 5
    assert 20 < sum(actual) / len(actual) < 60


def test_driver_supply_matters(day_run: Run) -> None:
    """At the dinner peak some orders wait for a free driver, and they are slower."""
    sim = day_run.sim
    assert sim.counters.orders_waited_for_driver > 0
    delivered = {o.order_id: o for o in sim.outcomes}
    timelines = _order_timelines(day_run)
    waits = []
    for order_id, o in delivered.items():
        t = timelines[order_id]
        waits.append((t["driver.ASSIGNED"][0][0] - t["kitchen.ORDER_ACCEPTED"][0][0], o.actual_minutes))
    long_wait = [a for w, a in waits if w > 120_000]
    short_wait = [a for w, a in waits if w <= 30_000]
    assert long_wait
    assert short_wait
    assert sum(long_wait) / len(long_wait) > sum(short_wait) / len(short_wait)


def test_outcome_callback_sees_every_delivered_order() -> None:
    seen: list[OrderOutcome] = []
    run = simulate(CityConfig(), MONDAY + 12 * 3_600_000, 2 * 3_600_000, on_outcome=seen.append)
    assert seen
    assert seen == run.sim.outcomes
    assert all(o.delivered_ms > o.placed_ms for o in seen)


def test_a_city_started_mid_day_is_already_running() -> None:
    start = MONDAY + 13 * 3_600_000
    run = simulate(CityConfig(), start, 120_000)
    opened = {
        e.kitchen.restaurant_id
        for e in run.events
        if e.WhichOneof("payload") == "kitchen" and e.kitchen.type == K.OPENED
    }
    online = {
        e.driver.driver_id
        for e in run.events
        if e.WhichOneof("payload") == "driver" and e.driver.type == D.ONLINE
    }
    assert len(opened) == 20
    assert len(online) >= 25  # lunch shifts
    assert all(
        event_ms(e) - start <= 31_000
        for e in run.events
        if e.WhichOneof("payload") == "driver" and e.driver.type == D.ONLINE
    )


def test_always_open_city_has_traffic_at_night() -> None:
    start = MONDAY + 3 * 3_600_000 + 123  # 03:00 and a bit, not on a whole second
    config = CityConfig(always_open=True, demand_multiplier=1.5)
    run = simulate(config, start, 30 * 60_000)
    first_minute = [e for e in run.events if event_ms(e) <= start + 60_000]
    opened = {
        e.kitchen.restaurant_id
        for e in first_minute
        if e.WhichOneof("payload") == "kitchen" and e.kitchen.type == K.OPENED
    }
    online = {
        e.driver.driver_id
        for e in first_minute
        if e.WhichOneof("payload") == "driver" and e.driver.type == D.ONLINE
    }
    assert len(opened) == 20
    assert len(online) == 60
    assert run.sim.counters.orders_placed >= 8  # ~0.65 orders/min at night with this multiplier
    assert min(run.times()) >= start


def test_time_scale_compresses_event_times_onto_the_wall_clock() -> None:
    start = MONDAY + 12 * 3_600_000
    scaled = simulate(CityConfig(always_open=True), start, 60 * 60_000, time_origin_ms=start, time_scale=10.0)
    times = scaled.times()
    assert times[-1] - start <= 6 * 60_000 + 1  # one simulated hour in six event-time minutes
    assert all(a <= b for a, b in itertools.pairwise(times))
    limits = ValidationLimits()
    assert not [
        v for e in scaled.events if (v := validate_event(e, now_ms=start + 6 * 60_000, limits=limits))
    ]
    for o in scaled.sim.outcomes:
        assert o.actual_minutes < 15  # 10x faster than real deliveries
        assert o.oracle_minutes < 15


def _pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    vx = sum((x - mx) ** 2 for x in xs)
    vy = sum((y - my) ** 2 for y in ys)
    return cov / math.sqrt(vx * vy)


@pytest.mark.parametrize("field", ["restaurants", "drivers", "customers"])
def test_config_rejects_empty_cities(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CityConfig(**{field: 0})  # type: ignore[arg-type]
