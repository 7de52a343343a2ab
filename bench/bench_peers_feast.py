"""The ETA service versus Feast as a peer, side by side on the same Redis, in one run.

Feast (``feast[redis]==0.67.*``, the ``peers`` extra, installed by ``make bench-peers`` into its own venv
``.venv/peers``: Feast pins ``redis<8`` and ``prometheus_client<0.25``, older than the project's) serves
the same 9 restaurant features — the restaurant features of ``eta_common.features.FEATURE_NAMES`` — for
the same 200 restaurants, with the values the ETA service reads for them (taken from its PredictEta
replies), materialised (``FeatureStore.materialize`` from a Parquet file) into the same Redis that holds
the ETA service's online store. Without the peers venv the benchmark is skipped with the reason.

Measured, in interleaved rounds (medians), each server alone on core 0 (the other parked on core 1), the
load generators (``bench.loadgen``: gRPC bytes in and out for the ETA service; HTTP/1.1 keep-alive JSON
POSTs for ``feast serve``), Redis and PostgreSQL (at the lowest CPU priority, see ``bench.harness``) on
core 1:

* PredictEta vs ``feast serve`` with 1 entity (``POST /get-online-features``): sequential p50/p99 (one call
  at a time) and max throughput (``concurrency`` outstanding over 2 load-generator processes);
* PredictEtaBatch(50) vs ``feast serve`` with 50 entities: sequential p50/p99 and max throughput;
* the Feast SDK in-process (``FeatureStore.get_online_features``, one call at a time, its process on
  core 0) for 1 and 50 entities;
* per call: the server's CPU, Redis's CPU (the redis-server process, from /proc) and Redis commands
  (``INFO commandstats``).

``feast serve`` runs with one worker, the access log off and worker recycling off (``--max-requests 0``;
the default recycles the only worker every ~1,000 requests, a multi-second gap each time), i.e. the
strongest single-process Feast server, as the ETA service is one process.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import harness as H
from bench.eta_setup import PREDICT, PREDICT_BATCH, call_once, eta_world, redis_ping_ms
from bench.result import BenchResult, Skipped, Target

NAME = "peers_feast"
FEAST_PATH = "/get-online-features"


@dataclass(frozen=True)
class Plan:
    seq_seconds: float
    max_seconds: float
    concurrency: int
    batch_concurrency: int
    clients: int
    warmup_seconds: float
    repeats: int
    model_rounds: int
    rows: int

    @classmethod
    def for_run(cls, quick: bool) -> Plan:
        from trainer.train import ROUNDS

        if quick:
            return cls(2.0, 2.0, 16, 4, 2, 0.5, 1, 100, 6000)
        return cls(5.0, 6.0, 16, 4, 2, 1.0, 5, ROUNDS, 20000)


def peers_python() -> Path:
    python = H.PEERS_VENV / "bin" / "python"
    if not python.exists():
        raise Skipped(f"Feast is not installed ({H.PEERS_VENV} missing): run `make bench-peers`")
    probe = subprocess.run([str(python), "-c", "import feast"], capture_output=True, check=False)
    if probe.returncode != 0:
        raise Skipped(f"Feast does not import in {H.PEERS_VENV}: {probe.stderr.decode()[-300:]}")
    return python


def _peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(H.REPO_ROOT)  # bench.feast_peer only; not the services (other versions)
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    return env


def _feature_values(
    eta: H.Server, restaurants: dict[str, tuple[float, float]]
) -> dict[str, dict[str, float]]:
    """Each restaurant's feature values as the ETA service reads them (NaN where it has none)."""
    from eta.v1 import eta_pb2, events_pb2

    async def collect() -> dict[str, dict[str, float]]:
        out = {}
        for rid, (lat, lng) in restaurants.items():
            request = eta_pb2.PredictEtaRequest(
                restaurant_id=rid,
                restaurant_location=events_pb2.GeoPoint(lat=lat, lng=lng),
                customer_location=events_pb2.GeoPoint(lat=lat + 0.01, lng=lng),
            ).SerializeToString()
            reply = eta_pb2.PredictEtaResponse.FromString(await call_once(eta.target, PREDICT, request))
            out[rid] = {f.name: (f.value if f.present else math.nan) for f in reply.features}
        return out

    return asyncio.run(collect())


