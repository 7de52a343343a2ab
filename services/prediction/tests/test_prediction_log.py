"""The prediction log never blocks or fails a request: bounded buffer (drop and count), batched writes,
failed batches dropped and counted, and a final flush on shutdown."""

from __future__ import annotations

import asyncio
import math
import struct
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from prediction import metrics
from prediction import prediction_log as PL
from prediction.prediction_log import (
    COLUMNS,
    COPY_HEADER,
    COPY_TRAILER,
    LoggedPrediction,
    PredictionLog,
    copy_record,
)

NAMES = ("orders_in_kitchen", "mean_prep_minutes_last_60_min")


def row(i: int, values: tuple[float, float] = (1.0, math.nan)) -> LoggedPrediction:
    return LoggedPrediction(
        1_800_000_000_000 + i, f"req-{i}", "r1", "v1", 20.0, 15.0, 28.0, "MISSING", NAMES, values,
    )  # fmt: skip


def counter(result: str) -> float:
    return float(metrics.LOG_ROWS.labels(result)._value.get())


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_FLOATS = {"eta_minutes", "eta_low_minutes", "eta_high_minutes"}


def _array(data: bytes) -> list[object]:
    """A one-dimensional binary array (text or float8 elements, no NULLs) back to a list."""
    ndim, has_null, oid, n, lower = struct.unpack_from(">iiiii", data)
    assert (ndim, has_null, lower) == (1, 0, 1)
    pos, out = 20, []
    for _ in range(n):
        (size,) = struct.unpack_from(">i", data, pos)
        element = data[pos + 4 : pos + 4 + size]
        out.append(struct.unpack(">d", element)[0] if oid == 701 else element.decode())
        pos += 4 + size
    assert pos == len(data)
    return out


def _value(column: str, data: bytes | None) -> object:
    if data is None:
        return None
    if column == "served_at":
        return _PG_EPOCH + timedelta(microseconds=struct.unpack(">q", data)[0])
    if column in _FLOATS:
        return struct.unpack(">d", data)[0]
    if column == "supply_as_of_ms":
        return struct.unpack(">q", data)[0]
    if column in ("feature_names", "feature_values"):
        return _array(data)
    return data.decode()


def parse_record(record: bytes) -> dict[str, object]:
    """A record of the binary COPY format back to its column values (None: NULL)."""
    (count,) = struct.unpack_from(">h", record)
    assert count == len(COLUMNS)
    pos, fields = 2, []
    for _ in range(count):
        (size,) = struct.unpack_from(">i", record, pos)
        pos += 4
        fields.append(None if size < 0 else record[pos : pos + size])
        pos += max(size, 0)
    assert pos == len(record)
    return {column: _value(column, data) for column, data in zip(COLUMNS, fields, strict=True)}


class Sink:
    """Keeps each batch of records written, parsed back to column values."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, object]]] = []
        self.fail = False

    async def __call__(self, records: list[bytes]) -> None:
        if self.fail:
            raise OSError("connection refused")
        self.batches.append([parse_record(r) for r in records])

    def request_ids(self) -> list[object]:
        return [r["request_id"] for b in self.batches for r in b]


@pytest.mark.parametrize("values", [(1.0, math.nan), (0.1 + 0.2, 1e-7), (3.0, -1234567.125), (math.inf, 0.0)])
def test_a_record_holds_the_models_input_exactly(values: tuple[float, float]) -> None:
    record = parse_record(copy_record(row(1, values)))
    assert record["feature_names"] == list(NAMES)
    got = record["feature_values"]
    assert isinstance(got, list)
    assert [None if math.isnan(v) else v for v in got] == [None if math.isnan(v) else v for v in values]


def test_a_record_keeps_the_supply_instant_customer_and_market() -> None:
    record = parse_record(
        copy_record(row(1)._replace(supply_as_of_ms=1_799_999_990_000.0, customer_id="c1", market="berlin"))
    )
    assert record["supply_as_of_ms"] == 1_799_999_990_000
    assert (record["customer_id"], record["market_id"]) == ("c1", "berlin")


def test_a_record_of_another_feature_list_and_length_mismatch() -> None:
    names = ("distance_km", "hour_of_week", "orders_in_kitchen")
    record = parse_record(copy_record(row(1)._replace(names=names, values=[2.5, 139.0, 4.0])))
    assert record["feature_names"] == list(names)
    assert record["feature_values"] == [2.5, 139.0, 4.0]
    with pytest.raises(ValueError, match="differ in length"):
        copy_record(row(1)._replace(names=names))


async def test_rows_are_written_in_batches_as_table_records() -> None:
    sink = Sink()
    log = PredictionLog(sink, capacity=100, batch_size=4, flush_seconds=60)
    for i in range(10):
        log.add(row(i))
    assert await log.flush()
    assert [len(b) for b in sink.batches] == [4, 4, 2]
    record = sink.batches[0][0]
    assert record["request_id"] == "req-0"
    assert record["served_at"] == datetime.fromtimestamp(1_800_000_000, UTC)
    ranges = (record["eta_minutes"], record["eta_low_minutes"], record["eta_high_minutes"])
    assert ranges == (20.0, 15.0, 28.0)
    assert record["feature_quality"] == "MISSING"
    assert record["supply_as_of_ms"] is None
    assert record["customer_id"] is None
    assert record["market_id"] is None
    assert len(log) == 0


def test_a_record_keeps_odd_text_and_drops_nul() -> None:
    odd = "a\tb\nc\rd\\e \\N é 🍕\0!"
    record = parse_record(copy_record(row(1)._replace(request_id=odd, customer_id=odd, market="m1")))
    assert record["request_id"] == record["customer_id"] == odd.replace("\0", "")
    assert record["market_id"] == "m1"


async def test_the_sink_writes_one_binary_copy_of_the_batch() -> None:
    written: list[tuple[str, bytes, list[str], str]] = []

    class Conn:
        async def copy_to_table(self, table: str, *, source: object, columns: list[str], format: str,
                                timeout: float) -> None:  # fmt: skip
            data = b"".join([chunk async for chunk in source])  # type: ignore[attr-defined]
            written.append((table, data, columns, format))

    class Pool:
        def acquire(self, timeout: float) -> object:
            class Acquired:
                async def __aenter__(self) -> Conn:
                    return Conn()

                async def __aexit__(self, *exc: object) -> None:
                    return None

            return Acquired()

    records = [copy_record(row(i)) for i in range(3)]
    await PL.copy_sink(Pool())(records)
    [(table, data, columns, fmt)] = written
    assert (table, columns, fmt) == ("predictions", list(COLUMNS), "binary")
    assert data == COPY_HEADER + b"".join(records) + COPY_TRAILER


async def test_rows_are_encoded_after_the_request_not_during_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``add`` (in the handler) only keeps the row; once ``_ENCODE_EVERY`` wait, a callback of its own
    encodes them; fewer wait for the next write."""
    order: list[str] = []

    def encode(row: LoggedPrediction) -> bytes:
        order.append(f"encoded {row.request_id}")
        return copy_record(row)

    monkeypatch.setattr(PL, "copy_record", encode)
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
    assert sink.request_ids() == [f"req-{i}" for i in range(PL._ENCODE_EVERY)] + ["req-100"]
    assert len(log) == 0


