"""Benchmarks: ``make bench`` runs every ``bench/bench_*.py`` module.

Each module defines ``NAME`` and ``def run(quick: bool) -> BenchResult``. The runner prints each result's
table and writes ``bench/results/<NAME>.json`` with the figures, the baseline measured in the same run,
and their ratio.
"""
