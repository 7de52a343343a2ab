"""The prediction log's cost per row, against the floor of writing the same rows.

Every ``PredictEta`` is logged (``prediction.prediction_log``): after the handler returns, a callback
encodes the waiting rows (8 at a time) to records of PostgreSQL's binary ``COPY`` format, and a
background task writes them with one ``COPY`` per batch of ``PREDICTION_LOG_BATCH`` (500). On the
serving process that is CPU taken from predictions (the serving benchmark measures it at ~2–10 % of a
call's CPU under load, within that benchmark's noise), and on PostgreSQL it is most of the service's
write load. Measured here on a real PostgreSQL (from the wheel, pinned to core 1; this process, the
"server", alone on core 0), per round, on rows shaped as ``PredictEta`` logs them (13 model features, a
request id, a customer, a market, the supply's as-of instant):

- **the log**: :class:`PredictionLog` fed 8 rows per event-loop turn (as 8 handlers would), its encoding
  callbacks and its writer: this process's CPU per row (what the serving process pays) and PostgreSQL's;
- **the floor** (baseline, same run): the same records encoded beforehand and written with the same
  ``COPY`` batches, with the same event-loop turns: what writing these rows costs whatever the encoding;
- the rows read back (count, and one row's ``prediction_features`` document) and the table's bytes per row.

The ratio is the log's CPU per row on the serving side over the floor's; their difference is the log's
own work (keeping, encoding and batching a row), what a faster format or encoder could save.
(The format this replaced, text lines with a JSON document per row, measured by hand on this machine in
a slow phase: 22–26 µs per row on the serving side and 20–25 µs on PostgreSQL, against 8–11 and 15–20.)
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import asyncpg

from bench import harness as H
from bench.result import BenchResult
from eta_common import features as F

NAME = "prediction_log"
FEATURES = F.FEATURE_NAMES  # the model's inputs, as the service logs them
BATCH = 500
PER_TURN = 8  # rows added between event-loop turns (the log's encoding callback runs every 8 rows)


def rows(n: int) -> list[Any]:
    from prediction.prediction_log import LoggedPrediction

    served = 1_765_000_000_000

    def one(i: int) -> LoggedPrediction:
        values = [float(i % 17) + 0.37 * k for k in range(len(FEATURES) - 1)] + [math.nan]
        return LoggedPrediction(
            served + i, f"req-{i:010d}", f"rest-{i % 500:05d}", "v-bench-1", 23.4 + i % 7, 18.1, 31.9,
            "COMPLETE", FEATURES, values, f"cust-{i % 900:05d}", float(served - 5_000), "berlin",
        )  # fmt: skip

    return [one(i) for i in range(n)]


async def _measure(pool: asyncpg.Pool, postgres_pid: int, work: Any, n: int) -> tuple[float, float, float]:
    """(this process's, PostgreSQL's) CPU µs per row while ``work`` runs, and the table's bytes per row."""
    await pool.execute("TRUNCATE predictions")
    own, pg = time.process_time(), H.tree_cpu_seconds(postgres_pid)
    await work()
    own, pg = time.process_time() - own, H.tree_cpu_seconds(postgres_pid) - pg
    stored = await pool.fetchval("SELECT count(*) FROM predictions")
    if stored != n:
        raise RuntimeError(f"{stored} rows stored of {n} written")
    size = await pool.fetchval("SELECT pg_total_relation_size('predictions')")
    return 1e6 * own / n, 1e6 * pg / n, size / n


async def _run(database_url: str, postgres_pid: int, n: int, rounds: int) -> dict[str, Any]:
    from eta_common.db.migrate import apply_migrations
    from prediction.prediction_log import PredictionLog, copy_record, copy_sink

    await apply_migrations(database_url)
    data = rows(n)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        sink = copy_sink(pool)

        async def the_log() -> None:
            log = PredictionLog(sink, capacity=n + 1, batch_size=BATCH, flush_seconds=3600)
            writer = asyncio.ensure_future(log.run())
            try:
                for start in range(0, n, PER_TURN):
                    for row in data[start : start + PER_TURN]:
                        log.add(row)
                    await asyncio.sleep(0)  # the handlers' turn ends: the encoding callback runs
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            await log.close(timeout_seconds=60)

        records = [copy_record(row) for row in data]

        async def the_floor() -> None:  # the same loop turns, the same batches: only the log's work differs
            for start in range(0, n, BATCH):
                for _ in range(0, BATCH, PER_TURN):
                    await asyncio.sleep(0)
                await sink(records[start : start + BATCH])

        runs: dict[str, list[tuple[float, float, float]]] = {"log": [], "floor": []}
        for _ in range(rounds):
            runs["log"].append(await _measure(pool, postgres_pid, the_log, n))
            runs["floor"].append(await _measure(pool, postgres_pid, the_floor, n))
        document = await pool.fetchval("SELECT prediction_features(p) FROM predictions p ORDER BY id LIMIT 1")
    finally:
        await pool.close()
    return {"runs": runs, "document": json.loads(document)}


def run(quick: bool) -> BenchResult:
    n, rounds = (2_000, 1) if quick else (50_000, 7)
    if (os.cpu_count() or 1) < 2:
        raise RuntimeError("needs at least 2 CPUs (this process on one, PostgreSQL on the other)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-log-"))
    try:
        with H.infrastructure(workdir) as infra:
            H.renice_tree(infra.postgres_pid, 0)  # alone on its core here: measured at normal priority
            os.sched_setaffinity(0, H.SERVER_CPUS)
            try:
                out = asyncio.run(_run(infra.database_url, infra.postgres_pid, n, rounds))
            finally:
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    runs = out["runs"]
    med = {
        kind: [median(r[i] for r in runs[kind]) for i in range(3)]  # own CPU, PostgreSQL CPU, bytes
        for kind in ("log", "floor")
    }
    expected = dict(zip(FEATURES, rows(1)[0].values, strict=True))
    got = {k: v for k, v in out["document"].items() if not k.startswith("@")}
    if got != {k: None if math.isnan(v) else v for k, v in expected.items()}:
        raise RuntimeError(f"the first row reads back as {out['document']}, not the row written")
    figures = {
        "log_cpu_us_per_row": med["log"][0],
        "log_postgres_cpu_us_per_row": med["log"][1],
        "floor_cpu_us_per_row": med["floor"][0],
        "floor_postgres_cpu_us_per_row": med["floor"][1],
        "encoding_cpu_us_per_row": med["log"][0] - med["floor"][0],
        "ratio_log_to_floor_cpu": med["log"][0] / med["floor"][0],
        "bytes_per_row": med["log"][2],
    }
    table = [
        {
            "case": kind,
            "serving-side CPU µs/row": med[kind][0],
            "PostgreSQL CPU µs/row": med[kind][1],
            "bytes/row": med[kind][2],
            "rounds (serving-side µs/row)": " / ".join(f"{r[0]:.1f}" for r in runs[kind]),
        }
        for kind in ("log", "floor")
    ]
    return BenchResult(
        name=NAME,
        rows=table,
        figures=figures,
        baseline="the floor: the same rows' records, encoded beforehand, written with the same COPY batches",
        notes=[
            f"{n:,} rows per round, {rounds} round(s), batches of {BATCH}, {PER_TURN} rows added per loop "
            "turn; medians; every round's rows counted back, the first row's prediction_features() checked",
            f"load average at end: {H.load_average()}",
        ],
        extra={"runs": runs},
    )
