"""Shared helpers of the simulator tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from eta.v1 import events_pb2
from simulator.city import CityConfig
from simulator.engine import CitySimulation
from simulator.messages import event_ms

MONDAY = int(datetime(2025, 3, 3, tzinfo=UTC).timestamp() * 1000)  # a Monday, 00:00 UTC
DAY_MS = 86_400_000


@dataclass
class Run:
    sim: CitySimulation
    events: list[events_pb2.Event]
    start_ms: int
    end_ms: int

    def times(self) -> list[int]:
        return [event_ms(e) for e in self.events]


def simulate(config: CityConfig, start_ms: int, duration_ms: int, **kwargs: object) -> Run:
    sim = CitySimulation(config, start_ms=start_ms, **kwargs)  # type: ignore[arg-type]
    events = list(sim.run_until(start_ms + duration_ms))
    return Run(sim, events, start_ms, start_ms + duration_ms)
