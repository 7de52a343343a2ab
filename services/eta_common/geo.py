"""Validation of coordinates shared by every API that takes a location."""

from __future__ import annotations

import math
from typing import Protocol

__all__ = ["check_point", "valid_point"]


class _Point(Protocol):
    lat: float
    lng: float


def valid_point(lat: float, lng: float) -> bool:
    """Whether :func:`check_point` accepts the location, in one expression (a feed's hot path): a
    comparison with NaN or an infinity is False, and ``lat or lng`` is false only for (±0, ±0)."""
    return -90.0 <= lat <= 90.0 and -180.0 <= lng <= 180.0 and bool(lat or lng)


def check_point(out: list[tuple[str, str]], path: str, has: bool, point: _Point, *, required: bool) -> None:
    """Append (field, reason) for a missing or impossible location."""
    if not has:
        if required:
            out.append((path, "required"))
        return
    lat, lng = point.lat, point.lng
    if valid_point(lat, lng):
        return
    if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
        out.append((f"{path}.lat", "must be within [-90, 90]"))
    if not (math.isfinite(lng) and -180.0 <= lng <= 180.0):
        out.append((f"{path}.lng", "must be within [-180, 180]"))
    if lat == 0.0 and lng == 0.0:
        out.append((path, "(0, 0) is not a real location"))
