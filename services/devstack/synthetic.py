"""Synthetic event streams for benchmarks and tests: produced straight to Kafka as ingestion would (an
EventEnvelope with an ingest time), plus the offline view of the same stream."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

from eta.v1 import events_pb2
from eta_common import features as F
from eta_common.config import KafkaSettings
from eta_common.kafka import Topics, event_kind, record_key
from eta_common.offline_features import HistoryEvent
from eta_common.online_store import OnlineStore, RestaurantFeatures
from eta_common.timeutil import ms_from_timestamp, timestamp_from_ms

MIN = 60_000
DriverType = events_pb2.DriverEvent
KitchenType = events_pb2.KitchenEvent
OrderType = events_pb2.OrderEvent


@dataclass(frozen=True)
class Sent:
    """One record as produced: the event and the ingest time stamped on its envelope."""

    event: events_pb2.Event
    ingest_ms: int

    def history(self) -> HistoryEvent:
        kind = self.event.WhichOneof("payload")
        assert kind is not None
        inner = getattr(self.event, kind)
        event_ms = ms_from_timestamp(inner.event_time)
        etype = type(inner).Type.Name(inner.type)
        lat = lng = None
        if kind == "driver":
            lat, lng = inner.location.lat, inner.location.lng
        elif inner.HasField("restaurant_location"):
            lat, lng = inner.restaurant_location.lat, inner.restaurant_location.lng
        return HistoryEvent(
            kind,
            etype,
            event_ms,
            self.ingest_ms,
            getattr(inner, "restaurant_id", None) or None,
            getattr(inner, "driver_id", None) or None,
            getattr(inner, "order_id", None) or None,
            lat,
            lng,
            market=inner.market_id,
        )


@dataclass
class City:
    prefix: str
    centre: tuple[float, float]
    restaurants: dict[str, tuple[float, float]]
    drivers: list[str]


def make_city(
    rng: random.Random, prefix: str, centre: tuple[float, float], n_restaurants: int = 8, n_drivers: int = 25
) -> City:
    restaurants = {
        f"{prefix}-r{i}": (centre[0] + rng.uniform(-0.03, 0.03), centre[1] + rng.uniform(-0.045, 0.045))
        for i in range(n_restaurants)
    }
    return City(prefix, centre, restaurants, [f"{prefix}-d{i}" for i in range(n_drivers)])


def random_stream(
    rng: random.Random,
    city: City,
    *,
    start_ms: int,
    minutes: int,
    orders_per_minute: float,
    late_fraction: float = 0.02,
    duplicate_fraction: float = 0.03,
) -> list[Sent]:
    """A plausible mixed stream: orders with kitchen lifecycle and pickup, kitchen status, driver state and
    pings.
    Arrival is mostly prompt with some out-of-order jitter, a few late events and a few duplicates.

    Dispatch: most orders are ASSIGNED (carrying the order id) to a random driver shortly after they are
    placed — so with the jitter some ASSIGNED events arrive before their PLACED, and a late ASSIGNED
    leaves its order waiting; some cancelled orders were assigned first; the rest are never assigned.
    A DELIVERED carries the driver's last assigned order."""
    events: list[events_pb2.Event] = []
    n = 0

    def eid() -> str:
        nonlocal n
        n += 1
        return f"{city.prefix}-e{n}"

    rids = list(city.restaurants)
    driver_last: dict[str, int] = {}
    driver_order: dict[str, str] = {}

    def driver_event(
        driver: str, etype: DriverType.Type.ValueType, when: int, order_id: str = ""
    ) -> events_pb2.Event:
        # strictly increasing event times per driver keep "same-ms" ties out of the comparison
        when = max(when, driver_last.get(driver, 0) + 1)
        driver_last[driver] = when
        return events_pb2.Event(
            driver=events_pb2.DriverEvent(
                event_id=eid(),
                event_time=timestamp_from_ms(when),
                driver_id=driver,
                type=etype,
                order_id=order_id,
                location=events_pb2.GeoPoint(
                    lat=city.centre[0] + rng.uniform(-0.04, 0.04),
                    lng=city.centre[1] + rng.uniform(-0.06, 0.06),
                ),
            )
        )

    def kitchen_event(
        etype: KitchenType.Type.ValueType, when: int, rid: str, **extra: Any
    ) -> events_pb2.Event:
        kitchen = events_pb2.KitchenEvent(
            event_id=eid(), event_time=timestamp_from_ms(when), restaurant_id=rid, type=etype, **extra
        )
        return events_pb2.Event(kitchen=kitchen)

    def order_event(
        etype: OrderType.Type.ValueType, when: int, rid: str, oid: str, **extra: Any
    ) -> events_pb2.Event:
        order = events_pb2.OrderEvent(
            event_id=eid(), event_time=timestamp_from_ms(when), order_id=oid, restaurant_id=rid, type=etype,
            **extra,
        )  # fmt: skip
        return events_pb2.Event(order=order)

    for minute in range(minutes):
        t = start_ms + minute * MIN
        for _ in range(int(orders_per_minute) + (1 if rng.random() < orders_per_minute % 1 else 0)):
            rid = rng.choice(rids)
            loc = events_pb2.GeoPoint(lat=city.restaurants[rid][0], lng=city.restaurants[rid][1])
            cust = events_pb2.GeoPoint(
                lat=loc.lat + rng.uniform(-0.02, 0.02), lng=loc.lng + rng.uniform(-0.03, 0.03)
            )
            oid = f"{city.prefix}-o{n}"
            placed = t + rng.randrange(MIN)
            events.append(
                events_pb2.Event(
                    order=events_pb2.OrderEvent(
                        event_id=eid(),
                        event_time=timestamp_from_ms(placed),
                        order_id=oid,
                        restaurant_id=rid,
                        customer_id="c",
                        type=OrderType.PLACED,
                        restaurant_location=loc,
                        customer_location=cust,
                    )
                )
            )
            if rng.random() < 0.85:  # dispatched to a driver; the rest wait (until abandoned)
                driver = rng.choice(city.drivers)
                driver_order[driver] = oid
                events.append(
                    driver_event(driver, DriverType.ASSIGNED, placed + rng.randrange(5_000, 240_000), oid)
                )
            accepted = placed + rng.randrange(20_000, 90_000)
            events.append(kitchen_event(KitchenType.ORDER_ACCEPTED, accepted, rid, order_id=oid))
            if rng.random() < 0.05:
                events.append(order_event(OrderType.CANCELLED, accepted + MIN, rid, oid))
            else:
                ready = accepted + rng.randrange(4 * MIN, 20 * MIN)
                events.append(
                    kitchen_event(KitchenType.ORDER_READY, ready, rid, order_id=oid, restaurant_location=loc)
                )
                if rng.random() < 0.8:  # a driver picks it up (the pickup wait)
                    picked = ready + rng.randrange(0, 10 * MIN)
                    driver = rng.choice(city.drivers)
                    events.append(order_event(OrderType.PICKED_UP, picked, rid, oid, driver_id=driver))
        if rng.random() < 0.1:
            rid = rng.choice(rids)
            when = t + rng.randrange(MIN)
            events.append(kitchen_event(rng.choice([KitchenType.BUSY, KitchenType.OPENED]), when, rid))
        for driver in city.drivers:
            if rng.random() < 0.4:
                etype = rng.choice(
                    [
                        DriverType.ONLINE,
                        DriverType.LOCATION,
                        DriverType.LOCATION,
                        DriverType.DELIVERED,
                        DriverType.OFFLINE,
                    ]
                )
                delivered = driver_order.get(driver, f"{city.prefix}-none")
                order_id = delivered if etype == DriverType.DELIVERED else ""
                events.append(driver_event(driver, etype, t + rng.randrange(MIN), order_id))
    sent: list[Sent] = []
    for event in events:
        kind = event.WhichOneof("payload")
        assert kind is not None
        event_ms = ms_from_timestamp(getattr(event, kind).event_time)
        roll = rng.random()
        if roll < late_fraction:
            delay = rng.randrange(6 * MIN, 8 * MIN)  # beyond the default 5-minute allowed lateness
        elif roll < 0.15:
            delay = rng.randrange(10_000, 3 * MIN)  # out of order, within lateness
        else:
            delay = rng.randrange(20, 2_000)
        sent.append(Sent(event, event_ms + delay))
        if rng.random() < duplicate_fraction:
            sent.append(Sent(event, event_ms + delay))  # e.g. a producer retry duplicate
    sent.sort(key=lambda s: s.ingest_ms)
    return sent


