"""The ready row: one restaurant's features, materialised by the aggregator, read with one command.

``rst:{R}:row`` is a hash of two fields, each one packed string (``|``-separated):

* ``w``, written by ``lua/apply_restaurant.lua`` on every update and by the row timer:
  ``r1 | computed_ms | valid_until_ms | <count per WINDOW_COUNTS> | kitchen | <sum | n per WINDOW_MEANS,
  then per PICKUP_WAIT_MEANS> | <the 15 META_FIELDS>`` (empty text for an absent field; valid_until empty
  when no window can change without a new event). The row is exact for a read at ``t`` with
  ``computed_ms <= t < valid_until_ms``: nothing enters or leaves a window in that interval, and any new
  event rewrites the row in the same script call that applies it.
* ``n``, the same as ``w`` computed ahead of time as of ``w``'s ``valid_until`` by the row timer (a read
  uses whichever of the two is valid at its time; any update rewrites ``w`` and drops ``n``).
* ``s``, written by the supply refresher: ``count | as_of_ms | drivers_event_ms | writer``: the free
  drivers within the supply radius counted at ``as_of_ms`` (its age is ``now - as_of_ms``; the feature's
  staleness budget bounds it).

Parsing is a ``split`` and a few ``float`` calls: the whole point of the row is that a read does no work.
"""

from __future__ import annotations

import math
from typing import Any

from eta_common import features as F
from eta_common.online.assemble import RestaurantState, Supply, num

__all__ = ["ROW_FIELDS", "ROW_VERSION", "Row", "parse_row", "parse_supply", "supply_text", "valid_row"]

ROW_VERSION = b"r1"
ROW_FIELDS = ("w", "n", "s")
_NWIN = len(F.WINDOW_COUNTS)
_NMEANS = len(F.WINDOW_MEANS) + len(F.PICKUP_WAIT_MEANS)
_KITCHEN = 3 + _NWIN
_MEANS = _KITCHEN + 1
_META = _MEANS + 2 * _NMEANS
_LENGTH = _META + 15


class Row:
    """A parsed ``w`` field: its validity interval and the restaurant's state and location."""

    __slots__ = ("computed_ms", "location", "state", "valid_until_ms")

    def __init__(
        self,
        computed_ms: int,
        valid_until_ms: float,
        state: RestaurantState,
        location: tuple[float, float] | None,
    ) -> None:
        self.computed_ms = computed_ms
        self.valid_until_ms = valid_until_ms
        self.state = state
        self.location = location

    def valid_at(self, t: int) -> bool:
        return self.computed_ms <= t < self.valid_until_ms


def parse_row(w: Any, supply: Supply | None) -> Row | None:
    """The row of a ``w`` field (None when absent or of another version)."""
    if not w:
        return None
    parts = w.split(b"|")
    if len(parts) != _LENGTH or parts[0] != ROW_VERSION:
        return None
    valid_until = float(parts[2]) if parts[2] else math.inf
    means = parts[_MEANS:_META]
    meta = [value or None for value in parts[_META:]]
    lat, lng = meta[1], meta[2]
    state = RestaurantState(
        [float(x) for x in parts[3:_KITCHEN]],
        float(parts[_KITCHEN]),
        [(float(means[i]), float(means[i + 1])) for i in range(0, 2 * _NMEANS, 2)],
        meta,
        supply,
    )
    location = (float(lat), float(lng)) if lat is not None and lng is not None else None
    return Row(int(parts[1]), valid_until, state, location)


def parse_supply(s: Any) -> Supply | None:
    """The supply of an ``s`` field (None when absent)."""
    if not s:
        return None
    count, as_of, event, writer = s.split(b"|")
    at = float(as_of)
    return Supply(float(count), at, num(event), writer or None, at)


def supply_text(count: int, as_of_ms: int, event_ms: int | None, writer: Any) -> str:
    """The ``s`` field of a count taken at ``as_of_ms`` (``writer``: the drivers group's t: reference)."""
    ref = writer.decode() if isinstance(writer, bytes) else (writer or "")
    return f"{count}|{as_of_ms}|{'' if event_ms is None else event_ms}|{ref}"


def valid_row(w: Any, n: Any, supply: Supply | None, t: int) -> Row | None:
    """The one of the two row versions that is valid at ``t`` (None: neither; read exactly)."""
    row = parse_row(w, supply)
    if row is not None and row.valid_at(t):
        return row
    ahead = parse_row(n, supply) if n else None
    return ahead if ahead is not None and ahead.valid_at(t) else None
