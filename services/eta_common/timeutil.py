"""Conversions between protobuf Timestamps, epoch milliseconds and datetimes (always UTC)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

__all__ = ["datetime_from_ms", "ms_from_timestamp", "now_ms", "timestamp_from_ms"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def ms_from_timestamp(ts: Timestamp) -> int:
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def timestamp_from_ms(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.seconds, rem = divmod(ms, 1000)
    ts.nanos = rem * 1_000_000
    return ts


def datetime_from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
