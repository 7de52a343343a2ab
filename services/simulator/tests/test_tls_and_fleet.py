"""The fleet follows the restaurants unless told otherwise; ``live`` speaks TLS (and mutual TLS) to an
ingestion that has it on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from eta.v1 import ingestion_pb2
from simulator.__main__ import build_parser, client_tls
from simulator.city import CityConfig, build_city, fleet_for
from simulator.live import run_live
from simulator.tests.test_live import FakeIngestion
from simulator.tls import ClientTls

TLS = Path(__file__).resolve().parents[2] / "ingestion" / "tests" / "tls"


def test_the_fleet_is_sized_from_the_restaurants() -> None:
    assert CityConfig().fleet_size == 60  # the default city is unchanged
    assert CityConfig(restaurants=50).fleet_size == 150
    assert replace(CityConfig(), restaurants=50).fleet_size == 150  # derived, not frozen at 60
    assert CityConfig(restaurants=50, drivers=60).fleet_size == 60  # told otherwise
    assert CityConfig(restaurants=10, orders_per_restaurant_hour=3.6).fleet_size == 60  # busier kitchens
    assert fleet_for(1) == 3
    assert fleet_for(1, 0.01) == 1
    default, explicit = build_city(CityConfig()), build_city(CityConfig(drivers=60))
    assert [(d.id, d.home, d.shifts) for d in default.drivers] == [
        (d.id, d.home, d.shifts) for d in explicit.drivers
    ]
    with pytest.raises(ValueError, match="drivers must be >= 1"):
        CityConfig(drivers=0)


def _tls_args(*extra: str) -> ClientTls | None:
    return client_tls(build_parser().parse_args(["live", *extra]))


def test_tls_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ETA_INGESTION_TLS_CA", raising=False)
    assert _tls_args() is None
    assert _tls_args("--tls") == ClientTls()
    assert _tls_args("--tls-ca", "ca.pem") == ClientTls(ca_file="ca.pem")
    both = _tls_args(
        "--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-server-name", "x"
    )
    assert both == ClientTls(ca_file="ca.pem", cert_file="c.pem", key_file="k.pem", server_name="x")
    assert both is not None
    assert both.options() == [("grpc.ssl_target_name_override", "x")]
    with pytest.raises(ValueError, match="needs its key"):
        _tls_args("--tls-cert", "c.pem")
    with pytest.raises(ValueError, match=r"cannot read TLS file /nonexistent/ca\.pem"):
        ClientTls(ca_file="/nonexistent/ca.pem").credentials()


def test_the_ca_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETA_INGESTION_TLS_CA", "/etc/eta/ca.pem")
    assert _tls_args() == ClientTls(ca_file="/etc/eta/ca.pem")


async def _tls_ingestion(*, mutual: bool) -> tuple[grpc.aio.Server, FakeIngestion, str]:
    servicer = FakeIngestion()
    server = grpc.aio.server()
    publish = grpc.unary_unary_rpc_method_handler(
        servicer.PublishEvents,
        request_deserializer=ingestion_pb2.PublishEventsRequest.FromString,
        response_serializer=ingestion_pb2.PublishEventsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("eta.v1.IngestionService", {"PublishEvents": publish}),)
    )
    credentials = grpc.ssl_server_credentials(
        [((TLS / "server.key").read_bytes(), (TLS / "server.crt").read_bytes())],
        root_certificates=(TLS / "ca.crt").read_bytes() if mutual else None,
        require_client_auth=mutual,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, servicer, f"localhost:{port}"


@pytest.fixture(params=[False, True], ids=["tls", "mutual-tls"])
async def secure(request: pytest.FixtureRequest) -> AsyncIterator[tuple[FakeIngestion, str, bool]]:
    server, servicer, target = await _tls_ingestion(mutual=request.param)
    try:
        yield servicer, target, request.param
    finally:
        await server.stop(0)


async def _live(target: str, tls: ClientTls | None) -> int:
    stats = await asyncio.wait_for(
        run_live(
            target,
            CityConfig(),
            speed=1.0,
            stop=asyncio.Event(),
            duration_seconds=0.5,
            tls=tls,
            eta_target=None,
            drain_timeout_s=1.0,
        ),
        timeout=20,
    )
    return stats.accepted


async def test_live_speaks_tls_to_a_tls_ingestion(secure: tuple[FakeIngestion, str, bool]) -> None:
    servicer, target, mutual = secure
    client = {"cert_file": str(TLS / "client.crt"), "key_file": str(TLS / "client.key")} if mutual else {}
    accepted = await _live(target, ClientTls(ca_file=str(TLS / "ca.crt"), **client))
    assert accepted >= 20  # kitchens open and drivers come online right away
    assert len(servicer.accepted) == accepted


async def test_without_the_right_tls_nothing_gets_through(secure: tuple[FakeIngestion, str, bool]) -> None:
    servicer, target, mutual = secure
    assert await _live(target, None) == 0  # plaintext to a TLS port
    assert await _live(target, ClientTls()) == 0  # the test CA is not a system root
    if mutual:  # the server's CA is trusted, but no client certificate is presented
        assert await _live(target, ClientTls(ca_file=str(TLS / "ca.crt"))) == 0
    assert servicer.accepted == []
