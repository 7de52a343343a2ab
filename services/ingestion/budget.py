"""The in-flight budget: how many events the process holds between admission and answer, over all calls.

Admission never waits: a call or stream chunk that does not fit is refused at once (RESOURCE_EXHAUSTED),
so memory stays bounded and the client, not the server, decides how to back off. One event loop runs every
handler, so plain counters suffice (no locks).
"""

from __future__ import annotations

from ingestion import metrics


class InFlightBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        metrics.IN_FLIGHT_LIMIT.set(limit)

    def try_acquire(self, events: int) -> bool:
        if self.in_use + events > self.limit:
            return False
        self.in_use += events
        metrics.IN_FLIGHT.set(self.in_use)
        return True

    def release(self, events: int) -> None:
        self.in_use -= events
        assert self.in_use >= 0, "released more than acquired"
        metrics.IN_FLIGHT.set(self.in_use)
