"""The offline builder keeps city-wide state per market, as the online store does: free drivers near a
restaurant are counted among its market's drivers only, the dispatch backlog is its market's, and an empty
market is the default one."""

from __future__ import annotations

import math

from eta_common import features as F
from eta_common.markets import DEFAULT_MARKET
from eta_common.offline_features import FeatureQuery, HistoryEvent, OfflineFeatureBuilder

T0 = 1_800_000_000_000
MIN = 60_000
AT = (52.52, 13.405)
NEAR = (52.521, 13.406)


def driver(did: str, etype: str, ms: int, market: str, oid: str | None = None) -> HistoryEvent:
    return HistoryEvent("driver", etype, ms, ms, None, did, oid, *NEAR, market=market)


def order(oid: str, etype: str, ms: int, rid: str, market: str) -> HistoryEvent:
    return HistoryEvent("order", etype, ms, ms, rid, None, oid, *AT, market=market)


def query(rid: str, ms: int, market: str) -> FeatureQuery:
    return FeatureQuery("q", rid, ms, *AT, market=market)


def test_city_wide_state_is_per_market() -> None:
    b = OfflineFeatureBuilder()
    # two markets whose drivers and restaurants sit at the same point (the worst case for leaking)
    for i in range(3):
        b.apply(driver(f"b{i}", "ONLINE", T0 + i, "berlin"))
    b.apply(driver("m0", "ONLINE", T0, "munich"))
    b.apply(order("o1", "PLACED", T0 + MIN, "rb", "berlin"))
    b.apply(order("o2", "PLACED", T0 + MIN, "rb", "berlin"))
    b.apply(order("o3", "PLACED", T0 + MIN, "rm", "munich"))
    b.apply(driver("b0", "ASSIGNED", T0 + 2 * MIN, "berlin", "o1"))
    b.apply(driver("m0", "ASSIGNED", T0 + 2 * MIN, "munich", "o2"))  # another market's order: not settled
    t = T0 + 3 * MIN
    berlin = b.features_at(query("rb", t, "berlin"))
    munich = b.features_at(query("rm", t, "munich"))
    assert berlin[F.FREE_DRIVERS_NEARBY] == 2  # b1, b2
    assert munich[F.FREE_DRIVERS_NEARBY] == 0  # m0 is busy; berlin's free drivers do not count
    assert berlin[F.ORDERS_WAITING_FOR_DRIVER] == 1  # o2 (settled only in munich's backlog)
    assert munich[F.ORDERS_WAITING_FOR_DRIVER] == 1  # o3
    assert b.markets == ["berlin", "munich"]
    # a market with no driver and no dispatch event: the documented defaults
    other = b.features_at(query("rb", t, "hamburg"))
    for name in (F.FREE_DRIVERS_NEARBY, F.ORDERS_WAITING_FOR_DRIVER):
        assert math.isnan(other[name]) if math.isnan(F.DEFAULTS[name]) else other[name] == F.DEFAULTS[name]
    # restaurant features do not depend on the market asked for
    assert berlin[F.WINDOW_COUNTS[0].name] == 2


def test_empty_market_is_the_default_market() -> None:
    b = OfflineFeatureBuilder()
    b.apply(driver("d0", "ONLINE", T0, ""))
    b.apply(driver("d1", "ONLINE", T0, DEFAULT_MARKET))
    b.apply(order("o1", "PLACED", T0, "r", ""))
    for market in ("", DEFAULT_MARKET):
        values = b.features_at(query("r", T0 + MIN, market))
        assert values[F.FREE_DRIVERS_NEARBY] == 2
        assert values[F.ORDERS_WAITING_FOR_DRIVER] == 1
    assert b.markets == [DEFAULT_MARKET]
