from __future__ import annotations

import re

import pytest

from trainer.__main__ import build_accuracy_parser, build_parser


def test_train_help_documents_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for option in (
        "--database-url",
        "--history-days",
        "--as-of",
        "--holdout-fraction",
        "--rounds",
        "--calibration-folds",
        "--report-dir",
        "--force-promote",
        "eta-trainer accuracy",
    ):
        assert option in text


def test_parsers() -> None:
    args = build_parser().parse_args(["--as-of", "2025-03-31", "--report-dir", "out", "--force-promote"])
    assert args.as_of == 1_743_379_200_000
    assert str(args.report_dir) == "out"
    assert args.force_promote
    assert args.calibration_folds == 5
    acc = build_accuracy_parser().parse_args(["--since-minutes", "15", "--json"])
    assert acc.since_minutes == 15
    assert acc.json
    assert acc.metrics_port is None
