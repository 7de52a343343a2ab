"""Hypothesis strategies for events that are valid, nearly valid, or garbage.

Times are drawn relative to a caller-supplied "now" and keep a few seconds away from the validity
boundaries (future skew, maximum age), so the server's clock reading a few milliseconds later cannot
flip a verdict.
"""

from __future__ import annotations

import string
from collections.abc import Callable

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import strategies as st

from eta.v1 import events_pb2, ingestion_pb2
from ingestion.validation import ValidationLimits

BOUNDARY_MARGIN_S = 5

good_ids = st.text(alphabet=string.ascii_letters + string.digits + "-_.:", min_size=1, max_size=24)
any_text = st.text(max_size=140)
ids = st.one_of(good_ids, good_ids, good_ids, any_text, st.just(""), st.just(" padded "), st.just("x" * 129))
enum_values = st.one_of(st.integers(0, 6), st.integers(-3, 40))
coordinates = st.one_of(st.floats(-90, 90), st.floats(-180, 180), st.floats(), st.just(0.0))


def _points() -> st.SearchStrategy[events_pb2.GeoPoint | None]:
    valid = st.builds(events_pb2.GeoPoint, lat=st.floats(-89.9, 89.9), lng=st.floats(-179.9, 179.9))
    anything = st.builds(events_pb2.GeoPoint, lat=coordinates, lng=coordinates)
    return st.one_of(st.none(), valid, valid, anything)


def _times(now_s: Callable[[], int], limits: ValidationLimits) -> st.SearchStrategy[Timestamp | None]:
    skew, age = limits.max_future_skew_ms // 1000, limits.max_age_ms // 1000
    offsets = st.one_of(
        st.integers(-600, 60),  # the common case: recent
        st.integers(-age - 86_400, skew + 86_400),
        st.integers(-(2**40), 2**40),
    ).filter(lambda s: abs(s - skew) > BOUNDARY_MARGIN_S and abs(s + age) > BOUNDARY_MARGIN_S)
    nanos = st.one_of(st.integers(0, 999_999_999), st.integers(-(2**31), 2**31 - 1))

    @st.composite
    def build(draw: st.DrawFn) -> Timestamp | None:
        if draw(st.integers(0, 9)) == 0:
            return None
        return Timestamp(seconds=now_s() + draw(offsets), nanos=draw(nanos))

    return build()


_VALID_TYPES = {
    "driver": [1, 2, 3, 4, 5],
    "kitchen": [1, 2, 3, 4, 5],
    "order": [1, 2, 3, 4],
}
_ID_FIELDS = {
    "driver": ["event_id", "driver_id", "order_id"],
    "kitchen": ["event_id", "restaurant_id", "order_id"],
    "order": ["event_id", "order_id", "restaurant_id", "customer_id", "driver_id"],
}
_POINT_FIELDS = {
    "driver": ["location"],
    "kitchen": ["restaurant_location"],
    "order": ["restaurant_location", "customer_location"],
}
_MUTATIONS = ["id", "clear_id", "time", "clear_time", "type", "point", "clear_point", "payload"]


def events(now_s: Callable[[], int], limits: ValidationLimits) -> st.SearchStrategy[events_pb2.Event]:
    """Events of every kind: a valid event, then 0–3 random breakages (often none, so a good share is
    valid); now and then a fully random one."""
    times, points = _times(now_s, limits), _points()
    valid_points = st.builds(events_pb2.GeoPoint, lat=st.floats(-89.9, 89.9), lng=st.floats(1, 179.9))

    @st.composite
    def valid(draw: st.DrawFn, kind: str) -> events_pb2.Event:
        event = events_pb2.Event()
        payload = getattr(event, kind)
        payload.type = draw(st.sampled_from(_VALID_TYPES[kind]))
        payload.event_time.CopyFrom(
            Timestamp(seconds=now_s() + draw(st.integers(-900, 60)), nanos=draw(st.integers(0, 999_999_999)))
        )
        for name in _ID_FIELDS[kind]:
            setattr(payload, name, draw(good_ids))
        payload.event_id = draw(st.uuids()).hex  # mostly fresh ids; resends come from the "id" breakage
        for name in _POINT_FIELDS[kind]:
            getattr(payload, name).CopyFrom(draw(valid_points))
        return event

    @st.composite
    def build(draw: st.DrawFn) -> events_pb2.Event:
        kind = draw(st.sampled_from(["driver", "kitchen", "order", "driver", "order"]))
        event = draw(valid(kind))
        payload = getattr(event, kind)
        for mutation in draw(
            st.lists(st.sampled_from(_MUTATIONS), max_size=draw(st.sampled_from([0, 0, 1, 2, 3])))
        ):
            if mutation == "id":
                setattr(payload, draw(st.sampled_from(_ID_FIELDS[kind])), draw(ids))
            elif mutation == "clear_id":
                payload.ClearField(draw(st.sampled_from(_ID_FIELDS[kind])))
            elif mutation == "time":
                ts = draw(times)
                if ts is not None:
                    payload.event_time.CopyFrom(ts)
            elif mutation == "clear_time":
                payload.ClearField("event_time")
            elif mutation == "type":
                payload.type = draw(enum_values)
            elif mutation == "point":
                point = draw(points)
                if point is not None:
                    getattr(payload, draw(st.sampled_from(_POINT_FIELDS[kind]))).CopyFrom(point)
            elif mutation == "clear_point":
                payload.ClearField(draw(st.sampled_from(_POINT_FIELDS[kind])))
            else:
                event.ClearField("payload")
        return event

    @st.composite
    def chaos(draw: st.DrawFn) -> events_pb2.Event:
        kind = draw(st.sampled_from(["driver", "kitchen", "order", "none"]))
        event = events_pb2.Event()
        if kind == "none":
            return event
        payload = getattr(event, kind)
        for name in _ID_FIELDS[kind]:
            if draw(st.booleans()):
                setattr(payload, name, draw(ids))
        ts = draw(times)
        if ts is not None:
            payload.event_time.CopyFrom(ts)
        payload.type = draw(enum_values)
        for name in _POINT_FIELDS[kind]:
            point = draw(points)
            if point is not None:
                getattr(payload, name).CopyFrom(point)
        return event

    built, random = build(), chaos()
    return st.sampled_from([built, built, built, random]).flatmap(lambda strategy: strategy)


def requests(
    now_s: Callable[[], int], limits: ValidationLimits, *, max_events: int = 12
) -> st.SearchStrategy[ingestion_pb2.PublishEventsRequest]:
    one_event = events(now_s, limits)
    return st.builds(
        ingestion_pb2.PublishEventsRequest,
        events=st.integers(0, max_events).flatmap(lambda n: st.lists(one_event, min_size=n, max_size=n)),
        sequence=st.integers(0, 2**64 - 1),
    )


def mangled(valid: bytes, data: st.DataObject) -> bytes:
    """``valid`` with random bytes flipped, inserted or cut off."""
    raw = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "insert", "truncate"]))
        if not raw or action == "insert":
            raw.insert(data.draw(st.integers(0, len(raw))), data.draw(st.integers(0, 255)))
        elif action == "flip":
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        else:
            del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    return bytes(raw)
