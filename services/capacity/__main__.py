"""``eta-capacity``: size the platform for a traffic profile.

Turns a profile (markets, orders/min, online drivers and their ping interval, feed loads/s × restaurants
per feed, checkout predictions/s) and the per-unit costs measured by ``make bench``
(``bench/bench_capacity.py``; a copy ships with this package) into partitions, aggregator replicas, Redis
shards and memory, the PostgreSQL write rate, and ingestion and prediction replicas. The method, its
assumptions and a worked example: ``docs/capacity.md``.

Without arguments it sizes the worked example: a large platform with 1M online drivers pinging every 4 s,
30k orders/min, 50k feed loads/s of 50 restaurants and 1k checkout predictions/s over 50 markets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from capacity.model import DEFAULT_UTILISATION, Profile, load_costs, size
from eta_common import features as F


def _utilisation(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in DEFAULT_UTILISATION or not value:
        raise argparse.ArgumentTypeError(
            f"expected one of {sorted(DEFAULT_UTILISATION)}=FRACTION, got {text!r}"
        )
    fraction = float(value)
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"{name}: a fraction in (0, 1], got {value}")
    return name, fraction


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eta-capacity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    traffic = p.add_argument_group("traffic profile (at peak; defaults: the worked example)")
    traffic.add_argument("--markets", type=int, default=50, help="markets (cities) (default: %(default)s)")
    traffic.add_argument("--orders-per-min", type=float, default=30_000, help="(default: %(default)s)")
    traffic.add_argument("--online-drivers", type=int, default=1_000_000, help="(default: %(default)s)")
    traffic.add_argument(
        "--ping-interval",
        type=float,
        default=4.0,
        metavar="SECONDS",
        help="driver app pings (default: %(default)s)",
    )
    traffic.add_argument(
        "--feed-loads", type=float, default=50_000, metavar="PER_S", help="restaurant feeds shown per second "
        "(one PredictEtaBatch each) (default: %(default)s)",
    )  # fmt: skip
    traffic.add_argument(
        "--restaurants-per-feed", type=int, default=50, help="restaurants in one feed (default: %(default)s)"
    )
    traffic.add_argument(
        "--checkout-predictions", type=float, default=1_000, metavar="PER_S",
        help="single-restaurant PredictEta calls per second (default: %(default)s)",
    )  # fmt: skip
    traffic.add_argument(
        "--restaurants", type=int, default=None, help="restaurants on the platform (default: 5 per order/min)"
    )
    traffic.add_argument(
        "--largest-market-share", type=float, default=None, metavar="FRACTION",
        help="the largest market's share of drivers (default: twice the average, 2 / markets, at most 1)",
    )  # fmt: skip
    model = p.add_argument_group("model")
    model.add_argument(
        "--all-pings", action="store_true",
        help="size for every ping applied and archived, without the keep rule (features.ping_kept: "
        f"{F.PING_KEEP_WINDOW_MS / 1000:g} s of every {F.PING_KEEP_PERIOD_MS / 1000:g} s per driver)",
    )  # fmt: skip
    model.add_argument(
        "--feed-log-sample", type=float, default=0.02, metavar="FRACTION",
        help="share of feed restaurants written to the prediction log (PREDICTION_LOG_FEED_SAMPLE; "
        "default: %(default)s)",
    )  # fmt: skip
    model.add_argument(
        "--costs", type=Path, default=None,
        help="per-unit costs: bench/results/capacity.json after `make bench` (default: the copy shipped "
        "with eta-capacity, capacity/costs.json)",
    )  # fmt: skip
    model.add_argument(
        "--core-speed", type=float, default=1.0,
        help="a production core's speed relative to the machine the costs were measured on (default: 1)",
    )  # fmt: skip
    model.add_argument(
        "--utilisation", type=_utilisation, action="append", default=[], metavar="COMPONENT=FRACTION",
        help="planned steady-state share of a core per component; the rest is headroom (defaults: "
        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_UTILISATION.items()) + ")",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the profile, the costs and the sizing as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        costs = load_costs(args.costs)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"eta-capacity: cannot read costs: {exc}\n")
        return 2
    profile = Profile(
        orders_per_min=args.orders_per_min,
        online_drivers=args.online_drivers,
        feed_loads_per_s=args.feed_loads,
        checkout_predictions_per_s=args.checkout_predictions,
        markets=args.markets,
        ping_interval_s=args.ping_interval,
        restaurants_per_feed=args.restaurants_per_feed,
        restaurants=args.restaurants,
        largest_market_share=args.largest_market_share,
        ping_keep=not args.all_pings,
        feed_log_sample=args.feed_log_sample,
        core_speed=args.core_speed,
        utilisation=DEFAULT_UTILISATION | dict(args.utilisation),
    )
    sizing = size(profile, costs)
    if args.json:
        sys.stdout.write(json.dumps(sizing.as_dict(), indent=2) + "\n")
        return 0
    sys.stdout.write(
        f"eta-capacity: {profile.markets} markets, {profile.orders_per_min:,.0f} orders/min, "
        f"{profile.online_drivers:,} drivers every {profile.ping_interval_s:g} s, "
        f"{profile.feed_loads_per_s:,.0f} feeds/s × {profile.restaurants_per_feed}, "
        f"{profile.checkout_predictions_per_s:,.0f} checkouts/s\n"
        f"costs: {costs.source} (measured {costs.measured_at or 'unknown'}); cores are the measuring "
        f"machine's × {profile.core_speed:g}\n"
    )
    sys.stdout.write(sizing.table() + "\n")
    for warning in sizing.warnings:
        sys.stdout.write(f"\nwarning: {warning}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
