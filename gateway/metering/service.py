"""The MeteringService servicer: glue from a request to the backend and back.

request → validate → call AWS → map result → response. Failures leave as
GatewayError; the interceptor turns them into statuses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta

import grpc
import structlog

from gateway.aws.backend import Backend
from gateway.domain import errors, validation
from gateway.domain.clock import utcnow
from gateway.metering.meter import meter
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc


def deadline_of(context: grpc.ServicerContext, clock: Callable[[], float] = time.monotonic) -> float | None:
    """The caller's deadline on the monotonic clock, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else clock() + remaining


class CallSlots:
    """At most ``limit`` calls at once; one more is refused at once, never queued.

    MeterUsage takes a slot for as long as it waits on AWS, so a slow AWS can hold
    ``limit`` of the server's threads and no more: health, RecordUsage and the rest
    keep the others (``--max-aws-calls``).
    """

    RETRY_DELAY = 0.5  # seconds, in RetryInfo: a slot frees when any call to AWS ends

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    @contextmanager
    def taken(self) -> Iterator[None]:
        if not self._free.acquire(blocking=False):
            raise errors.GatewayError(
                errors.Reason.CONCURRENCY_LIMIT_EXCEEDED,
                f"{self.limit} MeterUsage calls are waiting on AWS already "
                "(--max-aws-calls); nothing was sent: retry shortly",
                retry_delay=self.RETRY_DELAY,
            )
        try:
            yield
        finally:
            self._free.release()


class MeteringServicer(pb_grpc.MeteringServiceServicer):
    def __init__(
        self,
        backend: Backend,
        *,
        future_skew: timedelta,
        now: Callable[[], datetime] = utcnow,
        slots: CallSlots | None = None,
        products: validation.Products | None = None,
        agentcore: bool = False,
    ) -> None:
        self._backend = backend
        self._future_skew = future_skew
        self._now = now
        self._slots = slots
        self._products = products  # --products: anything else is refused before AWS
        self._agentcore = agentcore  # --agentcore: a client_token required, no allocations

    def MeterUsage(self, request: pb.MeterUsageRequest, context: grpc.ServicerContext) -> pb.MeterUsageResponse:  # noqa: N802 - gRPC's method name
        structlog.contextvars.bind_contextvars(
            product_code=request.product_code[:255],
            usage_dimension=request.usage_dimension[:255],
            dry_run=request.dry_run,
        )
        outcome = meter(
            self._backend,
            request,
            validation.Window(self._now(), self._future_skew),
            deadline=deadline_of(context),
            products=self._products,
            guard=self._slots.taken if self._slots is not None else nullcontext,
            agentcore=self._agentcore,
        )
        return pb.MeterUsageResponse(metering_record_id=outcome.metering_record_id, dry_run=outcome.dry_run)
