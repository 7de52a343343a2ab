"""The consistency check's verdicts: match, mismatch, and a read that raced an update (in flight)."""

from __future__ import annotations

from aggregator.consistency import ServedRow, check_consistency
from eta_common import customer_features as CF
from eta_common import features as F
from eta_common.offline_features import HistoryEvent

T0 = 1_800_000_000_000
MIN = 60_000


def placed(order: str, event_ms: int, seen_ms: int) -> HistoryEvent:
    return HistoryEvent("order", "PLACED", event_ms, seen_ms, "r1", None, order, 52.5, 13.4)


def test_match_mismatch_and_in_flight() -> None:
    events = [placed("a", T0 - 5 * MIN, T0 - 5 * MIN + 10), placed("b", T0 - 100, T0 + 200)]
    served = [
        ServedRow(T0 - MIN, "r1", {F.NUM_ORDERS_30.name: 1.0}, "match"),
        ServedRow(T0 - MIN, "r1", {F.NUM_ORDERS_10.name: 5.0}, "wrong"),
        # b became visible 200 ms after this read: online may have seen it already
        ServedRow(T0, "r1", {F.NUM_ORDERS_30.name: 2.0}, "raced"),
    ]
    lenient = check_consistency(events, served)
    assert lenient.predictions == 3
    assert lenient.per_feature[F.NUM_ORDERS_30.name].compared == 2
    assert lenient.per_feature[F.NUM_ORDERS_30.name].in_flight == 1
    assert lenient.per_feature[F.NUM_ORDERS_10.name].mismatches == 1
    assert lenient.mismatches == 1
    assert lenient.samples[0]["feature"] == F.NUM_ORDERS_10.name

    strict = check_consistency(events, served, strict=True)
    assert strict.mismatches == 2
    assert "predictions checked: 3" in strict.render()


def test_missing_values_compare_as_missing() -> None:
    events = [placed("a", T0 - MIN, T0 - MIN)]
    served = [ServedRow(T0, "r1", {F.MEAN_PREP_MINUTES_60.name: None}, "nan")]
    report = check_consistency(events, served, strict=True)
    assert report.per_feature[F.MEAN_PREP_MINUTES_60.name].compared == 1
    assert report.mismatches == 0


def test_customer_batch_features_compare_with_the_refresh_before_serving() -> None:
    hour = CF.CUSTOMER_REFRESH_MS
    boundary = CF.as_of_boundary(T0)
    event = CF.CustomerOrderEvent
    history = CF.CustomerHistory(
        [
            # placed and delivered (30 min) well before the previous boundary
            event("order", "PLACED", "o1", "c1", boundary - 3 * hour, boundary - 3 * hour),
            event("order", "DELIVERED", "o1", None, boundary - 150 * MIN, boundary - 2 * hour),
            # placed between the previous boundary and this one: counted from this boundary on
            event("order", "PLACED", "o2", "c1", boundary - 10 * MIN, boundary - 10 * MIN),
        ]
    )
    now: dict[str, float | None] = {CF.CUSTOMER_ORDERS_28D: 2.0}
    before: dict[str, float | None] = {CF.CUSTOMER_ORDERS_28D: 1.0}
    events = [placed("a", boundary - MIN, boundary - MIN)]
    served = [
        ServedRow(boundary + 20 * MIN, "r1", now, "current", "c1"),
        ServedRow(boundary + 2 * MIN, "r1", before, "refresh not landed yet", "c1"),
        ServedRow(boundary + 30 * MIN, "r1", before, "refresh missed", "c1"),
        ServedRow(boundary + 20 * MIN, "r1", {CF.CUSTOMER_ORDERS_28D: None}, "no customer", ""),
        ServedRow(boundary + 20 * MIN, "r1", {CF.CUSTOMER_MEAN_DELIVERY_28D: 30.0}, "mean", "c1"),
    ]
    report = check_consistency(events, served, customers=history)
    tally = report.per_feature[CF.CUSTOMER_ORDERS_28D]
    assert (tally.compared, tally.in_flight, tally.mismatches) == (4, 1, 1)
    assert report.per_feature[CF.CUSTOMER_MEAN_DELIVERY_28D].mismatches == 0
    assert report.samples[0]["customer_id"] == "c1"
    assert check_consistency(events, served, customers=history, strict=True).mismatches == 2
