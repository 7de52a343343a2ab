from __future__ import annotations

from collections.abc import Sequence

import pytest

from eta_common.db.archive import ArchivedEvent, event_row
from ingestion.validation import event_id_of
from simulator.city import CityConfig
from simulator.engine import OrderOutcome
from simulator.messages import event_ms
from simulator.seed import write_history
from simulator.tests.helpers import DAY_MS, MONDAY


class FakeArchive:
    def __init__(self) -> None:
        self.batches: list[list[ArchivedEvent]] = []
        self.ids: set[str] = set()

    async def __call__(self, items: Sequence[ArchivedEvent]) -> int:
        self.batches.append(list(items))
        new = {event_id_of(i.event) for i in items} - self.ids
        self.ids |= new
        return len(new)


async def test_history_is_written_in_batches_with_ingest_delays() -> None:
    archive = FakeArchive()
    outcomes: list[OrderOutcome] = []
    end = MONDAY + DAY_MS
    stats = await write_history(
        archive, CityConfig(), days=1, end_ms=end, progress=False, batch_size=3000, on_outcome=outcomes.append
    )
    items = [i for b in archive.batches for i in b]
    assert all(len(b) <= 3000 for b in archive.batches)
    assert len(archive.batches) > 5
    assert stats.events_generated == stats.events_written == len(items) == len(archive.ids)
    assert stats.start_ms == MONDAY
    assert stats.end_ms == end
    times = [event_ms(i.event) for i in items]
    assert times == sorted(times)
    assert times[0] >= MONDAY
    assert times[-1] <= end
    assert all(50 <= i.ingest_ms - event_ms(i.event) <= 500 for i in items)
    assert outcomes == stats.outcomes
    assert len(outcomes) == stats.orders_delivered > 300
    assert stats.orders_placed > stats.orders_delivered
    assert stats.events_per_second > 0
    row = event_row(items[0])  # rows are what the archive expects
    assert row[0] == event_id_of(items[0].event)


async def test_the_same_history_twice_writes_nothing_new() -> None:
    archive = FakeArchive()
    first = await write_history(
        archive, CityConfig(), days=0.25, end_ms=MONDAY + 14 * 3_600_000, progress=False
    )
    second = await write_history(
        archive, CityConfig(), days=0.25, end_ms=MONDAY + 14 * 3_600_000, progress=False
    )
    assert first.events_written > 0
    assert second.events_generated == first.events_generated
    assert second.events_written == 0


async def test_progress_line_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    await write_history(FakeArchive(), CityConfig(), days=0.1, end_ms=MONDAY + 13 * 3_600_000, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "seed: day 0.10/0.1" in captured.err
    assert "events/s" in captured.err


async def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="days"):
        await write_history(FakeArchive(), CityConfig(), days=0, end_ms=MONDAY)


async def test_the_oracle_of_every_delivered_order_goes_to_the_oracle_sink() -> None:
    archive = FakeArchive()
    stored: list[OrderOutcome] = []
    written_at: list[int] = []

    async def oracle_sink(outcomes: Sequence[OrderOutcome]) -> int:
        stored.extend(outcomes)
        written_at.append(len(archive.batches))
        return len(outcomes)

    stats = await write_history(
        archive,
        CityConfig(),
        days=0.5,
        end_ms=MONDAY + 20 * 3_600_000,
        progress=False,
        batch_size=2000,
        oracle_sink=oracle_sink,
    )
    assert stored == stats.outcomes
    assert stats.oracle_written == len(stored) == stats.orders_delivered > 100
    assert len(written_at) > 1  # written as the history goes, not all at the end
    assert all(o.oracle_minutes > 0 for o in stored)
