"""Conversion of online feature readings to the ``eta.v1.FeatureValue`` API message."""

from __future__ import annotations

import math
from collections.abc import Iterable

from eta.v1 import features_pb2
from eta_common.online_store import FeatureReading
from eta_common.timeutil import timestamp_from_ms

__all__ = ["to_feature_value", "to_feature_values"]


def to_feature_value(reading: FeatureReading, now_ms: int) -> features_pb2.FeatureValue:
    value = features_pb2.FeatureValue(name=reading.name, value=reading.value, present=reading.present)
    if math.isnan(reading.value) and not reading.present:  # an unknown default reads as 0
        value.value = 0.0
    if reading.updated_ms is not None:
        value.updated_at.CopyFrom(timestamp_from_ms(reading.updated_ms))
        value.age_seconds = reading.age_seconds(now_ms) or 0.0
    if reading.event_ms is not None:
        value.event_time.CopyFrom(timestamp_from_ms(reading.event_ms))
    return value


def to_feature_values(readings: Iterable[FeatureReading], now_ms: int) -> list[features_pb2.FeatureValue]:
    return [to_feature_value(reading, now_ms) for reading in readings]
