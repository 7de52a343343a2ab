"""The Quix Streams peer, run by ``.venv/peers``'s interpreter (``bench_peers_quix`` starts it).

``python -m bench.quix_peer --broker H:P --topic T --redis-url URL --mode hopping|sliding --records N``
consumes the order topic from the beginning (its own consumer group), decodes each record's
``EventEnvelope`` (protobuf, as the aggregator does), keeps the PLACED orders and counts them per
restaurant (the record key) over 30 minutes of event time — a hopping window with a 1-minute step, or a
sliding window — with the aggregator's allowed lateness (5 minutes) as the grace period. Each closed
window's count is written to Redis (Quix's ``RedisSink``: one ``SET`` per result, pipelined per
checkpoint). Changelog topics are on (Quix's default: its window state survives a restart, as ours does).

Tansu does not report ``retention.ms`` in its topic configs, and Quix derives its changelog topics' config
from the source topic's ``retention.ms`` (a KeyError without it): the derivation is told "-1" (infinite,
Tansu's behaviour) when the broker says nothing.

Prints one JSON line: records consumed, the window from the first to the last consumed record (seconds),
the process's CPU seconds over that window, and the window results sent to Redis.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

MIN = 60_000
LATENESS_MS = 300_000


def _tell_quix_about_retention() -> None:
    from quixstreams.models.topics.manager import TopicManager  # type: ignore[import-not-found, unused-ignore]

    derive = TopicManager.derive_topic_config.__func__

    def derive_with_default(cls: Any, topics: Any) -> Any:
        for topic in topics:
            if topic.broker_config is not None:
                topic.broker_config.extra_config.setdefault("retention.ms", "-1")
        return derive(cls, topics)

    TopicManager.derive_topic_config = classmethod(derive_with_default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quix_peer", description=__doc__)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--mode", choices=("hopping", "sliding"), required=True)
    parser.add_argument("--records", type=int, required=True, help="stop once this many are consumed")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="or after this long consuming")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))  # eta.v1 (protobuf) only
    from quixstreams import Application  # type: ignore[import-not-found, unused-ignore]
    from quixstreams.models.serializers import Deserializer  # type: ignore[import-not-found, unused-ignore]
    from quixstreams.sinks.community.redis import RedisSink  # type: ignore[import-not-found, unused-ignore]

    from eta.v1 import events_pb2

    _tell_quix_about_retention()
    placed = events_pb2.OrderEvent.PLACED
    parse = events_pb2.EventEnvelope.FromString
    state = {"records": 0, "first": 0.0, "last": 0.0, "cpu_first": 0.0, "cpu_last": 0.0, "outputs": 0}

    class Envelope(Deserializer):  # type: ignore[misc, unused-ignore]
        def __call__(self, value: bytes, ctx: Any) -> dict[str, Any]:
            now = time.perf_counter()
            if not state["records"]:
                state["first"], state["cpu_first"] = now, time.process_time()
            state["records"] += 1
            state["last"] = now
            order = parse(value).event.order
            t = order.event_time
            return {"t": order.type, "ms": t.seconds * 1000 + t.nanos // 1_000_000}

    def event_time(value: Any, headers: Any, timestamp: int, timestamp_type: Any) -> int:
        return int(value["ms"]) if isinstance(value, dict) else timestamp

    redis = urlparse(args.redis_url)
    with tempfile.TemporaryDirectory(prefix="quix-state-") as state_dir:
        app = Application(
            broker_address=args.broker,
            consumer_group=f"quix-{args.mode}-{time.time_ns()}",
            auto_offset_reset="earliest",
            state_dir=state_dir,
            loglevel="WARNING",
        )
        topic = app.topic(args.topic, value_deserializer=Envelope(), timestamp_extractor=event_time)
        sdf = app.dataframe(topic)
        sdf = sdf.filter(lambda value: value["t"] == placed)
        if args.mode == "hopping":
            windowed = sdf.hopping_window(duration_ms=30 * MIN, step_ms=MIN, grace_ms=LATENESS_MS)
        else:
            windowed = sdf.sliding_window(duration_ms=30 * MIN, grace_ms=LATENESS_MS)
        sdf = windowed.count().final()

        def counted(value: Any) -> Any:
            state["outputs"] += 1
            return value

        sdf = sdf.update(counted)
        sdf.sink(
            RedisSink(
                host=redis.hostname or "127.0.0.1",
                port=redis.port or 6379,
                db=int((redis.path or "/0").lstrip("/") or 0),
                key_serializer=lambda key, value: (
                    f"quix:{args.mode}:{key.decode() if isinstance(key, bytes) else key}"
                ),
            )
        )

        def watchdog() -> None:
            while True:
                time.sleep(0.05)
                done = state["records"] >= args.records
                if done or (state["first"] and time.perf_counter() - state["first"] > args.max_seconds):
                    state["cpu_last"] = time.process_time()
                    app.stop()
                    return

        threading.Thread(target=watchdog, daemon=True).start()
        app.run()
    seconds = state["last"] - state["first"]
    print(
        json.dumps(
            {
                "records": state["records"],
                "seconds": seconds,
                "cpu_s": state["cpu_last"] - state["cpu_first"],
                "outputs": state["outputs"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
