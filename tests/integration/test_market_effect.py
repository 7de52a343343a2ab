"""Markets through the offline path on real PostgreSQL, as a user runs it: ``eta-simulator seed --markets``
archives every event with its market, and ``eta-trainer market-effect`` builds the training set per market
and pooled, and reports the holdout MAE of its three variants overall and per market."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import asyncpg
import pytest

from devstack.infra import ChildProcess

pytestmark = pytest.mark.integration
END = "2026-11-30T00:00:00"


def _run(*argv: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", *argv], env=env, capture_output=True, text=True, timeout=600, check=False
    )


async def test_seed_markets_and_measure_their_effect(postgres: ChildProcess) -> None:
    seeded = await asyncio.to_thread(
        _run, "simulator", "seed", "--days", "3", "--end", END, "--markets", "berlin:6,munich:3:12",
        "--no-progress", url=postgres.url,
    )  # fmt: skip
    assert seeded.returncode == 0, seeded.stderr
    conn = await asyncpg.connect(postgres.url)
    try:
        rows = await conn.fetch(
            "SELECT market_id, count(*) AS n, count(DISTINCT restaurant_id) AS r FROM events GROUP BY 1"
        )
    finally:
        await conn.close()
    by_market = {r["market_id"]: (r["n"], r["r"]) for r in rows}
    assert set(by_market) == {"berlin", "munich"}  # every event archived with its market
    assert by_market["berlin"][1] == 6
    assert by_market["munich"][1] == 3
    measured = await asyncio.to_thread(
        _run, "trainer", "market-effect", "--as-of", END, "--history-days", "2", "--rounds", "40", "--json",
        url=postgres.url,
    )  # fmt: skip
    assert measured.returncode == 0, measured.stderr
    report = json.loads(measured.stdout)
    assert set(report["holdout_rows_by_market"]) == {"berlin", "munich"}
    assert sum(report["holdout_rows_by_market"].values()) == report["rows_holdout"] > 20
    maes = report["holdout_mae_minutes"]
    assert set(maes) == {"per-market", "pooled", "per-market + market"}
    for variant in maes.values():
        assert set(variant) == {"all", "berlin", "munich"}
        assert all(0 < v < 60 for v in variant.values())