def _feast_requests(ids: list[str], entities: int, seed: int) -> list[bytes]:
    from bench.feast_peer import ENTITY_KEY, REFS

    rng = random.Random(seed)
    return [
        json.dumps({"features": REFS, "entities": {ENTITY_KEY: rng.sample(ids, entities)}}).encode()
        for _ in range(200)
    ]


def _sdk_run(
    python: Path,
    repo: Path,
    ids_file: Path,
    entities: int,
    plan: Plan,
    redis_pid: int,
    redis_url: str,
    background: float,
) -> dict[str, Any]:
    argv = [str(python), "-m", "bench.feast_peer", "sdk", "--repo", str(repo), "--ids", str(ids_file)]
    argv += ["--entities", str(entities), "--seconds", str(plan.seq_seconds)]
    argv += ["--warmup", str(plan.warmup_seconds), "--redis-pid", str(redis_pid), "--redis-url", redis_url]
    proc = subprocess.Popen(
        argv, env=_peer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=H.REPO_ROOT
    )
    H.pin(proc.pid, H.SERVER_CPUS)
    out, err = proc.communicate(timeout=plan.seq_seconds + plan.warmup_seconds + 180)
    if proc.returncode != 0:
        raise RuntimeError(f"Feast SDK run failed: {err.decode()[-3000:]}")
    report = json.loads(out.decode().strip().splitlines()[-1])
    latencies = sorted(v / 1e3 for v in report["latencies_us"])
    calls, seconds = report["calls"], report["seconds"]
    return {
        "calls": calls,
        "rps": calls / seconds,
        "p50_ms": H.percentile(latencies, 0.5),
        "p99_ms": H.percentile(latencies, 0.99),
        "max_ms": latencies[-1],
        "server_cpu_pct": 100 * report["cpu_s"] / seconds,
        "server_cpu_us_per_call": 1e6 * report["cpu_s"] / calls,
        "redis_cpu_us_per_call": 1e6 * report["redis_cpu_s"] / calls,
        "redis_net_cpu_us_per_call": 1e6 * (report["redis_cpu_s"] - background * seconds) / calls,
        "redis_commands_per_call": report["redis_commands"] / calls,
        "client_cpu_pct": float("nan"),
        "bound": "in-process",
        "errors": {},
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _paired(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], key: str) -> list[float]:
    """:func:`bench.harness.paired_ratios`, sorted (the result reports them so)."""
    return sorted(H.paired_ratios(ours, theirs, key))


