"""A feed's one-pass validation accepts and rejects exactly what the per-field checks do."""

from __future__ import annotations

import itertools
import math

from eta.v1 import eta_pb2, events_pb2
from eta_common.geo import check_point
from prediction.server import _valid_restaurants

EDGES = [0.0, -0.0, 1.5, -1.5, 90.0, -90.0, 90.000001, 180.0, -180.0, 180.5, math.nan, math.inf, -math.inf]


def _reference(restaurants: list[eta_pb2.RestaurantLocation]) -> list[tuple[str, str]]:
    """The checks the handler ran on every restaurant before the one-pass version."""
    violations: list[tuple[str, str]] = []
    for i, item in enumerate(restaurants):
        if not item.restaurant_id:
            violations.append((f"restaurants[{i}].restaurant_id", "required"))
        check_point(
            violations, f"restaurants[{i}].location", item.HasField("location"), item.location, required=True
        )
    return violations


def test_every_edge_location_and_id_is_judged_as_the_field_checks_judge_it() -> None:
    items = [
        eta_pb2.RestaurantLocation(restaurant_id=rid, location=events_pb2.GeoPoint(lat=lat, lng=lng))
        for rid, lat, lng in itertools.product(["r", ""], EDGES, EDGES)
    ]
    items += [eta_pb2.RestaurantLocation(restaurant_id="r"), eta_pb2.RestaurantLocation()]  # no location
    for item in items:
        violations: list[tuple[str, str]] = []
        wanted = _valid_restaurants([item], violations)
        assert violations == _reference([item]), item
        assert (wanted == []) == bool(violations), item
    violations = []
    wanted = _valid_restaurants(items, violations)
    assert violations == _reference(items)
    assert wanted == [
        (item.restaurant_id, (item.location.lat, item.location.lng))
        for i, item in enumerate(items)
        if not _reference([item])
    ]
