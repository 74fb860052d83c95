"""The one BatchMeterUsage: validate → AWS parameters → the backend's call, then the
unprocessed records again, identically, while the deadline allows.

The MeteringService servicer (a caller's request) and the recording path's sender (a
batch of customers' hourly records) both meter SaaS usage through :func:`batch_meter`,
as both meter container usage through :func:`gateway.metering.meter.meter`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from gateway.aws import params
from gateway.aws.backend import Backend, BatchOutcome, RecordResult, RetryPolicy
from gateway.domain import errors, validation
from marketplace.metering.v1 import metering_pb2 as pb

# Below this much time left, no more resends of unprocessed records are started.
MIN_RESEND_SECONDS = 0.05


@dataclass(frozen=True)
class BatchResult:
    """Every record of the request, once: with AWS's status (``results``, indices into the
    request's records) or still unprocessed after the resends the deadline allowed."""

    results: tuple[RecordResult, ...]
    unprocessed: tuple[int, ...]
    calls: int  # BatchMeterUsage calls made (each may have been retried by the backend)
    attempts: int  # AWS attempts, over every call
    aws_request_id: str | None


def check(
    request: pb.BatchMeterUsageRequest,
    window: validation.Window,
    products: validation.Products | None = None,
    what: str = "request",
) -> params.BatchMeterUsageParams:
    """AWS's parameters for a valid request, or GatewayError naming every offending field
    (AWS's 1 MB limit on the body included)."""
    if request.ByteSize() >= validation.BATCH_BYTES_MAX:  # AWS's JSON is never smaller: refused before any work
        raise errors.invalid([_too_large(request.ByteSize())], what)
    violations = validation.validate_batch_meter_usage(request, window, products)
    if violations:
        raise errors.invalid(violations, what)
    aws = params.batch_to_aws(request)
    size = params.json_size(aws)
    if size >= validation.BATCH_BYTES_MAX:
        raise errors.invalid([_too_large(size)], what)
    return aws


def _too_large(size: int) -> validation.Violation:
    return validation.Violation(
        "usage_records",
        f"make a request of at least {size} bytes; AWS takes under {validation.BATCH_BYTES_MAX} "
        "(1 MB): send fewer records or allocations a call",
    )


def batch_meter(
    backend: Backend,
    request: pb.BatchMeterUsageRequest,
    window: validation.Window,
    *,
    deadline: float | None,
    products: validation.Products | None = None,
    what: str = "request",
    guard: Callable[[], AbstractContextManager[object]] = nullcontext,
    hold: Callable[[], AbstractContextManager[object]] = nullcontext,
    policy: RetryPolicy | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> BatchResult:
    """Meter ``request`` with BatchMeterUsage, or raise GatewayError (a refusal of the
    whole call, before AWS or by it).

    Records AWS leaves unprocessed are sent again, exactly as they were (AWS keeps one
    record per customer, dimension and hour, so the same record again is the same
    record), after a backoff, while ``deadline`` (on ``clock``) leaves time and the
    request has made fewer than ``policy.max_attempts`` AWS attempts in all. ``guard`` is
    held around each call to AWS, ``hold`` around all of them and the pauses between
    (the servicer's call slot: a request waiting to resend still holds its thread).
    """
    aws = check(request, window, products, what)
    with hold():
        return _send(backend, aws, deadline, guard, policy or backend.policy, clock, sleep)


def _send(
    backend: Backend,
    aws: params.BatchMeterUsageParams,
    deadline: float | None,
    guard: Callable[[], AbstractContextManager[object]],
    policy: RetryPolicy,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> BatchResult:
    """The calls of :func:`batch_meter`: at most ``policy.max_attempts`` AWS attempts in all
    (a caller's one request never becomes more), within ``deadline``."""
    pending = list(range(len(aws["UsageRecords"])))
    results: list[RecordResult] = []
    calls = attempts = 0
    request_id: str | None = None
    while True:
        part: params.BatchMeterUsageParams = {**aws, "UsageRecords": [aws["UsageRecords"][i] for i in pending]}
        started = clock()
        try:
            with guard():
                outcome: BatchOutcome = backend.batch_meter_usage(part, deadline=deadline)
        except errors.GatewayError:
            if not calls:
                raise
            break  # AWS answered an earlier call: that answer stands, the rest is unprocessed
        calls += 1
        attempts += outcome.attempts
        request_id = outcome.aws_request_id or request_id
        results += [RecordResult(pending[r.index], r.status, r.metering_record_id) for r in outcome.results]
        pending = [pending[i] for i in outcome.unprocessed]
        if not pending or attempts >= policy.max_attempts:
            break  # the backend's attempts are the budget of the whole request, resends included
        pause = policy.delay(calls)
        # Another call only when it can end in time: it may take as long as the last one.
        took = clock() - started
        if deadline is not None and deadline - clock() - pause < max(MIN_RESEND_SECONDS, took):
            break
        sleep(pause)
    return BatchResult(tuple(sorted(results)), tuple(pending), calls, attempts, request_id)
