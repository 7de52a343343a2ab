"""Per-customer history features: the offline point-in-time class and the online read's parsing."""

from __future__ import annotations

import math
from typing import Any

import pytest

from eta_common import customer_features as CF
from eta_common.customer_features import CustomerHistory, CustomerOrderEvent

MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
R = 1_800_000_000_000 // HOUR * HOUR  # a boundary
WINDOW = CF.CUSTOMER_HISTORY_MS


def placed(
    order: str, event_ms: int, customer: str = "c1", ingest_ms: int | None = None
) -> CustomerOrderEvent:
    return CustomerOrderEvent(
        "order", "PLACED", order, customer, event_ms, event_ms + 50 if ingest_ms is None else ingest_ms
    )


def delivered(order: str, event_ms: int, ingest_ms: int | None = None) -> CustomerOrderEvent:
    return CustomerOrderEvent(
        "order", "DELIVERED", order, None, event_ms, event_ms + 50 if ingest_ms is None else ingest_ms
    )


def values(history: CustomerHistory, as_of: int, customer: str = "c1") -> tuple[float, float]:
    v = history.features_as_of(customer, as_of)
    return v[CF.CUSTOMER_ORDERS_28D], v[CF.CUSTOMER_MEAN_DELIVERY_28D]


def same(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Equal, NaN equal to NaN."""
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


def test_names_and_boundaries() -> None:
    assert CF.CUSTOMER_FEATURE_NAMES == (
        "customer_orders_last_28_days",
        "customer_mean_delivery_minutes_last_28_days",
    )
    assert CF.CUSTOMER_REFRESH_MS == HOUR
    assert CF.CUSTOMER_HISTORY_MS == 28 * DAY
    assert CF.as_of_boundary(R) == R
    assert CF.as_of_boundary(R + HOUR - 1) == R
    assert CF.as_of_boundary(R - 1) == R - HOUR
    assert CF.as_of_boundary(0) == 0
    assert CF.customer_key("c-7") == "cust:{c-7}"
    assert CF.MARKER_TTL_MS < CF.CUSTOMER_KEY_TTL_MS


def test_window_edges_are_open_below_and_closed_above() -> None:
    h = CustomerHistory(
        [
            placed("at-lower-edge", R - WINDOW, ingest_ms=R - WINDOW),  # excluded: (r − 28 d, r]
            placed("just-inside", R - WINDOW + 1, ingest_ms=R - WINDOW + 1),
            placed("at-boundary", R, ingest_ms=R),  # included: event and ingest at r
            placed("after", R + 1, ingest_ms=R - 10),  # event time after r (clock skew): excluded
        ]
    )
    assert same(values(h, R), (2.0, math.nan))  # just-inside, at-boundary
    # one period later "just-inside" has left the window and "after" entered it
    assert values(h, R + HOUR)[0] == 2.0
    assert values(h, R - HOUR)[0] == 2.0  # an hour earlier: the two oldest, at-lower-edge included
    # 28 days on, the window is (r, r + 28 d]: "at-boundary" (event time r) is out, "after" still in
    assert values(h, R + WINDOW)[0] == 1.0
    assert values(h, R + WINDOW + HOUR)[0] == 0.0


def test_features_at_is_the_value_as_of_the_boundary_before_t() -> None:
    h = CustomerHistory([placed("o1", R + 10 * MIN), delivered("o1", R + 40 * MIN)])
    for t in (R, R + 30 * MIN, R + HOUR - 1):
        at = h.features_at("c1", t)
        assert same((at[CF.CUSTOMER_ORDERS_28D], at[CF.CUSTOMER_MEAN_DELIVERY_28D]), (0.0, math.nan))
    assert h.features_at("c1", R + HOUR) == {
        CF.CUSTOMER_ORDERS_28D: 1.0,
        CF.CUSTOMER_MEAN_DELIVERY_28D: 30.0,
    }
    assert h.features_at("c1", R + 5 * HOUR + 17) == h.features_as_of("c1", R + 5 * HOUR)


def test_late_ingested_events_count_only_from_the_next_boundary() -> None:
    h = CustomerHistory(
        [
            placed("o1", R - 20 * MIN, ingest_ms=R + 1),  # happened before r, archived just after
            placed("o2", R - 50 * MIN),
            delivered("o2", R - 10 * MIN, ingest_ms=R + 5 * MIN),  # delivery known only after r
            placed("o3", R - 3 * DAY, ingest_ms=R + HOUR + 1),  # days late: still counted (batch)
        ]
    )
    assert same(values(h, R), (1.0, math.nan))
    assert values(h, R + HOUR) == (2.0, 40.0)
    assert values(h, R + 2 * HOUR) == (3.0, 40.0)


def test_deliveries_after_the_boundary_do_not_count_and_join_by_order_id() -> None:
    h = CustomerHistory(
        [
            placed("o1", R - 2 * HOUR),
            delivered("o1", R - HOUR),  # 60 min, DELIVERED carries no customer
            placed("o2", R - 30 * MIN),
            delivered("o2", R + 5 * MIN, ingest_ms=R - 1),  # event time after r: not yet delivered
            delivered("unknown-order", R - MIN),  # no PLACED: ignored
            CustomerOrderEvent(
                "driver", "DELIVERED", "o2", None, R - 20 * MIN, R - 20 * MIN
            ),  # not an order's
        ]
    )
    assert values(h, R) == (2.0, 60.0)
    assert values(h, R + HOUR) == (2.0, (60.0 + 35.0) / 2)


def test_duplicates_count_once_and_the_earliest_times_win() -> None:
    h = CustomerHistory(
        [
            placed("o1", R - 3 * HOUR),
            placed("o1", R - 3 * HOUR),  # exact duplicate (another event id)
            placed("o1", R - 2 * HOUR),  # re-sent later: the earliest placement stays
            delivered("o1", R - HOUR),
            delivered("o1", R - HOUR + 7 * MIN),  # later duplicate delivery
            delivered("o1", R - 2 * HOUR + MIN, ingest_ms=R + 1),  # earlier, but only known after r
        ]
    )
    assert values(h, R) == (1.0, 120.0)
    assert values(h, R + HOUR) == (1.0, 61.0)  # the earlier delivery, once known


def test_an_order_belongs_to_the_customer_of_its_earliest_placement() -> None:
    h = CustomerHistory(
        [
            placed("o1", R - 3 * HOUR, customer="a"),
            placed("o1", R - 2 * HOUR, customer="b"),
            placed("o2", R - HOUR, customer="b"),
            placed("o2", R - HOUR, customer="a"),  # tie on time: the smallest customer id
            placed("o3", R - HOUR, customer=None),  # type: ignore[arg-type]  # no customer: ignored
            CustomerOrderEvent("order", "PLACED", None, "a", R - HOUR, R - HOUR),  # no order id: ignored
        ]
    )
    assert values(h, R, "a")[0] == 2.0
    assert values(h, R, "b")[0] == 0.0
    assert h.customers() == ["a", "b"]


def test_unknown_customer_has_no_orders_and_no_mean() -> None:
    h = CustomerHistory([placed("o1", R - HOUR)])
    assert same(values(h, R, "nobody"), (0.0, math.nan))


def test_mean_is_computed_from_integer_sums() -> None:
    events = []
    for i, minutes in enumerate((31, 17, 44)):
        events += [
            placed(f"o{i}", R - 10 * HOUR + i),
            delivered(f"o{i}", R - 10 * HOUR + i + minutes * MIN + 7),
        ]
    h = CustomerHistory(events)
    total_ms = (31 + 17 + 44) * MIN + 3 * 7
    assert values(h, R) == (3.0, total_ms / 3 / 60_000.0)
    assert CF.customer_values_as_of(3, 3, total_ms)[CF.CUSTOMER_MEAN_DELIVERY_28D] == total_ms / 3 / 60_000.0


# --- the online read ------------------------------------------------------------------------------------
class RecordingPipeline:
    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def hmget(self, name: str, keys: Any) -> None:
        self.commands.append(("HMGET", name, *keys))

    def get(self, name: str) -> None:
        self.commands.append(("GET", name))


def test_queue_customer_read_queues_one_hmget_and_the_marker() -> None:
    pipe = RecordingPipeline()
    assert CF.queue_customer_read(pipe, "c9") == CF.CUSTOMER_READ_REPLIES == 2
    assert pipe.commands == [
        ("HMGET", "cust:{c9}", "orders", "mean_minutes", "as_of"),
        ("GET", "eta:customers:as_of"),
    ]


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        # no refresh ever landed: unknown, whatever the hash says
        ([[None, None, None], None], (math.nan, math.nan, None)),
        ([[b"3", b"12.5", str(R).encode()], None], (math.nan, math.nan, None)),
        # refreshed, customer not in it (no hash, or a hash from an older refresh)
        ([[None, None, None], str(R).encode()], (0.0, math.nan, R)),
        ([[b"3", b"12.5", str(R - HOUR).encode()], str(R).encode()], (0.0, math.nan, R)),
        # current values (bytes or str replies), NaN mean stored as ''
        ([[b"3", b"12.5", str(R).encode()], str(R).encode()], (3.0, 12.5, R)),
        ([["2", "", str(R)], str(R)], (2.0, math.nan, R)),
        # written by a refresh still in progress: the customer's own newer values
        ([[b"4", b"20.0", str(R + HOUR).encode()], str(R).encode()], (4.0, 20.0, R + HOUR)),
    ],
)
def test_parse_customer_read(replies: list[Any], expected: tuple[float, float, int | None]) -> None:
    got = CF.parse_customer_read(replies)
    assert same((got.orders_last_28_days, got.mean_delivery_minutes_last_28_days), (expected[0], expected[1]))
    assert got.as_of_ms == expected[2]
    assert set(got.values()) == set(CF.CUSTOMER_FEATURE_NAMES)


async def test_refresh_rejects_a_time_that_is_not_a_boundary() -> None:
    with pytest.raises(ValueError, match="not a refresh boundary"):
        await CF.refresh_customer_features(None, None, R + 1)  # type: ignore[arg-type]
