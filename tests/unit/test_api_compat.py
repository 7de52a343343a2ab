"""The API check (`make api-check`): buf lint is clean and buf breaking holds the protos to wire AND JSON
compatibility with the committed baseline. The negative cases prove which rules are in force: a field
renamed under its old number (wire-compatible, JSON-breaking) and a renumbered field must both fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).parent / "buf"  # buf-bin, in the dev extra
BASELINE = ROOT / "protos" / "baseline" / "eta-v1.binpb"
SOURCE = ROOT / "protos" / "baseline" / "eta-v1.source"  # the commit the baseline was built from
PRE_MARKETS = "2b6013838000dcec4230e49152b664b533cd26ba"  # main before market_id

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf not installed (make install: buf-bin)")


def _buf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _copy_protos(tmp_path: Path) -> Path:
    dst = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", dst)
    return dst


def test_lint_and_breaking_pass_on_the_repo() -> None:
    lint = _buf("lint", "protos", cwd=ROOT)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    breaking = _buf("breaking", "protos", "--against", str(BASELINE), cwd=ROOT)
    assert breaking.returncode == 0, breaking.stdout + breaking.stderr


def _has_commit(commit: str) -> bool:
    found = subprocess.run(
        ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True, check=False
    )
    return found.returncode == 0


def test_baseline_is_the_recorded_commits_api(tmp_path: Path) -> None:
    """protos/baseline/eta-v1.binpb is what `make api-baseline` built from the commit in eta-v1.source."""
    commit = SOURCE.read_text().strip()
    assert len(commit) == 40
    if not _has_commit(commit):
        pytest.skip(f"{commit} is not in this clone's history (shallow clone)")
    built = tmp_path / "rebuilt.binpb"
    out = _buf(
        "build", f".git#ref={commit},subdir=protos", "--exclude-source-info", "-o", str(built), cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert built.read_bytes() == BASELINE.read_bytes()


def test_the_market_change_kept_the_api_before_it() -> None:
    """The market_id fields were checked against the API before markets (the previous main)."""
    if not _has_commit(PRE_MARKETS):
        pytest.skip("the pre-market commit is not in this clone's history (shallow clone)")
    against = f".git#ref={PRE_MARKETS},subdir=protos"
    old = _buf("build", against, "-o", "-#format=json", cwd=ROOT)
    assert old.returncode == 0, old.stderr
    assert "market_id" not in old.stdout
    out = _buf("breaking", "protos", "--against", against, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_breaking_rejects_a_json_only_break(tmp_path: Path) -> None:
    protos = _copy_protos(tmp_path)
    # same number and type: wire-compatible, but the JSON name changes
    _edit(protos / "eta" / "v1" / "eta.proto", "string customer_id = 5;", "string customer_ref = 5;")
    out = _buf("breaking", str(protos), "--against", str(BASELINE), "--error-format=json", cwd=tmp_path)
    assert out.returncode != 0
    assert "FIELD_SAME_JSON_NAME" in out.stdout, out.stdout


def test_breaking_rejects_an_enum_value_rename(tmp_path: Path) -> None:
    protos = _copy_protos(tmp_path)
    # JSON carries enum values by name: renaming one breaks JSON clients even with the same number
    _edit(protos / "eta" / "v1" / "eta.proto", "HEURISTIC_MODEL = 3;", "DEGRADATION_HEURISTIC_MODEL = 3;")
    out = _buf("breaking", str(protos), "--against", str(BASELINE), "--error-format=json", cwd=tmp_path)
    assert out.returncode != 0
    assert "ENUM_VALUE_SAME_NAME" in out.stdout, out.stdout


def test_breaking_rejects_a_wire_break(tmp_path: Path) -> None:
    protos = _copy_protos(tmp_path)
    _edit(protos / "eta" / "v1" / "events.proto", "string driver_id = 3;", "string driver_id = 30;")
    out = _buf("breaking", str(protos), "--against", str(BASELINE), cwd=tmp_path)
    assert out.returncode != 0


def test_lint_holds_new_names_to_the_rules(tmp_path: Path) -> None:
    protos = _copy_protos(tmp_path)
    path = protos / "eta" / "v1" / "eta.proto"
    path.write_text(path.read_text() + "\nenum Region {\n  REGION_UNSPECIFIED = 0;\n  NORTH = 1;\n}\n")
    out = _buf("lint", str(protos), "--error-format=json", cwd=tmp_path)
    assert out.returncode != 0
    assert "ENUM_VALUE_PREFIX" in out.stdout, out.stdout


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("eta.proto", "  string market_id = 6;\n"),
        ("events.proto", "  string market_id = 7;\n"),
        ("features.proto", "  string market_id = 3;\n"),
    ],
)
def test_the_market_fields_are_held_by_the_baseline(tmp_path: Path, path: str, line: str) -> None:
    """The baseline includes market_id since it landed: deleting one is a breaking change now."""
    protos = _copy_protos(tmp_path)
    _edit(protos / "eta" / "v1" / path, line, "")
    out = _buf("breaking", str(protos), "--against", str(BASELINE), "--error-format=json", cwd=tmp_path)
    assert out.returncode != 0
    assert "FIELD_NO_DELETE" in out.stdout, out.stdout
