"""Shared by the serving benchmarks (``bench_serving``, ``bench_peers_feast``, ``bench_redis_clients``):
CPU placement and accounting from ``/proc``, servers as pinned child processes, the infrastructure
(Redis, PostgreSQL) and the multi-process load generator (``bench.loadgen``) driven from here.

CPU layout on this 2-core machine: the server under test runs **alone** on ``SERVER_CPUS`` (core 0);
the load-generator processes, Redis, PostgreSQL and the orchestrator share ``CLIENT_CPUS`` (core 1).
Servers that are not under test are *parked* on the client core (``Server.park``) so they cannot take
cycles from the one being measured. Every load run reports, from ``/proc``:

* the CPU share of the server, of each load-generator process and of Redis over the measured window;
* how busy each core was in total (``/proc/stat``), so a run where the client core was saturated (the
  load generator, not the server, set the pace) or where something else ran on the server's core is
  visible — ``LoadRun.client_bound`` flags the first.

PostgreSQL stands in for a database on another host, so it runs at the lowest CPU priority
(``BENCH_PG_NICE`` [19]; 0 = as any process): on the shared client core, its share of the prediction log
(a COPY of 500 rows is ~7 ms of its CPU in one go, ~13 µs per prediction) delayed the load generator's
wake-ups, and that delay was counted in the ETA server's latency — measured over 8 paired sequential
rounds: p99 ×0.79, p50 ×0.93 and throughput ×1.08 at nice 19 against 0 (×0.88 p99 with SCHED_IDLE).
The log still keeps up: ``bench_serving`` reports its rows written, dropped and waiting.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_CPUS = {0}
CLIENT_CPUS = {1}
CLK_TCK = os.sysconf("SC_CLK_TCK")
# A core this busy (all processes, from /proc/stat) over a window is saturated.
SATURATED_PCT = 90.0
PEERS_VENV = REPO_ROOT / ".venv" / "peers"  # `make bench-peers` installs the `peers` extra here
# The gRPC load generator: "h2" (bench.loadgen's minimal HTTP/2 gRPC client: ~95 µs of client CPU per call
# against the echo at 16 outstanding vs grpc.aio's ~175, so one client core keeps a server core saturated)
# or "grpc" (grpc.aio).
GRPC_CLIENT = os.environ.get("BENCH_GRPC_CLIENT", "h2")
# open-loop runs: the last ms before each call spent on the CPU, not in asyncio's timer (see bench.loadgen)
FIXED_SPIN_MS = float(os.environ.get("BENCH_FIXED_SPIN_MS", "2"))
PG_NICE = int(os.environ.get("BENCH_PG_NICE", "19"))


# --- statistics ------------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def paired_ratios(
    runs: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]], key: str
) -> list[float]:
    """Per round, a figure over the reference's measured back to back in the same round (NaN where the
    reference is 0): a machine phase that slows both cancels out, which a ratio of medians does not
    guarantee. In round order."""
    return [
        float(a[key]) / float(b[key]) if b[key] else float("nan")
        for a, b in zip(runs, reference, strict=True)
    ]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- CPU placement and accounting ------------------------------------------------------------------------


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (threads created later inherit it)."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError, OSError):
                os.sched_setaffinity(int(tid), cpus)


def children(pid: int) -> list[int]:
    """Direct children of a process (PostgreSQL's backends, gunicorn's workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
    return out


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Pin a process and its descendants."""
    pin(pid, cpus)
    for child in children(pid):
        pin_tree(child, cpus)


def renice_tree(pid: int, niceness: int) -> None:
    """Set a process's and its descendants' niceness (processes they start later inherit it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        os.setpriority(os.PRIO_PROCESS, pid, niceness)
    for child in children(pid):
        renice_tree(child, niceness)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), in seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live descendants."""
    return cpu_seconds(pid) + sum(tree_cpu_seconds(child) for child in children(pid))


def core_busy_seconds() -> dict[int, float]:
    """Per core: seconds spent not idle (all processes, interrupts included), from /proc/stat."""
    return {core: busy for core, (busy, _) in core_times().items()}


def core_times() -> dict[int, tuple[float, float]]:
    """Per core: (busy, steal) seconds from /proc/stat — busy: user, nice, system, irq, softirq; steal:
    time the hypervisor ran something else while this virtual CPU wanted to run."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        match = re.match(r"cpu(\d+) (.*)", line)
        if match:
            values = [int(v) for v in match[2].split()]
            busy = values[0] + values[1] + values[2] + values[5] + values[6]
            out[int(match[1])] = (busy / CLK_TCK, values[7] / CLK_TCK)
    return out


# --- child processes -------------------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), str(REPO_ROOT / "services"), env.get("PYTHONPATH", "")]
    )
    return env


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    metrics_port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def park(self) -> None:
        """Move off the server core while another server is measured."""
        pin_tree(self.pid, CLIENT_CPUS)

    def unpark(self) -> None:
        pin_tree(self.pid, SERVER_CPUS)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def spawn(
    name: str, argv: list[str], env: Mapping[str, str], port: int, workdir: Path, *, timeout: float = 90
) -> Server:
    """Start a server pinned to the server core (its threads inherit it) and wait for its port."""
    from devstack.infra import wait_for_port

    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
        )
    pin(proc.pid, SERVER_CPUS)
    try:
        wait_for_port(port, timeout=timeout, proc=proc, what=name)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        raise RuntimeError(f"{exc}; see {log_path}:\n{log_path.read_text()[-3000:]}") from exc
    pin_tree(proc.pid, SERVER_CPUS)
    return Server(name, proc, port, log_path)


