"""The MeteringService servicer: glue from a request to the backend and back.

request → validate → call AWS → map result → response, for MeterUsage, and for the
SaaS operations BatchMeterUsage and ResolveCustomer. Failures leave as GatewayError;
the interceptor turns them into statuses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timedelta

import grpc
import structlog

from gateway.aws.backend import Backend
from gateway.domain import errors, validation
from gateway.domain.clock import utcnow
from gateway.metering.batch import batch_meter
from gateway.metering.meter import meter
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc


def deadline_of(context: grpc.ServicerContext, clock: Callable[[], float] = time.monotonic) -> float | None:
    """The caller's deadline on the monotonic clock, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else clock() + remaining


class CallSlots:
    """At most ``limit`` calls at once; one more is refused at once, never queued.

    MeterUsage, BatchMeterUsage (through its resends' pauses) and ResolveCustomer take a
    slot for as long as they wait on AWS, so a slow AWS can hold ``limit`` of the
    server's threads and no more: health, RecordUsage and the rest
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
                f"{self.limit} calls are waiting on AWS already (--max-aws-calls); nothing was sent: retry shortly",
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
        # Held around each call to AWS (--max-aws-calls): a slow AWS takes that many threads, no more.
        self._slot: Callable[[], AbstractContextManager[object]] = slots.taken if slots is not None else nullcontext
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
            guard=self._slot,
            agentcore=self._agentcore,
        )
        return pb.MeterUsageResponse(metering_record_id=outcome.metering_record_id, dry_run=outcome.dry_run)

    def BatchMeterUsage(  # noqa: N802 - gRPC's method name
        self, request: pb.BatchMeterUsageRequest, context: grpc.ServicerContext
    ) -> pb.BatchMeterUsageResponse:
        structlog.contextvars.bind_contextvars(
            product_code=request.product_code[:255], records=len(request.usage_records)
        )
        result = batch_meter(
            self._backend,
            request,
            validation.Window.for_saas(self._now(), self._future_skew),
            deadline=deadline_of(context),
            products=self._products,
            hold=self._slot,  # through the resends' pauses
        )
        structlog.contextvars.bind_contextvars(unprocessed=len(result.unprocessed), aws_calls=result.calls)
        return pb.BatchMeterUsageResponse(
            results=[
                pb.UsageRecordResult(
                    usage_record=request.usage_records[r.index],
                    metering_record_id=r.metering_record_id,
                    status=RECORD_STATUS.get(r.status, pb.UsageRecordResult.STATUS_UNSPECIFIED),
                )
                for r in result.results
            ],
            unprocessed_records=[request.usage_records[i] for i in result.unprocessed],
        )

    def ResolveCustomer(  # noqa: N802 - gRPC's method name
        self, request: pb.ResolveCustomerRequest, context: grpc.ServicerContext
    ) -> pb.ResolveCustomerResponse:
        violations = validation.check_registration_token(request.registration_token)
        if violations:
            raise errors.invalid(violations)
        with self._slot():
            customer = self._backend.resolve_customer(request.registration_token, deadline=deadline_of(context))
        structlog.contextvars.bind_contextvars(product_code=customer.product_code)
        return pb.ResolveCustomerResponse(
            customer_identifier=customer.customer_identifier,
            product_code=customer.product_code,
            customer_aws_account_id=customer.customer_aws_account_id,
            license_arn=customer.license_arn,
        )


# AWS's record statuses (UsageRecordResultStatus) → the proto's; one AWS adds later is UNSPECIFIED.
RECORD_STATUS: dict[str, pb.UsageRecordResult.Status.ValueType] = {
    "Success": pb.UsageRecordResult.STATUS_SUCCESS,
    "CustomerNotSubscribed": pb.UsageRecordResult.STATUS_CUSTOMER_NOT_SUBSCRIBED,
    "DuplicateRecord": pb.UsageRecordResult.STATUS_DUPLICATE_RECORD,
}
