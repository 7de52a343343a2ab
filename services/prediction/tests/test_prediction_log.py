"""The prediction log never blocks or fails a request: bounded buffer (drop and count), batched writes,
failed batches dropped and counted, and a final flush on shutdown."""

from __future__ import annotations

import asyncio
import json
import math
import re
from datetime import datetime

import pytest
from prometheus_client import REGISTRY

from prediction import metrics
from prediction import prediction_log as PL
from prediction.prediction_log import (
    COLUMNS,
    LoggedPrediction,
    PredictionLog,
    copy_line,
    features_document,
)


def row(i: int, values: tuple[float, float] = (1.0, math.nan)) -> LoggedPrediction:
    return LoggedPrediction(
        1_800_000_000_000 + i, f"req-{i}", "r1", "v1", 20.0, 15.0, 28.0, "MISSING",
        ("orders_in_kitchen", "mean_prep_minutes_last_60_min"), values,
    )  # fmt: skip


def counter(result: str) -> float:
    return float(metrics.LOG_ROWS.labels(result)._value.get())


_UNESCAPED = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}


def parse_line(line: str) -> tuple[str | None, ...]:
    """A line of COPY's text format back to its column values (\\N: None)."""
    assert line.endswith("\n")
    assert line.count("\n") == 1
    return tuple(
        None if field == "\\N" else re.sub(r"\\(.)", lambda m: _UNESCAPED[m.group(1)], field)
        for field in line[:-1].split("\t")
    )


class Sink:
    """Keeps each batch of lines written, parsed back to column values."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str | None, ...]]] = []
        self.fail = False

    async def __call__(self, lines: list[str]) -> None:
        if self.fail:
            raise OSError("connection refused")
        self.batches.append([parse_line(line) for line in lines])


def test_the_features_document_is_the_models_input_with_null_for_missing() -> None:
    assert json.loads(features_document(row(1))) == {
        "orders_in_kitchen": 1.0,
        "mean_prep_minutes_last_60_min": None,
    }


@pytest.mark.parametrize("values", [(1.0, math.nan), (0.1 + 0.2, 1e-7), (3.0, 1234567.125)])
def test_the_document_is_the_text_json_dumps_writes(values: tuple[float, float]) -> None:
    document = features_document(row(1, values))
    expected = {n: None if math.isnan(v) else v for n, v in zip(row(1).names, values, strict=True)}
    assert document == json.dumps(expected, separators=(",", ":"))


def test_the_document_is_what_the_consistency_check_reads() -> None:
    from aggregator.consistency import served_features

    assert served_features(features_document(row(1))) == {
        "orders_in_kitchen": 1.0,
        "mean_prep_minutes_last_60_min": None,
    }


async def test_rows_are_written_in_batches_as_table_records() -> None:
    sink = Sink()
    log = PredictionLog(sink, capacity=100, batch_size=4, flush_seconds=60)
    for i in range(10):
        log.add(row(i))
    assert await log.flush()
    assert [len(b) for b in sink.batches] == [4, 4, 2]
    record = dict(zip(COLUMNS, sink.batches[0][0], strict=True))
    assert record["request_id"] == "req-0"
    assert datetime.fromisoformat(str(record["served_at"])).timestamp() == 1_800_000_000
    assert (record["eta_minutes"], record["eta_low_minutes"], record["eta_high_minutes"]) == (
        "20.0",
        "15.0",
        "28.0",
    )
    assert json.loads(str(record["features"]))["orders_in_kitchen"] == 1.0
    assert record["customer_id"] is None
    assert record["market_id"] is None
    assert len(log) == 0


def test_a_line_escapes_what_copy_text_format_reserves_and_drops_nul() -> None:
    odd = "a\tb\nc\rd\\e \\N é\0!"
    line = copy_line(row(1)._replace(request_id=odd, customer_id=odd, market="m1"))
    record = dict(zip(COLUMNS, parse_line(line), strict=True))
    assert record["request_id"] == record["customer_id"] == odd.replace("\0", "")
    assert record["market_id"] == "m1"


async def test_rows_are_encoded_after_the_request_not_during_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``add`` (in the handler) only keeps the row; once ``_ENCODE_EVERY`` wait, a callback of its own
    encodes them; fewer wait for the next write."""
    order: list[str] = []

    def encode(row: LoggedPrediction) -> str:
        order.append(f"encoded {row.request_id}")
        return copy_line(row)

    monkeypatch.setattr(PL, "copy_line", encode)
    sink = Sink()
    log = PredictionLog(sink, capacity=100, batch_size=100, flush_seconds=60)
    for i in range(PL._ENCODE_EVERY - 1):
        log.add(row(i))
    await asyncio.sleep(0)
    assert order == []  # not enough rows for a callback
    log.add(row(PL._ENCODE_EVERY - 1))
    order.append("handler done")
    assert len(log) == PL._ENCODE_EVERY
    await asyncio.sleep(0)
    assert order == ["handler done"] + [f"encoded req-{i}" for i in range(PL._ENCODE_EVERY)]
    log.add(row(100))
    assert await log.flush()  # the write encodes what waits
    assert [r[1] for b in sink.batches for r in b] == [f"req-{i}" for i in range(PL._ENCODE_EVERY)] + [
        "req-100"
    ]
    assert len(log) == 0


