"""Shared feature definitions and the offline (point-in-time) builder."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from eta_common import features as F
from eta_common.offline_features import FeatureQuery, HistoryEvent, OfflineFeatureBuilder

T0 = 1_800_000_000_000
MIN = 60_000


def placed(order_id: str, event_ms: int, ingest_ms: int | None = None, restaurant: str = "r") -> HistoryEvent:
    return HistoryEvent(
        "order",
        "PLACED",
        event_ms,
        event_ms + 100 if ingest_ms is None else ingest_ms,
        restaurant_id=restaurant,
        order_id=order_id,
        lat=52.5,
        lng=13.4,
    )


def query(at_ms: int, restaurant: str = "r") -> FeatureQuery:
    return FeatureQuery("q", restaurant, at_ms, 52.5, 13.4)


def test_haversine_matches_known_distance() -> None:
    # Berlin Hbf → Alexanderplatz is about 3 km
    assert F.haversine_km(52.5251, 13.3694, 52.5219, 13.4132) == pytest.approx(2.98, abs=0.05)
    assert F.haversine_km(1.0, 1.0, 1.0, 1.0) == 0.0


def test_hour_of_week() -> None:
    monday = int(datetime(2026, 11, 30, tzinfo=UTC).timestamp() * 1000)  # a Monday, 00:00 UTC
    assert F.hour_of_week(monday) == 0
    assert F.hour_of_week(monday + 25 * 60 * MIN) == 25  # Tuesday 01:00
    assert F.hour_of_week(monday - 1) == 167  # Sunday 23:59


def test_window_is_half_open_over_event_time() -> None:
    b = OfflineFeatureBuilder(allowed_lateness_ms=60 * MIN)
    for i, ms in enumerate([T0 - 30 * MIN, T0 - 30 * MIN + 1, T0 - 10 * MIN, T0 - 10 * MIN + 1, T0]):
        b.apply(placed(f"o{i}", ms, ingest_ms=T0))
    values = b.features_at(query(T0))
    assert values[F.NUM_ORDERS_30.name] == 4  # (t-30m, t]: the event exactly at t-30m is out
    assert values[F.NUM_ORDERS_10.name] == 2  # only t-10m+1 and t


def test_duplicates_and_replays_count_once() -> None:
    b = OfflineFeatureBuilder()
    for _ in range(3):
        b.apply(placed("o1", T0 - MIN))
    assert b.features_at(query(T0))[F.NUM_ORDERS_30.name] == 1


def test_late_events_are_not_applied() -> None:
    b = OfflineFeatureBuilder(allowed_lateness_ms=5 * MIN)
    b.apply(placed("on-time", T0 - 4 * MIN, ingest_ms=T0))
    b.apply(placed("late", T0 - 6 * MIN, ingest_ms=T0))
    assert b.features_at(query(T0))[F.NUM_ORDERS_30.name] == 1


def test_point_in_time_queries_never_see_later_ingestion() -> None:
    events = [placed("a", T0 - 2 * MIN, ingest_ms=T0 - 2 * MIN), placed("b", T0 - MIN, ingest_ms=T0 + 1)]
    results = dict((q.at_ms, v) for q, v in OfflineFeatureBuilder().run(events, [query(T0), query(T0 + 1)]))
    assert results[T0][F.NUM_ORDERS_30.name] == 1  # b's event time is before T0, but it arrived after T0
    assert results[T0 + 1][F.NUM_ORDERS_30.name] == 2


def test_kitchen_and_prep_handle_out_of_order_events() -> None:
    b = OfflineFeatureBuilder()
    b.apply(HistoryEvent("kitchen", "ORDER_READY", T0 - MIN, T0 - MIN, restaurant_id="r", order_id="o1"))
    # the ACCEPTED event arrives after READY but within the allowed lateness
    b.apply(
        HistoryEvent("kitchen", "ORDER_ACCEPTED", T0 - 5 * MIN, T0 - MIN, restaurant_id="r", order_id="o1")
    )
    b.apply(
        HistoryEvent(
            "kitchen", "ORDER_ACCEPTED", T0 - 2 * MIN, T0 - 2 * MIN, restaurant_id="r", order_id="o2"
        )
    )
    values = b.features_at(query(T0))
    assert values[F.ORDERS_IN_KITCHEN] == 1  # o1 was ready before its accept arrived
    assert values[F.MEAN_PREP_MINUTES_60.name] == pytest.approx(4.0)


def test_driver_supply_respects_event_time_order_and_radius() -> None:
    b = OfflineFeatureBuilder()
    near, far = (52.51, 13.41), (52.9, 13.4)
    b.apply(HistoryEvent("driver", "ONLINE", T0 - 5 * MIN, T0, driver_id="d1", lat=near[0], lng=near[1]))
    b.apply(HistoryEvent("driver", "ONLINE", T0 - 5 * MIN, T0, driver_id="d2", lat=far[0], lng=far[1]))
    b.apply(HistoryEvent("driver", "ASSIGNED", T0 - 4 * MIN, T0, driver_id="d3", lat=near[0], lng=near[1]))
    # a stale OFFLINE for d1 (older than its ONLINE) must be ignored
    b.apply(HistoryEvent("driver", "OFFLINE", T0 - 6 * MIN, T0, driver_id="d1", lat=near[0], lng=near[1]))
    assert b.features_at(query(T0))[F.FREE_DRIVERS_NEARBY] == 1


def test_no_prep_history_is_nan_default() -> None:
    assert math.isnan(OfflineFeatureBuilder().features_at(query(T0))[F.MEAN_PREP_MINUTES_60.name])


def _kitchen_ready(order_id: str, event_ms: int) -> HistoryEvent:
    return HistoryEvent("kitchen", "ORDER_READY", event_ms, event_ms, restaurant_id="r", order_id=order_id)


def _picked_up(order_id: str, event_ms: int, ingest_ms: int | None = None) -> HistoryEvent:
    ingest = event_ms if ingest_ms is None else ingest_ms
    return HistoryEvent("order", "PICKED_UP", event_ms, ingest, restaurant_id="r", order_id=order_id)


def test_pickup_wait_is_ready_to_picked_up_in_either_arrival_order() -> None:
    name = F.MEAN_PICKUP_WAIT_30.name
    b = OfflineFeatureBuilder()
    assert math.isnan(b.features_at(query(T0))[name])  # nothing picked up yet: unknown
    b.apply(_kitchen_ready("o1", T0 - 20 * MIN))
    b.apply(_picked_up("o1", T0 - 14 * MIN))  # waited 6 min
    b.apply(_picked_up("o2", T0 - 5 * MIN, ingest_ms=T0 - 4 * MIN))  # arrives before its READY …
    assert b.features_at(query(T0))[name] == pytest.approx(6.0)  # … so it is not complete yet
    b.apply(_kitchen_ready("o2", T0 - 7 * MIN))  # waited 2 min
    b.apply(_picked_up("o2", T0 - 5 * MIN))  # a duplicate changes nothing
    b.apply(_kitchen_ready("o3", T0 - 3 * MIN))
    b.apply(_picked_up("o3", T0 - 4 * MIN))  # a clock says "picked up before ready": floored at 0
    assert b.features_at(query(T0))[name] == pytest.approx((6 + 2 + 0) / 3)


def test_pickup_wait_window_is_half_open_over_pickup_time() -> None:
    name = F.MEAN_PICKUP_WAIT_30.name
    b = OfflineFeatureBuilder(allowed_lateness_ms=60 * MIN)
    b.apply(_kitchen_ready("edge", T0 - 40 * MIN))
    b.apply(_picked_up("edge", T0 - 30 * MIN, ingest_ms=T0))  # picked up exactly at t − 30 min: out
    b.apply(_kitchen_ready("in", T0 - 35 * MIN))
    b.apply(_picked_up("in", T0 - 30 * MIN + 1, ingest_ms=T0))
    assert b.features_at(query(T0))[name] == pytest.approx((5 * MIN + 1) / MIN)
