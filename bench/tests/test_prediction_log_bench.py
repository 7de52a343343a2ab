"""The prediction log benchmark's quick run on a real PostgreSQL: every row written is counted back and
the first row's ``prediction_features`` document is the row's features (it raises otherwise)."""

from __future__ import annotations

import math

from bench import bench_prediction_log as B


def test_a_quick_run_writes_and_reads_back_every_row() -> None:
    result = B.run(quick=True)
    figures = result.figures
    assert figures["log_cpu_us_per_row"] > 0
    assert figures["floor_cpu_us_per_row"] > 0
    assert figures["bytes_per_row"] > 100  # 13 features, names included
    assert math.isclose(
        figures["encoding_cpu_us_per_row"], figures["log_cpu_us_per_row"] - figures["floor_cpu_us_per_row"]
    )
    assert [row["case"] for row in result.rows] == ["log", "floor"]


def test_the_rows_are_shaped_as_predict_eta_logs_them() -> None:
    rows = B.rows(3)
    assert [r.request_id for r in rows] == ["req-0000000000", "req-0000000001", "req-0000000002"]
    assert all(len(r.values) == len(B.FEATURES) for r in rows)
    assert all(math.isnan(r.values[-1]) for r in rows)  # a feature the model saw as missing
