"""``ETA_EVENT_LOOP``: uvloop by default, the standard library's loop a setting away, anything else refused
with the choices named."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from eta_common.grpc_server import event_loop_factory


def test_uvloop_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ETA_EVENT_LOOP", raising=False)
    factory = event_loop_factory()
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_asyncio_selects_the_standard_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETA_EVENT_LOOP", "asyncio")
    assert event_loop_factory() is None
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        assert not isinstance(runner.get_loop(), uvloop.Loop)


def test_an_unknown_loop_is_refused_with_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETA_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="uvloop, asyncio"):
        event_loop_factory()
