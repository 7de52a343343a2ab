"""``eta-simulator live`` drives an ingestion whose gRPC port has TLS on — here mutual TLS and bearer
tokens, as the Helm chart's production values run it — through the real CLI, as a process."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import LocalStack
from tests.integration.conftest import own_stack

pytestmark = pytest.mark.integration
TLS = Path(__file__).resolve().parents[2] / "services" / "ingestion" / "tests" / "tls"
TOKEN = "sim-" + "9" * 28


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tokens = tmp_path_factory.mktemp("simulator-tls-tokens") / "tokens"
    tokens.write_text(f"simulator {TOKEN}\n")
    env = {
        "INGESTION_AUTH_REQUIRED": "true",
        "INGESTION_AUTH_TOKENS_FILE": str(tokens),
        "GRPC_TLS_CERT_FILE": str(TLS / "server.crt"),
        "GRPC_TLS_KEY_FILE": str(TLS / "server.key"),
        "GRPC_TLS_CLIENT_CA_FILE": str(TLS / "ca.crt"),  # mutual TLS
        "SHUTDOWN_GRACE_SECONDS": "1",
        "OTEL_TRACES_SAMPLER": "always_off",
    }
    with own_stack(tmp_path_factory, "simulator-tls", services=("ingestion",), extra_env=env) as stack:
        yield stack


def _live(stack: LocalStack, *options: str) -> tuple[int, str]:
    """Run ``eta-simulator live`` for a few seconds; (events accepted, its output)."""
    env = stack.env()
    env.pop("ETA_INGESTION_TLS_CA", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulator",
            "live",
            "--target",
            f"localhost:{stack.ports.grpc['ingestion']}",
            "--duration-seconds",
            "3",
            "--eta-target",
            "",
            "--database-url",
            "",
            *options,
        ],
        env={**env, "LOG_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    match = re.search(r"([\d,]+) accepted", done.stdout)
    assert match, output
    return int(match[1].replace(",", "")), output


def test_live_over_mutual_tls_with_a_token(secured: LocalStack) -> None:
    accepted, output = _live(
        secured,
        "--tls-ca",
        str(TLS / "ca.crt"),
        "--tls-cert",
        str(TLS / "client.crt"),
        "--tls-key",
        str(TLS / "client.key"),
        "--token",
        TOKEN,
    )
    assert accepted >= 20, output  # kitchens open and drivers come online right away
    assert " 0 rejected" in output


def test_without_tls_or_a_client_certificate_nothing_is_accepted(secured: LocalStack) -> None:
    assert _live(secured, "--token", TOKEN)[0] == 0  # plaintext to the TLS port
    assert _live(secured, "--tls-ca", str(TLS / "ca.crt"), "--token", TOKEN)[0] == 0  # no client certificate


def test_unreadable_tls_files_fail_at_start(secured: LocalStack) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulator",
            "live",
            "--tls-ca",
            "/nonexistent/ca.crt",
            "--duration-seconds",
            "1",
        ],
        env=secured.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "cannot read TLS file /nonexistent/ca.crt" in done.stderr
