"""The wire-encoded FeatureValues parse to exactly the messages built field by field."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from eta.v1 import eta_pb2, features_pb2
from prediction.feature_wire import EtaRowsWire, FeatureWire

NAN = math.nan


def _reference(
    name: str, value: float, present: bool, age: float, updated: float, event: float
) -> features_pb2.FeatureValue:
    """The field-by-field build (``eta_common.feature_proto``'s rules)."""
    if not present and math.isnan(value):
        value = 0.0
    fields: dict[str, Any] = {"name": name, "value": value, "present": present}
    if not math.isnan(updated):
        seconds, rest = divmod(int(updated), 1000)
        fields["age_seconds"] = age
        fields["updated_at"] = {"seconds": seconds, "nanos": rest * 1_000_000}
    if not math.isnan(event):
        seconds, rest = divmod(int(event), 1000)
        fields["event_time"] = {"seconds": seconds, "nanos": rest * 1_000_000}
    return features_pb2.FeatureValue(**fields)


VALUES = [0.0, -0.0, 3.5, -12.25, 1e300, NAN]
TIMES = [NAN, 0.0, 999.0, 1_765_000_000_000.0, 1_765_000_000_123.0, -1500.0]


@pytest.mark.parametrize(
    ("value", "present", "updated", "event"), list(itertools.product(VALUES, [True, False], TIMES, TIMES[:3]))
)
def test_online_features_parse_to_the_reference_message(
    value: float, present: bool, updated: float, event: float
) -> None:
    wire = FeatureWire(eta_pb2.PredictEtaResponse.FEATURES_FIELD_NUMBER)
    reply = eta_pb2.PredictEtaResponse(restaurant_id="r")
    names = ["num_orders_last_30_min", "ü-näme " * 30]  # a name longer than 127 bytes: two-byte length
    reply.MergeFromString(b"".join(wire.online(n, value, present, 42.5, updated, event) for n in names))
    expected = eta_pb2.PredictEtaResponse(
        restaurant_id="r", features=[_reference(n, value, present, 42.5, updated, event) for n in names]
    )
    assert reply.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize("value", VALUES)
def test_request_time_features_are_present_without_age_or_times(value: float) -> None:
    wire = FeatureWire(eta_pb2.PredictEtaResponse.FEATURES_FIELD_NUMBER)
    reply = eta_pb2.PredictEtaResponse()
    reply.MergeFromString(wire.request_time("distance_km", value))
    expected = eta_pb2.PredictEtaResponse(
        features=[features_pb2.FeatureValue(name="distance_km", value=value, present=True)]
    )
    assert reply.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    assert not reply.features[0].HasField("updated_at")
    assert reply.features[0].age_seconds == 0.0


def test_the_field_number_is_the_replys() -> None:
    wire = FeatureWire(features_pb2.GetRestaurantFeaturesResponse.FEATURES_FIELD_NUMBER)
    reply = features_pb2.GetRestaurantFeaturesResponse()
    reply.MergeFromString(wire.request_time("hour_of_week", 5.0))
    assert [f.name for f in reply.features] == ["hour_of_week"]


# --- the batch reply's rows --------------------------------------------------------------------------------


def _batch_reference(
    ids: list[str],
    points: list[float],
    lows: list[float],
    highs: list[float],
    qualities: list[int],
    values: list[list[float]],
    ages: list[list[float]],
    stale: list[list[str]],
    missing: list[list[str]],
) -> eta_pb2.PredictEtaBatchResponse:
    """The field-by-field build the handler used before."""
    return eta_pb2.PredictEtaBatchResponse(
        request_id="req",
        model_version="v1",
        feature_names=["a", "b"],
        etas=[
            eta_pb2.RestaurantEta(
                restaurant_id=ids[i],
                eta_minutes=points[i],
                eta_low_minutes=lows[i],
                eta_high_minutes=highs[i],
                feature_quality=qualities[i],  # type: ignore[arg-type]
                feature_values=values[i],
                feature_ages_seconds=ages[i],
                stale_features=stale[i],
                missing_features=missing[i],
            )
            for i in range(len(ids))
        ],
    )


@pytest.mark.parametrize("k", [0, 1, 13, 16, 40])  # 16 features: a 128-byte packed column, 2-byte length
def test_batch_rows_parse_to_the_reference_message(k: int) -> None:
    import numpy as np

    rng = np.random.default_rng(k)
    quality = eta_pb2.PredictEtaResponse.FeatureQuality
    ids = ["r-1", "", "ü-restaurant " * 12, "r-4", "r-5"]  # empty and > 127 bytes
    n = len(ids)
    points = [0.0, -0.0, 25.5, 1e300, 7.0]
    lows, highs = [p * 0.8 for p in points], [p * 1.2 for p in points]
    qualities = [quality.COMPLETE, quality.STALE, quality.MISSING, 0, quality.COMPLETE]
    values = rng.normal(size=(n, k))
    values[0, :] = 0.0
    ages = np.abs(rng.normal(size=(n, k)))
    if k:
        values[1, 0] = -0.0
    stale = [[], ["num_orders_last_10_min"], [], ["x", "ü" * 200], []]
    missing = [[], [], ["free_drivers_within_3km", "kitchen_busy"], [], ["x"]]
    wire = EtaRowsWire()
    reply = eta_pb2.PredictEtaBatchResponse(request_id="req", model_version="v1", feature_names=["a", "b"])
    for _ in range(2):  # the second time from the cached pieces
        reply.ClearField("etas")
        reply.MergeFromString(
            wire.encode(ids, np.array(points), lows, highs, qualities, values, ages, stale, missing)
        )
        expected = _batch_reference(
            ids, points, lows, highs, qualities, values.tolist(), ages.tolist(), stale, missing
        )
        assert reply.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
        assert reply == expected


def test_every_feature_quality_is_one_varint_byte() -> None:
    """The batch rows hold the quality in one byte: every enum number must stay below 128."""
    numbers = eta_pb2.PredictEtaResponse.FeatureQuality.values()
    assert numbers
    assert all(0 <= v < 128 for v in numbers)


def test_varints_match_the_protobuf_runtime() -> None:
    """Against the runtime's own int64 encoding (``Timestamp.seconds``, field 1: tag byte, varint)."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from prediction.feature_wire import _varint

    assert _varint(0) == b"\x00"
    for n in [*range(1, 20000), 2**21, 2**40, -1, -5]:
        assert _varint(n) == Timestamp(seconds=n).SerializeToString()[1:], n
