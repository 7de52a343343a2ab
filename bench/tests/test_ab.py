"""``bench.ab``: variants, the alternating round order and the paired ratios (the runs themselves need the
whole world: run by hand, ``python -m bench.ab --help``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from bench import ab
from bench import harness as H


def test_a_variant_is_a_name_and_its_environment() -> None:
    v = ab.parse_variant('nolog={"PREDICTION_LOG_ENABLED": "false"}')
    assert (v.name, v.env) == ("nolog", {"PREDICTION_LOG_ENABLED": "false"})
    assert ab.parse_variant("base={}").env == {}


def test_a_code_copy_replaces_the_services_on_the_path_and_keeps_this_bench(tmp_path: Path) -> None:
    services = tmp_path / "services"
    (services / "prediction").mkdir(parents=True)
    (services / "prediction" / "__main__.py").write_text("")
    v = ab.parse_variant(f'copy={{"ETA_SERVICES": "{services}"}}')
    assert v.env == {"PYTHONPATH": os.pathsep.join([str(H.REPO_ROOT), str(services)])}


def test_a_code_copy_that_is_not_one_is_refused_not_silently_replaced_by_this_tree(tmp_path: Path) -> None:
    # the installed tree is on the path too: a wrong directory would run it instead of the copy
    with pytest.raises(argparse.ArgumentTypeError, match="has no prediction/"):
        ab.parse_variant(f'copy={{"ETA_SERVICES": "{tmp_path / "nowhere"}"}}')


@pytest.mark.parametrize("text", ["base", "=", "x=[1]", 'x={"N": 1}', "x={nope"])
def test_a_malformed_variant_says_what_is_wrong(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        ab.parse_variant(text)


def test_rounds_alternate_so_every_variant_holds_every_position_equally() -> None:
    names = ["a", "b", "c"]
    orders = [ab.round_order(names, r) for r in range(4)]
    assert orders == [names, names[::-1], names, names[::-1]]
    for name in names:
        assert sorted(order.index(name) for order in orders) in ([0, 0, 2, 2], [1, 1, 1, 1])


def test_the_summary_gives_medians_and_ratios_against_the_last_variant() -> None:
    def run(rps: float) -> dict[str, float]:
        return {"rps": rps, "server_cpu_us_per_call": 1e6 / rps, "p50_ms": 1.0, "p99_ms": 2.0}

    fast = ab.Variant("fast", {}, {"max": [run(110.0), run(120.0), run(100.0)]})
    base = ab.Variant("base", {}, {"max": [run(100.0), run(100.0), run(100.0)]})
    text = "\n".join(ab.summary([fast, base], ["max"]))
    assert "max fast         rps     110" in text
    assert "fast/base rps: x1.100 (rounds 1.10, 1.20, 1.00)" in text
    assert "base/fast" not in text


def test_the_command_refuses_one_variant_or_unknown_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["base={}"], ["a={}", "a={}"], ["--kinds", "burst", "a={}", "b={}"]):
        with pytest.raises(SystemExit) as exit_info:
            ab.main(argv)
        assert exit_info.value.code == 2
    assert "two or more variants" in capsys.readouterr().err
