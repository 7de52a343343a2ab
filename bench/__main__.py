"""Run the benchmarks: ``python -m bench [--quick] [name ...]`` (``make bench`` runs them all)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback

import bench
from bench.result import BenchResult, Skipped


def discover() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {discover()})")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test of the benchmarks)")
    args = parser.parse_args(argv)
    names = args.names or discover()
    failed = 0
    for name in names:
        module_name = name if name.startswith("bench_") else f"bench_{name}"
        module = importlib.import_module(f"bench.{module_name}")
        started = time.monotonic()
        sys.stderr.write(f"== {module_name} …\n")
        try:
            result: BenchResult = module.run(quick=args.quick)
        except Skipped as exc:
            sys.stdout.write(f"\n{module_name}: skipped — {exc}\n")
            continue
        except Exception as exc:  # report and go on with the other benchmarks
            failed += 1
            sys.stderr.write(f"!! {module_name} failed: {exc!r}\n")
            traceback.print_exc()
            continue
        path = result.save()
        sys.stdout.write(
            f"\n{result.name} (baseline: {result.baseline}; {time.monotonic() - started:.0f}s)\n"
        )
        sys.stdout.write(result.table() + "\n")
        for key, value in result.figures.items():
            sys.stdout.write(f"  {key}: {value:,.4g}\n")
        for target in result.targets:
            sys.stdout.write(f"  {target.line()}\n")
        for note in result.notes:
            sys.stdout.write(f"  note: {note}\n")
        sys.stdout.write(f"  -> {path}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
