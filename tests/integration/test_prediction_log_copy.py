"""The prediction log's COPY text lines, written to a real PostgreSQL, read back as the rows they encode:
odd text in every text column (tab, newline, carriage return, backslash, quotes, non-ASCII, NUL), NULL
for an absent customer and market, a NaN feature as JSON null, and the supply's as-of instant."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from devstack.infra import ChildProcess
from eta_common import features as F
from eta_common.db.migrate import apply_migrations
from prediction.prediction_log import LoggedPrediction, PredictionLog, copy_sink

NAMES = ("orders_in_kitchen", "mean_prep_minutes_last_60_min", "distance_km")
ODD = "a\tb\nc\rd\\e\"f'g é 🍕 \\N \0end"


@pytest.fixture
async def pool(postgres: ChildProcess) -> AsyncIterator[asyncpg.Pool]:
    await apply_migrations(postgres.url)
    pool = await asyncpg.create_pool(postgres.url, min_size=0, max_size=2)
    await pool.execute("TRUNCATE predictions")
    yield pool
    await pool.close()


def row(i: int, **fields: object) -> LoggedPrediction:
    base = LoggedPrediction(
        1_800_000_000_123 + i, f"req-{i}", f"r{i}", "v1", 20.25, 15.0, 28.5, "COMPLETE", NAMES,
        [3.0, math.nan, 1.75], f"cust-{i}", 1_800_000_000_000.0, "berlin",
    )  # fmt: skip
    return base._replace(**fields)  # type: ignore[arg-type]


async def test_logged_rows_read_back_as_written(pool: asyncpg.Pool) -> None:
    log = PredictionLog(copy_sink(pool), capacity=100, batch_size=2, flush_seconds=60)
    rows = [
        row(0),
        row(1, request_id=ODD, restaurant_id=ODD, model_version=ODD, customer_id=ODD, market=ODD),
        row(2, customer_id="", market="", supply_as_of_ms=math.nan, eta=float("inf")),
    ]
    for r in rows:
        log.add(r)
    await log.close(timeout_seconds=10)
    stored = await pool.fetch("SELECT * FROM predictions ORDER BY id")
    assert len(stored) == 3
    nul_free = ODD.replace("\0", "")  # PostgreSQL text cannot hold NUL
    for got, want in zip(stored, rows, strict=True):
        text = (lambda s: s.replace("\0", "")) if want.request_id == ODD else (lambda s: s)
        assert got["served_at"] == datetime.fromtimestamp(want.served_ms / 1000, UTC)
        assert got["request_id"] == text(want.request_id)
        assert got["restaurant_id"] == text(want.restaurant_id)
        assert got["model_version"] == text(want.model_version)
        assert (got["eta_minutes"], got["eta_low_minutes"], got["eta_high_minutes"]) == (
            want.eta,
            want.low,
            want.high,
        )
        assert got["feature_quality"] == want.quality
        assert got["customer_id"] == (text(want.customer_id) or None)
        assert got["market_id"] == (text(want.market) or None)
        features = json.loads(got["features"])
        expected = {"orders_in_kitchen": 3.0, "mean_prep_minutes_last_60_min": None, "distance_km": 1.75}
        if not math.isnan(want.supply_as_of_ms):
            expected[F.SUPPLY_AS_OF_LOG_KEY] = int(want.supply_as_of_ms)
        assert features == expected
    assert stored[1]["request_id"] == nul_free