def start_echo(workdir: Path, response_bytes: int) -> Server:
    """The floor: a bare grpc.aio server (generic handler, bytes in and out, no interceptors)."""
    from devstack.infra import free_port

    port = free_port()
    argv = [sys.executable, "-m", "bench.loadgen", "echo", "--port", str(port)]
    argv += ["--response-bytes", str(response_bytes)]
    return spawn("echo", argv, base_env(), port, workdir)


def start_eta(
    workdir: Path,
    redis_url: str,
    database_url: str,
    *,
    tracing: bool,
    tag: str,
    export: bool = True,
    extra_env: dict[str, str] | None = None,
) -> Server:
    """The ``eta-prediction`` service with its default settings (tracing on or off)."""
    from devstack.infra import free_port

    port, metrics_port = free_port(), free_port()
    env = base_env()
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
    env.update(extra_env or {})
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.pop("ETA_TRACES_FILE", None)
    if tracing and export:
        env["ETA_TRACES_FILE"] = str(workdir / "traces" / f"{tag}-{{pid}}.jsonl")
    server = spawn(f"eta-{tag}", [sys.executable, "-m", "prediction"], env, port, workdir)
    server.metrics_port = metrics_port
    return server


def scrape(server: Server) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


def wait_for_scorer(server: Server, timeout: float = 180.0) -> str:
    """Wait until the ETA server scores with its compiled model (it starts on LightGBM's fast path and
    compiles in the background); returns the scorer it ended with ("compiled", or "fast" on timeout)."""
    deadline = time.monotonic() + timeout
    scorer = ""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            match = re.search(r'eta_prediction_model_info\{[^}]*scorer="(\w*)"', scrape(server))
            scorer = match[1] if match else ""
            if scorer == "compiled":
                return scorer
        time.sleep(0.5)
    return scorer or "unknown"


def metric_samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric in Prometheus text (labels as written, "" when none)."""
    out: dict[str, float] = {}
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{(.*?)\}})? (\S+)$", text, re.MULTILINE):
        out[match[1] or ""] = float(match[2])
    return out


def feature_read_paths(server: Server) -> dict[str, float] | None:
    """``eta_prediction_feature_reads_total`` by path (row / fallback), or None when not exported."""
    samples = metric_samples(scrape(server), "eta_prediction_feature_reads_total")
    if not samples:
        return None
    out: dict[str, float] = {}
    for labels, value in samples.items():
        match = re.search(r'path="(\w+)"', labels)
        if match:
            out[match[1]] = out.get(match[1], 0.0) + value
    return out


# --- infrastructure --------------------------------------------------------------------------------------


@dataclass
class Infra:
    redis_url: str
    redis_pid: int
    database_url: str = ""
    postgres_pid: int = 0


@contextlib.contextmanager
def infrastructure(workdir: Path, *, postgres: bool = True) -> Iterator[Infra]:
    """Redis (and PostgreSQL, at ``PG_NICE``) from wheels, pinned to the client core."""
    from devstack.infra import start_postgres, start_redis

    redis = start_redis(workdir / "redis", workdir / "logs")
    try:
        pin_tree(redis.proc.pid, CLIENT_CPUS)
        if not postgres:
            yield Infra(redis.url, redis.proc.pid)
            return
        pg = start_postgres(workdir / "pgdata", workdir / "logs")
        try:
            pin_tree(pg.proc.pid, CLIENT_CPUS)
            renice_tree(pg.proc.pid, PG_NICE)
            yield Infra(redis.url, redis.proc.pid, pg.url, pg.proc.pid)
        finally:
            pg.stop()
    finally:
        redis.stop()


def redis_command_calls(redis_url: str) -> int:
    """Commands Redis has executed so far (``INFO commandstats``, minus INFO itself)."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def write_requests(path: Path, requests: Sequence[bytes]) -> Path:
    """Length-prefixed request bodies, read by ``bench.loadgen``."""
    path.write_bytes(b"".join(len(r).to_bytes(4, "little") + r for r in requests))
    return path


