"""The processor's decode step (no Redis): the keep rule drops pings before anything else reads them,
with the same decision as on the event's facts, and every other record keeps its online update and its
archive row."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any, cast

from aggregator.processor import BatchProcessor
from eta.v1 import events_pb2
from eta_common import features as F
from eta_common.event_facts import event_facts
from eta_common.online_store import OnlineStore
from eta_common.timeutil import timestamp_from_ms

T0 = 1_765_000_000_000
Driver = events_pb2.DriverEvent


def _record(event: events_pb2.Event, offset: int, ingest_ms: int) -> Any:
    envelope = events_pb2.EventEnvelope(event=event, ingest_time=timestamp_from_ms(ingest_ms))
    return SimpleNamespace(
        topic="events.driver", partition=0, offset=offset, value=envelope.SerializeToString(), headers=()
    )


def _driver(n: int, driver: str, kind: int, event_ms: int) -> events_pb2.Event:
    return events_pb2.Event(
        driver=Driver(
            event_id=f"e{n}",
            event_time=timestamp_from_ms(event_ms),
            driver_id=driver,
            type=cast(Any, kind),
            location=events_pb2.GeoPoint(lat=52.5 + n * 1e-6, lng=13.4),
        )
    )


def _processor() -> BatchProcessor:
    return BatchProcessor(cast(OnlineStore, None), allowed_lateness_ms=300_000)


def test_the_keep_rule_drops_pings_before_decoding_them_with_the_facts_decision() -> None:
    rng = random.Random(3)
    events = []
    for n in range(2000):
        driver = f"d{rng.randrange(50)}"
        kind = Driver.LOCATION if n % 5 else rng.choice([Driver.ONLINE, Driver.ASSIGNED, Driver.OFFLINE])
        events.append(_driver(n, driver, kind, T0 + rng.randrange(10 * F.PING_KEEP_PERIOD_MS)))
    records = [_record(event, n, T0 + 10 * F.PING_KEEP_PERIOD_MS + 1_000) for n, event in enumerate(events)]
    batch = _processor().prepare(records)
    expected = []
    for event in events:
        facts = event_facts(event)
        assert facts is not None
        assert facts.driver_id is not None
        if facts.type != "LOCATION" or F.ping_kept(facts.driver_id, facts.event_ms):
            expected.append(facts.event_id)
    kept = [row[1].event_id for row in batch.rows]
    assert kept == expected
    dropped = batch.outcomes[("events.driver", "ping_not_kept")]
    assert dropped == len(events) - len(expected) > 0
    # every kept record is applied (nothing is late), with the update its facts give
    assert [update.event_ms for update in batch.updates] == [row[1].event_ms for row in batch.rows]
    assert {update.event_type for update in batch.updates} >= {"LOCATION", "ONLINE"}
