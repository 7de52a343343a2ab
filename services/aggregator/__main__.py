"""The feature aggregator.

``eta-aggregator`` (or ``eta-aggregator serve``) consumes the event topics as part of the consumer group,
keeps the online features in Redis, archives every event to PostgreSQL and serves the FeatureService gRPC
API (configuration: see :mod:`aggregator.config`). If it finds the online store uninitialized (a new or
flushed Redis) it rebuilds it from the archive first, and it keeps checking while it runs.

``eta-aggregator rebuild [--since-hours H]`` rebuilds the online store from the archive and exits.
``eta-aggregator check-consistency [...]`` compares served features with an offline recomputation
(see ``eta-aggregator check-consistency --help``).
``eta-aggregator refresh-customer-features [--as-of-ms MS]`` refreshes the per-customer history features
in Redis from the archive once (the service also does it hourly; see ``aggregator.customer_refresh``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys

import asyncpg

from aggregator import config
from aggregator.archiver import ArchiveWriter
from aggregator.consumer import Progress, consume_forever
from aggregator.customer_refresh import add_arguments as add_refresh_arguments
from aggregator.customer_refresh import refresh_loop, run_refresh
from aggregator.feature_service import FeatureServicer
from aggregator.processor import BatchProcessor
from aggregator.rebuild import rebuild_online
from aggregator.row_maintenance import RowMaintenance
from eta.v1 import features_pb2, features_pb2_grpc
from eta_common.db.migrate import apply_migrations
from eta_common.grpc_server import GrpcService, run_grpc_service
from eta_common.kafka import Topics, ensure_topics, make_consumer
from eta_common.live_accuracy import AccuracyGauges, live_accuracy
from eta_common.logs import configure_logging
from eta_common.online_store import OnlineStore
from eta_common.timeutil import now_ms

log = logging.getLogger("aggregator")
WATCHDOG_SECONDS = 10.0


def build(settings: config.AggregatorSettings) -> GrpcService:
    lateness_ms = int(settings.allowed_lateness_seconds * 1000)
    store = OnlineStore.from_url(settings.redis.url, allowed_lateness_ms=lateness_ms)
    consumer = make_consumer(
        settings.kafka,
        group_id=settings.group_id,
        client_id=f"eta-aggregator-{socket.gethostname()}",
        topics=Topics.from_settings(settings.kafka),
        session_timeout_ms=settings.session_timeout_ms,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )
    state: dict[str, asyncpg.Pool] = {}
    progress = Progress()
    rows = RowMaintenance(
        store,
        tick_ms=settings.row_tick_ms,
        supply_refresh_seconds=settings.supply_refresh_seconds,
        supply_restamp_seconds=settings.supply_restamp_seconds,
        lookahead_ms=settings.row_lookahead_ms,
        progress=progress,
    )

    async def ensure_online_state(trigger: str) -> None:
        if not await store.is_initialized():
            log.warning(
                "online store is uninitialized; rebuilding from the archive", extra={"trigger": trigger}
            )
            await rebuild_online(
                state["pool"],
                store,
                allowed_lateness_ms=lateness_ms,
                trigger=trigger,
                since_ms=now_ms() - int(settings.rebuild_hours * 3_600_000),
            )

    async def start() -> None:
        await apply_migrations(settings.database.url)
        state["pool"] = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=4)
        await ensure_online_state("startup")
        await ensure_topics(settings.kafka)
        await consumer.start()

    archiver_box: dict[str, ArchiveWriter] = {}

    async def commit(offsets: object) -> None:
        await consumer.commit(offsets)

    async def run_consumer() -> None:
        processor = BatchProcessor(store, allowed_lateness_ms=lateness_ms, group_id=settings.group_id)
        archiver = ArchiveWriter(state["pool"], commit)
        archiver_box["archiver"] = archiver
        writer = asyncio.create_task(archiver.run(), name="archive-writer")
        try:
            await consume_forever(
                consumer, processor, archiver, max_batch=settings.max_batch, progress=progress
            )
        finally:
            writer.cancel()

    async def accuracy() -> None:
        gauges = AccuracyGauges()
        while True:
            await asyncio.sleep(settings.accuracy_seconds)
            try:
                gauges.update(
                    await live_accuracy(state["pool"], window_minutes=settings.accuracy_window_minutes)
                )
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("live accuracy not refreshed", extra={"error": str(exc)})

    async def watchdog() -> None:
        while True:
            await asyncio.sleep(WATCHDOG_SECONDS)
            try:
                await ensure_online_state("watchdog")
            except Exception:
                log.exception("online-store check failed; will retry")

    async def customer_refresh() -> None:
        await refresh_loop(state["pool"], store.client, settings)

    async def stop() -> None:
        archiver = archiver_box.get("archiver")
        if archiver is not None:
            await archiver.drain(timeout=settings.server.shutdown_grace_seconds)
        await consumer.stop()
        await state["pool"].close()
        await store.close()

    return GrpcService(
        name="eta-aggregator",
        settings=settings.server,
        register=[
            lambda server: features_pb2_grpc.add_FeatureServiceServicer_to_server(
                FeatureServicer(store), server
            )
        ],
        service_names=[features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name],
        on_start=[start],
        background=[
            run_consumer,
            rows.run_timer,
            rows.run_supply,
            watchdog,
            accuracy,
            *([customer_refresh] if settings.customer_refresh else []),
        ],
        on_stop=[stop],
    )


async def run_rebuild(settings: config.AggregatorSettings, since_hours: float) -> None:
    await apply_migrations(settings.database.url)
    pool = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=2)
    store = OnlineStore.from_url(
        settings.redis.url, allowed_lateness_ms=int(settings.allowed_lateness_seconds * 1000)
    )
    try:
        stats = await rebuild_online(
            pool,
            store,
            allowed_lateness_ms=int(settings.allowed_lateness_seconds * 1000),
            since_ms=now_ms() - int(since_hours * 3_600_000),
        )
        sys.stdout.write(f"rebuilt online store: {stats}\n")
    finally:
        await pool.close()
        await store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="eta-aggregator",
        description=__doc__ + "\n" + (config.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="consume, aggregate, archive and serve FeatureService (default)")
    rebuild = sub.add_parser(
        "rebuild", help="rebuild the online store from the PostgreSQL archive, then exit"
    )
    rebuild.add_argument(
        "--since-hours",
        type=float,
        default=None,
        help="replay events ingested in the last H hours (default: $AGGREGATOR_REBUILD_HOURS or 168)",
    )
    from aggregator.consistency import add_arguments as add_check_arguments
    from aggregator.consistency import run_check

    add_check_arguments(
        sub.add_parser("check-consistency", help="compare served features with an offline recomputation")
    )
    add_refresh_arguments(
        sub.add_parser(
            "refresh-customer-features",
            help="refresh the per-customer history features in Redis from the archive once, then exit",
        )
    )
    args = parser.parse_args(argv)
    configure_logging("eta-aggregator")
    settings = config.AggregatorSettings.from_env()
    if args.command == "rebuild":
        asyncio.run(run_rebuild(settings, args.since_hours or settings.rebuild_hours))
        return
    if args.command == "check-consistency":
        sys.exit(asyncio.run(run_check(settings, args)))
    if args.command == "refresh-customer-features":
        sys.exit(asyncio.run(run_refresh(settings, args)))
    run_grpc_service("eta-aggregator", lambda: build(settings))


if __name__ == "__main__":
    main()
