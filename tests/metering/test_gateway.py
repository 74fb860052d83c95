"""End to end: a real gateway on loopback, real boto3 over HTTP to the local backend.

Each row of the status table (docs/api.md, Status codes) is driven through the whole path: the gRPC
channel, the interceptor, validation, the shared boto3 client, the local AWS
backend's JSON protocol, and back.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import boto3
import botocore.session
import grpc
import pytest
from botocore.credentials import CredentialResolver
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.local_aws import DROP, LocalAws
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import Clock, allocation, details, request, running_gateway
from support.contract import CONTRACT_ROWS

C = grpc.StatusCode


@pytest.fixture
def seen(local_aws: LocalAws) -> list[tuple[float, dict[str, Any]]]:
    """Every call the local backend receives: (monotonic time, JSON body)."""
    calls: list[tuple[float, dict[str, Any]]] = []
    original = local_aws.handle

    def spy(target: str, body: Any, identity: str, size: int | None = None) -> Any:
        calls.append((time.monotonic(), dict(body)))
        return original(target, body, identity, size=size)

    local_aws.handle = spy  # type: ignore[method-assign]
    return calls


def call_error(stub: pb_grpc.MeteringServiceStub, req: pb.MeterUsageRequest, timeout: float = 10) -> Any:
    with pytest.raises(grpc.RpcError) as caught:
        stub.MeterUsage(req, timeout=timeout)
    return details(caught.value)


def test_meter_usage_records_once_and_replays(stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws) -> None:
    req = request(usage_quantity=7)
    first = stub.MeterUsage(req, timeout=10)
    again = stub.MeterUsage(req, timeout=10)
    assert first.metering_record_id and first.metering_record_id == again.metering_record_id
    assert not first.dry_run
    [record] = local_aws.records()
    assert (record.metering_record_id, record.quantity, record.product_code) == (
        first.metering_record_id,
        7,
        "prod-abc123",
    )


def test_same_hour_other_quantity_is_a_duplicate(stub: pb_grpc.MeteringServiceStub, clock: Clock) -> None:
    now = clock.datetime()  # FIXED_NOW, minutes past the hour: the hour's start and now share it, neither is ahead
    hour = now.replace(minute=0, second=1, microsecond=0)
    stub.MeterUsage(request(when=hour, usage_quantity=1), timeout=10)
    d = call_error(stub, request(when=now, usage_quantity=2))
    assert (d.code, d.info.reason, d.info.domain) == (
        C.ALREADY_EXISTS,
        "DUPLICATE_REQUEST",
        "metering.marketplace.amazonaws.com",
    )
    assert d.info.metadata["awsErrorCode"] == "DuplicateRequestException" and d.info.metadata["awsRequestId"]
    assert d.infos == 1


def test_decimal_quantities_compare_by_value(stub: pb_grpc.MeteringServiceStub, clock: Clock) -> None:
    when = clock.datetime()
    a = stub.MeterUsage(request(when=when, usage_quantity=17), timeout=10)
    b = stub.MeterUsage(request(when=when, usage_quantity_as_decimal="17.00"), timeout=10)
    assert a.metering_record_id == b.metering_record_id


def test_decimal_allocations_reach_aws(stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws) -> None:
    allocs = [allocation("1.25", team="a"), allocation("0.75", team="b", env="prod")]
    stub.MeterUsage(request(usage_quantity_as_decimal="2", usage_allocations=allocs), timeout=10)
    [record] = local_aws.records()
    assert sorted((sorted(tags), str(q)) for tags, q in record.allocations) == [
        ([("env", "prod"), ("team", "b")], "0.75"),
        ([("team", "a")], "1.25"),
    ]


def test_client_token_conflict(stub: pb_grpc.MeteringServiceStub) -> None:
    stub.MeterUsage(request(usage_dimension="a", client_token="tok-1"), timeout=10)
    d = call_error(stub, request(usage_dimension="b", client_token="tok-1"))
    assert (d.code, d.info.reason) == (C.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")


@pytest.mark.parametrize(("aws_code", "code", "reason"), CONTRACT_ROWS)
def test_every_aws_error_row_end_to_end(
    stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws, aws_code: str, code: grpc.StatusCode, reason: str
) -> None:
    local_aws.inject(aws_code, count=10, message=f"local says {aws_code}")
    d = call_error(stub, request())
    assert (d.code, d.info.reason, d.info.domain) == (code, reason, "metering.marketplace.amazonaws.com")
    assert d.info.metadata["awsErrorCode"] == aws_code and d.info.metadata["awsRequestId"]
    assert d.message == f"local says {aws_code}"
    retryable = code in (C.RESOURCE_EXHAUSTED, C.UNAVAILABLE)
    assert (d.retry is not None) is retryable
    assert local_aws.calls == (4 if retryable else 1)  # the default aws_max_attempts


def test_throttling_is_retried_to_success_with_one_client_token(
    stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws, seen: list
) -> None:
    local_aws.inject("ThrottlingException", count=2)
    reply = stub.MeterUsage(request(), timeout=10)
    assert reply.metering_record_id == local_aws.records()[0].metering_record_id
    tokens = {body["ClientToken"] for _, body in seen}
    assert len(seen) == 3 and len(tokens) == 1 and next(iter(tokens))


def test_caller_token_is_kept_across_retries(
    stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws, seen: list
) -> None:
    local_aws.inject("InternalServiceErrorException", count=1)
    local_aws.inject(DROP, count=1)
    stub.MeterUsage(request(client_token="caller-token"), timeout=10)
    assert [body["ClientToken"] for _, body in seen] == ["caller-token"] * 3


def test_dry_run_accepted_records_nothing(stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws) -> None:
    reply = stub.MeterUsage(request(dry_run=True), timeout=10)
    assert reply.dry_run and reply.metering_record_id == ""
    assert local_aws.records() == []


def test_dry_run_refused_is_permission_denied(stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws) -> None:
    local_aws.inject("UnauthorizedException")
    d = call_error(stub, request(dry_run=True))
    assert (d.code, d.info.reason) == (C.PERMISSION_DENIED, "UNAUTHORIZED")


def test_invalid_request_never_reaches_aws(stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws) -> None:
    bad = request(
        product_code="no spaces",
        usage_quantity=1,
        usage_allocations=[
            allocation(1, team="a"),
            pb.UsageAllocation(allocated_usage_quantity=1, tags=[pb.Tag(key="", value="v")]),
        ],
    )
    d = call_error(stub, bad)
    assert (d.code, d.info.reason, d.info.domain) == (C.INVALID_ARGUMENT, "INVALID_REQUEST", "metering-gateway")
    assert d.fields == ["product_code", "usage_allocations[1].tags[0].key", "usage_allocations"]
    assert dict(d.info.metadata) == {} and local_aws.calls == 0


def test_old_timestamp_is_out_of_range_without_calling_aws(
    stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws, clock: Clock
) -> None:
    d = call_error(stub, request(when=clock.datetime() - timedelta(hours=7)))
    assert (d.code, d.info.reason, d.info.domain) == (C.OUT_OF_RANGE, "TIMESTAMP_OUT_OF_BOUNDS", "metering-gateway")
    assert d.fields == ["timestamp"] and local_aws.calls == 0


def test_garbage_bytes_are_invalid_and_the_server_keeps_serving(
    channel: grpc.Channel, stub: pb_grpc.MeteringServiceStub
) -> None:
    raw = channel.unary_unary("/marketplace.metering.v1.MeteringService/MeterUsage")
    for garbage in (b"\x0a\xff\xff\xff", b"\xff" * 64, b"\x12\x05abc"):
        with pytest.raises(grpc.RpcError) as caught:
            raw(garbage, timeout=5)
        d = details(caught.value)
        assert (d.code, d.info.reason) == (C.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert stub.MeterUsage(request(), timeout=10).metering_record_id


def test_unreachable_aws_is_unavailable(local_aws: LocalAws) -> None:
    dead = LocalAws(quiet=True)
    url = dead.endpoint_url
    dead.stop()  # nothing listens there any more
    with running_gateway(url, aws_max_attempts=2) as target, grpc.insecure_channel(target) as ch:
        d = call_error(pb_grpc.MeteringServiceStub(ch), request())
    assert (d.code, d.info.reason, d.info.domain) == (C.UNAVAILABLE, "AWS_UNREACHABLE", "metering-gateway")
    assert d.retry is not None


def test_no_credentials_is_failed_precondition(local_aws: LocalAws) -> None:
    core = botocore.session.Session()
    core.register_component("credential_provider", CredentialResolver(providers=[]))
    session = boto3.session.Session(botocore_session=core, region_name="us-east-1")
    with running_gateway(local_aws.endpoint_url, session=session) as target, grpc.insecure_channel(target) as ch:
        d = call_error(pb_grpc.MeteringServiceStub(ch), request())
    assert (d.code, d.info.reason) == (C.FAILED_PRECONDITION, "NO_CREDENTIALS")
    assert local_aws.calls == 0


def test_retries_never_outlive_the_deadline(local_aws: LocalAws, seen: list) -> None:
    local_aws.inject("ThrottlingException", count=1000)
    # The most attempts the settings allow (10), spaced to outlast the caller's 0.5 s deadline.
    with (
        running_gateway(
            local_aws.endpoint_url, aws_max_attempts=10, aws_backoff_base=0.2, aws_backoff_max=0.2
        ) as target,
        grpc.insecure_channel(target) as ch,
    ):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.MeteringServiceStub(ch).MeterUsage(request(), timeout=0.5)
        time.sleep(0.3)  # any attempt the gateway still had in mind would show up now
    assert caught.value.code() in (C.RESOURCE_EXHAUSTED, C.DEADLINE_EXCEEDED)
    assert len(seen) >= 2, "the gateway should have retried while it had time"
    assert all(t <= started + 0.5 for t, _ in seen), "an attempt started after the caller's deadline"


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "marketplace.metering.v1.MeteringService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {"marketplace.metering.v1.MeteringService", "grpc.health.v1.Health"} <= names


def test_request_id_is_echoed(stub: pb_grpc.MeteringServiceStub) -> None:
    _, call = stub.MeterUsage.with_call(request(), metadata=[("x-request-id", "caller-42")], timeout=10)
    assert ("x-request-id", "caller-42") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError) as caught:
        stub.MeterUsage(request(product_code=""), metadata=[("x-request-id", "caller-43")], timeout=10)
    assert ("x-request-id", "caller-43") in caught.value.trailing_metadata()


def test_concurrent_callers_each_get_their_own_record(local_aws: LocalAws) -> None:
    """24 calls at once, on 32 workers (24 of which may wait on AWS: --max-aws-calls' default)."""
    ids: list[str] = []
    with running_gateway(local_aws.endpoint_url, max_workers=32) as target, grpc.insecure_channel(target) as channel:
        stub = pb_grpc.MeteringServiceStub(channel)

        def worker(n: int) -> None:
            ids.append(stub.MeterUsage(request(usage_dimension=f"dim-{n}"), timeout=10).metering_record_id)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(set(ids)) == 24 == len(local_aws.records())


def test_a_bare_5xx_is_retried_and_unavailable(stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws) -> None:
    local_aws.inject("", count=10, status=503)  # a load balancer's 503: no error type at all
    d = call_error(stub, request())
    assert (d.code, d.info.reason) == (C.UNAVAILABLE, "HTTP_503") and d.retry is not None
    assert local_aws.calls == 4


def test_a_slow_aws_gives_the_caller_deadline_exceeded_on_time(
    stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws
) -> None:
    from gateway.local_aws import SLOW

    local_aws.inject(SLOW, count=1, delay=2.0)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.MeterUsage(request(), timeout=0.4)
    assert caught.value.code() == C.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5
    assert stub.MeterUsage(request(usage_dimension="after"), timeout=10).metering_record_id  # still serving
