"""Settings from the environment: security options and the budget/batch consistency check."""

from __future__ import annotations

import pytest

from eta_common.config import ConfigError
from ingestion.config import IngestionSettings, SecuritySettings


def test_defaults_are_local_friendly(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INGESTION_AUTH_REQUIRED", "GRPC_TLS_CERT_FILE", "GRPC_TLS_KEY_FILE", "GRPC_HEALTH_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = IngestionSettings.from_env()
    assert settings.security == SecuritySettings()
    assert (settings.max_in_flight_events, settings.stream_window, settings.max_batch) == (10_000, 8, 500)


def test_security_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGESTION_AUTH_REQUIRED", "true")
    monkeypatch.setenv("INGESTION_AUTH_TOKENS_FILE", "/etc/eta/auth/tokens")
    monkeypatch.setenv("INGESTION_AUTH_TOKENS", "secret-inline-tokens")
    monkeypatch.setenv("GRPC_TLS_CERT_FILE", "/tls/tls.crt")
    monkeypatch.setenv("GRPC_TLS_KEY_FILE", "/tls/tls.key")
    monkeypatch.setenv("GRPC_HEALTH_PORT", "50061")
    security = SecuritySettings.from_env()
    assert security.auth_required
    assert security.auth_tokens_file == "/etc/eta/auth/tokens"
    assert security.tls is not None
    assert security.tls.cert_file == "/tls/tls.crt"
    assert security.health_port == 50061
    assert "secret-inline-tokens" not in repr(security)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"GRPC_TLS_CERT_FILE": "/c"}, "set together"),
        ({"GRPC_TLS_CLIENT_CA_FILE": "/ca"}, "needs GRPC_TLS_CERT_FILE"),
        ({"INGESTION_AUTH_REQUIRED": "maybe"}, "boolean"),
        ({"INGESTION_MAX_BATCH": "600"}, "INGESTION_MAX_IN_FLIGHT_EVENTS"),
    ],
)
def test_inconsistent_settings_fail_fast(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], problem: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("INGESTION_MAX_IN_FLIGHT_EVENTS", "500")
    with pytest.raises(ConfigError, match=problem):
        IngestionSettings.from_env()
