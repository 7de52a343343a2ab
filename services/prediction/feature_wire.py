"""Replies' repeated fields as protobuf wire bytes, for ``Message.MergeFromString``.

PredictEta answers with every model feature as an ``eta.v1.FeatureValue`` (value, presence, age and
two timestamps). Built as messages (``features.add(**fields)``, timestamps from dicts) that was the
handler's largest single cost, ~25 µs of ~110. Encoded here from cached pieces (the field tags, each
name's bytes, each distinct timestamp once and kept: a row's times repeat on every read) and parsed by
the protobuf runtime in C in one call. The bytes parse to exactly the message the field-by-field build
gives (a unit test compares them across present, missing, unknown and NaN values).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["EtaRowsWire", "FeatureWire"]

_DOUBLE = struct.Struct("<d").pack
_VALUE, _PRESENT, _UPDATED, _EVENT, _AGE = b"\x11", b"\x18\x01", b"\x22", b"\x2a", b"\x31"  # fields 2-6
_MASK64 = (1 << 64) - 1
_ONE_BYTE = [bytes((n,)) for n in range(128)]


def _varint(n: int) -> bytes:
    """A protobuf varint (a negative int64 as its 64-bit two's complement, ten bytes)."""
    if 0 <= n < 128:
        return _ONE_BYTE[n]
    if 0 < n < 16384:  # two bytes: a batch row's length
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    n &= _MASK64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string(tag: int, text: str) -> bytes:
    """A string field: its tag byte (field number < 16), the length, the UTF-8 bytes."""
    raw = text.encode()
    return bytes((tag,)) + _varint(len(raw)) + raw


def _timestamp(ms: float) -> bytes:
    """A ``google.protobuf.Timestamp`` of epoch milliseconds, length-prefixed (zero fields omitted)."""
    seconds, rest = divmod(int(ms), 1000)
    body = (b"\x08" + _varint(seconds) if seconds else b"") + (
        b"\x10" + _varint(rest * 1_000_000) if rest else b""
    )
    return _varint(len(body)) + body


class FeatureWire:
    """Encodes ``FeatureValue`` entries of a repeated field number ``field`` of the reply."""

    def __init__(self, field: int) -> None:
        self._tag = _varint(field << 3 | 2)
        self._names: dict[str, bytes] = {}

    def _name(self, name: str) -> bytes:
        part = self._names.get(name)
        if part is None:
            part = self._names[name] = _string(0x0A, name)
        return part

    def request_time(self, name: str, value: float) -> bytes:
        """A feature computed with the request (distance, hour): present, no age, no timestamps."""
        return self._entry(self._name(name) + _VALUE + _DOUBLE(value) + _PRESENT)

    def online(
        self,
        name: str,
        value: float,
        present: bool,
        age_seconds: float,
        updated_ms: float,
        event_ms: float,
    ) -> bytes:
        """A feature of the online store. Not present: the documented default, an unknown one (NaN) as
        0. ``updated_ms`` NaN (unknown): no ``updated_at`` and no age; ``event_ms`` NaN: no
        ``event_time``. Encoded timestamps are kept across calls (a row's times repeat on every read)."""
        if not present and math.isnan(value):
            value = 0.0
        parts = [self._name(name), _VALUE, _DOUBLE(value)]
        if present:
            parts.append(_PRESENT)
        if not math.isnan(updated_ms):
            parts += (_AGE, _DOUBLE(age_seconds), _UPDATED, _stamp(updated_ms))
        if not math.isnan(event_ms):
            parts += (_EVENT, _stamp(event_ms))
        return self._entry(b"".join(parts))

    def _entry(self, body: bytes) -> bytes:
        return self._tag + _varint(len(body)) + body


_STAMPS: dict[float, bytes] = {}
STAMPS_KEPT = 100_000  # encoded timestamps kept (~15 MB at most): a row's times repeat on every read


def _stamp(ms: float) -> bytes:
    encoded = _STAMPS.get(ms)
    if encoded is None:
        if len(_STAMPS) >= STAMPS_KEPT:
            _STAMPS.clear()
        encoded = _STAMPS[ms] = _timestamp(ms)
    return encoded


# --- PredictEtaBatchResponse.etas ------------------------------------------------------------------------


class EtaRowsWire:
    """Encodes a batch reply's ``repeated RestaurantEta etas`` (field 4) for ``MergeFromString``.

    Built as 50 ``RestaurantEta`` messages from Python lists (26 floats each) that was a feed's largest
    single cost, ~160 µs of a batch's ~770 in-process. Here every row's fixed part — its three minutes,
    its quality and its two packed columns of ``k`` doubles — is one record of a numpy structured array
    filled column-wise from the arrays the handler already holds; a row then only adds its id and its
    (usually empty) stale and missing names: ~50 µs, serialisation included. The bytes parse to exactly
    the message the field-by-field build gives (unit-tested), and gRPC serialises the parsed message as
    usual, so what goes on the wire is the runtime's own canonical encoding."""

    def __init__(self) -> None:
        self._layouts: dict[int, tuple[np.dtype[Any], bytes]] = {}
        self._ids: dict[str, bytes] = {}
        self._names: dict[tuple[Any, ...], bytes] = {}

    def _layout(self, k: int) -> tuple[np.dtype[Any], bytes]:
        """The fixed record of ``k`` features per row, and the length prefix of one packed column."""
        found = self._layouts.get(k)
        if found is None:
            prefix = _varint(8 * k)
            fields: list[Any] = [
                ("eta_tag", "u1"), ("eta", "<f8"), ("low_tag", "u1"), ("low", "<f8"),
                ("high_tag", "u1"), ("high", "<f8"), ("quality_tag", "u1"), ("quality", "u1"),
                ("values_tag", "u1"), ("values_len", "u1", (len(prefix),)), ("values", "<f8", (k,)),
                ("ages_tag", "u1"), ("ages_len", "u1", (len(prefix),)), ("ages", "<f8", (k,)),
            ]  # fmt: skip
            found = self._layouts[k] = (np.dtype(fields), prefix)
        return found

    def _id(self, restaurant_id: str) -> bytes:
        part = self._ids.get(restaurant_id)
        if part is None:
            if len(self._ids) >= IDS_KEPT:
                self._ids.clear()
            part = self._ids[restaurant_id] = _string(0x0A, restaurant_id)
        return part

    def _names_of(self, tag: int, names: Sequence[str]) -> bytes:
        """A repeated string field of these names, kept per (field, names): a feed's rows share a few
        sets (e.g. the customer features, missing on every row of a call without a customer)."""
        key = (tag, *names)
        part = self._names.get(key)
        if part is None:
            if len(self._names) >= IDS_KEPT:
                self._names.clear()
            part = self._names[key] = b"".join(_string(tag, name) for name in names)
        return part

    def encode(
        self,
        restaurant_ids: Sequence[str],
        points: Any,
        lows: Any,
        highs: Any,
        qualities: Sequence[int],
        values: np.ndarray,
        ages: np.ndarray,
        stale: Sequence[Sequence[str]],
        missing: Sequence[Sequence[str]],
    ) -> bytes:
        """Rows ``i`` of: the ids, the three minutes, the qualities (enum numbers), ``values`` and
        ``ages`` (n × k float64 arrays, NaN already replaced as the reply wants), the stale and missing
        feature names."""
        n = len(restaurant_ids)
        layout, prefix = self._layout(values.shape[1])
        rows = np.empty(n, layout)
        rows["eta_tag"], rows["low_tag"], rows["high_tag"] = 0x11, 0x19, 0x21  # fields 2-4, 64-bit
        rows["quality_tag"], rows["values_tag"], rows["ages_tag"] = 0x28, 0x32, 0x3A  # 5 varint, 6-7 packed
        rows["values_len"] = rows["ages_len"] = np.frombuffer(prefix, dtype=np.uint8)
        rows["eta"], rows["low"], rows["high"] = points, lows, highs
        rows["quality"] = qualities  # enum numbers below 128: one varint byte (a unit test checks)
        rows["values"], rows["ages"] = values, ages
        fixed = rows.tobytes()
        size = layout.itemsize
        restaurant = self._id
        parts = []
        for i in range(n):
            body = restaurant(restaurant_ids[i]) + fixed[i * size : (i + 1) * size]
            if stale[i]:
                body += self._names_of(0x42, stale[i])  # field 8
            if missing[i]:
                body += self._names_of(0x4A, missing[i])  # field 9
            parts.append(_ETAS_TAG + _varint(len(body)) + body)
        return b"".join(parts)


_ETAS_TAG = b"\x22"  # PredictEtaBatchResponse.etas: field 4, length-delimited
IDS_KEPT = 100_000  # encoded restaurant ids (a city's restaurants), and name sets, kept at most