async def produce(settings: KafkaSettings, stream: Sequence[Sent]) -> None:
    """Produce records exactly as ingestion would (envelope + key), acks=all, wait for every ack."""
    topics = Topics.from_settings(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = []
        for item in stream:
            kind = event_kind(item.event)
            assert kind is not None
            envelope = events_pb2.EventEnvelope(
                event=item.event, ingest_time=timestamp_from_ms(item.ingest_ms), ingested_by="test"
            )
            futures.append(
                await producer.send(
                    topics.for_kind(kind), envelope.SerializeToString(), key=record_key(item.event)
                )
            )
        for future in futures:
            await future
    finally:
        await producer.stop()


def event_id(event: events_pb2.Event) -> str:
    kind = event.WhichOneof("payload")
    assert kind is not None
    return str(getattr(event, kind).event_id)


def unique_count(stream: Sequence[Sent]) -> int:
    """Distinct events the archive keeps: every event id once, without the driver pings the keep rule
    drops (``features.ping_kept``: neither applied online nor archived)."""
    return len({event_id(s.event) for s in stream if archived(s.event)})


def archived(event: events_pb2.Event) -> bool:
    """Whether the aggregator archives (and applies) the event: all but the pings the keep rule drops."""
    if event.HasField("driver") and event.driver.type == DriverType.LOCATION:
        t = event.driver.event_time
        return F.ping_kept(event.driver.driver_id, t.seconds * 1000 + t.nanos // 1_000_000)
    return True


async def online_features(store: OnlineStore, city: City, at_ms: int) -> dict[str, RestaurantFeatures]:
    reads = await store.read_restaurants(list(city.restaurants.items()), now_ms=at_ms)
    return {r.restaurant_id: r for r in reads}
