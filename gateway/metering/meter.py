"""The one MeterUsage: validate → AWS parameters → the backend's retried call.

The MeteringService servicer (a caller's request) and the recording path's sender
(an hourly record) both meter through :func:`meter`, so an hourly record meets
exactly the rules a caller's request meets, on its way to exactly the same call.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from gateway.aws import params
from gateway.aws.backend import Backend, Outcome
from gateway.domain import errors, validation
from marketplace.metering.v1 import metering_pb2 as pb


def meter(
    backend: Backend,
    request: pb.MeterUsageRequest,
    window: validation.Window,
    *,
    deadline: float | None,
    products: validation.Products | None = None,
    what: str = "request",
    guard: Callable[[], AbstractContextManager[object]] = nullcontext,
    agentcore: bool = False,
) -> Outcome:
    """Meter ``request``, or raise GatewayError (INVALID_REQUEST naming the fields, before AWS).

    ``what`` names the request in a refusal ("hourly record"); ``guard`` is held around
    the AWS call only (the servicer's call slots: an invalid request never takes one);
    ``deadline`` is on the backend's monotonic clock; ``agentcore`` (--agentcore) applies
    AgentCore Runtime's rules too (a ClientToken, no allocations).
    """
    violations = validation.validate_meter_usage(request, window, products, agentcore=agentcore)
    if violations:
        raise errors.invalid(violations, what)
    with guard():
        return backend.meter_usage(params.to_aws(request), deadline=deadline)
