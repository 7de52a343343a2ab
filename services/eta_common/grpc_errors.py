"""gRPC error helpers: INVALID_ARGUMENT with ``google.rpc.BadRequest`` field violations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = ["abort_bad_request"]


async def abort_bad_request(
    context: grpc.aio.ServicerContext[Any, Any], violations: Sequence[tuple[str, str]]
) -> NoReturn:
    """Fail the call with INVALID_ARGUMENT; every (field, reason) is in the rich error details."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=reason)
                for field, reason in violations
            ]
        )
    )
    message = "; ".join(f"{field}: {reason}" for field, reason in violations)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable")  # abort_with_status raises
