"""A feed's one-pass validation and ``check_point`` accept and reject exactly what the per-field rules do."""

from __future__ import annotations

import itertools
import math

from eta.v1 import eta_pb2, events_pb2
from eta_common.geo import check_point, valid_point
from prediction.server import _valid_restaurants

EDGES = [0.0, -0.0, 1.5, -1.5, 90.0, -90.0, 90.000001, 180.0, -180.0, 180.5, math.nan, math.inf, -math.inf]


def _reference(restaurants: list[eta_pb2.RestaurantLocation]) -> list[tuple[str, str]]:
    """The per-field rules, written out (not through ``valid_point``, which both paths now share)."""
    violations: list[tuple[str, str]] = []
    for i, item in enumerate(restaurants):
        path = f"restaurants[{i}].location"
        if not item.restaurant_id:
            violations.append((f"restaurants[{i}].restaurant_id", "required"))
        if not item.HasField("location"):
            violations.append((path, "required"))
            continue
        lat, lng = item.location.lat, item.location.lng
        if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
            violations.append((f"{path}.lat", "must be within [-90, 90]"))
        if not (math.isfinite(lng) and -180.0 <= lng <= 180.0):
            violations.append((f"{path}.lng", "must be within [-180, 180]"))
        if lat == 0.0 and lng == 0.0:
            violations.append((path, "(0, 0) is not a real location"))
    return violations


def test_check_point_names_the_same_fields_as_the_written_out_rules() -> None:
    for lat, lng in itertools.product(EDGES, EDGES):
        item = eta_pb2.RestaurantLocation(restaurant_id="r", location=events_pb2.GeoPoint(lat=lat, lng=lng))
        violations: list[tuple[str, str]] = []
        check_point(violations, "restaurants[0].location", True, item.location, required=True)
        assert violations == _reference([item]), (lat, lng)
        assert valid_point(lat, lng) == (not violations), (lat, lng)


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
