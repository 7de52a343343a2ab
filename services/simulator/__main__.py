"""``eta-simulator``: a simulated city of restaurants, drivers and customers.

  eta-simulator seed --days 3                  write 3 days of history ending now into PostgreSQL
  eta-simulator live --target localhost:50051  send the live city's events to the ingestion API
                                               (and ask localhost:50053 for each order's ETA first)

The same seed gives the same city (restaurants rst-000…, drivers drv-000…) in both modes, so a model
trained on the seeded history serves the live city. ``--markets berlin:20,munich:8`` runs several markets
(cities) of different sizes at once, each with its own restaurants, drivers, customers and area and
market_id on every event (see simulator.markets); without it, one city in the default market.
Logging: LOG_LEVEL, LOG_FORMAT (json|text); tracing: OTEL_* / ETA_TRACES_FILE (see eta_common.telemetry).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import replace
from datetime import UTC, datetime

from eta_common.config import DatabaseSettings, env_str
from eta_common.logs import configure_logging
from eta_common.telemetry import setup_tracing
from eta_common.timeutil import now_ms
from simulator.city import DRIVERS_PER_RESTAURANT, CityConfig
from simulator.live import LIVE_DEMAND_MULTIPLIER, run_live
from simulator.markets import MarketSpec, market_configs, parse_markets
from simulator.seed import seed_history
from simulator.tls import ClientTls

__all__ = ["build_parser", "city_config", "city_configs", "main"]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: …)" for every option with a real default (None / off defaults say it in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = (
            action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        )
        if action.option_strings and shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _speed(text: str) -> float:
    value = float(text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100], got {text}")
    return value


def parse_time_ms(text: str) -> int:
    """ISO 8601 date/time → epoch ms; a time without offset is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _markets(text: str) -> list[MarketSpec]:
    try:
        return parse_markets(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_city_options(parser: argparse.ArgumentParser, *, demand_multiplier: float) -> None:
    group = parser.add_argument_group("city")
    group.add_argument(
        "--markets",
        type=_markets,
        default=None,
        metavar="NAME:RESTAURANTS[:DRIVERS],…",
        help="several markets (cities) at once, e.g. berlin:20,munich:8: each its own restaurants, drivers,"
        " customers and area, market_id on every event (--restaurants/--drivers are then per market);"
        " default: one city in the default market (no market_id), sized by --restaurants/--drivers",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=CityConfig.seed,
        help="random seed: the same seed gives the same city and the same events",
    )
    group.add_argument(
        "--restaurants", type=_positive_int, default=CityConfig.restaurants, help="number of restaurants"
    )
    group.add_argument(
        "--drivers",
        type=_positive_int,
        default=None,
        help=f"number of drivers (default: {DRIVERS_PER_RESTAURANT:g} per restaurant, scaled with the "
        "demand per restaurant: 60 for 20 restaurants)",
    )
    group.add_argument(
        "--demand-multiplier",
        type=_non_negative_float,
        default=demand_multiplier,
        help="scales the order rate (orders per restaurant-hour × daily profile)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eta-simulator", description=__doc__, formatter_class=_HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{seed,live}")

    seed = sub.add_parser(
        "seed", formatter_class=_HelpFormatter,
        help="simulate history into PostgreSQL (as fast as possible)",
        description="Simulate DAYS of city history ending at END and write its events into PostgreSQL's\n"
        "events table (migrations are applied first). Progress goes to stderr.",
    )  # fmt: skip
    seed.add_argument("--days", type=_positive_float, default=3.0, help="length of the history in days")
    seed.add_argument(
        "--end",
        type=parse_time_ms,
        default=None,
        metavar="ISO_TIME",
        help="end of the history, ISO 8601 (no offset = UTC); default: now",
    )
    seed.add_argument(
        "--database-url",
        default=None,
        help=f"PostgreSQL URL; default: $DATABASE_URL or {DatabaseSettings.url}",
    )
    seed.add_argument("--batch-size", type=_positive_int, default=5000, help="events per database write")
    seed.add_argument("--no-progress", action="store_true", help="do not show the progress line")
    _add_city_options(seed, demand_multiplier=CityConfig.demand_multiplier)

    live = sub.add_parser(
        "live", formatter_class=_HelpFormatter,
        help="run the city in real time against the ingestion API",
        description="Run the city from now in real time (or SPEED times faster) and send its events to\n"
        "eta.v1.IngestionService/PublishEvents. Stops on Ctrl-C / SIGTERM or after the duration.\n"
        "By default the city is open around the clock so there is traffic at any hour.",
    )  # fmt: skip
    live.add_argument("--target", default="localhost:50051", help="ingestion gRPC endpoint host:port")
    live.add_argument(
        "--token",
        default=env_str("ETA_INGESTION_TOKEN", "") or None,
        help="bearer token, when ingestion requires authentication; default: $ETA_INGESTION_TOKEN or none",
    )
    tls = live.add_argument_group(
        "TLS", "when the ingestion's gRPC port speaks TLS (GRPC_TLS_CERT_FILE); any of these turns it on"
    )
    tls.add_argument("--tls", action="store_true", help="TLS with the system's trusted root certificates")
    tls.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=env_str("ETA_INGESTION_TLS_CA", "") or None,
        help="PEM of the CA that signed the ingestion's certificate; default: $ETA_INGESTION_TLS_CA or none",
    )
    tls.add_argument(
        "--tls-cert", metavar="FILE", default=None, help="client certificate (PEM), for mutual TLS"
    )
    tls.add_argument("--tls-key", metavar="FILE", default=None, help="the client certificate's key (PEM)")
    tls.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=None,
        help="name the ingestion's certificate must carry, when not the target's host",
    )
    live.add_argument(
        "--speed",
        type=_speed,
        default=1.0,
        help="simulated seconds per wall-clock second (event times stay wall-clock)",
    )
    live.add_argument(
        "--duration-seconds",
        type=_positive_float,
        default=None,
        help="stop after this many seconds; default: run until interrupted",
    )
    live.add_argument(
        "--warmup-minutes",
        type=_non_negative_float,
        default=0.0,
        help="start the city this many simulated minutes in the past and send those events first",
    )
    live.add_argument(
        "--opening-hours",
        action="store_true",
        help="keep the kitchens' opening hours and drivers' shifts instead of running around the clock",
    )
    live.add_argument(
        "--eta-target",
        default="localhost:50053",
        help="ETA service host:port asked for every order's ETA right before it is placed (request_id ="
        " order id, for live accuracy); '' disables",
    )
    live.add_argument(
        "--database-url",
        default=env_str("DATABASE_URL", "") or None,
        help="PostgreSQL URL where each delivered order's oracle is stored (simulation_oracle);"
        " default: $DATABASE_URL, or not stored; '' disables",
    )
    live.add_argument(
        "--max-batch", type=_positive_int, default=200, help="events per PublishEvents call at most"
    )
    live.add_argument(
        "--flush-ms", type=_positive_float, default=150.0, help="send a partial batch after this long"
    )
    live.add_argument(
        "--summary-seconds", type=_positive_float, default=10.0, help="interval of the summary log line"
    )
    _add_city_options(live, demand_multiplier=LIVE_DEMAND_MULTIPLIER)
    return parser


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    """The TLS settings of ``live`` (None: plaintext). Raises ValueError on an incomplete pair."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return None
    return ClientTls(
        ca_file=args.tls_ca or "",
        cert_file=args.tls_cert or "",
        key_file=args.tls_key or "",
        server_name=args.tls_server_name or "",
    )


def city_config(args: argparse.Namespace) -> CityConfig:
    return replace(
        CityConfig(),
        seed=args.seed,
        restaurants=args.restaurants,
        drivers=args.drivers,
        demand_multiplier=args.demand_multiplier,
    )


def city_configs(args: argparse.Namespace) -> list[CityConfig]:
    """One configuration per market (``--markets``), or the single city."""
    base = city_config(args)
    if not args.markets:
        return [base]
    return market_configs(base, args.markets)


async def _seed(args: argparse.Namespace) -> int:
    url = args.database_url or DatabaseSettings.from_env().url
    end = args.end if args.end is not None else now_ms()
    stats = await seed_history(
        url,
        city_configs(args),
        days=args.days,
        end_ms=end,
        progress=not args.no_progress,
        batch_size=args.batch_size,
    )
    sys.stdout.write(
        f"seeded {args.days:g} days: {stats.events_generated:,} events ({stats.events_written:,} new), "
        f"{stats.orders_delivered:,} orders delivered ({stats.oracle_written:,} new oracle rows), "
        f"in {stats.seconds:.1f} s ({stats.events_per_second:,.0f} events/s)\n"
    )
    return 0


async def _live(args: argparse.Namespace) -> int:
    try:
        tls = client_tls(args)
        if tls is not None:
            tls.credentials()  # the files are readable
    except ValueError as exc:
        sys.stderr.write(f"eta-simulator live: {exc}\n")
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stats = await run_live(
        args.target,
        city_configs(args),
        speed=args.speed,
        stop=stop,
        duration_seconds=args.duration_seconds,
        warmup_minutes=args.warmup_minutes,
        around_the_clock=not args.opening_hours,
        max_batch=args.max_batch,
        flush_interval_s=args.flush_ms / 1000.0,
        summary_interval_s=args.summary_seconds,
        token=args.token,
        tls=tls,
        eta_target=args.eta_target or None,
        oracle_database_url=args.database_url or None,
    )
    lost = stats.dropped + stats.failed
    sys.stdout.write(
        f"live: {stats.elapsed_seconds:.1f} s, {stats.generated:,} events generated, "
        f"{stats.accepted:,} accepted ({stats.accepted_per_second:.1f}/s), {stats.duplicates:,} duplicates, "
        f"{stats.rejected:,} rejected, {stats.unavailable:,} unavailable (retried), {lost:,} lost; "
        f"{stats.orders_placed:,} orders placed, {stats.orders_delivered:,} delivered; "
        f"{stats.eta_calls:,} checkout ETAs ({stats.eta_errors:,} failed), "
        f"{stats.oracle_written:,} oracle rows stored\n"
    )
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging("eta-simulator")
    provider = setup_tracing("eta-simulator")
    try:
        code = asyncio.run(_seed(args) if args.command == "seed" else _live(args))
    except KeyboardInterrupt:
        code = 130
    finally:
        provider.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