async def test_many_rows_are_encoded_a_chunk_per_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[int] = []

    def encode(row: LoggedPrediction) -> str:
        encoded.append(1)
        return copy_line(row)

    monkeypatch.setattr(PL, "copy_line", encode)
    log = PredictionLog(Sink(), capacity=1000, batch_size=1000, flush_seconds=60)
    for i in range(PL._ENCODE_CHUNK * 2 + 1):
        log.add(row(i))
    await asyncio.sleep(0)
    assert len(encoded) == PL._ENCODE_CHUNK  # the others wait for the loop's next turn
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(encoded) == PL._ENCODE_CHUNK * 2 + 1


async def test_a_full_buffer_drops_new_rows_and_counts_them() -> None:
    before = counter("dropped_full")
    log = PredictionLog(Sink(), capacity=3, batch_size=100, flush_seconds=60)
    for i in range(5):
        log.add(row(i))  # never blocks
    assert len(log) == 3
    assert counter("dropped_full") - before == 2
    assert REGISTRY.get_sample_value("eta_prediction_log_buffered_rows") == 3  # read at scrape time


async def test_a_failed_write_drops_that_batch_counts_it_and_keeps_going() -> None:
    before = counter("dropped_error")
    sink = Sink()
    log = PredictionLog(sink, capacity=100, batch_size=2, flush_seconds=60)
    for i in range(3):
        log.add(row(i))
    sink.fail = True
    assert not await log.flush()
    assert counter("dropped_error") - before == 2
    sink.fail = False
    assert await log.flush()
    assert [r[1] for b in sink.batches for r in b] == ["req-2"]


async def test_the_background_writer_flushes_on_time_and_on_a_full_batch() -> None:
    sink = Sink()
    log = PredictionLog(sink, capacity=100, batch_size=3, flush_seconds=0.05)
    writer = asyncio.ensure_future(log.run())
    try:
        log.add(row(1))
        for _ in range(100):
            if sink.batches:
                break
            await asyncio.sleep(0.01)
        assert [r[1] for b in sink.batches for r in b] == ["req-1"]  # the flush period passed
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


async def test_shutdown_flushes_what_is_left() -> None:
    sink = Sink()
    log = PredictionLog(sink, capacity=100, batch_size=500, flush_seconds=60)
    for i in range(7):
        log.add(row(i))
    await log.close(timeout_seconds=5)
    assert sum(len(b) for b in sink.batches) == 7


async def test_under_steady_traffic_rows_go_in_full_batches_or_once_per_period() -> None:
    """Rows that arrive while a batch is being written wait for the next full batch or flush period:
    never one COPY per handful of predictions (the log once wrote 2.4 rows per COPY under load)."""

    class SlowSink(Sink):
        async def __call__(self, lines: list[str]) -> None:
            await asyncio.sleep(0.005)  # a COPY's round trips
            await super().__call__(lines)

    sink = SlowSink()
    batch, period = 50, 0.1
    log = PredictionLog(sink, capacity=100_000, batch_size=batch, flush_seconds=period)
    writer = asyncio.ensure_future(log.run())
    loop = asyncio.get_running_loop()
    started = loop.time()
    added = 0
    try:
        while loop.time() - started < 0.6:
            log.add(row(added))
            added += 1
            await asyncio.sleep(0.001)
        elapsed = loop.time() - started
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    await log.close(timeout_seconds=5)
    written = [r[1] for b in sink.batches for r in b]
    assert written == [f"req-{i}" for i in range(added)]  # nothing lost, in order
    assert added > 2 * batch
    # at most: the full batches, one partial batch per flush period, and the final flush
    sizes = [len(b) for b in sink.batches]
    assert len(sizes) <= added // batch + math.ceil(elapsed / period) + 2, sizes
    assert all(len(b) <= batch for b in sink.batches)


async def test_a_row_that_cannot_be_encoded_is_dropped_and_counted_and_the_rest_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = counter("dropped_error")

    def encode(row: LoggedPrediction) -> str:
        if row.request_id == "req-3":
            raise ValueError("not a float")
        return copy_line(row)

    monkeypatch.setattr(PL, "copy_line", encode)
    sink = Sink()
    log = PredictionLog(sink, capacity=100, batch_size=100, flush_seconds=60)
    for i in range(PL._ENCODE_EVERY * 2):
        log.add(row(i))
    await asyncio.sleep(0)
    assert await log.flush()
    written = [r[1] for b in sink.batches for r in b]
    assert written == [f"req-{i}" for i in range(PL._ENCODE_EVERY * 2) if i != 3]
    assert counter("dropped_error") - before == 1
    for i in range(PL._ENCODE_EVERY):  # the callbacks still run for later rows
        log.add(row(100 + i))
    await asyncio.sleep(0)
    assert len(log) == PL._ENCODE_EVERY
    assert await log.flush()
    assert len(log) == 0
