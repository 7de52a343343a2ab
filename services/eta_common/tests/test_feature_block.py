"""FeatureBlock: the column layout, defaults, and the per-restaurant view round trip."""

from __future__ import annotations

import math

from eta_common import features as F
from eta_common.feature_block import COLUMN, ONLINE_NAMES, FeatureBlock, parse_writer
from eta_common.online_store import FeatureReading, RestaurantFeatures

WHERE = (52.52, 13.405)


def test_defaults_are_the_documented_values_and_never_present() -> None:
    block = FeatureBlock.defaults([("a", WHERE), ("b", WHERE)], 1_000)
    assert block.restaurant_ids == ["a", "b"]
    assert len(block) == 2
    for features in block.restaurants():
        assert set(features.readings) == set(ONLINE_NAMES)
        for name, reading in features.readings.items():
            default = F.DEFAULTS[name]
            assert not reading.present
            assert reading.updated_ms is None
            assert reading.event_ms is None
            assert reading.writer is None
            assert reading.value == default or (math.isnan(default) and math.isnan(reading.value))


def test_readings_round_trip_through_the_block() -> None:
    kitchen = F.ORDERS_IN_KITCHEN
    readings = {
        kitchen: FeatureReading(kitchen, 4.0, True, 9_000, 8_500, (7, 9)),
        F.MEAN_PREP_MINUTES_60.name: FeatureReading(F.MEAN_PREP_MINUTES_60.name, math.nan, False),
    }
    block = FeatureBlock.from_features([RestaurantFeatures("r1", 10_000, readings, WHERE)])
    assert block.values[0][COLUMN[kitchen]] == 4.0
    view = block.restaurant(0)
    assert view.restaurant_id == "r1"
    assert view.location == WHERE
    assert view.as_of_ms == 10_000
    assert view.readings[kitchen] == readings[kitchen]
    prep = view.readings[F.MEAN_PREP_MINUTES_60.name]
    assert not prep.present
    assert math.isnan(prep.value)
    # a feature the readings did not name takes its default, not present
    busy = view.readings[F.KITCHEN_BUSY]
    assert busy == FeatureReading(F.KITCHEN_BUSY, F.DEFAULTS[F.KITCHEN_BUSY], False)


def test_writer_references_parse_from_bytes_text_or_pairs() -> None:
    assert parse_writer(f"{7:032x}-{9:016x}".encode()) == (7, 9)
    assert parse_writer(f"{7:032x}-{9:016x}") == (7, 9)
    assert parse_writer((7, 9)) == (7, 9)
    assert parse_writer(None) is None
    assert parse_writer(b"") is None
    assert parse_writer(False) is None
