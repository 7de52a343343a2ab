"""Traces proved across processes: the three services export real OTLP/gRPC to a collector started by
this test; the test rebuilds the traces and checks the edges of an event's journey and a prediction's,
and that a sampled-out request leaves no spans anywhere downstream."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from devstack.infra import free_port
from devstack.stack import LocalStack, ServicePorts
from eta.v1 import eta_pb2, eta_pb2_grpc, features_pb2, features_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc
from tests.integration.helpers import BERLIN, NEARBY, new_id, placed

pytestmark = pytest.mark.integration


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent: str
    name: str
    kind: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]] = field(default_factory=list)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP trace receiver keeping every span in memory."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            service = next(
                (_value(a.value) for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    self.spans.append(
                        Span(
                            service=str(service),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent=s.parent_span_id.hex(),
                            name=s.name,
                            kind=["UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"][
                                s.kind
                            ],
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    yield servicer, port
    await server.stop(0)


@pytest.fixture(scope="module")
def traced_stack(
    tmp_path_factory: pytest.TempPathFactory, collector: tuple[Collector, int]
) -> Iterator[LocalStack]:
    _, port = collector
    stack = LocalStack(
        tmp_path_factory.mktemp("otlp"),
        ports=ServicePorts.free(),
        use_env_endpoints=False,
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "SHUTDOWN_GRACE_SECONDS": "2",
        },
    )
    try:
        stack.start_infra()
        stack.start_services()
        yield stack
    finally:
        stack.stop()


def traceparent(sampled: bool) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    header = f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"
    return trace_id, span_id, (("traceparent", header),)


async def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "spans did not arrive in time"
        await asyncio.sleep(0.1)


async def _features_visible(stack: LocalStack, restaurant: str) -> None:
    async with grpc.aio.insecure_channel(stack.target("aggregator")) as channel:
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        deadline = time.monotonic() + 15
        while True:
            reply = await stub.GetRestaurantFeatures(
                features_pb2.GetRestaurantFeaturesRequest(restaurant_id=restaurant), timeout=5
            )
            if any(f.name == "num_orders_last_30_min" and f.value >= 1 for f in reply.features):
                return
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


async def test_event_journey_is_one_trace_across_processes(
    traced_stack: LocalStack, collector: tuple[Collector, int]
) -> None:
    spans, _ = collector
    trace_id, caller_span, metadata = traceparent(sampled=True)
    restaurant = new_id("otlp")
    event = placed(restaurant)
    async with grpc.aio.insecure_channel(traced_stack.target("ingestion")) as channel:
        reply = await ingestion_pb2_grpc.IngestionServiceStub(channel).PublishEvents(
            ingestion_pb2.PublishEventsRequest(events=[event]), metadata=metadata, timeout=10
        )
    assert reply.accepted == 1

    def complete() -> bool:
        return any(s.name == "redis apply features" for s in spans.trace(trace_id))

    await wait_for(complete)
    journey = {(s.service, s.kind, s.name): s for s in spans.trace(trace_id)}
    server = journey[("eta-ingestion", "SERVER", "eta.v1.IngestionService/PublishEvents")]
    produce = journey[("eta-ingestion", "PRODUCER", "send eta.order-events")]
    process = journey[("eta-aggregator", "CONSUMER", "eta.order-events process")]
    redis_write = journey[("eta-aggregator", "CLIENT", "redis apply features")]
    assert server.parent == caller_span
    assert produce.parent == server.span_id
    assert process.parent == produce.span_id
    assert redis_write.parent == process.span_id
    assert server.attributes["rpc.system"] == "grpc"
    assert produce.attributes["messaging.system"] == "kafka"
    assert produce.attributes["messaging.message.id"] == event.order.event_id
    assert process.attributes["messaging.destination.name"] == "eta.order-events"
    assert "messaging.kafka.offset" in process.attributes
    assert redis_write.attributes["db.system"] == "redis"
    # the batch span (its own trace) links to every producer it served, this one included
    batches = [
        s for s in spans.spans if s.name == "aggregator batch" and (trace_id, produce.span_id) in s.links
    ]
    assert len(batches) == 1


async def test_prediction_trace_reads_redis_links_the_writer_and_runs_the_model(
    traced_stack: LocalStack, collector: tuple[Collector, int]
) -> None:
    spans, _ = collector
    restaurant = new_id("otlp")
    write_trace, _, write_meta = traceparent(sampled=True)
    async with grpc.aio.insecure_channel(traced_stack.target("ingestion")) as channel:
        await ingestion_pb2_grpc.IngestionServiceStub(channel).PublishEvents(
            ingestion_pb2.PublishEventsRequest(events=[placed(restaurant)]), metadata=write_meta, timeout=10
        )
    await _features_visible(traced_stack, restaurant)
    trace_id, caller_span, metadata = traceparent(sampled=True)
    async with grpc.aio.insecure_channel(traced_stack.target("prediction")) as channel:
        await eta_pb2_grpc.EtaServiceStub(channel).PredictEta(
            eta_pb2.PredictEtaRequest(
                restaurant_id=restaurant, restaurant_location=BERLIN, customer_location=NEARBY
            ),
            metadata=metadata,
            timeout=5,
        )
    await wait_for(lambda: any(s.name == "model inference" for s in spans.trace(trace_id)))
    prediction = {s.name: s for s in spans.trace(trace_id)}
    server = prediction["eta.v1.EtaService/PredictEta"]
    read, inference = prediction["redis read features"], prediction["model inference"]
    assert server.parent == caller_span
    assert read.parent == server.span_id
    assert inference.parent == server.span_id
    assert read.attributes["db.system"] == "redis"
    assert "eta.feature_age_s.num_orders_last_30_min" in read.attributes
    writer = next(s for s in spans.trace(write_trace) if s.kind == "CONSUMER")
    assert (write_trace, writer.span_id) in read.links  # provenance: which aggregator span wrote the feature


async def test_sampled_out_request_leaves_no_spans_downstream(
    traced_stack: LocalStack, collector: tuple[Collector, int]
) -> None:
    spans, _ = collector
    trace_id, _, metadata = traceparent(sampled=False)
    restaurant = new_id("otlp")
    async with grpc.aio.insecure_channel(traced_stack.target("ingestion")) as channel:
        reply = await ingestion_pb2_grpc.IngestionServiceStub(channel).PublishEvents(
            ingestion_pb2.PublishEventsRequest(events=[placed(restaurant)]), metadata=metadata, timeout=10
        )
    assert reply.accepted == 1
    await _features_visible(traced_stack, restaurant)
    # a sampled request sent afterwards has arrived at the collector, so the exporters have flushed past ours
    marker, _, marker_meta = traceparent(sampled=True)
    async with grpc.aio.insecure_channel(traced_stack.target("ingestion")) as channel:
        await ingestion_pb2_grpc.IngestionServiceStub(channel).PublishEvents(
            ingestion_pb2.PublishEventsRequest(events=[placed(restaurant)]), metadata=marker_meta, timeout=10
        )
    await wait_for(lambda: any(s.name == "redis apply features" for s in spans.trace(marker)))
    assert spans.trace(trace_id) == []
    linking = [(s.service, s.name) for s in spans.spans if any(link[0] == trace_id for link in s.links)]
    assert linking == []
