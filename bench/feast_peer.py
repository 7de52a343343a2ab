"""Feast, the peer of ``bench_peers_feast``: roles run by the peers venv's interpreter (``feast`` is not a
project dependency; ``make bench-peers`` installs the ``peers`` extra into ``.venv/peers``).

``python -m bench.feast_peer setup --repo DIR --redis HOST:PORT --values FILE`` — a feature repository
(``feature_store.yaml`` with the Redis online store and a file offline store; an entity ``restaurant``
keyed by ``restaurant_id``; one feature view with the 9 restaurant features), ``feast apply``, then
``materialize`` of a Parquet file holding each restaurant's values (from the ETA service) into Redis.

``python -m bench.feast_peer sdk --repo DIR --entities N ...`` — the Feast SDK in-process:
``FeatureStore.get_online_features`` one call at a time; prints one JSON line (latencies, the process's
CPU and Redis's CPU over the window, both from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

VIEW = "restaurant_features"
ENTITY_KEY = "restaurant_id"
# The restaurant features of eta_common.features.FEATURE_NAMES (request-time and customer ones excluded).
FEATURES = (
    "num_orders_last_10_min",
    "num_orders_last_30_min",
    "orders_in_kitchen",
    "mean_prep_minutes_last_60_min",
    "kitchen_busy",
    "free_drivers_within_3km",
    "mean_prep_minutes_last_24_hours",
    "orders_waiting_for_driver",
    "mean_pickup_wait_minutes_last_30_min",
)
REFS = [f"{VIEW}:{name}" for name in FEATURES]

_DEFINITIONS = """
from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float64

restaurant = Entity(name="restaurant", join_keys=["{key}"], value_type=ValueType.STRING)
source = FileSource(path="{parquet}", timestamp_field="event_timestamp")
{view} = FeatureView(
    name="{view}",
    entities=[restaurant],
    ttl=timedelta(days=2),
    schema=[{fields}],
    online=True,
    source=source,
)
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def setup(args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd  # type: ignore[import-not-found, import-untyped, unused-ignore]

    repo = Path(args.repo)
    (repo / "data").mkdir(parents=True, exist_ok=True)
    values: dict[str, dict[str, float]] = json.loads(Path(args.values).read_text())
    now = datetime.now(UTC)
    frame = pd.DataFrame(
        [
            {
                ENTITY_KEY: rid,
                **{f: float(row.get(f, float("nan"))) for f in FEATURES},
                "event_timestamp": now,
            }
            for rid, row in values.items()
        ]
    )
    parquet = repo / "data" / "restaurants.parquet"
    frame.to_parquet(parquet)
    (repo / "feature_store.yaml").write_text(
        "project: eta_bench\n"
        "registry: data/registry.db\n"
        "provider: local\n"
        "online_store:\n"
        "  type: redis\n"
        f'  connection_string: "{args.redis}"\n'
        "offline_store:\n"
        "  type: file\n"
        "entity_key_serialization_version: 3\n"
    )
    fields = ", ".join(f'Field(name="{f}", dtype=Float64)' for f in FEATURES)
    (repo / "definitions.py").write_text(
        _DEFINITIONS.format(key=ENTITY_KEY, parquet=parquet, view=VIEW, fields=fields)
    )
    feast = str(Path(sys.executable).parent / "feast")
    subprocess.run([feast, "-c", str(repo), "apply"], check=True, capture_output=True)
    from feast import FeatureStore  # type: ignore[import-not-found, unused-ignore]

    store = FeatureStore(repo_path=str(repo))
    store.materialize(now - timedelta(hours=1), now + timedelta(minutes=1))
    some = next(iter(values))
    check = store.get_online_features(features=REFS, entity_rows=[{ENTITY_KEY: some}]).to_dict()
    return {"restaurants": len(values), "check": {k: v[0] for k, v in check.items()}}


def _commands(redis_url: str) -> int:
    """Commands Redis has executed (INFO commandstats, minus INFO itself)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def sdk(args: argparse.Namespace) -> dict[str, Any]:
    from feast import FeatureStore  # type: ignore[import-not-found, unused-ignore]

    store = FeatureStore(repo_path=args.repo)
    ids: list[str] = json.loads(Path(args.ids).read_text())
    rng = random.Random(3)
    samples = [[{ENTITY_KEY: rid} for rid in rng.sample(ids, args.entities)] for _ in range(200)]
    for rows in samples[:20]:
        reply = store.get_online_features(features=REFS, entity_rows=rows).to_dict()
        if any(v is None for v in reply[FEATURES[0]]):
            raise RuntimeError(f"Feast returned no value for some of {rows[:3]}…")
    clock = time.perf_counter
    latencies: list[float] = []
    warm_until = clock() + args.warmup
    stop_at = warm_until + args.seconds
    n = 0
    while clock() < warm_until:
        store.get_online_features(features=REFS, entity_rows=samples[n % len(samples)]).to_dict()
        n += 1
    commands0 = _commands(args.redis_url)
    cpu0, redis0, wall0 = _cpu_seconds(os.getpid()), _cpu_seconds(args.redis_pid), clock()
    while clock() < stop_at:
        started = clock()
        store.get_online_features(features=REFS, entity_rows=samples[n % len(samples)]).to_dict()
        latencies.append(clock() - started)
        n += 1
    cpu1, redis1, wall1 = _cpu_seconds(os.getpid()), _cpu_seconds(args.redis_pid), clock()
    commands = _commands(args.redis_url) - commands0
    return {
        "redis_commands": commands,
        "calls": len(latencies),
        "seconds": wall1 - wall0,
        "latencies_us": [int(v * 1e6) for v in latencies],
        "cpu_s": cpu1 - cpu0,
        "redis_cpu_s": redis1 - redis0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.feast_peer", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    make = sub.add_parser("setup", help="feature repository, apply, materialize")
    make.add_argument("--repo", required=True)
    make.add_argument("--redis", required=True, help="host:port")
    make.add_argument("--values", required=True, help="JSON {restaurant_id: {feature: value}}")
    measure = sub.add_parser("sdk", help="the SDK in-process, one call at a time")
    measure.add_argument("--repo", required=True)
    measure.add_argument("--ids", required=True, help="JSON list of restaurant ids")
    measure.add_argument("--entities", type=int, default=1)
    measure.add_argument("--seconds", type=float, default=5.0)
    measure.add_argument("--warmup", type=float, default=1.0)
    measure.add_argument("--redis-pid", type=int, required=True)
    measure.add_argument("--redis-url", required=True)
    args = parser.parse_args(argv)
    result = setup(args) if args.role == "setup" else sdk(args)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