# --- load runs -------------------------------------------------------------------------------------------


@dataclass
class LoadRun:
    """One load run: merged over its client processes; CPU shares are % of one core."""

    ok: int
    errors: dict[str, int]
    seconds: float
    latencies_ms: list[float]  # sorted
    server_cpu_s: float
    client_cpu_s: list[float]  # per load-generator process
    watched_cpu_s: dict[str, float]  # e.g. redis
    core_busy_s: dict[int, float]
    core_steal_s: dict[int, float] = field(default_factory=dict)
    redis_commands: int = 0
    send_lag_p99_ms: float = 0.0
    # CPU the server ("server") and the watched processes spend anyway, per second, measured idle (e.g.
    # Redis serving the row maintenance, the service's background tasks): subtracted for net CPU per call
    background: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else float("nan")

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def pct(self, cpu_s: float) -> float:
        return 100.0 * cpu_s / self.seconds

    def per_call_us(self, cpu_s: float) -> float:
        return 1e6 * cpu_s / self.ok if self.ok else float("nan")

    @property
    def client_core_pct(self) -> float:
        return self.pct(sum(self.core_busy_s.get(c, 0.0) for c in CLIENT_CPUS) / len(CLIENT_CPUS))

    @property
    def server_core_others_pct(self) -> float:
        """CPU on the server core not spent by the server (other processes, interrupts)."""
        busy = sum(self.core_busy_s.get(c, 0.0) for c in SERVER_CPUS)
        return max(0.0, self.pct(busy - self.server_cpu_s))

    @property
    def server_core_steal_pct(self) -> float:
        """Time the hypervisor took the server's virtual CPU away (another VM ran on it)."""
        return self.pct(sum(self.core_steal_s.get(c, 0.0) for c in SERVER_CPUS))

    @property
    def client_bound(self) -> bool:
        """The load generator's core was saturated while the server's was not: the client set the pace."""
        return self.client_core_pct >= SATURATED_PCT and self.pct(self.server_cpu_s) < SATURATED_PCT

    @property
    def bound(self) -> str:
        """What set the pace of a closed-loop run: "server" (it used ≥ 90 % of its core), "client" (the
        client core was saturated, the server was not) or "neither" (e.g. other work on the server core,
        or too few calls outstanding)."""
        if self.pct(self.server_cpu_s) >= SATURATED_PCT:
            return "server"
        return "client" if self.client_bound else "neither"

    def summary(self) -> dict[str, Any]:
        return {
            "calls": self.ok,
            "rps": self.throughput,
            "p50_ms": self.p(0.50),
            "p90_ms": self.p(0.90),
            "p99_ms": self.p(0.99),
            "max_ms": self.latencies_ms[-1] if self.latencies_ms else float("nan"),
            "server_cpu_pct": self.pct(self.server_cpu_s),
            "server_cpu_us_per_call": self.per_call_us(self.server_cpu_s),
            "server_net_cpu_us_per_call": self.per_call_us(
                self.server_cpu_s - self.background.get("server", 0.0) * self.seconds
            ),
            "client_cpu_pct": self.pct(sum(self.client_cpu_s)),
            "client_procs": len(self.client_cpu_s),
            "client_core_busy_pct": self.client_core_pct,
            "server_core_others_pct": self.server_core_others_pct,
            "server_core_steal_pct": self.server_core_steal_pct,
            "client_bound": self.client_bound,
            "bound": self.bound,
            **{f"{k}_cpu_us_per_call": self.per_call_us(v) for k, v in self.watched_cpu_s.items()},
            **{
                f"{k}_net_cpu_us_per_call": self.per_call_us(v - self.background.get(k, 0.0) * self.seconds)
                for k, v in self.watched_cpu_s.items()
            },
            "redis_commands_per_call": self.redis_commands / self.ok if self.ok else float("nan"),
            "send_lag_p99_ms": self.send_lag_p99_ms,
            "errors": dict(self.errors),
            **self.extra,
        }


