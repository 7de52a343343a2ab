"""Paired A/B rounds of ``eta-prediction`` variants: is a change faster, by more than the machine's noise?

``python -m bench.ab [--rounds N] [--kinds max,seq] NAME=SPEC [NAME=SPEC ...]``

Each variant is the service started with its default settings plus an environment (``SPEC``: a JSON
object, e.g. ``'{"PREDICTION_LOG_ENABLED": "false"}'``). To compare code, copy ``services/`` elsewhere,
change the copy and give ``'{"ETA_SERVICES": "/tmp/copy/services"}'``: that variant imports the copy's
packages (``bench`` stays this tree's). All variants run against the same Redis, PostgreSQL and model
(``bench.eta_setup``), one at a time alone on the server core, in rounds whose order alternates
(ABC, CBA, ...), and every ratio is **paired**: variant / reference within the same round, median over
the rounds. The reference is the last variant.

Why paired rounds and a control: on this 2-core VM the same server's throughput drifts by 10-20 % between
rounds and by up to 1.7x between phases of the machine, so figures from separate runs cannot be compared.
Two identical variants still differ by up to ~6 % in the median of 4-5 rounds (measured), so run the
reference twice (``base='{}' base2='{}'``): a ratio inside the two controls' spread is not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from bench import harness as H

KINDS = {"max": (16, 2), "seq": (1, 1)}  # calls outstanding, load-generator processes
FIELDS = ("rps", "server_cpu_us_per_call", "p50_ms", "p99_ms")


@dataclass
class Variant:
    name: str
    env: dict[str, str]
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    """``NAME=JSON``: the environment the variant's server gets on top of the defaults."""
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=JSON, e.g. base='{{}}'")
    try:
        env = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{name}: the environment is not JSON: {exc}") from exc
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise argparse.ArgumentTypeError(f"{name}: the environment must be an object of strings")
    services = env.pop("ETA_SERVICES", None)
    if services is not None:
        # a wrong path would not fail: the installed tree's packages would answer instead, unnoticed
        if not (Path(services) / "prediction" / "__main__.py").is_file():
            raise argparse.ArgumentTypeError(f"{name}: {services} has no prediction/ (a copy of services/?)")
        env["PYTHONPATH"] = os.pathsep.join([str(H.REPO_ROOT), services])
    return Variant(name, env)


def round_order(names: Sequence[str], round_no: int) -> list[str]:
    """ABC in even rounds, CBA in odd ones: every position is held as often by each variant."""
    return list(names) if round_no % 2 == 0 else list(reversed(names))


def summary(variants: Sequence[Variant], kinds: Sequence[str]) -> list[str]:
    reference = variants[-1]
    lines = []
    for kind in kinds:
        for v in variants:
            med = {f: median(r[f] for r in v.runs[kind]) for f in FIELDS}
            lines.append(
                f"{kind:3s} {v.name:12s} rps {med['rps']:7.0f}"
                f"  cpu/call {med['server_cpu_us_per_call']:6.1f} us"
                f"  p50 {med['p50_ms']:.3f}  p99 {med['p99_ms']:.3f} ms"
            )
        for v in variants[:-1]:
            for f in ("rps", "server_cpu_us_per_call", "p99_ms"):
                ratios = H.paired_ratios(v.runs[kind], reference.runs[kind], f)
                lines.append(
                    f"    {v.name}/{reference.name} {f}: x{median(ratios):.3f} "
                    f"(rounds {', '.join(f'{r:.2f}' for r in ratios)})"
                )
    return lines


def run(variants: Sequence[Variant], kinds: Sequence[str], rounds: int, seconds: float) -> None:
    from bench.eta_setup import PREDICT, eta_world
    from trainer.train import ROUNDS

    workdir = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    with eta_world(workdir, rows=20000, rounds=ROUNDS) as world:
        infra = world.infra
        servers: dict[str, H.Server] = {}
        try:  # a variant that fails to start stops the ones already started
            for v in variants:
                servers[v.name] = H.start_eta(
                    workdir, infra.redis_url, infra.database_url, tracing=False, tag=v.name, extra_env=v.env
                )
            for s in servers.values():
                H.wait_for_scorer(s)
                s.park()
            idle = H.idle_cpu_rate({n: s.pid for n, s in servers.items()}, 4.0)
            by_name = {v.name: v for v in variants}
            for round_no in range(rounds):
                for name in round_order(list(servers), round_no):
                    for other in servers.values():
                        other.park()
                    server = servers[name]
                    server.unpark()
                    for kind in kinds:
                        concurrency, clients = KINDS[kind]
                        result = H.run_load(
                            server.target,
                            world.single_file,
                            method=PREDICT,
                            mode="max",
                            concurrency=concurrency,
                            clients=clients,
                            duration=seconds,
                            warmup=2.0,
                            server_pid=server.pid,
                            background={"server": idle[name]},
                        ).summary()
                        by_name[name].runs.setdefault(kind, []).append(result)
                        print(
                            f"round {round_no} {name:12s} {kind:3s} rps {result['rps']:7.0f}  cpu/call "
                            f"{result['server_cpu_us_per_call']:6.1f} us  p99 {result['p99_ms']:.3f} ms  "
                            f"client core {result['client_core_busy_pct']:.0f} %  bound: {result['bound']}",
                            flush=True,
                        )
        finally:
            for s in servers.values():
                s.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "variants", nargs="+", type=parse_variant, help="NAME=JSON environment; the last is the reference"
    )
    parser.add_argument("--rounds", type=int, default=4, help="paired rounds [4]")
    parser.add_argument("--kinds", default="max", help="max (16 outstanding), seq (one at a time) [max]")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run [10]")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        parser.error(f"--kinds: one or more of {sorted(KINDS)}")
    names = [v.name for v in args.variants]
    if len(set(names)) != len(names) or len(names) < 2:
        parser.error("give two or more variants with distinct names")
    run(args.variants, kinds, args.rounds, args.seconds)
    print("\n".join(summary(args.variants, kinds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
