"""Markets: the partition key of everything city-wide.

Every driver, restaurant, order and prediction belongs to a market (a city). City-wide online state —
driver state, the free-driver index, the dispatch backlog, the ready rows' schedule — lives under the
market's own hash tag, so no Redis Cluster slot carries the whole platform. A request or event without a
``market_id`` belongs to the default market, ``ETA_DEFAULT_MARKET`` [default], so clients that predate
markets keep working unchanged.
"""

from __future__ import annotations

import os
import re

__all__ = ["DEFAULT_MARKET", "MARKET_ID_PATTERN", "MARKET_ID_REASON", "check_market", "market_or_default"]

DEFAULT_MARKET = os.environ.get("ETA_DEFAULT_MARKET", "default") or "default"
# a market id is part of Redis keys and hash tags: no braces, colons or spaces
MARKET_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


MARKET_ID_REASON = "must be 1..64 characters of [A-Za-z0-9_.-] (empty = the default market)"


def market_or_default(market_id: str | None) -> str:
    return market_id or DEFAULT_MARKET


def check_market(out: list[tuple[str, str]], market_id: str, field: str = "market_id") -> None:
    """Append (field, reason) for a malformed market id (empty is the default market)."""
    if market_id and MARKET_ID_PATTERN.fullmatch(market_id) is None:
        out.append((field, MARKET_ID_REASON))
