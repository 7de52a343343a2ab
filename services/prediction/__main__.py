"""Run the ETA prediction service: ``eta-prediction`` (configuration: see :mod:`prediction.config`)."""

from __future__ import annotations

import argparse
import asyncio
import logging

import asyncpg

from eta.v1 import eta_pb2, eta_pb2_grpc
from eta_common.grpc_server import GrpcService, serve
from eta_common.logs import configure_logging
from eta_common.online_store import OnlineStore
from eta_common.telemetry import setup_tracing
from prediction import config
from prediction.models import ModelHolder
from prediction.server import EtaServicer

log = logging.getLogger(__name__)


def build(settings: config.PredictionSettings) -> GrpcService:
    store = OnlineStore.from_url(settings.redis.url)
    models = ModelHolder()
    state: dict[str, asyncpg.Pool] = {}
    servicer = EtaServicer(store, models, staleness_budget_seconds=settings.staleness_budget_seconds)

    async def start() -> None:
        state["pool"] = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=2)
        try:
            await models.refresh(state["pool"])
        except (asyncpg.PostgresError, ValueError) as exc:
            log.warning("no model loaded at start; serving the heuristic", extra={"error": str(exc)})

    async def refresh() -> None:
        await models.refresh_forever(state["pool"], settings.model_refresh_seconds)

    async def stop() -> None:
        await state["pool"].close()
        await store.close()

    return GrpcService(
        name="eta-prediction",
        settings=settings.server,
        register=[lambda server: eta_pb2_grpc.add_EtaServiceServicer_to_server(servicer, server)],
        service_names=[eta_pb2.DESCRIPTOR.services_by_name["EtaService"].full_name],
        on_start=[start],
        background=[refresh],
        on_stop=[stop],
    )


async def run(settings: config.PredictionSettings) -> None:
    """Build inside the event loop (aiokafka clients need a running loop) and serve until SIGTERM."""
    await serve(build(settings))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="eta-prediction",
        description=config.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    configure_logging("eta-prediction")
    provider = setup_tracing("eta-prediction")
    try:
        asyncio.run(run(config.PredictionSettings.from_env()))
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