def run_load(
    target: str,
    requests_file: Path,
    *,
    method: str,
    mode: str,
    duration: float,
    warmup: float,
    server_pid: int,
    protocol: str = GRPC_CLIENT,
    concurrency: int = 1,
    rate: float = 0.0,
    clients: int = 1,
    watch: Mapping[str, int] | None = None,
    redis_url: str = "",
    background: Mapping[str, float] | None = None,
    timeout: float = 5.0,
    lead: float = 2.0,
) -> LoadRun:
    """Drive ``target`` with ``clients`` load-generator processes (pinned to the client core) that
    together keep ``concurrency`` calls outstanding (``mode="max"``; 1 = sequential) or send ``rate``
    calls/s open loop (``mode="fixed"``); measure every process's CPU over the same window."""
    if mode == "max":
        clients = max(1, min(clients, concurrency))
        shares = [concurrency // clients + (1 if i < concurrency % clients else 0) for i in range(clients)]
    else:
        shares = [0] * clients
    start_at = time.time() + lead
    procs = []
    for share in shares:
        argv = [sys.executable, "-m", "bench.loadgen", "load", "--protocol", protocol]
        argv += ["--target", target, "--method", method, "--requests", str(requests_file)]
        argv += ["--mode", mode, "--concurrency", str(share), "--rate", str(rate / clients)]
        argv += ["--start-at", repr(start_at), "--warmup", str(warmup), "--duration", str(duration)]
        argv += ["--timeout", str(timeout), "--spin-ms", str(FIXED_SPIN_MS)]
        proc = subprocess.Popen(
            argv, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT
        )
        pin(proc.pid, CLIENT_CPUS)
        procs.append(proc)
    watch = dict(watch or {})
    try:
        time.sleep(max(0.0, start_at + warmup - time.time()))
        before_cpu = {
            "server": tree_cpu_seconds(server_pid),
            **{k: tree_cpu_seconds(v) for k, v in watch.items()},
        }
        before_clients = [cpu_seconds(p.pid) for p in procs]
        before_cores = core_times()
        before_commands = redis_command_calls(redis_url) if redis_url else 0
        time.sleep(max(0.0, start_at + warmup + duration - time.time()))
        after_cores = core_times()
        after_clients = [cpu_seconds(p.pid) for p in procs]
        after_cpu = {
            "server": tree_cpu_seconds(server_pid),
            **{k: tree_cpu_seconds(v) for k, v in watch.items()},
        }
        after_commands = redis_command_calls(redis_url) if redis_url else 0
        outputs = [p.communicate(timeout=duration + warmup + lead + 60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    reports = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"load generator failed ({proc.returncode}): {err.decode()[-3000:]}")
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    lags: list[float] = []
    for report in reports:
        errors.update(report["errors"])
        latencies.extend(v / 1e3 for v in report["latencies_us"])
        lags.append(report["send_lag_p99_ms"])
    latencies.sort()
    window = sum(r["seconds"] for r in reports) / len(reports)
    return LoadRun(
        ok=sum(r["ok"] for r in reports),
        errors=dict(errors),
        seconds=window,
        latencies_ms=latencies,
        server_cpu_s=after_cpu["server"] - before_cpu["server"],
        client_cpu_s=[a - b for a, b in zip(after_clients, before_clients, strict=True)],
        watched_cpu_s={k: after_cpu[k] - before_cpu[k] for k in watch},
        core_busy_s={c: after_cores[c][0] - before_cores[c][0] for c in after_cores if c in before_cores},
        core_steal_s={c: after_cores[c][1] - before_cores[c][1] for c in after_cores if c in before_cores},
        redis_commands=after_commands - before_commands,
        send_lag_p99_ms=max(lags) if lags else 0.0,
        background=dict(background or {}),
        extra={"window_skew_ms": 1e3 * (max(r["started"] for r in reports) - (start_at + warmup))},
    )


def medians(results: Sequence[Mapping[str, Any]], *, closed_loop: bool) -> tuple[dict[str, float], int]:
    """Median of every numeric figure over a scenario's runs, and how many runs it used. A closed-loop
    (max-throughput) figure uses only the runs where the server set the pace (``bound == "server"``)
    when there are any: a run disturbed by other work on the server core, or paced by a saturated client
    core, measures the machine, not the server."""
    used = [r for r in results if r.get("bound") == "server"] if closed_loop else []
    used = used or list(results)
    numeric = [k for k, v in used[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return {key: median([float(r[key]) for r in used]) for key in numeric}, len(used)


def cold_work(gap_ms: float = 50.0, calls: int = 150) -> dict[str, float]:
    """``bench.cold_work`` on the server core (park the servers first): the same CPU work's cost back to
    back and every ``gap_ms``, and their ratio (the machine's cold-call factor)."""
    argv = [sys.executable, "-m", "bench.cold_work", "--gap-ms", str(gap_ms), "--calls", str(calls)]
    argv += ["--cpus", ",".join(str(cpu) for cpu in sorted(SERVER_CPUS))]
    done = subprocess.run(
        argv, env=base_env(), cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def idle_cpu_rate(pids: Mapping[str, int], seconds: float = 3.0) -> dict[str, float]:
    """CPU seconds per second each process spends with no load (its background work)."""
    before = {k: tree_cpu_seconds(v) for k, v in pids.items()}
    time.sleep(seconds)
    return {k: (tree_cpu_seconds(v) - before[k]) / seconds for k, v in pids.items()}


def py_spy() -> str | None:
    path = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return path if Path(path).exists() else None
