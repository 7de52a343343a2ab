"""A ``grpc.aio.ServicerContext`` stand-in for calling servicers directly in unit tests: records what an
abort said and raises :class:`Aborted`, as the real one ends the call."""

from __future__ import annotations

from typing import Any

import grpc


class Aborted(Exception):
    pass


class Context:
    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining
        self.code: Any = None
        self.details = ""

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted(details)

    async def abort_with_status(self, status: Any) -> None:
        self.code, self.details = status.code, status.details
        raise Aborted(status.details)
