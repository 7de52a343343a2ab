"""The prediction log's binary COPY records, written to a real PostgreSQL, read back as the rows they
encode: odd text in every text column (tab, newline, carriage return, backslash, quotes, non-ASCII, NUL),
NULL for an absent customer and market, ∞ and NaN, and ``prediction_features(p)`` (migration 0008) giving
the document the consistency check reads: a NaN feature as JSON null, the supply's as-of instant under
its key — and a row logged before, with its JSON document, read back as that document."""

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
    stored = await pool.fetch("SELECT p.*, prediction_features(p) AS document FROM predictions p ORDER BY id")
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
        assert got["feature_names"] == list(NAMES)
        assert got["feature_values"][0::2] == [3.0, 1.75]
        assert math.isnan(got["feature_values"][1])
        features = json.loads(got["document"])
        expected = {"orders_in_kitchen": 3.0, "mean_prep_minutes_last_60_min": None, "distance_km": 1.75}
        if not math.isnan(want.supply_as_of_ms):
            expected[F.SUPPLY_AS_OF_LOG_KEY] = int(want.supply_as_of_ms)
        assert features == expected
    assert stored[1]["request_id"] == nul_free


async def test_a_row_logged_before_the_arrays_reads_as_its_document(pool: asyncpg.Pool) -> None:
    document = {"orders_in_kitchen": 2.0, "mean_prep_minutes_last_60_min": None}
    await pool.execute(
        "INSERT INTO predictions (served_at, restaurant_id, model_version, eta_minutes, eta_low_minutes,"
        " eta_high_minutes, feature_quality, features)"
        " VALUES (now(), 'r0', 'v0', 20, 15, 28, 'COMPLETE', $1)",
        json.dumps(document),
    )
    got = await pool.fetchval("SELECT prediction_features(p) FROM predictions p")
    assert json.loads(got) == document
