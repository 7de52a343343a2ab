"""Online features of many restaurants as columns: what the serving path reads, checks and scores.

:meth:`eta_common.online_store.OnlineStore.read_block` fills one (from ready rows, one Redis command per
restaurant; see :mod:`eta_common.online.reader`). The
prediction service then computes ages, staleness and quality over whole columns and hands the value
rows to the model, instead of building a reading object per feature and restaurant (the largest Python
cost of a read before). Rows are plain lists, not arrays: numpy's per-operation overhead made a
one-restaurant prediction ~60 % more expensive than per-row Python (measured here), and the
one-restaurant call is the common one. :meth:`FeatureBlock.restaurant` gives one
restaurant's view as :class:`RestaurantFeatures` (readings with their
provenance) for the callers that want it: the feature RPC, the consistency check, tests.

Layout: row ``i`` is ``restaurant_ids[i]``; the columns are
:data:`eta_common.features.FEATURE_NAMES` (the model's canonical row). The online columns
(:data:`ONLINE_COLUMNS`) carry a value, whether the store knows it (``present``: a windowed mean with no
sample in its window is present with the value NaN, the value the model was trained with; absent means
the store has nothing for the feature), and its provenance:
``updated_ms`` (when the store last changed it) and ``event_ms`` (the newest event time it reflects),
NaN when unknown. The request-time columns (distance, hour of the week) are the caller's to fill.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eta_common import features as F

__all__ = [
    "COLUMN",
    "DEFAULT_ROW",
    "ONLINE_COLUMNS",
    "ONLINE_NAMES",
    "FeatureBlock",
    "FeatureColumns",
    "FeatureReading",
    "K",
    "RestaurantFeatures",
    "Rows",
    "parse_writer",
]

Rows = list[list[float]]

K = len(F.FEATURE_NAMES)
COLUMN = {name: k for k, name in enumerate(F.FEATURE_NAMES)}
ONLINE_NAMES: tuple[str, ...] = tuple(name for name in F.FEATURE_NAMES if name in F.DEFAULTS)
ONLINE_COLUMNS: tuple[int, ...] = tuple(COLUMN[name] for name in ONLINE_NAMES)
# every feature's default (request-time columns 0): the row a restaurant starts from
DEFAULT_ROW: tuple[float, ...] = tuple(F.DEFAULTS.get(name, 0.0) for name in F.FEATURE_NAMES)


def parse_writer(ref: Any) -> tuple[int, int] | None:
    """``(trace_id, span_id)`` from a stored ``<trace hex>-<span hex>`` reference (bytes or str), or a
    parsed pair as it is; None when there is none."""
    if ref is None or ref is False or ref in {b"", ""}:
        return None
    if isinstance(ref, tuple):
        return (int(ref[0]), int(ref[1]))
    text = ref.decode() if isinstance(ref, bytes) else str(ref)
    trace_hex, _, span_hex = text.partition("-")
    return int(trace_hex, 16), int(span_hex, 16)


@dataclass(slots=True)  # not frozen: a frozen init costs 4x
class FeatureReading:
    """One feature value with its freshness (a value object: never changed after the read)."""

    name: str
    value: float
    present: bool
    updated_ms: int | None = None
    event_ms: int | None = None
    # (trace_id, span_id) of the aggregator span that last changed it, when that span was sampled.
    writer: tuple[int, int] | None = None

    def age_seconds(self, now_ms: int) -> float | None:
        return None if self.updated_ms is None else max(0.0, (now_ms - self.updated_ms) / 1000.0)


@dataclass
class RestaurantFeatures:
    """One restaurant's online features as readings (the feature RPC, the consistency check, tests)."""

    restaurant_id: str
    as_of_ms: int
    readings: dict[str, FeatureReading] = field(default_factory=dict)
    location: tuple[float, float] | None = None

    def vector(self, names: Sequence[str]) -> list[float]:
        return [self.readings[name].value for name in names]


def _ms(x: float) -> int | None:
    return None if math.isnan(x) else int(x)


