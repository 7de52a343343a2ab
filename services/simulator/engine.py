"""Discrete-event engine of the city: a heap of scheduled happenings, processed in time order.

:meth:`CitySimulation.run_until` runs the happenings up to a simulation time and yields the
``eta.v1.Event`` messages they produce, in non-decreasing event-time order. The same engine serves the
history seeder (as fast as possible, event time = simulation time) and the live city (paced by the
wall clock; with ``time_scale`` > 1 simulation time runs faster and event times are compressed back to
wall-clock time around ``time_origin_ms``).

Ordering guarantees beyond the global order (the online feature store ignores a state event that is not
strictly newer than the last one applied for the same entity):

* every state event of a driver (ONLINE, ASSIGNED, DELIVERED, OFFLINE) happens on a whole second and at
  least one second after the driver's previous state event; LOCATION pings happen half-way between whole
  seconds, so one driver never has two events at the same millisecond;
* a kitchen's status events (OPENED, BUSY, CLOSED) are at least one second apart.

Identifiers: restaurants ``rst-NNN``, drivers ``drv-NNN`` and customers ``cust-NNNNN`` depend on the seed
only; order and event ids carry a tag derived from the whole configuration and the start time, so two
different runs never collide in the event archive, and the same run always produces the same ids.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from eta.v1 import events_pb2
from eta_common.features import haversine_km
from simulator.city import (
    DAY_MS,
    HOUR_MS,
    CityConfig,
    CityModel,
    Customer,
    Driver,
    DriverState,
    Order,
    Restaurant,
    build_city,
)
from simulator.messages import DriverType, KitchenType, OrderType, driver_event, kitchen_event, order_event
from simulator.oracle import BusyDriver, oracle_minutes

__all__ = ["CitySimulation", "OrderOutcome", "SimCounters"]

log = logging.getLogger(__name__)

Handler = Callable[[Any], None]
_D = events_pb2.DriverEvent
_K = events_pb2.KitchenEvent
_O = events_pb2.OrderEvent
_HOME_AFTER_MS = 3 * HOUR_MS  # a driver offline longer than this starts the next shift at home


@dataclass(frozen=True, slots=True)
class OrderOutcome:
    """A delivered order: times in event time (epoch ms); the oracle in event-time minutes."""

    order_id: str
    restaurant_id: str
    placed_ms: int
    delivered_ms: int
    oracle_minutes: float

    @property
    def actual_minutes(self) -> float:
        return (self.delivered_ms - self.placed_ms) / 60_000.0


@dataclass(slots=True)
class SimCounters:
    events: int = 0
    orders_placed: int = 0
    orders_delivered: int = 0
    orders_cancelled: int = 0
    orders_waited_for_driver: int = 0


def run_tag(config: CityConfig, start_ms: int) -> str:
    """Short id of (configuration, start): the same run always gets the same ids, another run others."""
    return hashlib.blake2b(f"{config!r}:{start_ms}".encode(), digest_size=5).hexdigest()


class CitySimulation:
    """One simulated city from ``start_ms`` on. Not thread-safe; drive it from one task."""

    def __init__(
        self,
        config: CityConfig,
        *,
        start_ms: int,
        time_origin_ms: int | None = None,
        time_scale: float = 1.0,
        on_outcome: Callable[[OrderOutcome], None] | None = None,
    ) -> None:
        if not 0 < time_scale <= 100:
            raise ValueError("time_scale must be in (0, 100]")
        self.config = config
        self._market = config.market  # on every event ('' = none: the default market)
        self.city = build_city(config)
        self.model = CityModel(config, random.Random(f"eta-city-dynamics:{config.seed}"))
        self._rng = self.model.rng
        start = -(-start_ms // 1000) * 1000  # whole seconds: see the ordering guarantees above
        self.start_ms = start
        self.time_origin_ms = start if time_origin_ms is None else time_origin_ms
        self.time_scale = time_scale
        self._now = start
        self._heap: list[tuple[int, int, Handler, Any]] = []
        self._seq = itertools.count()
        self._out: list[events_pb2.Event] = []
        self._tag = run_tag(config, start)
        self._event_no = 0
        self._order_no = 0
        self._waiting: deque[Order] = deque()
        self._n_waiting = 0
        self._pending_accept = 0
        self._day_factor = 1.0
        self._driver_cycle_ms = 30 * 60_000.0  # moving average of assignment → delivery
        self._on_outcome = on_outcome
        self._started = False
        self.counters = SimCounters()
        self.outcomes: list[OrderOutcome] = []

    # --- public API ---------------------------------------------------------------------------------
    @property
    def now_ms(self) -> int:
        """Simulation time of the last happening processed."""
        return self._now

    def event_time_ms(self, sim_ms: int) -> int:
        """Event time (epoch ms) of a simulation time."""
        if self.time_scale == 1.0:
            return sim_ms
        return self.time_origin_ms + round((sim_ms - self.time_origin_ms) / self.time_scale)

    def sim_time_ms(self, event_ms: int) -> int:
        """Simulation time of an event time (inverse of :meth:`event_time_ms`)."""
        return self.time_origin_ms + round((event_ms - self.time_origin_ms) * self.time_scale)

    def next_happening_ms(self) -> int | None:
        """Simulation time of the next scheduled happening (None before the start or when idle)."""
        return self._heap[0][0] if self._heap else None

    @property
    def orders_waiting_for_driver(self) -> int:
        return self._n_waiting

    def run_until(self, end_ms: int) -> Iterator[events_pb2.Event]:
        """Process every happening with simulation time <= ``end_ms``; yield the events produced."""
        if not self._started:
            self._start()  # kitchens' initial status is emitted right at the start
        heap = self._heap
        while True:
            if self._out:
                out, self._out = self._out, []
                yield from out
            if not heap or heap[0][0] > end_ms:
                return
            t, _, handler, arg = heapq.heappop(heap)
            self._now = t
            handler(arg)

    # --- scheduling and emission ----------------------------------------------------------------------
    def _at(self, t: int, handler: Handler, arg: Any = None) -> None:
        heapq.heappush(self._heap, (max(t, self._now), next(self._seq), handler, arg))

    def _eid(self) -> str:
        self._event_no += 1
        return f"ev-{self._tag}-{self._event_no:08x}"

    def _ems(self) -> int:
        return self.event_time_ms(self._now)

    def _emit(self, event: events_pb2.Event) -> None:
        self._out.append(event)
        self.counters.events += 1

    def _driver_event(self, d: Driver, etype: DriverType.ValueType, order_id: str = "") -> None:
        at = d.position(self._now)
        if etype == _D.LOCATION:
            at = self.model.ping_jitter(at)
        else:
            d.last_state_ms = self._now
        self._emit(driver_event(self._eid(), self._ems(), d.id, etype, at, order_id, self._market))

    def _kitchen_event(self, r: Restaurant, etype: KitchenType.ValueType, order_id: str = "") -> None:
        self._emit(kitchen_event(self._eid(), self._ems(), r.id, etype, r.location, order_id, self._market))

    def _order_event(self, o: Order, etype: OrderType.ValueType) -> None:
        if etype == _O.PLACED:
            event = order_event(
                self._eid(),
                self._ems(),
                o.id,
                o.restaurant.id,
                etype,
                customer_id=o.customer.id,
                restaurant_at=o.restaurant.location,
                customer_at=o.customer.location,
                market_id=self._market,
            )
        else:
            driver_id = o.driver.id if o.driver is not None and etype in (_O.PICKED_UP, _O.DELIVERED) else ""
            event = order_event(
                self._eid(),
                self._ems(),
                o.id,
                o.restaurant.id,
                etype,
                driver_id=driver_id,
                market_id=self._market,
            )
        self._emit(event)

    def _driver_guard(self, d: Driver, handler: Handler, arg: Any) -> bool:
        """True (and the handler rescheduled) when the driver already had a state event this second."""
        if d.last_state_ms >= self._now:
            self._at(d.last_state_ms + 1000, handler, arg)
            return True
        return False

    # --- start and days -------------------------------------------------------------------------------
    def _start(self) -> None:
        self._started = True
        now = self._now
        day_start = now - now % DAY_MS
        self._day_factor = self.model.day_factor()
        if self.config.always_open:
            for r in self.city.restaurants:
                self._open_kitchen(r)
            for d in self.city.drivers:
                self._at(now + self._rng.randint(0, 20) * 1000, self._shift_start, (d, None))
        else:
            self._plan_day(day_start, first=True)
        self._at(day_start + DAY_MS, self._new_day, day_start + DAY_MS)
        self._at(now + self.model.interarrival_seconds() * 1000, self._arrival)
        log.debug(
            "city started",
            extra={
                "start_ms": now,
                "restaurants": len(self.city.restaurants),
                "drivers": len(self.city.drivers),
            },
        )

    def _new_day(self, day_start: int) -> None:
        self._day_factor = self.model.day_factor()
        if not self.config.always_open:
            self._plan_day(day_start, first=False)
        self._at(day_start + DAY_MS, self._new_day, day_start + DAY_MS)

    def _plan_day(self, day_start: int, *, first: bool) -> None:
        c, now, rng = self.config, self._now, self._rng
        open_ms, close_ms = day_start + c.open_hour * HOUR_MS, day_start + c.close_hour * HOUR_MS
        for r in self.city.restaurants:
            if first and open_ms <= now < close_ms:
                self._open_kitchen(r)
            elif first:
                self._sync_status(r)  # CLOSED
            if now < open_ms:
                self._at(open_ms, self._open_kitchen, r)
            if now < close_ms:
                self._at(close_ms, self._close_kitchen, r)
        jitter = c.shift_jitter_minutes * 60.0
        for d in self.city.drivers:
            if rng.random() < c.day_off_probability:
                continue
            for start_h, end_h in d.shifts:
                start = day_start + round(start_h * 3600 + rng.uniform(-jitter, jitter)) * 1000
                end = day_start + round(end_h * 3600 + rng.uniform(-jitter, jitter)) * 1000
                if start < now:
                    if first and end > now + 600_000:  # already on shift when the city starts
                        self._at(now + rng.randint(0, 30) * 1000, self._shift_start, (d, end))
                    continue
                self._at(start, self._shift_start, (d, end))

    # --- demand ------------------------------------------------------------------------------------------
    def _arrival(self, _: Any) -> None:
        now, model = self._now, self.model
        if not model.is_opening_hours(now):  # skip the night
            day_start = now - now % DAY_MS
            next_open = day_start + self.config.open_hour * HOUR_MS
            if next_open <= now:
                next_open += DAY_MS
            self._at(next_open + model.interarrival_seconds() * 1000, self._arrival)
            return
        self._at(now + model.interarrival_seconds() * 1000, self._arrival)
        rate = model.city_rate_per_hour(now, self._day_factor)
        if self._rng.random() * model.max_city_rate_per_hour >= rate:
            return  # thinned out
        customers, restaurants = self.city.customers, self.city.restaurants
        for _attempt in range(5):
            customer = customers[self._rng.randrange(len(customers))]
            idx = model.choose_restaurant(customer, restaurants)
            if idx is not None:
                break
        else:
            return
        restaurant = restaurants[idx]
        if restaurant.is_open:
            self._place(restaurant, customer)

    def _place(self, r: Restaurant, customer: Customer) -> None:
        now = self._now
        self._order_no += 1
        order = Order(
            id=f"ord-{self._tag}-{self._order_no:06d}", restaurant=r, customer=customer, placed_ms=now
        )
        order.oracle_minutes = self._oracle(order)
        r.pending_accept += 1
        self._pending_accept += 1
        self.counters.orders_placed += 1
        self._order_event(order, _O.PLACED)
        self._at(now + self.model.accept_delay_seconds() * 1000, self._accept, order)
        if self._rng.random() < self.config.cancel_probability:
            self._at(
                now + self.model.minutes_between(self.config.cancel_after_minutes) * 1000, self._cancel, order
            )

    def _oracle(self, order: Order) -> float:
        free, busy = [], []
        now = self._now
        for d in self.city.drivers:
            if d.available:
                free.append(d.position(now))
            elif d.state is DriverState.BUSY and not d.pending_offline:
                at = d.order.customer.location if d.order is not None else d.position(now)
                busy.append(BusyDriver(d.expected_free_ms, at))
        return oracle_minutes(
            self.model,
            placed_ms=now,
            restaurant=order.restaurant,
            customer_at=order.customer.location,
            free_drivers=free,
            busy_drivers=busy,
            orders_ahead=self._n_waiting + self._pending_accept,
            driver_cycle_ms=self._driver_cycle_ms,
        )

    # --- kitchen ---------------------------------------------------------------------------------------
    def _accept(self, order: Order) -> None:
        r, now = order.restaurant, self._now
        r.pending_accept -= 1
        self._pending_accept -= 1
        if order.cancelled:
            return
        prep = self.model.prep_seconds(r, r.in_kitchen, now, incident=r.incident(now))
        r.in_kitchen += 1
        order.cooking = True
        order.accepted_ms = now
        order.ready_ms = now + prep * 1000
        self._kitchen_event(r, _K.ORDER_ACCEPTED, order.id)
        self._at(order.ready_ms, self._ready, order)
        self._sync_status(r)
        self._dispatch(order)

    def _ready(self, order: Order) -> None:
        if not order.cooking:
            return
        r = order.restaurant
        order.cooking = False
        r.in_kitchen -= 1
        self._kitchen_event(r, _K.ORDER_READY, order.id)
        self._sync_status(r)

    def _open_kitchen(self, r: Restaurant) -> None:
        r.is_open = True
        r.incident_epoch += 1
        self._schedule_incident(r)
        self._sync_status(r)

    def _close_kitchen(self, r: Restaurant) -> None:
        r.is_open = False
        r.incident_epoch += 1
        r.incident_until_ms = 0
        self._sync_status(r)

    def _schedule_incident(self, r: Restaurant) -> None:
        rate = self.config.busy_incidents_per_hour
        if rate > 0:
            wait_s = max(1, round(self._rng.expovariate(rate / 3600.0)))
            self._at(self._now + wait_s * 1000, self._incident, (r, r.incident_epoch))

    def _incident(self, arg: tuple[Restaurant, int]) -> None:
        r, epoch = arg
        if epoch != r.incident_epoch or not r.is_open:
            return
        r.incident_until_ms = self._now + self.model.minutes_between(self.config.busy_incident_minutes) * 1000
        self._sync_status(r)
        self._at(r.incident_until_ms, self._incident_end, arg)

    def _incident_end(self, arg: tuple[Restaurant, int]) -> None:
        r, epoch = arg
        if epoch != r.incident_epoch:
            return
        self._sync_status(r)
        self._schedule_incident(r)

    def _sync_status(self, r: Restaurant) -> None:
        """Emit the kitchen's status (OPENED / BUSY / CLOSED) if it changed."""
        now = self._now
        if r.in_kitchen >= math.ceil(r.capacity * self.config.busy_queue_factor):
            r.busy_by_queue = True
        elif r.in_kitchen < r.capacity:
            r.busy_by_queue = False
        if not r.is_open:
            status = _K.CLOSED
        elif r.incident(now) or r.busy_by_queue:
            status = _K.BUSY
        else:
            status = _K.OPENED
        if status == r.emitted_status:
            return
        if r.last_status_ms >= now:
            if not r.status_sync_pending:
                r.status_sync_pending = True
                self._at(r.last_status_ms + 1000, self._deferred_sync, r)
            return
        r.emitted_status = status
        r.last_status_ms = now
        self._kitchen_event(r, status)

    def _deferred_sync(self, r: Restaurant) -> None:
        r.status_sync_pending = False
        self._sync_status(r)

    # --- dispatch and delivery ----------------------------------------------------------------------------
    def _dispatch(self, order: Order) -> None:
        """Assign the nearest free driver, or queue the order until a driver is free."""
        now, loc = self._now, order.restaurant.location
        best: Driver | None = None
        best_km = math.inf
        for d in self.city.drivers:
            if d.available:
                p = d.position(now)
                km = haversine_km(p.lat, p.lng, loc.lat, loc.lng)
                if km < best_km:
                    best, best_km = d, km
        if best is not None:
            self._assign(order, best)
        else:
            order.waiting = True
            self._waiting.append(order)
            self._n_waiting += 1
            self.counters.orders_waited_for_driver += 1

    def _assign(self, order: Order, d: Driver) -> None:
        d.state = DriverState.BUSY
        d.order = order
        d.busy_since_ms = self._now
        order.driver = d
        start = self._now + self.model.uniform_seconds(self.config.dispatch_delay_seconds) * 1000
        d.expected_free_ms = self._expected_free_ms(order, d, start)
        self._at(start, self._on_assigned, order)

    def _expected_free_ms(self, order: Order, d: Driver, start_ms: int) -> int:
        c, model = self.config, self.model
        rloc = order.restaurant.location
        arrive = start_ms + model.mean_travel_seconds(d.position(self._now), rloc, start_ms) * 1000.0
        pickup = (
            max(arrive, float(order.ready_ms or 0)) + model.mean_seconds(c.pickup_handoff_seconds) * 1000.0
        )
        drive = model.mean_travel_seconds(rloc, order.customer.location, int(pickup)) * 1000.0
        return int(pickup + drive + model.mean_seconds(c.dropoff_handoff_seconds) * 1000.0)

    def _on_assigned(self, order: Order) -> None:
        d = order.driver
        assert d is not None
        if order.cancelled:  # cancelled during dispatch: the driver never heard of it
            d.order = None
            d.state = DriverState.FREE
            self._driver_freed(d)
            return
        if self._driver_guard(d, self._on_assigned, order):
            return
        now = self._now
        order.assigned_ms = now
        self._driver_event(d, _D.ASSIGNED, order.id)
        rloc = order.restaurant.location
        d.travel(rloc, now, self.model.travel_seconds(d.position(now), rloc, now))
        self._at(d.arrive_ms, self._at_restaurant, order)

    def _at_restaurant(self, order: Order) -> None:
        if order.cancelled:
            return
        assert order.ready_ms is not None
        handoff = self.model.uniform_seconds(self.config.pickup_handoff_seconds) * 1000
        self._at(max(self._now, order.ready_ms) + handoff, self._pickup, order)

    def _pickup(self, order: Order) -> None:
        if order.cancelled:
            return
        d = order.driver
        assert d is not None
        now = self._now
        order.picked_up_ms = now
        self._order_event(order, _O.PICKED_UP)
        cloc = order.customer.location
        d.travel(cloc, now, self.model.travel_seconds(d.position(now), cloc, now))
        handoff = self.model.uniform_seconds(self.config.dropoff_handoff_seconds) * 1000
        d.expected_free_ms = d.arrive_ms + handoff
        self._at(d.expected_free_ms, self._deliver, order)

    def _deliver(self, order: Order) -> None:
        d = order.driver
        assert d is not None
        if self._driver_guard(d, self._deliver, order):
            return
        now = self._now
        order.delivered_ms = now
        self._order_event(order, _O.DELIVERED)
        self._driver_event(d, _D.DELIVERED, order.id)
        d.state = DriverState.FREE
        d.order = None
        d.stay(order.customer.location, now)
        self.counters.orders_delivered += 1
        self._driver_cycle_ms += 0.05 * (now - d.busy_since_ms - self._driver_cycle_ms)
        outcome = OrderOutcome(
            order_id=order.id,
            restaurant_id=order.restaurant.id,
            placed_ms=self.event_time_ms(order.placed_ms),
            delivered_ms=self.event_time_ms(now),
            oracle_minutes=order.oracle_minutes / self.time_scale,
        )
        self.outcomes.append(outcome)
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        self._driver_freed(d)

    def _cancel(self, order: Order) -> None:
        if order.picked_up_ms is not None or order.cancelled:
            return
        now = self._now
        order.cancelled_ms = now
        self.counters.orders_cancelled += 1
        self._order_event(order, _O.CANCELLED)
        r = order.restaurant
        if order.cooking:
            order.cooking = False
            r.in_kitchen -= 1
            self._sync_status(r)
        if order.waiting:
            order.waiting = False
            self._n_waiting -= 1
        if order.driver is not None and order.assigned_ms is not None:
            self._release((order.driver, order))

    def _release(self, arg: tuple[Driver, Order]) -> None:
        """A driver whose order was cancelled is free again where they are (reported as ONLINE)."""
        d, order = arg
        if d.order is not order:
            return
        if self._driver_guard(d, self._release, arg):
            return
        d.stay(d.position(self._now), self._now)
        d.order = None
        d.state = DriverState.FREE
        self._driver_event(d, _D.ONLINE)
        self._driver_freed(d)

    # --- driver shifts --------------------------------------------------------------------------------------
    def _driver_freed(self, d: Driver) -> None:
        """A driver became free: leave if the shift is over, else take the oldest waiting order."""
        if d.pending_offline:
            self._at(self._now + self._rng.randint(10, 60) * 1000, self._go_offline, (d, d.epoch))
            return
        while self._waiting:
            order = self._waiting.popleft()
            if order.waiting:
                order.waiting = False
                self._n_waiting -= 1
                self._assign(order, d)
                return

    def _shift_start(self, arg: tuple[Driver, int | None]) -> None:
        d, end_ms = arg
        now = self._now
        if end_ms is None:  # always-open city: work a few hours, then take a break
            end_ms = (
                now
                + self.model.minutes_between((self.config.work_hours[0] * 60, self.config.work_hours[1] * 60))
                * 1000
            )
            arg = (d, end_ms)
        if d.state is not DriverState.OFFLINE:  # still finishing the previous shift: just stay on
            d.pending_offline = False
            d.shift_end_ms = end_ms
            self._at(end_ms, self._shift_end, (d, end_ms))
            if d.state is DriverState.FREE:
                self._driver_freed(d)
            return
        if self._driver_guard(d, self._shift_start, arg):
            return
        if now - d.offline_since_ms > _HOME_AFTER_MS:
            d.stay(d.home, now)
        d.state = DriverState.FREE
        d.pending_offline = False
        d.shift_end_ms = end_ms
        self._driver_event(d, _D.ONLINE)
        self._at(now + self._rng.randint(3, 30) * 1000 + 500, self._ping, (d, d.epoch))
        self._at(end_ms, self._shift_end, (d, end_ms))
        self._driver_freed(d)

    def _shift_end(self, arg: tuple[Driver, int]) -> None:
        d, end_ms = arg
        if d.state is DriverState.OFFLINE or d.shift_end_ms != end_ms:
            return
        if d.state is DriverState.BUSY:
            d.pending_offline = True
            return
        if self._driver_guard(d, self._shift_end, arg):
            return
        self._offline(d)

    def _go_offline(self, arg: tuple[Driver, int]) -> None:
        d, epoch = arg
        if d.epoch != epoch or d.state is not DriverState.FREE or not d.pending_offline:
            return
        if self._driver_guard(d, self._go_offline, arg):
            return
        self._offline(d)

    def _offline(self, d: Driver) -> None:
        self._driver_event(d, _D.OFFLINE)
        d.state = DriverState.OFFLINE
        d.pending_offline = False
        d.epoch += 1
        d.offline_since_ms = self._now
        if self.config.always_open:
            self._at(
                self._now + self.model.minutes_between(self.config.break_minutes) * 1000,
                self._shift_start,
                (d, None),
            )

    def _ping(self, arg: tuple[Driver, int]) -> None:
        d, epoch = arg
        if d.epoch != epoch or d.state is DriverState.OFFLINE:
            return
        self._driver_event(d, _D.LOCATION)
        self._at(
            self._now + self.model.uniform_seconds(self.config.ping_interval_seconds) * 1000, self._ping, arg
        )
