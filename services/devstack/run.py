"""The ``make run`` orchestration (see :mod:`devstack.__main__` for the user-facing description)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from devstack.infra import free_port, port_open, start_prometheus
from devstack.live_view import LiveView
from devstack.stack import LocalStack, ServicePorts
from eta_common.db.migrate import apply_migrations
from eta_common.timeutil import now_ms

log = logging.getLogger("devstack")

INFRA_PORTS: dict[str, int | None] = {"kafka": 19092, "redis": 16379, "postgres": 15432}
PROMETHEUS_PORT = 9090


@dataclass(frozen=True)
class RunOptions:
    workdir: str = ".run"
    seed_days: float = 7.0
    restaurants: int = 20
    drivers: int | None = None  # None: sized from the restaurants (simulator.city.fleet_for)
    speed: float = 1.0
    duration_seconds: float | None = None
    refresh_seconds: float = 3.0
    keep_data: bool = False
    redis_cluster: bool = False  # a local Redis Cluster of 3 primaries (16379-16381) instead of one Redis


def _step(message: str, started: float) -> None:
    sys.stderr.write(f"[{time.monotonic() - started:6.1f}s] {message}\n")
    sys.stderr.flush()


def run(options: RunOptions) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = Path(options.workdir).resolve()
    for folder in ("traces", "logs", "redis") + (() if options.keep_data else ("pgdata",)):
        shutil.rmtree(workdir / folder, ignore_errors=True)
    stack = LocalStack(
        workdir,
        ports=ServicePorts.defaults(),
        infra_ports=INFRA_PORTS,
        extra_env={
            "ETA_TRACES_FILE": str(workdir / "traces" / "spans-{pid}.jsonl"),
            "OTEL_BSP_SCHEDULE_DELAY": "500",
            "PREDICTION_MODEL_REFRESH_SECONDS": "5",
        },
        redis_cluster=options.redis_cluster,
    )
    started = time.monotonic()
    try:
        redis = "a Redis Cluster of 3 primaries" if options.redis_cluster else "Redis"
        _step(f"starting Kafka-protocol broker, {redis}, PostgreSQL …", started)
        stack.start_infra()
        _step(
            f"infrastructure up: kafka={stack.kafka} redis={stack.redis_url} postgres={stack.database_url}",
            started,
        )
        return asyncio.run(_run_async(stack, options, started))
    except KeyboardInterrupt:
        return 130
    finally:
        _step("stopping services and servers …", started)
        stack.stop()
        _step("stopped cleanly", started)


def _start_prometheus(stack: LocalStack, started: float) -> None:
    """A real Prometheus scraping the three services, with the repository's rules, when one is installed."""
    if shutil.which("prometheus") is None:
        _step("no prometheus on PATH (apt-get install prometheus): metrics at :9101-9103/metrics", started)
        return
    targets = {f"eta-{name}": port for name, port in stack.ports.metrics.items()}
    port = free_port() if port_open(PROMETHEUS_PORT) else PROMETHEUS_PORT
    try:
        child = start_prometheus(stack.workdir / "prometheus", stack.log_dir, targets, port=port)
    except (OSError, RuntimeError, TimeoutError) as exc:
        _step(f"prometheus did not start ({exc}); going on without it", started)
        return
    stack.processes.append(child)  # stopped with everything else
    _step(
        f"Prometheus at {child.url} (rules: deploy/monitoring/rules.yaml; try eta:freshness_seconds:p99_5m)",
        started,
    )


async def _run_async(stack: LocalStack, options: RunOptions, started: float) -> int:
    from simulator import LIVE_DEMAND_MULTIPLIER, CityConfig, run_live, seed_history
    from trainer.__main__ import train_and_register

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    applied = await apply_migrations(stack.database_url)
    _step(f"migrations applied: {applied or 'already up to date'}", started)
    city = CityConfig(restaurants=options.restaurants, drivers=options.drivers)
    live_city = dataclasses.replace(city, demand_multiplier=LIVE_DEMAND_MULTIPLIER)
    has_history = False
    if options.keep_data:
        import asyncpg

        conn = await asyncpg.connect(stack.database_url)
        has_history = bool(await conn.fetchval("SELECT count(*) FROM events"))
        await conn.close()
    if not has_history:
        _step(
            f"seeding {options.seed_days:g} days of city history into PostgreSQL ({city.restaurants} "
            f"restaurants, {city.fleet_size} drivers) …",
            started,
        )
        stats = await seed_history(
            stack.database_url, city, days=options.seed_days, end_ms=now_ms(), progress=True
        )
        _step(
            f"seeded {stats.events_written} events ({stats.orders_delivered} delivered orders) in "
            f"{stats.seconds:.1f}s",
            started,
        )
    _step("training the first model (LightGBM p10/p50/p90) …", started)
    summary = await train_and_register(stack.database_url, history_days=options.seed_days + 1, rounds=200)
    metrics = summary["metrics"]
    assert isinstance(metrics, dict)
    notice = ""  # shown in the live view
    if summary["promoted"]:
        _step(f"model {summary['version']} promoted: {summary['promotion_reason']}", started)
    else:
        notice = (
            f"model {summary['version']} NOT promoted ({summary['promotion_reason']}); "
            "the heuristic answers until a model passes"
        )
        _step(notice, started)
    if stop.is_set():
        return 130
    _step("starting ingestion :50051, aggregator/features :50052, prediction :50053 …", started)
    await asyncio.to_thread(stack.start_services)
    await asyncio.to_thread(_start_prometheus, stack, started)
    _step("services up; driving live city traffic through the ingestion API", started)
    live = asyncio.create_task(
        run_live(
            stack.target("ingestion"),
            live_city,
            speed=options.speed,
            stop=stop,
            duration_seconds=options.duration_seconds,
            warmup_minutes=3.0,  # starts 3 min back (within the allowed lateness): orders already in flight
            eta_target=stack.target("prediction"),  # checkout ETAs, joined to deliveries for live accuracy
            oracle_database_url=stack.database_url,
        )
    )
    live.add_done_callback(lambda _t: stop.set())
    view = LiveView(stack.target("prediction"), stack.redis_url, stack.workdir / "traces", notice=notice)
    first_eta_logged = False
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=options.refresh_seconds)
            if stop.is_set():
                break
            for child in stack.processes:
                if not child.alive():
                    code = child.proc.returncode
                    _step(f"{child.name} exited unexpectedly (code {code}); see {child.log_path}", started)
                    return 1
            header = f"ETA platform live — up {time.monotonic() - started:5.0f}s — Ctrl-C to stop"
            screen = await view.render(header)
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[2J\x1b[H")
            sys.stdout.write(screen + "\n\n")
            sys.stdout.flush()
            if not first_eta_logged and "waiting for the first events" not in screen:
                first_eta_logged = True
                _step("first live ETAs shown", started)
    finally:
        stop.set()
        await view.close()
        live_stats = await live
        _step(f"live simulator: {live_stats}", started)
    return 0