@dataclass(slots=True)
class FeatureBlock:
    restaurant_ids: list[str]
    locations: list[tuple[float, float] | None]
    as_of_ms: int
    values: Rows  # n rows of K
    present: list[list[bool]]
    updated_ms: Rows  # NaN = unknown
    event_ms: Rows  # NaN = unknown
    # per row, per column: the writer reference (see parse_writer) of the aggregator span that last
    # changed the value, when that span was sampled; None otherwise
    writers: list[Sequence[Any]]
    # how many rows came from ready rows and how many from the exact read (a row not valid at as_of_ms)
    from_rows: int = 0
    from_fallback: int = 0
    # per row: the instant its free-driver count is exact for when it was materialised before the read
    # (NaN: counted by the read itself, exact at as_of_ms); the consistency check judges it there
    supply_as_of_ms: list[float] = field(default_factory=list)
    # when the store was last known current (every aggregator caught up with the event stream; NaN:
    # unknown): an event-driven value that has not changed since is exact as of then, whatever its age
    current_ms: float = math.nan

    def __len__(self) -> int:
        return len(self.restaurant_ids)

    @classmethod
    def defaults(cls, requests: Sequence[tuple[str, tuple[float, float]]], now_ms: int) -> FeatureBlock:
        """The documented default of every online feature, all flagged not present."""
        n = len(requests)
        nothing: tuple[None, ...] = (None,) * K
        return cls(
            [rid for rid, _ in requests],
            [location for _, location in requests],
            now_ms,
            [list(DEFAULT_ROW) for _ in range(n)],
            [[False] * K for _ in range(n)],
            [[math.nan] * K for _ in range(n)],
            [[math.nan] * K for _ in range(n)],
            [nothing] * n,
        )

    @classmethod
    def from_features(cls, found: Sequence[RestaurantFeatures]) -> FeatureBlock:
        """A block from per-restaurant readings (a feature absent from ``readings`` takes its default,
        not present)."""
        block = cls.defaults([(f.restaurant_id, (0.0, 0.0)) for f in found], 0)
        values, present, updated, event = block.values, block.present, block.updated_ms, block.event_ms
        writers: list[Sequence[Any]] = []
        for i, features in enumerate(found):
            refs: list[Any] = [None] * K
            for name, reading in features.readings.items():
                k = COLUMN.get(name)
                if k is None:
                    continue
                values[i][k] = reading.value
                present[i][k] = reading.present
                if reading.updated_ms is not None:
                    updated[i][k] = reading.updated_ms
                if reading.event_ms is not None:
                    event[i][k] = reading.event_ms
                refs[k] = reading.writer
            writers.append(refs)
        return cls(
            [features.restaurant_id for features in found],
            [features.location for features in found],
            found[0].as_of_ms if found else 0,
            values,
            present,
            updated,
            event,
            writers,
        )

    def restaurant(self, i: int) -> RestaurantFeatures:
        """Row ``i`` as readings (every online feature) with their provenance."""
        values, present = self.values[i], self.present[i]
        updated, event = self.updated_ms[i], self.event_ms[i]
        refs = self.writers[i]
        readings = {
            name: FeatureReading(
                name, values[k], present[k], _ms(updated[k]), _ms(event[k]), parse_writer(refs[k])
            )
            for name, k in zip(ONLINE_NAMES, ONLINE_COLUMNS, strict=True)
        }
        return RestaurantFeatures(self.restaurant_ids[i], self.as_of_ms, readings, self.locations[i])

    def restaurants(self) -> list[RestaurantFeatures]:
        return [self.restaurant(i) for i in range(len(self))]


@dataclass(slots=True)
class FeatureColumns:
    """A :class:`FeatureBlock` as arrays (rows × :data:`K`): what a feed computes on column-wise. The
    reader builds it straight from its cached row templates when a read is answered from memory
    (:meth:`eta_common.online.reader.OnlineReader.read_columns_from_memory`), with no per-row lists;
    :meth:`of_block` converts any block (the full read, the defaults) to the same layout. Only what a
    feed uses: no event times or writers (a traced feed reads the block, whose span links need them)."""

    restaurant_ids: list[str]
    locations: list[tuple[float, float] | None]
    values: np.ndarray  # float64; the request-time columns are the caller's to fill
    present: np.ndarray  # bool
    updated_ms: np.ndarray  # float64, NaN = unknown
    from_rows: int = 0
    supply_as_of_ms: list[float] = field(default_factory=list)
    current_ms: float = math.nan

    def __len__(self) -> int:
        return len(self.restaurant_ids)

    @classmethod
    def of_block(cls, block: FeatureBlock) -> FeatureColumns:
        n = len(block)
        flat = itertools.chain.from_iterable
        # np.fromiter over the flattened rows: ~10 µs less per array than np.array's shape discovery
        return cls(
            block.restaurant_ids,
            block.locations,
            np.fromiter(flat(block.values), np.float64, n * K).reshape(n, K),
            np.fromiter(flat(block.present), bool, n * K).reshape(n, K),
            np.fromiter(flat(block.updated_ms), np.float64, n * K).reshape(n, K),
            block.from_rows,
            block.supply_as_of_ms,
            block.current_ms,
        )
