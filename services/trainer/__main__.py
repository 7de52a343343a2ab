"""Train ETA models from the PostgreSQL history and register them; report live accuracy.

  eta-trainer [train] [options]        train, evaluate, register (and maybe promote) a model
  eta-trainer accuracy [options]       rolling MAE / range coverage of the ETAs served to delivered orders
  eta-trainer market-effect [options]  does the market help the model? (holdout MAE per market, variants)

Training builds a point-in-time-correct training set (features as of each order's placement, via the
shared feature definitions), trains LightGBM quantile models (p10/p50/p90) on the older orders with a
conformally calibrated p10–p90 range, evaluates on the most recent orders against two baselines
(restaurant mean, distance/speed) and the simulator's oracle when present, writes a report (--report-dir:
report.md, error_by_hour.png, calibration.png), stores the run, metrics, report and model bytes in the
registry, and promotes the new version if it passes the promotion gate — it beats both baselines on its
holdout and its p10–p90 coverage is within --min-coverage..--max-coverage — and beats the promoted one
(if any) on the same holdout; --force-promote overrides both. A first model that fails the gate is not
promoted: the prediction service keeps answering with its heuristic. The reason is logged, stored with
the run and printed. Exit code 0 also when the model was registered but not promoted; 1 on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from eta_common.config import DatabaseSettings, env_float
from eta_common.logs import configure_logging
from trainer.gate import PromotionGate
from trainer.run import train_and_register
from trainer.train import ROUNDS

__all__ = [
    "build_accuracy_parser",
    "build_market_effect_parser",
    "build_parser",
    "main",
    "train_and_register",
]

log = logging.getLogger("trainer")


def _as_of(text: str) -> int:
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=None,
        help=f"PostgreSQL URL (default: $DATABASE_URL or {DatabaseSettings.url})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eta-trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _database_option(parser)
    parser.add_argument(
        "--history-days",
        type=float,
        default=env_float("TRAINER_HISTORY_DAYS", 28.0),
        help="how much history to train on (default: $TRAINER_HISTORY_DAYS or 28)",
    )
    parser.add_argument(
        "--as-of",
        type=_as_of,
        default=None,
        metavar="ISO_TIME",
        help="end of the history used, ISO 8601, no offset = UTC (default: now)",
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.2,
        help="most recent share of orders held out for evaluation (default: 0.2)",
    )
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help=f"boosting rounds per quantile model (default: {ROUNDS})"
    )
    parser.add_argument(
        "--calibration-folds",
        type=int,
        default=5,
        help="time blocks for the conformal calibration of the range; 0 = raw quantiles (default: 5)",
    )
    parser.add_argument(
        "--report-dir",
        type=Path,
        default=None,
        help="write report.md, error_by_hour.png and calibration.png here (default: no files; the "
        "markdown is stored with the run either way)",
    )
    parser.add_argument(
        "--force-promote",
        action="store_true",
        help="promote even if it fails the promotion gate or is not better than the promoted model",
    )
    gate = PromotionGate()
    parser.add_argument(
        "--max-mae-ratio",
        type=float,
        default=gate.max_mae_ratio,
        help="promotion gate: holdout MAE / each baseline's MAE must be below this "
        f"(default: {gate.max_mae_ratio:g})",
    )
    parser.add_argument(
        "--min-coverage",
        type=float,
        default=gate.min_coverage,
        help=f"promotion gate: lowest p10–p90 coverage on the holdout (default: {gate.min_coverage:g})",
    )
    parser.add_argument(
        "--max-coverage",
        type=float,
        default=gate.max_coverage,
        help=f"promotion gate: highest p10–p90 coverage on the holdout (default: {gate.max_coverage:g})",
    )
    return parser


def build_accuracy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eta-trainer accuracy",
        description="Live accuracy: orders delivered in the window joined to the ETA served at checkout "
        "(predictions.request_id = order id): MAE, p90 absolute error, p10–p90 coverage and bias, per "
        "model version. With --metrics-port the figures are served as Prometheus gauges and refreshed "
        "every --every seconds until interrupted.",
    )
    _database_option(parser)
    parser.add_argument(
        "--since-minutes",
        type=float,
        default=60.0,
        help="window: orders delivered in the last N minutes (default: 60)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve the figures as Prometheus gauges on this port and keep refreshing (default: print once)",
    )
    parser.add_argument(
        "--every",
        type=float,
        default=30.0,
        help="refresh interval with --metrics-port, seconds (default: 30)",
    )
    return parser


async def _accuracy(args: argparse.Namespace) -> int:
    import asyncpg

    from eta_common.live_accuracy import AccuracyGauges, live_accuracy

    url = args.database_url or DatabaseSettings.from_env().url
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        if args.metrics_port is None:
            result = await live_accuracy(pool, window_minutes=args.since_minutes)
            out = json.dumps(result.as_dict(), indent=2) if args.json else result.render()
            sys.stdout.write(out + "\n")
            return 0
        from prometheus_client import start_http_server

        gauges = AccuracyGauges()
        start_http_server(args.metrics_port)
        log.info("serving live accuracy gauges", extra={"port": args.metrics_port})
        while True:
            result = await live_accuracy(pool, window_minutes=args.since_minutes)
            gauges.update(result)
            await asyncio.sleep(args.every)
    finally:
        await pool.close()


def _train(args: argparse.Namespace) -> int:
    url = args.database_url or DatabaseSettings.from_env().url
    try:
        gate = PromotionGate(
            max_mae_ratio=args.max_mae_ratio, min_coverage=args.min_coverage, max_coverage=args.max_coverage
        )
    except ValueError as exc:
        log.error("invalid promotion gate", extra={"error": str(exc)})
        return 2
    try:
        summary: dict[str, Any] = asyncio.run(
            train_and_register(
                url,
                history_days=args.history_days,
                holdout_fraction=args.holdout_fraction,
                force_promote=args.force_promote,
                rounds=args.rounds,
                folds=args.calibration_folds,
                as_of_ms=args.as_of,
                report_dir=args.report_dir,
                gate=gate,
            )
        )
    except RuntimeError as exc:
        log.error("training failed", extra={"error": str(exc)})
        return 1
    sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    verdict = "promoted" if summary["promoted"] else "NOT promoted"
    sys.stderr.write(f"model {summary['version']} {verdict}: {summary['promotion_reason']}\n")
    return 0


def build_market_effect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eta-trainer market-effect",
        description="Does the market help the model? On the same time-ordered split as training: the p50"
        " model with city-wide features per market (served), pooled across markets (before markets), and"
        " per market plus the market id as a categorical feature; holdout MAE overall and per market.",
    )
    _database_option(parser)
    parser.add_argument("--history-days", type=float, default=28.0, help="history used (default 28)")
    parser.add_argument("--holdout-fraction", type=float, default=0.2, help="most recent share (default 0.2)")
    parser.add_argument("--as-of", type=_as_of, default=None, help="end of the history (default now)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"boosting rounds (default {ROUNDS})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


async def _market_effect(args: argparse.Namespace) -> int:
    import asyncpg

    from eta_common.timeutil import now_ms
    from trainer.dataset import load_training_set
    from trainer.market_effect import market_effect

    url = args.database_url or DatabaseSettings.from_env().url
    until = args.as_of if args.as_of is not None else now_ms()
    since = until - int(args.history_days * 86_400_000)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        split = (await load_training_set(pool, since_ms=since, until_ms=until)).split(args.holdout_fraction)
        pooled = await load_training_set(pool, since_ms=since, until_ms=until, per_market=False)
    finally:
        await pool.close()
    effect = market_effect(split, pooled.split(args.holdout_fraction), rounds=args.rounds)
    sys.stdout.write((effect.to_json() if args.json else effect.render()) + "\n")
    return 0


def main(argv: list[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    configure_logging("eta-trainer")
    if args_list[:1] == ["market-effect"]:
        sys.exit(asyncio.run(_market_effect(build_market_effect_parser().parse_args(args_list[1:]))))
    if args_list[:1] == ["accuracy"]:
        args = build_accuracy_parser().parse_args(args_list[1:])
        try:
            code = asyncio.run(_accuracy(args))
        except KeyboardInterrupt:
            code = 130
        sys.exit(code)
    if args_list[:1] == ["train"]:
        args_list = args_list[1:]
    sys.exit(_train(build_parser().parse_args(args_list)))


if __name__ == "__main__":
    main()