def run(quick: bool) -> BenchResult:
    python = peers_python()
    plan = Plan.for_run(quick)
    if (os.cpu_count() or 1) < 2:
        raise RuntimeError("needs at least 2 CPUs (servers on one, load generators on the other)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-peers-feast-"))
    notes: list[str] = [f"load average at start: {H.load_average()}"]
    runs: dict[str, list[dict[str, Any]]] = {}
    servers: list[H.Server] = []
    try:
        with eta_world(workdir, rows=plan.rows, rounds=plan.model_rounds) as world:
            infra = world.infra
            ping_p50, _ = redis_ping_ms(infra.redis_url)
            eta = H.start_eta(workdir, infra.redis_url, infra.database_url, tracing=False, tag="off")
            servers.append(eta)
            notes.append(f"ETA model scorer: {H.wait_for_scorer(eta)}")
            values = _feature_values(eta, world.restaurants)
            values_file = workdir / "values.json"
            values_file.write_text(json.dumps(values))
            ids = list(world.restaurants)
            ids_file = workdir / "ids.json"
            ids_file.write_text(json.dumps(ids))
            repo = workdir / "feast-repo"
            redis_hostport = infra.redis_url.split("//", 1)[1].split("/", 1)[0]
            setup_args = ["--redis", redis_hostport, "--values", str(values_file)]
            setup = subprocess.run(
                [str(python), "-m", "bench.feast_peer", "setup", "--repo", str(repo), *setup_args],
                env=_peer_env(),
                capture_output=True,
                text=True,
                check=False,
                cwd=H.REPO_ROOT,
            )
            if setup.returncode != 0:
                raise RuntimeError(f"Feast setup failed: {setup.stderr[-3000:]}")
            check = json.loads(setup.stdout.strip().splitlines()[-1])
            notes.append(
                f"Feast materialised {check['restaurants']} restaurants × 9 features; one read back: "
                + json.dumps(check["check"])
            )
            from devstack.infra import free_port

            port = free_port()
            feast_argv = [str(H.PEERS_VENV / "bin" / "feast"), "-c", str(repo), "serve", "-h", "127.0.0.1"]
            feast_argv += ["-p", str(port), "--no-access-log", "-w", "1", "--max-requests", "0"]
            feast = H.spawn("feast-serve", feast_argv, _peer_env(), port, workdir, timeout=120)
            servers.append(feast)
            for server in servers:
                server.park()
            idle = H.idle_cpu_rate(
                {"redis": infra.redis_pid, **{s.name: s.pid for s in servers}}, seconds=2.0 if quick else 8.0
            )
            feast_single = H.write_requests(workdir / "feast1.bin", _feast_requests(ids, 1, 5))
            feast_batch = H.write_requests(workdir / "feast50.bin", _feast_requests(ids, 50, 6))

            def measure(
                scenario: str, server: H.Server, method: str, requests: Path, concurrency: int, protocol: str
            ) -> None:
                for other in servers:
                    (other.unpark if other is server else other.park)()
                result = H.run_load(
                    server.target,
                    requests,
                    method=method,
                    protocol=protocol,
                    mode="max",
                    concurrency=concurrency,
                    clients=plan.clients if concurrency > 1 else 1,
                    duration=plan.max_seconds if concurrency > 1 else plan.seq_seconds,
                    warmup=plan.warmup_seconds,
                    server_pid=server.pid,
                    watch={"redis": infra.redis_pid},
                    redis_url=infra.redis_url,
                    background={"redis": idle["redis"], "server": idle[server.name]},
                )
                runs.setdefault(scenario, []).append(result.summary())

            def sdk(scenario: str, entities: int) -> None:
                for other in servers:
                    other.park()
                report = _sdk_run(
                    python,
                    repo,
                    ids_file,
                    entities,
                    plan,
                    infra.redis_pid,
                    infra.redis_url,
                    idle["redis"],
                )
                runs.setdefault(scenario, []).append(report)

            c, bc = plan.concurrency, plan.batch_concurrency
            for _ in range(plan.repeats):
                measure("eta PredictEta, sequential", eta, PREDICT, world.single_file, 1, H.GRPC_CLIENT)
                measure("feast serve 1 entity, sequential", feast, FEAST_PATH, feast_single, 1, "http")
                measure(f"eta PredictEta, max (c={c})", eta, PREDICT, world.single_file, c, H.GRPC_CLIENT)
                measure(f"feast serve 1 entity, max (c={c})", feast, FEAST_PATH, feast_single, c, "http")
                measure(
                    "eta PredictEtaBatch(50), sequential", eta, PREDICT_BATCH, world.batch_file, 1, "grpc"
                )
                measure("feast serve 50 entities, sequential", feast, FEAST_PATH, feast_batch, 1, "http")
                measure(
                    f"eta PredictEtaBatch(50), max (c={bc})", eta, PREDICT_BATCH, world.batch_file, bc, "grpc"
                )
                measure(f"feast serve 50 entities, max (c={bc})", feast, FEAST_PATH, feast_batch, bc, "http")
                sdk("feast SDK in-process 1 entity, sequential", 1)
                sdk("feast SDK in-process 50 entities, sequential", 50)
            reads = H.feature_read_paths(eta)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    med: dict[str, dict[str, float]] = {}
    rows = []
    for scenario, results in runs.items():
        med[scenario], used = H.medians(results, closed_loop="max" in scenario)
        m = med[scenario]
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r["errors"])
        rows.append(
            {
                "scenario": scenario,
                "rps": m["rps"],
                "p50_ms": m["p50_ms"],
                "p99_ms": m["p99_ms"],
                "max_ms": m["max_ms"],
                "srv_µs/call": m.get("server_net_cpu_us_per_call", m["server_cpu_us_per_call"]),
                "redis_µs/call": m["redis_net_cpu_us_per_call"],
                "redis_cmds/call": m["redis_commands_per_call"],
                "srv_cpu_%": m["server_cpu_pct"],
                "cli_cpu_%": m["client_cpu_pct"],
                "bound": ",".join(sorted({str(r["bound"]) for r in results})),
                "runs_used": f"{used}/{len(results)}",
                "errors": ",".join(f"{k}={v}" for k, v in errors.items()) or "-",
            }
        )
    eta_seq, feast_seq = med["eta PredictEta, sequential"], med["feast serve 1 entity, sequential"]
    eta_max, feast_max = med[f"eta PredictEta, max (c={c})"], med[f"feast serve 1 entity, max (c={c})"]
    batch_seq, feast50_seq = (
        med["eta PredictEtaBatch(50), sequential"],
        med["feast serve 50 entities, sequential"],
    )
    batch_max = med[f"eta PredictEtaBatch(50), max (c={bc})"]
    feast50_max = med[f"feast serve 50 entities, max (c={bc})"]
    sdk1 = med["feast SDK in-process 1 entity, sequential"]
    sdk50 = med["feast SDK in-process 50 entities, sequential"]
    figures = {
        "redis_ping_p50_ms": ping_p50,
        "eta_seq_p50_ms": eta_seq["p50_ms"],
        "eta_seq_p99_ms": eta_seq["p99_ms"],
        "feast_serve_seq_p50_ms": feast_seq["p50_ms"],
        "feast_serve_seq_p99_ms": feast_seq["p99_ms"],
        "eta_max_rps": eta_max["rps"],
        "feast_serve_max_rps": feast_max["rps"],
        "feast_sdk_rps": sdk1["rps"],
        "feast_sdk_p99_ms": sdk1["p99_ms"],
        "batch50_seq_p99_ms": batch_seq["p99_ms"],
        "feast_serve50_seq_p99_ms": feast50_seq["p99_ms"],
        "batch50_max_rps": batch_max["rps"],
        "feast_serve50_max_rps": feast50_max["rps"],
        "feast_sdk50_p99_ms": sdk50["p99_ms"],
        "eta_redis_cpu_us_per_call": eta_max["redis_net_cpu_us_per_call"],
        "feast_redis_cpu_us_per_call": feast_max["redis_net_cpu_us_per_call"],
        "batch50_redis_cpu_us": batch_max["redis_net_cpu_us_per_call"],
        "feast50_redis_cpu_us": feast50_max["redis_net_cpu_us_per_call"],
        "eta_redis_commands_per_call": eta_max["redis_commands_per_call"],
        "feast_redis_commands_per_call": feast_max["redis_commands_per_call"],
        "batch50_redis_commands": batch_max["redis_commands_per_call"],
        "feast50_redis_commands": feast50_max["redis_commands_per_call"],
    }
    paired = {
        "throughput": _paired(
            runs[f"eta PredictEta, max (c={c})"], runs[f"feast serve 1 entity, max (c={c})"], "rps"
        ),
        "seq_p99": _paired(
            runs["eta PredictEta, sequential"], runs["feast serve 1 entity, sequential"], "p99_ms"
        ),
        "batch50_seq_p99": _paired(
            runs["eta PredictEtaBatch(50), sequential"], runs["feast serve 50 entities, sequential"], "p99_ms"
        ),
    }
    for name, ratios in paired.items():
        figures[f"paired_{name}_ratio_median"] = H.median(ratios)
        figures[f"paired_{name}_ratio_min"] = ratios[0]
        figures[f"paired_{name}_ratio_max"] = ratios[-1]
    notes.append(
        "the three ratio targets are the median of the rounds' paired ratios (ours ÷ feast serve's, measured "
        "back to back in each round); per round, sorted: "
        + "; ".join(f"{name} " + ", ".join(f"{r:.2f}" for r in ratios) for name, ratios in paired.items())
    )
    targets = [
        Target(
            "PredictEta max throughput ≥ 2× feast serve's (median of paired rounds)",
            H.median(paired["throughput"]),
            ">=",
            2.0,
            "×",
        ),
        Target(
            "PredictEta p99 ≤ 0.5× feast serve's (median of paired rounds)",
            H.median(paired["seq_p99"]),
            "<=",
            0.5,
            "×",
        ),
        Target(
            "PredictEtaBatch(50) p99 ≤ 0.5× feast serve's for 50 entities (median of paired rounds)",
            H.median(paired["batch50_seq_p99"]),
            "<=",
            0.5,
            "×",
        ),
        Target(
            "Redis CPU per prediction ≤ 2× per Feast 1-entity read",
            _ratio(eta_max["redis_net_cpu_us_per_call"], feast_max["redis_net_cpu_us_per_call"]),
            "<=",
            2.0,
            "×",
        ),
        Target(
            "Redis CPU per batch of 50 ≤ 2× per Feast 50-entity read",
            _ratio(batch_max["redis_net_cpu_us_per_call"], feast50_max["redis_net_cpu_us_per_call"]),
            "<=",
            2.0,
            "×",
        ),
    ]
    notes += [
        "latency targets compare sequential runs (one call at a time); throughput, closed loop with "
        f"{c} outstanding (batches: {bc}) over {plan.clients} load-generator processes; Redis CPU per call "
        "from the closed-loop runs",
        f"cores: the server under test alone on {sorted(H.SERVER_CPUS)} (the other parked), the SDK process "
        f"on {sorted(H.SERVER_CPUS)}; load generators + Redis + PostgreSQL (nice {H.PG_NICE}) "
        f"on {sorted(H.CLIENT_CPUS)}",
        "feast serve: 1 gunicorn/uvicorn worker, --no-access-log, --max-requests 0; HTTP keep-alive client, "
        "one connection per outstanding call",
        "ETA feature reads by path: "
        + (
            ", ".join(f"{k}={v:.0f}" for k, v in reads.items()) if reads is not None else "n/a (not exported)"
        ),
        f"ETA ready rows kept fresh by: {world.row_maintenance}; Redis CPU per call is net of Redis's idle "
        f"background ({100 * idle['redis']:.2f} % of a core with no load); server CPU per call net of each "
        f"server's idle CPU (ETA {100 * idle[eta.name]:.2f} %, feast serve {100 * idle[feast.name]:.2f} %)",
        f"each scenario ran {plan.repeats}× interleaved; medians (closed loop: of the server-bound runs "
        "when there are any, see runs_used and bound)",
        f"load average at end: {H.load_average()}",
    ]
    return BenchResult(
        name=NAME,
        rows=rows,
        figures=figures,
        baseline="Feast 0.67 (feast serve over HTTP, and the SDK in-process) on the same Redis, same run",
        notes=notes,
        targets=targets,
        extra={"runs": runs},
    )
