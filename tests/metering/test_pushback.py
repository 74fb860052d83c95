"""One retry layer: a caller's gRPC retries never multiply the gateway's AWS attempts.

The gateway retries AWS up to ``--aws-max-attempts`` itself; its error answers say
so with the ``grpc-retry-pushback-ms`` trailer (gRFC A6 server pushback): negative
once AWS was called (gRPC clients then do not retry), the RetryInfo delay in
milliseconds when the gateway refused alone with a retryable error.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from gateway.domain import errors
from gateway.local_aws import LocalAws
from gateway.metering.service import MeteringServicer
from gateway.rpc.interceptors import PUSHBACK_KEY
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from metering_client import MeteringClient, RetryPolicy, Throttled, Unavailable
from support import request, running_gateway

FAST_RETRIES = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


def pushback_of(exc: grpc.RpcError) -> str | None:
    found = [v for k, v in exc.trailing_metadata() or () if k == PUSHBACK_KEY]  # type: ignore[attr-defined]
    return found[0] if found else None


def test_the_rule() -> None:
    after_aws = errors.from_aws("ThrottlingException", "slow down", "rid", retry_delay=0.4)
    after_aws.aws_attempts = 4
    assert after_aws.pushback_ms() == -1
    refused = errors.from_aws("DuplicateRequestException", "taken", "rid")
    refused.aws_attempts = 1
    assert refused.pushback_ms() == -1  # not retryable anyway; the trailer still tells the truth
    assert errors.GatewayError("SPOOL_UNAVAILABLE", "disk full", retry_delay=0.25).pushback_ms() == 250
    assert errors.GatewayError("SPOOL_UNAVAILABLE", "disk full").pushback_ms() is None  # client's own backoff
    assert errors.GatewayError("INVALID_REQUEST", "bad").pushback_ms() is None


@pytest.mark.parametrize("aws_max_attempts", [4, 2])
def test_a_throttled_call_costs_at_most_the_gateways_attempts(local_aws: LocalAws, aws_max_attempts: int) -> None:
    local_aws.inject("ThrottlingException", count=100)
    with (
        running_gateway(local_aws.endpoint_url, aws_max_attempts=aws_max_attempts) as target,
        MeteringClient(target, retry=FAST_RETRIES) as client,
    ):
        with pytest.raises(Throttled):
            client.meter_usage(product_code="prod-abc123", usage_dimension="requests", quantity=1)
        assert local_aws.calls == aws_max_attempts  # was aws_max_attempts × 4 before the pushback
        with grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.MeteringServiceStub(channel).MeterUsage(request(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert pushback_of(caught.value) == "-1"


def test_an_unavailable_aws_is_not_retried_on_top(local_aws: LocalAws) -> None:
    local_aws.inject("InternalServiceErrorException", count=100)
    with (
        running_gateway(local_aws.endpoint_url, aws_max_attempts=3) as target,
        MeteringClient(target, retry=FAST_RETRIES) as client,
    ):
        with pytest.raises(Unavailable):
            client.meter_usage(product_code="prod-abc123", usage_dimension="requests", quantity=1)
    assert local_aws.calls == 3


def test_a_refusal_without_aws_is_retried_after_its_delay(local_aws: LocalAws, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def refuse(
        self: MeteringServicer, req: pb.MeterUsageRequest, context: grpc.ServicerContext
    ) -> pb.MeterUsageResponse:
        with lock:
            seen.append(req.client_token)
        raise errors.GatewayError("SPOOL_UNAVAILABLE", "the spool is full", retry_delay=0.05)

    monkeypatch.setattr(MeteringServicer, "MeterUsage", refuse)
    with running_gateway(local_aws.endpoint_url) as target:
        started = time.monotonic()
        with MeteringClient(target, retry=FAST_RETRIES) as client, pytest.raises(Unavailable) as refused:
            client.meter_usage(product_code="prod-abc123", usage_dimension="requests", quantity=1)
        took = time.monotonic() - started
        with grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.MeteringServiceStub(channel).MeterUsage(request(), timeout=5)
    assert refused.value.reason == "SPOOL_UNAVAILABLE" and refused.value.retry_delay == pytest.approx(0.05)
    assert len(seen) == 1 + FAST_RETRIES.max_attempts and len(set(seen[:-1])) == 1  # 4 tries, one ClientToken
    assert took >= 3 * 0.05 * 0.9  # gRPC waited the pushback (50 ms), not its own jittered 10-40 ms
    assert pushback_of(caught.value) == "50"
    assert local_aws.calls == 0
