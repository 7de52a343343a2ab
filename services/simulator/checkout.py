"""The app's checkout screen: ask the ETA service for an order's ETA right before placing it.

Live mode calls ``eta.v1.EtaService/PredictEta`` with ``request_id`` = the order id for every order it is
about to place, the way an app shows "20–30 min" at checkout. The prediction service logs what it served
under that request id, so a delivered order can be joined to the ETA its customer saw (live accuracy:
``eta-trainer accuracy``). The order is placed whatever the answer: a failed or slow ETA call (short
deadline) is counted and logged at most every few seconds, never retried.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from eta.v1 import eta_pb2, eta_pb2_grpc, events_pb2

__all__ = ["CheckoutEta", "CheckoutStats", "is_placed"]

log = logging.getLogger(__name__)
ERROR_LOG_INTERVAL_S = 5.0


def is_placed(event: events_pb2.Event) -> bool:
    return event.WhichOneof("payload") == "order" and event.order.type == events_pb2.OrderEvent.PLACED


@dataclass
class CheckoutStats:
    calls: int = 0
    errors: int = 0
    last_model_version: str = ""


class CheckoutEta:
    def __init__(
        self,
        stub: eta_pb2_grpc.EtaServiceStub,
        *,
        timeout_s: float = 0.5,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._stub = stub
        self._timeout = timeout_s
        self._metadata = metadata
        self.stats = CheckoutStats()
        self._last_error_log = -float("inf")

    async def ask(self, placed: events_pb2.Event) -> eta_pb2.PredictEtaResponse | None:
        """The ETA of the order ``placed`` (a PLACED event not yet sent), or None if the call failed."""
        order = placed.order
        request = eta_pb2.PredictEtaRequest(
            restaurant_id=order.restaurant_id,
            restaurant_location=order.restaurant_location,
            customer_location=order.customer_location,
            request_id=order.order_id,
            customer_id=order.customer_id,  # the customer's history features
            market_id=order.market_id,  # the order's market ('' = none named: the default market)
        )
        self.stats.calls += 1
        try:
            reply: eta_pb2.PredictEtaResponse = await self._stub.PredictEta(
                request, timeout=self._timeout, metadata=self._metadata or None
            )
        except grpc.aio.AioRpcError as exc:
            self.stats.errors += 1
            now = time.monotonic()
            if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
                self._last_error_log = now
                log.warning(
                    "checkout ETA failed; placing the order anyway",
                    extra={"code": exc.code().name, "detail": exc.details(), "errors": self.stats.errors},
                )
            return None
        self.stats.last_model_version = reply.model_version
        return reply
