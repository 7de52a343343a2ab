from __future__ import annotations

import re

import pytest

from simulator.__main__ import build_parser, city_config, parse_time_ms
from simulator.city import CityConfig
from simulator.tests.helpers import MONDAY


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("seed", ["--days", "--end", "--database-url", "--batch-size", "--no-progress"]),
        (
            "live",
            [
                "--target",
                "--speed",
                "--duration-seconds",
                "--warmup-minutes",
                "--opening-hours",
                "--max-batch",
                "--flush-ms",
                "--summary-seconds",
                "--eta-target",
                "--database-url",
                "--tls",
                "--tls-ca",
                "--tls-cert",
                "--tls-key",
                "--tls-server-name",
            ],
        ),
    ],
)
def test_help_documents_every_option_with_its_default(
    command: str, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for option in [*options, "--seed", "--restaurants", "--drivers", "--demand-multiplier"]:
        assert option in text
    for default in ("(default: 42)", "(default: 20)", "(default: 3 per restaurant"):
        assert default in text
    specific = {
        "seed": ["(default: 3.0)", "(default: 5000)", "default: $DATABASE_URL", "default: now"],
        "live": [
            "(default: localhost:50051)",
            "(default: localhost:50053)",
            "'' disables",
            "(default: 1.0)",
            "(default: 200)",
            "(default: 150.0)",
            "(default: 0.0)",
            "default: run until interrupted",
        ],
    }
    for default in specific[command]:
        assert default in text


def test_subcommands_share_the_city_options() -> None:
    seed = build_parser().parse_args(["seed", "--seed", "7", "--restaurants", "5", "--drivers", "9"])
    live = build_parser().parse_args(["live", "--seed", "7", "--restaurants", "5", "--drivers", "9"])
    assert city_config(seed) == CityConfig(seed=7, restaurants=5, drivers=9)
    sized = city_config(build_parser().parse_args(["seed", "--restaurants", "50"]))
    assert sized.drivers is None
    assert sized.fleet_size == 150  # the fleet follows the restaurants unless --drivers says otherwise
    assert city_config(live).demand_multiplier == 1.5  # the live city is busier by default
    assert live.target == "localhost:50051"
    assert live.speed == 1.0
    assert live.duration_seconds is None
    assert live.eta_target == "localhost:50053"
    assert build_parser().parse_args(["live", "--eta-target", ""]).eta_target == ""


def test_bad_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["live", "--speed", "0"],
        ["live", "--speed", "1000"],
        ["seed", "--days", "-1"],
        ["seed", "--restaurants", "0"],
        ["seed", "--end", "yesterday"],
    ):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
    assert "must be" in capsys.readouterr().err


def test_end_time_without_offset_is_utc() -> None:
    assert parse_time_ms("2025-03-03") == MONDAY
    assert parse_time_ms("2025-03-03T01:00:00+01:00") == MONDAY