async def test_many_rows_are_encoded_a_chunk_per_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[int] = []

    def encode(row: LoggedPrediction) -> bytes:
        encoded.append(1)
        return copy_record(row)

    monkeypatch.setattr(PL, "copy_record", encode)
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
    assert sink.request_ids() == ["req-2"]


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
        assert sink.request_ids() == ["req-1"]  # the flush period passed
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
        async def __call__(self, records: list[bytes]) -> None:
            await asyncio.sleep(0.005)  # a COPY's round trips
            await super().__call__(records)

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
    written = sink.request_ids()
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

    def encode(row: LoggedPrediction) -> bytes:
        if row.request_id == "req-3":
            raise ValueError("not a float")
        return copy_record(row)

    monkeypatch.setattr(PL, "copy_record", encode)
    sink = Sink()
    log = PredictionLog(sink, capacity=100, batch_size=100, flush_seconds=60)
    for i in range(PL._ENCODE_EVERY * 2):
        log.add(row(i))
    await asyncio.sleep(0)
    assert await log.flush()
    written = sink.request_ids()
    assert written == [f"req-{i}" for i in range(PL._ENCODE_EVERY * 2) if i != 3]
    assert counter("dropped_error") - before == 1
    for i in range(PL._ENCODE_EVERY):  # the callbacks still run for later rows
        log.add(row(100 + i))
    await asyncio.sleep(0)
    assert len(log) == PL._ENCODE_EVERY
    assert await log.flush()
    assert len(log) == 0


async def test_a_row_with_a_value_that_is_no_number_is_dropped_and_counted() -> None:
    before = counter("dropped_error")
    sink = Sink()
    log = PredictionLog(sink, capacity=100, batch_size=100, flush_seconds=60)
    log.add(row(1, ("three", 1.0)))  # type: ignore[arg-type]
    log.add(row(2))
    assert await log.flush()
    assert sink.request_ids() == ["req-2"]
    assert counter("dropped_error") - before == 1


async def test_a_write_cut_short_by_shutdown_is_neither_written_twice_nor_lost() -> None:
    """Shutdown cancels the writer, maybe in the middle of a COPY that still commits; close() must not
    write that batch's rows again (it once gave them back, and they were logged twice)."""

    class SlowSink(Sink):
        async def __call__(self, records: list[bytes]) -> None:
            await super().__call__(records)  # PostgreSQL has the rows: the COPY will commit
            await asyncio.sleep(0.05)  # its reply still on the way

    before = counter("written")
    sink = SlowSink()
    log = PredictionLog(sink, capacity=100, batch_size=PL._ENCODE_EVERY // 2, flush_seconds=60)
    writer = asyncio.ensure_future(log.run())
    for i in range(PL._ENCODE_EVERY):
        log.add(row(i))
    await asyncio.sleep(0.01)  # encoded, and the writer's first COPY is on its way
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await log.close(timeout_seconds=5)
    assert sink.request_ids() == [f"req-{i}" for i in range(PL._ENCODE_EVERY)]
    assert counter("written") - before == PL._ENCODE_EVERY
    assert len(log) == 0
