"""The MeteringService servicer: glue from a request to the backend and back.

request → validate → call AWS → map result → response. Failures leave as
GatewayError; the interceptor turns them into statuses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import grpc
import structlog

from gateway import errors, params, validation
from gateway.backend import Backend
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def deadline_of(context: grpc.ServicerContext, clock: Callable[[], float] = time.monotonic) -> float | None:
    """The caller's deadline on the monotonic clock, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else clock() + remaining


class MeteringServicer(pb_grpc.MeteringServiceServicer):
    def __init__(self, backend: Backend, *, future_skew: timedelta, now: Callable[[], datetime] = utcnow) -> None:
        self._backend = backend
        self._future_skew = future_skew
        self._now = now

    def MeterUsage(self, request: pb.MeterUsageRequest, context: grpc.ServicerContext) -> pb.MeterUsageResponse:  # noqa: N802
        structlog.contextvars.bind_contextvars(
            product_code=request.product_code[:255], usage_dimension=request.usage_dimension[:255], dry_run=request.dry_run
        )
        violations = validation.validate_meter_usage(request, validation.Window(self._now(), self._future_skew))
        if violations:
            raise errors.invalid(violations)
        outcome = self._backend.meter_usage(params.to_aws(request), deadline=deadline_of(context))
        return pb.MeterUsageResponse(metering_record_id=outcome.metering_record_id, dry_run=outcome.dry_run)
