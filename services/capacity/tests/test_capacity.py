"""The capacity model: its arithmetic on known costs, the shipped costs, and the command."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from capacity import model
from capacity.__main__ import main
from capacity.model import Costs, Profile, load_costs, size
from eta_common import features as F

UNIT = Costs(
    aggregator_cpu_us_per_ping=20.0,
    aggregator_cpu_us_per_dropped_ping=5.0,
    aggregator_cpu_us_per_order_event=40.0,
    redis_cpu_us_per_ping=10.0,
    redis_cpu_us_per_order_event=30.0,
    postgres_cpu_us_per_ping_row=10.0,
    postgres_cpu_us_per_order_event_row=20.0,
    archive_bytes_per_ping_row=300.0,
    archive_bytes_per_order_event_row=400.0,
    order_events_per_order=5.0,
    redis_bytes_per_driver=200.0,
    redis_bytes_per_order=400.0,
    redis_bytes_per_restaurant=600.0,
    ingestion_cpu_us_per_event=40.0,
    prediction_cpu_us_per_call=800.0,
    prediction_cpu_us_per_batch_restaurant=80.0,
    redis_cpu_us_per_prediction=40.0,
    redis_cpu_us_per_batch_restaurant=2.0,
)
LARGE = Profile(
    orders_per_min=30_000,
    online_drivers=1_000_000,
    feed_loads_per_s=50_000,
    checkout_predictions_per_s=1_000,
    markets=50,
)


def test_rates_follow_the_profile() -> None:
    sizing = size(LARGE, UNIT)
    assert sizing.get("driver pings") == 250_000
    keep = F.PING_KEEP_WINDOW_MS / F.PING_KEEP_PERIOD_MS
    assert sizing.get("pings kept") == pytest.approx(250_000 * keep)
    assert sizing.get("order events") == pytest.approx(30_000 / 60 * 5)
    assert sizing.get("feed restaurant predictions") == 2_500_000
    everything = size(replace(LARGE, ping_keep=False), UNIT)
    assert everything.get("pings kept") == 250_000
    assert everything.get("archive rows") == pytest.approx(250_000 + 2_500)


def test_replicas_are_cpu_over_planned_utilisation_with_a_floor_of_two() -> None:
    sizing = size(LARGE, UNIT)
    kept = sizing.get("pings kept")
    agg_cores = (kept * 20 + (250_000 - kept) * 5 + 2_500 * 40) / 1e6
    assert sizing.get("aggregator CPU") == pytest.approx(agg_cores)
    assert sizing.get("aggregator replicas") == math.ceil(agg_cores / 0.6)
    partitions = sizing.get("partitions per topic")
    assert partitions >= 2 * sizing.get("aggregator replicas")
    assert partitions % 6 == 0
    pred_cores = (1_000 * 800 + 50_000 * 800 + 2_500_000 * 80) / 1e6
    assert sizing.get("prediction replicas") == math.ceil(pred_cores / 0.5)
    assert sizing.get("ingestion replicas") == math.ceil(252_500 * 40 / 1e6 / 0.6)
    tiny = size(
        Profile(orders_per_min=10, online_drivers=50, feed_loads_per_s=1, checkout_predictions_per_s=1), UNIT
    )
    for what in ("aggregator replicas", "ingestion replicas", "prediction replicas"):
        assert tiny.get(what) == model.MIN_REPLICAS
    assert tiny.get("partitions per topic") == model.MIN_PARTITIONS
    assert tiny.get("Redis shards (primaries)") == 1


def test_faster_cores_and_more_headroom_move_the_replicas() -> None:
    base = size(LARGE, UNIT).get("prediction replicas")
    assert size(replace(LARGE, core_speed=2.0), UNIT).get("prediction replicas") == math.ceil(base / 2)
    tighter = replace(LARGE, utilisation=model.DEFAULT_UTILISATION | {"prediction": 0.25})
    assert size(tighter, UNIT).get("prediction replicas") == pytest.approx(2 * base, abs=1)


def test_redis_shards_cover_cpu_and_memory() -> None:
    sizing = size(LARGE, UNIT)
    dataset = 1_000_000 * 200 + 150_000 * 600 + 30_000 * 60 * 24 * 400
    assert sizing.get("Redis memory") == pytest.approx(dataset * model.REDIS_MEMORY_OVERHEAD / 2**30)
    shards = sizing.get("Redis shards (primaries)")
    assert shards >= sizing.get("Redis CPU") / 0.5
    assert shards * model.REDIS_SHARD_MEMORY_BYTES >= sizing.get("Redis memory") * 2**30


def test_one_big_market_warns_about_its_driver_slot() -> None:
    assert not [w for w in size(LARGE, UNIT).warnings if "slot" in w]
    one_market = size(replace(LARGE, markets=1, ping_keep=False), UNIT)
    assert one_market.get("largest market's driver slot") == pytest.approx(250_000 * 10 / 1e6)
    assert any("hash slot" in w for w in one_market.warnings)


def test_the_shipped_costs_load_and_a_bench_result_loads_too(tmp_path: Path) -> None:
    shipped = load_costs()
    assert shipped.measured_at
    assert shipped.aggregator_cpu_us_per_ping > 0
    bench_result = tmp_path / "capacity.json"
    bench_result.write_text(json.dumps({"figures": {**vars(UNIT), "extra": 1}, "measured_at": "now"}))
    assert load_costs(bench_result).ingestion_cpu_us_per_event == 40.0
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"figures": {"aggregator_cpu_us_per_ping": 1}}))
    with pytest.raises(ValueError, match="costs lack"):
        load_costs(broken)


def test_the_command_prints_the_worked_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    for what in ("partitions per topic", "aggregator replicas", "Redis shards", "Redis memory",
                 "archive rows", "ingestion replicas", "prediction replicas"):  # fmt: skip
        assert what in out
    assert main(["--json", "--online-drivers", "1000", "--utilisation", "redis=0.4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sizing"]["driver pings"]["value"] == 250
    assert data["profile"]["utilisation"]["redis"] == 0.4
    with pytest.raises(SystemExit):
        main(["--utilisation", "nonsense=2"])


def test_help_names_every_input(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for option in ("--markets", "--orders-per-min", "--online-drivers", "--ping-interval", "--feed-loads",
                   "--restaurants-per-feed", "--checkout-predictions", "--costs", "--all-pings"):  # fmt: skip
        assert option in out
