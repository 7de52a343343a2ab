"""The city: its parameters (:class:`CityConfig`), its entities and the random model that drives them.

The clock is UTC everywhere: "12:00" means 12:00 UTC, which is also the city's local time.

Model in one paragraph
----------------------
Restaurants sit at random points of a disc ``radius_km`` around the centre (a city ~10 km across); each
has a base prep time, a kitchen capacity and a popularity. Customers live in a slightly larger disc and
order from restaurants 0.5–7 km away (closer ones are likelier). The city's order rate follows a daily
profile (baseline + lunch and dinner peaks, a bigger lunch at weekends), a weekday factor and a random
per-day factor. A kitchen accepts an order 0.5–2 min after it is placed; the prep time grows with the
number of orders already in the kitchen (and beyond the kitchen's capacity every extra order waits for a
free slot), with the hour (busy hours are slower) and during a BUSY incident; it has lognormal noise.
Drivers work shifts; at acceptance the nearest free driver is assigned (or the order waits for the next
driver to become free), drives to the restaurant, picks up at max(arrival, ready), drives to the customer
and hands over. Travel time is road distance (great-circle × detour factor) over an hour-dependent speed
(rush hours are slow), with lognormal noise of mean 1.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from enum import Enum

from eta_common.features import haversine_km
from eta_common.markets import MARKET_ID_PATTERN

__all__ = [
    "DRIVERS_PER_RESTAURANT",
    "City",
    "CityConfig",
    "CityModel",
    "Customer",
    "Driver",
    "DriverState",
    "GeoPoint",
    "Order",
    "Restaurant",
    "build_city",
    "fleet_for",
]

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
KM_PER_DEGREE_LAT = 111.32
# Fleet size when none is given: drivers per restaurant at the default demand (1.8 orders per
# restaurant-hour), scaled with that demand. The default city (20 restaurants, 60 drivers) keeps up with
# its dinner peak with ~10 % of orders waiting for a driver at times; 50 restaurants with 60 drivers
# starve (the dispatch backlog grows all day: deliveries of 5+ hours by the third day).
DRIVERS_PER_RESTAURANT = 3.0
REFERENCE_ORDERS_PER_RESTAURANT_HOUR = 1.8

# Rush-hour slowdown: speed factor per UTC hour (1.0 = free-flowing city traffic).
DEFAULT_SPEED_FACTORS: tuple[float, ...] = (
    1.15, 1.15, 1.15, 1.15, 1.15, 1.1,   # 00–05 night
    1.0, 0.8, 0.75, 0.8, 0.95, 1.0,      # 06–11 morning rush
    0.9, 0.9, 0.95, 0.95, 0.8, 0.72,     # 12–17 lunch, evening rush starts
    0.72, 0.85, 0.95, 1.0, 1.05, 1.1,    # 18–23 evening rush ends
)  # fmt: skip

# Driver shift templates (weight, shifts as (start hour, end hour) UTC). A driver keeps one template.
SHIFT_TEMPLATES: tuple[tuple[float, tuple[tuple[float, float], ...]], ...] = (
    (0.15, ((10.5, 15.0),)),                # lunch
    (0.25, ((16.5, 23.5),)),                # dinner
    (0.15, ((10.0, 18.5),)),                # day
    (0.15, ((14.5, 23.5),)),                # late
    (0.30, ((11.0, 14.5), (17.5, 22.5))),   # split
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class CityConfig:
    """Every parameter of the simulated city. Ranges ``(low, high)`` are drawn uniformly."""

    # --- size and layout -------------------------------------------------------------------------
    # The market (city) every event of this city carries as market_id; '' = none named (the default
    # market). A named market prefixes every id ("berlin-rst-000", "berlin-drv-000", "berlin-cust-00000")
    # so ids stay unique across the platform's markets.
    market: str = ""
    seed: int = 42  # same seed + same start time → identical event stream
    restaurants: int = 20
    # None: sized from the restaurants (see :attr:`fleet_size`, 60 for the default city)
    drivers: int | None = None
    customers: int = 4000  # customer pool (repeat customers)
    center_lat: float = 52.52
    center_lng: float = 13.405
    radius_km: float = 5.0  # restaurants and driver homes lie within this radius (city ~10 km across)
    customer_radius_km: float = 5.5
    customer_distance_km: tuple[float, float] = (0.5, 7.0)  # a customer orders from restaurants this far
    distance_decay_km: float = 3.0  # restaurant choice weight ∝ popularity × exp(-distance / decay)
    popularity_sigma: float = 0.5  # restaurant popularity ~ lognormal(0, sigma)

    # --- opening hours ------------------------------------------------------------------------------
    open_hour: int = 10  # kitchens OPENED at this UTC hour …
    close_hour: int = 23  # … and CLOSED at this one; orders already placed are still completed
    # Live cities: kitchens never close, drivers work continuously with breaks, and demand never falls
    # below ``demand_floor`` of the profile, so something happens at any hour.
    always_open: bool = False
    demand_floor: float = 0.8

    # --- demand ------------------------------------------------------------------------------------
    orders_per_restaurant_hour: float = 1.8  # city rate = this × restaurants × demand factor
    demand_multiplier: float = 1.0
    baseline_demand: float = 0.35  # demand factor outside the peaks
    lunch_peak: tuple[float, float, float] = (13.0, 0.8, 1.0)  # (centre hour, width in hours, height)
    dinner_peak: tuple[float, float, float] = (19.5, 1.0, 1.3)
    weekend_lunch_boost: float = 1.4  # lunch peak height × this on Saturday and Sunday
    weekday_factors: tuple[float, ...] = (0.9, 0.9, 0.95, 1.0, 1.15, 1.25, 1.2)  # Monday … Sunday
    day_demand_sigma: float = 0.1  # per-day factor ~ lognormal, mean 1, clipped to [0.7, 1.4]
    cancel_probability: float = 0.025  # orders that would cancel (only those not yet picked up do)
    cancel_after_minutes: tuple[float, float] = (1.0, 20.0)

    # --- kitchens -------------------------------------------------------------------------------------
    base_prep_minutes: tuple[float, float] = (8.0, 25.0)
    kitchen_capacity: tuple[int, int] = (3, 6)  # orders cooked in parallel
    queue_slowdown: float = 0.06  # prep × (1 + this × orders already in the kitchen)
    peak_prep_slowdown: float = 0.10  # prep × (1 + this × demand factor of the hour)
    prep_noise_sigma: float = 0.25  # lognormal noise (mean 1)
    min_prep_minutes: float = 3.0
    accept_delay_seconds: tuple[int, int] = (30, 120)  # PLACED → ORDER_ACCEPTED
    busy_incidents_per_hour: float = 0.04  # per open kitchen: staff short, oven down …
    busy_incident_minutes: tuple[float, float] = (20.0, 60.0)
    busy_prep_factor: float = 1.4  # prep × this during an incident
    busy_queue_factor: float = 1.5  # kitchen says BUSY when orders in kitchen ≥ capacity × this

    # --- drivers and traffic ------------------------------------------------------------------------
    speed_kmh: float = 22.0  # free-flowing speed of a courier on a scooter
    detour_factor: float = 1.35  # road distance / great-circle distance
    hourly_speed_factors: tuple[float, ...] = DEFAULT_SPEED_FACTORS
    travel_noise_sigma: float = 0.2  # lognormal noise (mean 1)
    ping_interval_seconds: tuple[int, int] = (60, 120)  # LOCATION pings while online
    dispatch_delay_seconds: tuple[int, int] = (5, 30)  # driver free / order accepted → ASSIGNED
    pickup_handoff_seconds: tuple[int, int] = (60, 180)
    dropoff_handoff_seconds: tuple[int, int] = (60, 180)
    shift_jitter_minutes: float = 20.0  # shift start / end ± this
    day_off_probability: float = 0.05
    work_hours: tuple[float, float] = (2.0, 5.0)  # always_open: online this long …
    break_minutes: tuple[float, float] = (15.0, 45.0)  # … then offline this long
    no_driver_fallback_minutes: float = 45.0  # oracle: wait for a driver when nobody is on shift

    def __post_init__(self) -> None:
        problems = []
        if self.market and MARKET_ID_PATTERN.fullmatch(self.market) is None:
            problems.append("market must be 1..64 characters of [A-Za-z0-9_.-]")
        if self.restaurants < 1:
            problems.append("restaurants must be >= 1")
        if self.drivers is not None and self.drivers < 1:
            problems.append("drivers must be >= 1")
        if self.customers < 1:
            problems.append("customers must be >= 1")
        if not 0 <= self.open_hour < self.close_hour <= 24:
            problems.append("need 0 <= open_hour < close_hour <= 24")
        if self.demand_multiplier < 0 or self.orders_per_restaurant_hour < 0:
            problems.append("demand must be >= 0")
        if len(self.weekday_factors) != 7:
            problems.append("weekday_factors needs 7 values (Monday … Sunday)")
        if len(self.hourly_speed_factors) != 24 or min(self.hourly_speed_factors) <= 0:
            problems.append("hourly_speed_factors needs 24 positive values")
        if self.speed_kmh <= 0:
            problems.append("speed_kmh must be > 0")
        if not 0 < self.customer_distance_km[0] < self.customer_distance_km[1]:
            problems.append("customer_distance_km must be (low, high) with 0 < low < high")
        if problems:
            raise ValueError("invalid CityConfig: " + "; ".join(problems))

    @property
    def fleet_size(self) -> int:
        """Drivers in the city: ``drivers`` when given, else :data:`DRIVERS_PER_RESTAURANT` per
        restaurant scaled by the demand per restaurant (not by ``demand_multiplier``, so a live city
        built from a seeded one keeps its fleet)."""
        if self.drivers is not None:
            return self.drivers
        return fleet_for(self.restaurants, self.orders_per_restaurant_hour)


def fleet_for(
    restaurants: int, orders_per_restaurant_hour: float = REFERENCE_ORDERS_PER_RESTAURANT_HOUR
) -> int:
    """The default fleet for ``restaurants`` restaurants at ``orders_per_restaurant_hour``."""
    scale = orders_per_restaurant_hour / REFERENCE_ORDERS_PER_RESTAURANT_HOUR
    return max(1, math.ceil(round(DRIVERS_PER_RESTAURANT * restaurants * scale, 6)))


@dataclass(frozen=True, slots=True)
class GeoPoint:
    lat: float
    lng: float


class DriverState(Enum):
    OFFLINE = "offline"
    FREE = "free"
    BUSY = "busy"  # reserved for, driving to, waiting at or delivering an order


@dataclass(slots=True, eq=False)
class Restaurant:
    id: str
    location: GeoPoint
    base_prep_minutes: float
    capacity: int
    popularity: float
    # dynamic state
    is_open: bool = False
    in_kitchen: int = 0  # accepted, not ready, not cancelled
    pending_accept: int = 0  # placed, not yet accepted
    incident_until_ms: int = 0
    incident_epoch: int = 0
    busy_by_queue: bool = False
    emitted_status: int | None = None  # KitchenEvent.Type last emitted
    last_status_ms: int = -1
    status_sync_pending: bool = False

    def incident(self, now_ms: int) -> bool:
        return now_ms < self.incident_until_ms


@dataclass(slots=True, eq=False)
class Customer:
    id: str
    location: GeoPoint
    choices: tuple[list[int], list[float]] | None = None  # eligible restaurants, cumulative weights


@dataclass(slots=True, eq=False)
class Driver:
    id: str
    home: GeoPoint
    shifts: tuple[tuple[float, float], ...]
    state: DriverState = DriverState.OFFLINE
    order: Order | None = None
    pending_offline: bool = False  # shift is over: go offline once the current order is delivered
    shift_end_ms: int = 0
    offline_since_ms: int = -DAY_MS
    epoch: int = 0  # bumped when going offline: stale pings / shift ends are ignored
    last_state_ms: int = -1  # time of the last non-LOCATION event (per-driver ordering guard)
    # current leg: from → to between depart and arrive; stays at `to` afterwards
    leg_from: GeoPoint = field(default_factory=lambda: GeoPoint(0.0, 0.0))
    leg_to: GeoPoint = field(default_factory=lambda: GeoPoint(0.0, 0.0))
    depart_ms: int = 0
    arrive_ms: int = 0
    expected_free_ms: int = 0  # while BUSY: when the simulator expects the driver to be free
    busy_since_ms: int = 0

    @property
    def available(self) -> bool:
        return self.state is DriverState.FREE and not self.pending_offline

    def position(self, now_ms: int) -> GeoPoint:
        if now_ms >= self.arrive_ms or self.arrive_ms <= self.depart_ms:
            return self.leg_to
        if now_ms <= self.depart_ms:
            return self.leg_from
        f = (now_ms - self.depart_ms) / (self.arrive_ms - self.depart_ms)
        a, b = self.leg_from, self.leg_to
        return GeoPoint(a.lat + (b.lat - a.lat) * f, a.lng + (b.lng - a.lng) * f)

    def stay(self, at: GeoPoint, now_ms: int) -> None:
        self.leg_from = self.leg_to = at
        self.depart_ms = self.arrive_ms = now_ms

    def travel(self, to: GeoPoint, now_ms: int, seconds: int) -> None:
        self.leg_from = self.position(now_ms)
        self.leg_to = to
        self.depart_ms = now_ms
        self.arrive_ms = now_ms + seconds * 1000


@dataclass(slots=True, eq=False)
class Order:
    id: str
    restaurant: Restaurant
    customer: Customer
    placed_ms: int
    oracle_minutes: float = 0.0
    accepted_ms: int | None = None
    ready_ms: int | None = None
    driver: Driver | None = None
    assigned_ms: int | None = None  # when ASSIGNED was emitted
    picked_up_ms: int | None = None
    delivered_ms: int | None = None
    cancelled_ms: int | None = None
    waiting: bool = False  # accepted and waiting for a free driver
    cooking: bool = False  # accepted, not ready, not cancelled

    @property
    def cancelled(self) -> bool:
        return self.cancelled_ms is not None


@dataclass(slots=True)
class City:
    restaurants: list[Restaurant]
    drivers: list[Driver]
    customers: list[Customer]


def _point_in_disc(rng: random.Random, config: CityConfig, radius_km: float) -> GeoPoint:
    r = radius_km * math.sqrt(rng.random())
    theta = rng.uniform(0.0, 2.0 * math.pi)
    dy, dx = r * math.sin(theta), r * math.cos(theta)
    lat = config.center_lat + dy / KM_PER_DEGREE_LAT
    lng = config.center_lng + dx / (KM_PER_DEGREE_LAT * math.cos(math.radians(config.center_lat)))
    return GeoPoint(round(lat, 6), round(lng, 6))


def build_city(config: CityConfig) -> City:
    """The static layout: depends on the seed only (not on the start time), so a live city started later
    has the same restaurants, drivers and customers as the history seeded for it."""
    rng = random.Random(f"eta-city-layout:{config.seed}")
    prefix = f"{config.market}-" if config.market else ""
    restaurants = [
        Restaurant(
            id=f"{prefix}rst-{i:03d}",
            location=_point_in_disc(rng, config, config.radius_km),
            base_prep_minutes=round(rng.uniform(*config.base_prep_minutes), 2),
            capacity=rng.randint(*config.kitchen_capacity),
            popularity=math.exp(rng.gauss(0.0, config.popularity_sigma)),
        )
        for i in range(config.restaurants)
    ]
    weights = [w for w, _ in SHIFT_TEMPLATES]
    drivers = []
    for i in range(config.fleet_size):
        home = _point_in_disc(rng, config, config.radius_km)
        (shifts,) = rng.choices([s for _, s in SHIFT_TEMPLATES], weights=weights)
        driver = Driver(id=f"{prefix}drv-{i:03d}", home=home, shifts=shifts)
        driver.stay(home, 0)
        drivers.append(driver)
    customers = [
        Customer(id=f"{prefix}cust-{i:05d}", location=_point_in_disc(rng, config, config.customer_radius_km))
        for i in range(config.customers)
    ]
    return City(restaurants, drivers, customers)


def _gauss_bump(hour: float, peak: tuple[float, float, float]) -> float:
    centre, width, height = peak
    return height * math.exp(-0.5 * ((hour - centre) / width) ** 2)


class CityModel:
    """The random model: every draw of the simulation goes through here (one seeded RNG)."""

    def __init__(self, config: CityConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        # demand factor per minute of the day, weekdays and weekends
        self._profile_weekday = [self._profile(m / 60.0, weekend=False) for m in range(1440)]
        self._profile_weekend = [self._profile(m / 60.0, weekend=True) for m in range(1440)]
        peak_profile = max(*self._profile_weekday, *self._profile_weekend)
        self.max_city_rate_per_hour = (
            config.orders_per_restaurant_hour * config.restaurants * config.demand_multiplier
            * max(peak_profile, config.demand_floor) * max(config.weekday_factors) * 1.4
        )  # fmt: skip
        self._travel_sigma = config.travel_noise_sigma
        self._prep_sigma = config.prep_noise_sigma

    def _profile(self, hour: float, *, weekend: bool) -> float:
        c = self.config
        lunch_height = c.lunch_peak[2] * (c.weekend_lunch_boost if weekend else 1.0)
        lunch = (c.lunch_peak[0], c.lunch_peak[1], lunch_height)
        return c.baseline_demand + _gauss_bump(hour, lunch) + _gauss_bump(hour, c.dinner_peak)

    # --- clock helpers ---------------------------------------------------------------------------
    @staticmethod
    def weekday(ms: int) -> int:
        """0 = Monday (1970-01-01 was a Thursday)."""
        return (ms // DAY_MS + 3) % 7

    @staticmethod
    def hour(ms: int) -> int:
        return (ms % DAY_MS) // HOUR_MS

    def is_opening_hours(self, ms: int) -> bool:
        c = self.config
        return c.always_open or c.open_hour <= self.hour(ms) < c.close_hour

    # --- demand ------------------------------------------------------------------------------------
    def demand_factor(self, ms: int) -> float:
        """Daily profile × weekday factor (no per-day randomness, no multiplier)."""
        wd = self.weekday(ms)
        table = self._profile_weekend if wd >= 5 else self._profile_weekday
        profile = table[(ms % DAY_MS) // MINUTE_MS]
        if self.config.always_open:
            profile = max(profile, self.config.demand_floor)
        return profile * self.config.weekday_factors[wd]

    def city_rate_per_hour(self, ms: int, day_factor: float) -> float:
        c = self.config
        if not self.is_opening_hours(ms):
            return 0.0
        return (c.orders_per_restaurant_hour * c.restaurants * c.demand_multiplier * day_factor
                * self.demand_factor(ms))  # fmt: skip

    def day_factor(self) -> float:
        sigma = self.config.day_demand_sigma
        return min(1.4, max(0.7, math.exp(self.rng.gauss(-sigma * sigma / 2, sigma))))

    def interarrival_seconds(self) -> int:
        """Candidate arrivals of the thinned Poisson process (rate ``max_city_rate_per_hour``)."""
        if self.max_city_rate_per_hour <= 0:
            return 3600
        return max(1, round(self.rng.expovariate(self.max_city_rate_per_hour / 3600.0)))

    def choose_restaurant(self, customer: Customer, restaurants: list[Restaurant]) -> int | None:
        if customer.choices is None:
            low, high = self.config.customer_distance_km
            decay = self.config.distance_decay_km
            idx: list[int] = []
            cum: list[float] = []
            total = 0.0
            loc = customer.location
            for i, r in enumerate(restaurants):
                d = haversine_km(loc.lat, loc.lng, r.location.lat, r.location.lng)
                if low <= d <= high:
                    total += r.popularity * math.exp(-d / decay)
                    idx.append(i)
                    cum.append(total)
            customer.choices = (idx, cum)
        idx, cum = customer.choices
        if not idx:
            return None
        return self.rng.choices(idx, cum_weights=cum)[0]

    # --- kitchens ------------------------------------------------------------------------------------
    def mean_prep_seconds(self, r: Restaurant, in_kitchen: int, ms: int, *, incident: bool) -> float:
        """Expected prep time of an order accepted now with ``in_kitchen`` orders already cooking."""
        c = self.config
        base = r.base_prep_minutes
        minutes = (
            base
            * (1.0 + c.queue_slowdown * in_kitchen)
            * (1.0 + c.peak_prep_slowdown * self.demand_factor(ms))
        )
        if incident:
            minutes *= c.busy_prep_factor
        # beyond capacity, an order waits for a free slot: each extra order adds base / capacity
        minutes += max(0, in_kitchen + 1 - r.capacity) * base / r.capacity
        return max(c.min_prep_minutes, minutes) * 60.0

    def prep_seconds(self, r: Restaurant, in_kitchen: int, ms: int, *, incident: bool) -> int:
        mean = self.mean_prep_seconds(r, in_kitchen, ms, incident=incident)
        return max(round(self.config.min_prep_minutes * 60), round(mean * self._noise(self._prep_sigma)))

    def accept_delay_seconds(self) -> int:
        return self.rng.randint(*self.config.accept_delay_seconds)

    def mean_accept_delay_seconds(self) -> float:
        return sum(self.config.accept_delay_seconds) / 2.0

    # --- drivers and traffic --------------------------------------------------------------------------
    def mean_travel_seconds(self, a: GeoPoint, b: GeoPoint, ms: int) -> float:
        c = self.config
        km = haversine_km(a.lat, a.lng, b.lat, b.lng) * c.detour_factor
        speed = c.speed_kmh * c.hourly_speed_factors[self.hour(ms)]
        return km / speed * 3600.0

    def travel_seconds(self, a: GeoPoint, b: GeoPoint, ms: int) -> int:
        return round(self.mean_travel_seconds(a, b, ms) * self._noise(self._travel_sigma))

    def _noise(self, sigma: float) -> float:
        """Lognormal multiplier with mean 1."""
        return math.exp(self.rng.gauss(-sigma * sigma / 2.0, sigma))

    def uniform_seconds(self, bounds: tuple[int, int]) -> int:
        return self.rng.randint(*bounds)

    @staticmethod
    def mean_seconds(bounds: tuple[int, int]) -> float:
        return sum(bounds) / 2.0

    def minutes_between(self, bounds: tuple[float, float]) -> int:
        """A uniform draw in minutes, returned in whole seconds."""
        return round(self.rng.uniform(*bounds) * 60.0)

    def ping_jitter(self, p: GeoPoint) -> GeoPoint:
        """A GPS fix: a few metres of noise."""
        return GeoPoint(
            round(p.lat + self.rng.gauss(0.0, 0.00008), 6), round(p.lng + self.rng.gauss(0.0, 0.00012), 6)
        )
