"""The oracle: the expected delivery time of an order given the city's true hidden state at placement.

It is what a perfect model could know at the moment the customer orders: the kitchen's real queue and
incident state, where every driver is and when each busy driver will be free, how many orders are ahead
in the queue for drivers. It uses expected values for everything still random (accept delay, prep
noise, travel noise, hand-over times), so the difference between the oracle and the actual delivery
time is the irreducible noise of the simulated world. A learnt model can approach it, not beat it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eta_common.features import haversine_km
from simulator.city import CityModel, GeoPoint, Restaurant

__all__ = ["BusyDriver", "oracle_minutes"]


@dataclass(frozen=True, slots=True)
class BusyDriver:
    """A driver on shift with an order: expected to be free at ``free_ms`` at ``free_at``."""

    free_ms: int
    free_at: GeoPoint


def oracle_minutes(
    model: CityModel,
    *,
    placed_ms: int,
    restaurant: Restaurant,
    customer_at: GeoPoint,
    free_drivers: Sequence[GeoPoint],
    busy_drivers: Sequence[BusyDriver],
    orders_ahead: int,
    driver_cycle_ms: float,
) -> float:
    """Expected minutes from placement to delivery.

    ``orders_ahead`` is the number of orders that will claim a driver before this one (accepted orders
    waiting for a driver plus orders placed earlier and not yet accepted); ``driver_cycle_ms`` how long a
    driver is busy with one order (recent average).
    """
    c = model.config
    accept_ms = placed_ms + model.mean_accept_delay_seconds() * 1000.0
    in_kitchen = restaurant.in_kitchen + restaurant.pending_accept
    prep_s = model.mean_prep_seconds(
        restaurant, in_kitchen, int(accept_ms), incident=restaurant.incident(int(accept_ms))
    )
    ready_ms = accept_ms + prep_s * 1000.0
    dispatch_ms = model.mean_seconds(c.dispatch_delay_seconds) * 1000.0
    rloc = restaurant.location

    if len(free_drivers) > orders_ahead:
        nearest = min(free_drivers, key=lambda p: haversine_km(p.lat, p.lng, rloc.lat, rloc.lng))
        start_ms = accept_ms + dispatch_ms
        arrival_ms = start_ms + model.mean_travel_seconds(nearest, rloc, int(start_ms)) * 1000.0
    else:
        # the order gets the driver freed (rank)-th; with more orders ahead than busy drivers, every
        # driver serves several of them, one driver cycle (assignment → delivery) each
        rank = orders_ahead - len(free_drivers)
        ordered = sorted(busy_drivers, key=lambda b: b.free_ms)
        if ordered:
            rounds, index = divmod(rank, len(ordered))
            nxt = ordered[index]
            start_ms = max(accept_ms, nxt.free_ms + rounds * driver_cycle_ms) + dispatch_ms
            arrival_ms = start_ms + model.mean_travel_seconds(nxt.free_at, rloc, int(start_ms)) * 1000.0
        else:  # nobody on shift
            arrival_ms = accept_ms + c.no_driver_fallback_minutes * 60_000.0

    pickup_ms = max(ready_ms, arrival_ms) + model.mean_seconds(c.pickup_handoff_seconds) * 1000.0
    drive_ms = model.mean_travel_seconds(rloc, customer_at, int(pickup_ms)) * 1000.0
    delivered_ms = pickup_ms + drive_ms + model.mean_seconds(c.dropoff_handoff_seconds) * 1000.0
    return (delivered_ms - placed_ms) / 60_000.0
