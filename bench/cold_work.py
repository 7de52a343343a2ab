"""The machine's cold-call factor: how much more CPU the same work costs when it runs alone every
``--gap-ms`` than back to back, on the core it is pinned to.

``bench_serving`` measures its open-loop figures (a feed every 50 ms) on a server that is idle between
calls. This probe runs a fixed piece of CPU work shaped like a request handler's (Python loops, dict
lookups, small numpy arrays; ~0.4 ms back to back here) in both ways on the server core, in the same run,
and prints one JSON line: the median thread CPU per call back to back and gapped, and their ratio. No
sockets, no threads, no other process: what the ratio shows is the machine (caches, TLB and branch
predictors refilled after an idle gap on a shared host), not gRPC or the service.

``python -m bench.cold_work --gap-ms 50 --calls 150 --cpus 0``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np

_RNG = random.Random(11)
_FLOATS = [_RNG.random() for _ in range(50_000)]
_ARRAYS = [np.random.default_rng(i).random((50, 18)) for i in range(200)]
_TABLE = {i: str(i) for i in range(20_000)}


def work() -> float:
    """One call's worth of mixed interpreter and numpy work (a fixed amount each time)."""
    total = 0.0
    for i in range(0, 50_000, 7):
        total += _FLOATS[i]
    for array in _ARRAYS[:60]:
        total += float(array.sum())
    for i in range(0, 20_000, 13):
        total += len(_TABLE[i])
    return total


def cpu_per_call_us(calls: int, gap_seconds: float) -> float:
    """Median thread CPU of ``work()`` over ``calls`` calls, each after sleeping ``gap_seconds``."""
    spent = []
    for _ in range(calls):
        if gap_seconds:
            time.sleep(gap_seconds)
        started = time.thread_time_ns()
        work()
        spent.append((time.thread_time_ns() - started) / 1e3)
    return statistics.median(spent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_work", description=__doc__)
    parser.add_argument("--gap-ms", type=float, default=50.0, help="idle time before each gapped call")
    parser.add_argument("--calls", type=int, default=150, help="calls measured each way")
    parser.add_argument("--cpus", default="", help="pin to these CPUs first (comma-separated)")
    args = parser.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in args.cpus.split(",")})
    for _ in range(50):  # warm the code and data once
        work()
    back_to_back = cpu_per_call_us(args.calls, 0.0)
    gapped = cpu_per_call_us(args.calls, args.gap_ms / 1000)
    back_to_back = (back_to_back + cpu_per_call_us(args.calls, 0.0)) / 2  # either side of the gapped run
    result = {
        "back_to_back_us": back_to_back,
        "gapped_us": gapped,
        "gap_ms": args.gap_ms,
        "factor": gapped / back_to_back,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
