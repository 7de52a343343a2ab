"""The consistency check's verdicts: match, mismatch, and a read that raced an update (in flight)."""

from __future__ import annotations

from aggregator.consistency import ServedRow, check_consistency
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
