"""Live mode: run the city in real time (or ``speed`` times faster) from now, sending its events through
the ingestion API.

The simulation clock starts at the wall clock's now; every event is sent once the wall clock reaches its
event time. With ``speed`` > 1 simulated time runs faster (a 15-min prep takes 15/speed real minutes)
and event times are compressed back onto the wall clock, so every event_time is "now" when it is sent
and ingestion accepts it. By default the city is open around the clock (kitchens OPENED and drivers
ONLINE within the first seconds, demand never below ``CityConfig.demand_floor`` of the daily profile), so
something happens at any hour; ``around_the_clock=False`` keeps the opening hours of the history.
The order rate is the config's; :data:`LIVE_DEMAND_MULTIPLIER` (what the CLI uses) makes a livelier city.

``warmup_minutes`` starts the city that many simulated minutes in the past and sends those events first
(with their past event times), so orders are already in flight; keep it within the aggregator's allowed
lateness (``AGGREGATOR_ALLOWED_LATENESS_SECONDS``, 5 min by default) for them to count online.

With ``eta_target`` the city asks ``EtaService/PredictEta`` for every order right before placing it
(``request_id`` = order id, see :mod:`simulator.checkout`), so the served predictions can be joined to
the deliveries (live accuracy). With ``oracle_database_url`` each delivered order's oracle is stored in
``simulation_oracle`` (source ``live``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import grpc

from eta.v1 import eta_pb2_grpc, ingestion_pb2_grpc
from eta_common.telemetry import TracingClientInterceptor
from eta_common.timeutil import now_ms
from simulator.checkout import CheckoutEta, is_placed
from simulator.city import CityConfig
from simulator.engine import OrderOutcome
from simulator.markets import Platform
from simulator.oracle_store import OracleWriter
from simulator.publisher import EventPublisher, PublishStats
from simulator.tls import ClientTls, ingestion_channel

__all__ = ["LIVE_DEMAND_MULTIPLIER", "LiveStats", "run_live"]

log = logging.getLogger(__name__)

# Demand multiplier the CLI uses for live cities: with the default 20 restaurants and 60 drivers,
# about 1 order/min at night and 2/min at the dinner peak, close to what 60 drivers can deliver.
LIVE_DEMAND_MULTIPLIER = 1.5

MAX_TICK_S = 0.1


@dataclass(frozen=True)
class LiveStats:
    """Totals of a live run (event counts unless named otherwise)."""

    elapsed_seconds: float
    generated: int  # events the city produced
    sent: int  # events sent in answered calls, retries included
    accepted: int
    duplicates: int
    rejected: int
    unavailable: int  # answered UNAVAILABLE and retried with the same event_id
    failed: int  # dropped after a non-retryable call error
    dropped: int  # unsent at shutdown
    calls: int
    call_errors: int
    orders_placed: int
    orders_delivered: int
    orders_cancelled: int
    orders_waiting_for_driver: int
    eta_calls: int = 0  # checkout PredictEta calls (with eta_target)
    eta_errors: int = 0  # of which failed (the order was placed anyway)
    oracle_written: int = 0  # simulation_oracle rows stored (with oracle_database_url)

    @property
    def accepted_per_second(self) -> float:
        return self.accepted / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0


def _live_stats(
    sim: Platform,
    pub: PublishStats,
    elapsed: float,
    checkout: CheckoutEta | None = None,
    oracle: OracleWriter | None = None,
) -> LiveStats:
    c = sim.counters
    return LiveStats(
        elapsed_seconds=elapsed, generated=c.events, sent=pub.sent, accepted=pub.accepted,
        duplicates=pub.duplicates, rejected=pub.rejected, unavailable=pub.unavailable, failed=pub.failed,
        dropped=pub.dropped, calls=pub.calls, call_errors=pub.call_errors, orders_placed=c.orders_placed,
        orders_delivered=c.orders_delivered, orders_cancelled=c.orders_cancelled,
        orders_waiting_for_driver=sim.orders_waiting_for_driver,
        eta_calls=checkout.stats.calls if checkout else 0,
        eta_errors=checkout.stats.errors if checkout else 0,
        oracle_written=oracle.written if oracle else 0,
    )  # fmt: skip


async def run_live(
    target: str,
    config: CityConfig | Sequence[CityConfig],
    *,
    speed: float,
    stop: asyncio.Event,
    duration_seconds: float | None = None,
    stats_callback: Callable[[LiveStats], None] | None = None,
    warmup_minutes: float = 0.0,
    around_the_clock: bool = True,
    on_outcome: Callable[[OrderOutcome], None] | None = None,
    max_batch: int = 200,
    flush_interval_s: float = 0.15,
    summary_interval_s: float = 10.0,
    drain_timeout_s: float = 10.0,
    token: str | None = None,
    eta_target: str | None = None,
    oracle_database_url: str | None = None,
    tls: ClientTls | None = None,
) -> LiveStats:
    """Run the live city against the ingestion service at ``target`` until ``stop`` is set or
    ``duration_seconds`` have passed; returns the totals. ``stats_callback`` gets the running totals after
    every PublishEvents call; ``on_outcome`` every delivered order with its oracle (event-time minutes);
    ``token`` is sent as ``authorization: Bearer <token>`` when ingestion requires authentication;
    ``tls`` speaks TLS (optionally mutual) to an ingestion whose gRPC port has it on;
    ``eta_target`` (host:port of the ETA service) makes every order ask for its ETA right before it is
    placed; ``oracle_database_url`` stores each delivered order's oracle in PostgreSQL. Several
    configurations are several markets at once (:mod:`simulator.markets`)."""
    if not 0 < speed <= 100:
        raise ValueError("speed must be in (0, 100]")
    if not 0 <= warmup_minutes <= 24 * 60:
        raise ValueError("warmup_minutes must be in [0, 1440]")
    configs = [config] if isinstance(config, CityConfig) else list(config)
    if around_the_clock:
        configs = [c if c.always_open else replace(c, always_open=True) for c in configs]
    oracle = OracleWriter(oracle_database_url) if oracle_database_url else None

    def outcome_sinks(outcome: OrderOutcome) -> None:
        if oracle is not None:
            oracle.add(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    origin = now_ms()
    sim = Platform(
        configs,
        start_ms=origin - round(warmup_minutes * 60_000),
        time_origin_ms=origin,
        time_scale=speed,
        on_outcome=outcome_sinks if oracle is not None or on_outcome is not None else None,
    )
    checkout: CheckoutEta | None = None
    started = time.monotonic()

    def elapsed() -> float:
        return time.monotonic() - started

    def on_call(pub: PublishStats) -> None:
        if stats_callback is not None:
            stats_callback(_live_stats(sim, pub, elapsed(), checkout, oracle))

    log.info(
        "live city starting",
        extra={
            "target": target,
            "tls": tls is not None,
            "speed": speed,
            "markets": [c.market or "(default)" for c in configs],
            "restaurants": sim.restaurants,
            "drivers": sim.fleet_size,
            "seed": configs[0].seed,
            "demand_multiplier": configs[0].demand_multiplier,
            "around_the_clock": configs[0].always_open,
            "warmup_minutes": warmup_minutes,
            "duration_seconds": duration_seconds,
            "eta_target": eta_target or None,
            "store_oracle": oracle is not None,
        },
    )
    # First: TLS files are read here, and a missing one fails before anything else starts.
    channel = ingestion_channel(target, tls, [TracingClientInterceptor()])
    eta_channel = (
        grpc.aio.insecure_channel(eta_target, interceptors=[TracingClientInterceptor()])
        if eta_target
        else None
    )
    if eta_channel is not None:
        checkout = CheckoutEta(eta_pb2_grpc.EtaServiceStub(eta_channel))
    if oracle is not None:
        oracle.start()
    async with channel:
        publisher = EventPublisher(
            ingestion_pb2_grpc.IngestionServiceStub(channel),
            max_batch=max_batch,
            flush_interval_s=flush_interval_s,
            on_call=on_call,
            metadata=[("authorization", f"Bearer {token}")] if token else (),
        )
        publisher.start()
        next_summary = summary_interval_s
        last_accepted, last_summary_at = 0, 0.0
        try:
            while not stop.is_set():
                wall = now_ms()
                for event in sim.run_until(sim.sim_time_ms(wall)):
                    if checkout is not None and is_placed(event):
                        await checkout.ask(event)  # the customer sees the ETA, then orders
                    publisher.add(event)
                now = elapsed()
                if now >= next_summary:
                    stats = _live_stats(sim, publisher.stats, now, checkout, oracle)
                    rate = (stats.accepted - last_accepted) / max(now - last_summary_at, 1e-9)
                    log.info(
                        "live traffic",
                        extra={
                            "accepted": stats.accepted,
                            "duplicates": stats.duplicates,
                            "rejected": stats.rejected,
                            "unavailable": stats.unavailable,
                            "backlog": publisher.backlog,
                            "accepted_per_s": round(rate, 1),
                            "orders_placed": stats.orders_placed,
                            "orders_delivered": stats.orders_delivered,
                            "orders_waiting_for_driver": stats.orders_waiting_for_driver,
                            "eta_calls": stats.eta_calls,
                            "eta_errors": stats.eta_errors,
                        },
                    )
                    last_accepted, last_summary_at = stats.accepted, now
                    next_summary = now + summary_interval_s
                if duration_seconds is not None and now >= duration_seconds:
                    break
                wait = MAX_TICK_S
                nxt = sim.next_happening_ms()
                if nxt is not None:
                    wait = min(wait, max(0.0, (sim.event_time_ms(nxt) - now_ms()) / 1000.0))
                if duration_seconds is not None:
                    wait = min(wait, max(0.0, duration_seconds - now))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(wait, 0.005))
        finally:
            pub_stats = await publisher.close(drain_timeout_s)
            if eta_channel is not None:
                await eta_channel.close()
            if oracle is not None:
                await oracle.close()
    final = _live_stats(sim, pub_stats, elapsed(), checkout, oracle)
    if stats_callback is not None:
        stats_callback(final)
    log.info(
        "live city stopped",
        extra={
            "seconds": round(final.elapsed_seconds, 1),
            "generated": final.generated,
            "accepted": final.accepted,
            "duplicates": final.duplicates,
            "rejected": final.rejected,
            "unavailable": final.unavailable,
            "failed": final.failed,
            "dropped": final.dropped,
            "accepted_per_s": round(final.accepted_per_second, 1),
            "orders_placed": final.orders_placed,
            "orders_delivered": final.orders_delivered,
            "eta_calls": final.eta_calls,
            "eta_errors": final.eta_errors,
            "oracle_written": final.oracle_written,
        },
    )
    return final
