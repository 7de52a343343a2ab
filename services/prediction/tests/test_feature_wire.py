"""The wire-encoded FeatureValues parse to exactly the messages built field by field."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from eta.v1 import eta_pb2, features_pb2
from prediction.feature_wire import FeatureWire

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
