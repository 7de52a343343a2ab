"""Redis clients on the serving read of ready rows: the hand-written ``prediction.redis_client.LeanRedis``
versus maintained clients — redis-py asyncio with hiredis, coredis, valkey-glide — CPU per call.

The read (issue 13's design): one pipeline with, per restaurant, ``HMGET rst:{<id>}:row w s`` (two packed
string fields of ~150 bytes each), plus the two city commands ``ZCOUNT drv:{city}:waiting <min> +inf``
and ``HMGET drv:{city}:meta`` (6 fields); for 1 restaurant and for 50.

Each client runs in its own process pinned to core 0, Redis alone on core 1. Per client, size and mode
(sequential: one pipeline at a time, as one request does; concurrent: ``CONCURRENCY`` pipelines
outstanding from as many tasks, as a busy server does) the process measures its own CPU from
``/proc/self/stat`` and Redis's from ``/proc/<redis>/stat`` over the window. Rounds are interleaved;
medians are reported, with the ratio of CPU per call to the hand-written client's (the issue: adopt a
maintained client if it is within 15 %). Every client's replies are checked against the data written.

coredis and valkey-glide are not project dependencies: they come with the ``peers`` extra (``make
bench-peers`` installs it in ``.venv/peers``); each client runs from the main venv if it can import
there, else from the peers venv, else is reported as not installed.
Role used internally: ``python -m bench.bench_redis_clients client ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench import harness as H
from bench.result import BenchResult

NAME = "redis_clients"
CLIENTS = ("lean", "redis-py", "coredis", "valkey-glide")
IMPORTS = {
    "lean": "prediction.redis_client",
    "redis-py": "redis",
    "coredis": "coredis",
    "valkey-glide": "glide",
}
SIZES = (1, 50)
CONCURRENCY = 8
RESTAURANTS = 200
CITY = "berlin"
CITY_FIELDS = ("u:drivers", "e:drivers", "t:drivers", "u:dispatch", "e:dispatch", "t:dispatch")
WAITING_MIN = 1_700_000_000_000


def _row_key(i: int) -> str:
    return f"rst:{{rest-{i:03d}}}:row"


def _row_values(i: int) -> tuple[bytes, bytes]:
    """~150 bytes each, shaped like the packed ``w`` and ``s`` fields."""
    w = "|".join(
        ["r1", "1764990000000", "1764990120000", str(i % 7), str(i % 13), "3"] + [f"{i * 1.37:.4f}"] * 14
    )
    s = "|".join([str(i % 9), "1764990000000", "1764989990000", f"aggregator-{i:04d}"] + ["x" * 20] * 5)
    return w.encode()[:150].ljust(150, b"_"), s.encode()[:150].ljust(150, b"_")


def populate(redis_url: str) -> None:
    import redis as redis_sync

    client = redis_sync.Redis.from_url(redis_url)
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(RESTAURANTS):
            w, s = _row_values(i)
            pipe.hset(_row_key(i), mapping={"w": w, "s": s})
        pipe.zadd(f"drv:{{{CITY}}}:waiting", {f"order-{j}": WAITING_MIN + j * 1000 for j in range(60)})
        pipe.hset(
            f"drv:{{{CITY}}}:meta", mapping={f: f"1764990000{k:03d}" for k, f in enumerate(CITY_FIELDS)}
        )
        pipe.execute()
    finally:
        client.close()


# --- role: one client ------------------------------------------------------------------------------------

Read = Callable[[Sequence[int]], Awaitable[list[Any]]]  # restaurants -> [waiting, city fields, *rows]


async def _connect(name: str, url: str) -> tuple[Read, Callable[[], Awaitable[None]]]:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    waiting_key, meta_key = f"drv:{{{CITY}}}:waiting", f"drv:{{{CITY}}}:meta"
    if name == "lean":
        from prediction.redis_client import LeanRedis

        lean = LeanRedis(host, port)

        async def read_lean(ids: Sequence[int]) -> list[Any]:
            commands: list[tuple[Any, ...]] = [("ZCOUNT", waiting_key, WAITING_MIN, "+inf")]
            commands.append(("HMGET", meta_key, *CITY_FIELDS))
            commands += [("HMGET", _row_key(i), "w", "s") for i in ids]
            return await lean.execute(commands)

        return read_lean, lean.aclose
    if name == "redis-py":
        import redis.asyncio as aioredis

        client = aioredis.Redis(host=host, port=port)

        async def read_redis_py(ids: Sequence[int]) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            pipe.zcount(waiting_key, WAITING_MIN, "+inf")
            pipe.hmget(meta_key, CITY_FIELDS)
            for i in ids:
                pipe.hmget(_row_key(i), ("w", "s"))
            return list(await pipe.execute())

        return read_redis_py, client.aclose
    if name == "coredis":
        import coredis  # type: ignore[import-not-found, unused-ignore]  # the peers extra

        core: Any = coredis.Redis(host, port)
        await core.__aenter__()

        async def read_coredis(ids: Sequence[int]) -> list[Any]:
            async with core.pipeline(transaction=False) as pipe:
                requests = [pipe.zcount(waiting_key, WAITING_MIN, "+inf"), pipe.hmget(meta_key, CITY_FIELDS)]
                requests += [pipe.hmget(_row_key(i), ("w", "s")) for i in ids]
            return [await r for r in requests]

        async def close_coredis() -> None:
            await core.__aexit__(None, None, None)

        return read_coredis, close_coredis
    if name == "valkey-glide":
        from glide import (  # type: ignore[import-not-found, unused-ignore]  # the peers extra
            Batch,
            GlideClient,
            GlideClientConfiguration,
            InfBound,
            NodeAddress,
            ScoreBoundary,
        )

        glide_client: Any = await GlideClient.create(
            GlideClientConfiguration([NodeAddress(host, port)], request_timeout=5000)
        )

        async def read_glide(ids: Sequence[int]) -> list[Any]:
            batch = Batch(is_atomic=False)
            batch.zcount(waiting_key, ScoreBoundary(WAITING_MIN), InfBound.POS_INF)
            batch.hmget(meta_key, list(CITY_FIELDS))
            for i in ids:
                batch.hmget(_row_key(i), ["w", "s"])
            return list(await glide_client.exec(batch, raise_on_error=True) or [])

        return read_glide, glide_client.close
    raise ValueError(f"unknown client {name!r}")


def _check(replies: list[Any], ids: Sequence[int]) -> None:
    expected = [60, [f"1764990000{k:03d}".encode() for k in range(6)]]
    expected += [list(_row_values(i)) for i in ids]
    got = [replies[0], [bytes(v) for v in replies[1]]] + [[bytes(v) for v in r] for r in replies[2:]]
    if got != expected:
        raise AssertionError(f"unexpected replies: {str(got)[:300]}")


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    read, close = await _connect(args.client, args.url)
    rng = random.Random(7)
    samples = [rng.sample(range(RESTAURANTS), args.restaurants) for _ in range(500)]
    try:
        for ids in samples[:20]:
            _check(await read(ids), ids)
        state = {"calls": 0, "measuring": False}
        latencies: list[float] = []
        clock = time.perf_counter

        async def worker(offset: int, stop_at: float) -> None:
            n = offset
            while clock() < stop_at:
                started = clock()
                await read(samples[n % len(samples)])
                n += 1
                if state["measuring"]:
                    state["calls"] += 1
                    latencies.append(clock() - started)

        warm_until = clock() + args.warmup
        stop_at = warm_until + args.seconds
        tasks = [asyncio.ensure_future(worker(k * 37, stop_at)) for k in range(args.concurrency)]
        await asyncio.sleep(max(0.0, warm_until - clock()))
        state["measuring"] = True
        cpu0, redis0, wall0 = H.cpu_seconds(os.getpid()), H.cpu_seconds(args.redis_pid), clock()
        await asyncio.sleep(max(0.0, stop_at - clock()))
        cpu1, redis1, wall1 = H.cpu_seconds(os.getpid()), H.cpu_seconds(args.redis_pid), clock()
        state["measuring"] = False
        await asyncio.gather(*tasks)
    finally:
        await close()
    calls = state["calls"]
    latencies.sort()
    return {
        "calls": calls,
        "seconds": wall1 - wall0,
        "client_cpu_us_per_call": 1e6 * (cpu1 - cpu0) / calls,
        "client_cpu_pct": 100 * (cpu1 - cpu0) / (wall1 - wall0),
        "redis_cpu_us_per_call": 1e6 * (redis1 - redis0) / calls,
        "p50_ms": H.percentile(latencies, 0.5) * 1e3,
        "p99_ms": H.percentile(latencies, 0.99) * 1e3,
    }


# --- orchestration ---------------------------------------------------------------------------------------


def _python_for(client: str) -> str | None:
    """The interpreter that can import the client: the main venv's, else the peers venv's."""
    candidates = [sys.executable, str(H.PEERS_VENV / "bin" / "python")]
    for python in candidates:
        if not Path(python).exists():
            continue
        probe = subprocess.run(
            [python, "-c", f"import {IMPORTS[client]}"], env=H.base_env(), capture_output=True, check=False
        )
        if probe.returncode == 0:
            return python
    return None


def _version(python: str, client: str) -> str:
    dist = {"lean": "hiredis", "redis-py": "redis", "coredis": "coredis", "valkey-glide": "valkey-glide"}[
        client
    ]
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    version = done.stdout.strip() or "?"
    return f"hiredis {version}" if client == "lean" else version


def run(quick: bool) -> BenchResult:
    seconds, warmup, repeats = (1.5, 0.3, 1) if quick else (4.0, 0.5, 3)
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-clients-"))
    notes = [f"load average at start: {H.load_average()}"]
    available: dict[str, str] = {}
    for client in CLIENTS:
        python = _python_for(client)
        if python is None:
            notes.append(f"{client}: not installed (the `peers` extra: make bench-peers)")
        else:
            available[client] = python
            where = "peers venv" if python != sys.executable else "main venv"
            notes.append(f"{client} {_version(python, client)} ({where})")
    results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    os.sched_setaffinity(0, H.CLIENT_CPUS)
    try:
        with H.infrastructure(workdir, postgres=False) as infra:
            populate(infra.redis_url)
            for _ in range(repeats):
                for size in SIZES:
                    for mode, concurrency in (("sequential", 1), (f"{CONCURRENCY} outstanding", CONCURRENCY)):
                        for client, python in available.items():
                            argv = [python, "-m", "bench.bench_redis_clients", "client", "--client", client]
                            argv += ["--url", infra.redis_url, "--redis-pid", str(infra.redis_pid)]
                            argv += ["--restaurants", str(size), "--concurrency", str(concurrency)]
                            argv += ["--seconds", str(seconds), "--warmup", str(warmup)]
                            proc = subprocess.Popen(
                                argv,
                                env=H.base_env(),
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                cwd=H.REPO_ROOT,
                            )
                            H.pin(proc.pid, H.SERVER_CPUS)
                            out, err = proc.communicate(timeout=seconds + warmup + 120)
                            if proc.returncode != 0:
                                raise RuntimeError(f"{client} failed: {err.decode()[-2000:]}")
                            report = json.loads(out.decode().strip().splitlines()[-1])
                            results.setdefault((client, size, mode), []).append(report)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    rows = []
    figures: dict[str, float] = {}
    for (client, size, mode), reports in results.items():
        med = {key: H.median([r[key] for r in reports]) for key in reports[0]}
        lean = results.get(("lean", size, mode))
        lean_cpu = H.median([r["client_cpu_us_per_call"] for r in lean]) if lean else float("nan")
        ratio = med["client_cpu_us_per_call"] / lean_cpu
        rows.append(
            {
                "client": client,
                "restaurants": size,
                "mode": mode,
                "calls/s": med["calls"] / med["seconds"],
                "client_µs/call": med["client_cpu_us_per_call"],
                "vs_lean": ratio,
                "client_cpu_%": med["client_cpu_pct"],
                "redis_µs/call": med["redis_cpu_us_per_call"],
                "p50_ms": med["p50_ms"],
                "p99_ms": med["p99_ms"],
            }
        )
        tag = f"{client.replace('-', '_')}_{size}_{'seq' if mode == 'sequential' else 'conc'}"
        figures[f"{tag}_client_cpu_us"] = med["client_cpu_us_per_call"]
        figures[f"{tag}_ratio_to_lean"] = ratio
    rows.sort(key=lambda r: (r["restaurants"], r["mode"] != "sequential", CLIENTS.index(r["client"])))
    notes += [
        "read: per restaurant HMGET rst:{id}:row w s (2 × 150 B) + ZCOUNT drv:{city}:waiting + "
        "HMGET drv:{city}:meta (6 fields), one pipeline; replies checked against the data",
        f"client process pinned to {sorted(H.SERVER_CPUS)}, Redis to {sorted(H.CLIENT_CPUS)}; "
        "CPU of the client process (all threads) and of redis-server from /proc over the window",
        "issue 13: a maintained client within 15 % of the hand-written one's CPU per call (vs_lean ≤ 1.15) "
        "may replace it",
        f"{repeats} interleaved rounds of {seconds:.1f}s per case; medians",
        f"load average at end: {H.load_average()}",
    ]
    return BenchResult(
        name=NAME,
        rows=rows,
        figures=figures,
        baseline="the hand-written client (prediction.redis_client.LeanRedis), same run",
        notes=notes,
        extra={"runs": {f"{c}/{s}/{m}": r for (c, s, m), r in results.items()}},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_redis_clients", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    client = sub.add_parser("client", help="measure one client (prints one JSON line)")
    client.add_argument("--client", choices=CLIENTS, required=True)
    client.add_argument("--url", required=True)
    client.add_argument("--redis-pid", type=int, required=True)
    client.add_argument("--restaurants", type=int, default=1)
    client.add_argument("--concurrency", type=int, default=1)
    client.add_argument("--seconds", type=float, default=3.0)
    client.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args(argv)
    sys.stdout.write(json.dumps(asyncio.run(_client(args))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
