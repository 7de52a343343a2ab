"""``make run``: the whole ETA platform on this machine, from Python wheels, in one command.

Steps: start a Kafka-protocol broker (Tansu), Redis and PostgreSQL (or use KAFKA_BOOTSTRAP_SERVERS /
REDIS_URL / DATABASE_URL when set) → apply migrations → seed history with the city simulator → train and
promote a first model → start ingestion, aggregator and prediction as separate processes → drive live
city traffic through the ingestion gRPC API → print live ETAs, their features and ages, and per-hop
latency. Ctrl-C stops everything (services drain first, then the servers).

Ports (defaults): ingestion 50051, features 50052, prediction 50053; embedded Kafka 19092, Redis 16379,
PostgreSQL 15432 (``--redis-cluster``: a Redis Cluster of 3 primaries on 16379-16381). Logs and spans
go to .run/ (logs/, traces/).
"""

from __future__ import annotations

import argparse
import sys

from devstack.run import RunOptions, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devstack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser(
        "run",
        help="start everything and show it working (Ctrl-C to stop)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_p.add_argument("--workdir", default=".run", help="state, logs and spans (default: .run)")
    run_p.add_argument(
        "--seed-days",
        type=float,
        default=7.0,
        help="days of history to simulate (default: 7: from 3, 1 first model in 5 failed the promotion gate)",
    )
    run_p.add_argument("--restaurants", type=int, default=20, help="restaurants in the city (default: 20)")
    run_p.add_argument(
        "--drivers",
        type=int,
        default=None,
        help="drivers in the city (default: 3 per restaurant, 60 for the default 20)",
    )
    run_p.add_argument(
        "--speed", type=float, default=1.0, help="live simulation speed; >1 compresses city time (default: 1)"
    )
    run_p.add_argument(
        "--duration-seconds",
        type=float,
        default=None,
        help="stop by itself after this long (default: run until Ctrl-C)",
    )
    run_p.add_argument("--refresh-seconds", type=float, default=3.0, help="live view refresh (default: 3)")
    run_p.add_argument(
        "--keep-data",
        action="store_true",
        help="reuse PostgreSQL data from a previous run instead of starting fresh",
    )
    run_p.add_argument(
        "--redis-cluster",
        action="store_true",
        help="a local Redis Cluster of 3 primaries (ports 16379-16381) instead of one Redis; the services "
        "are given one node's URL and detect cluster mode",
    )
    args = parser.parse_args(argv)
    options = RunOptions(
        workdir=args.workdir,
        seed_days=args.seed_days,
        restaurants=args.restaurants,
        drivers=args.drivers,
        speed=args.speed,
        duration_seconds=args.duration_seconds,
        refresh_seconds=args.refresh_seconds,
        keep_data=args.keep_data,
        redis_cluster=args.redis_cluster,
    )
    sys.exit(run(options))


if __name__ == "__main__":
    main()
