"""MeteringClient against a live gateway on loopback, backed by the local AWS stand-in."""

from __future__ import annotations

import threading
import uuid
from concurrent import futures
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
import pytest

from gateway.domain import errors as gateway_errors
from gateway.local_aws import SLOW, UNPROCESSED, LocalAws
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from metering_client import (
    REASONS,
    AccessDenied,
    Allocation,
    AlreadyExists,
    BatchMeterResult,
    CredentialsRefused,
    Customer,
    DeadlineExceeded,
    DuplicateRequest,
    EventIdConflict,
    ExpiredRegistrationToken,
    ExpiredToken,
    IdempotencyConflict,
    Internal,
    InvalidArgument,
    InvalidCustomerIdentifier,
    InvalidLicense,
    InvalidRequest,
    InvalidToken,
    MeteringClient,
    MeteringError,
    PermissionDenied,
    RecordStatus,
    RetryPolicy,
    Throttled,
    TimestampOutOfBounds,
    Unavailable,
    UsageEvent,
    UsageRecord,
    UsageRecordResult,
    convert,
)
from metering_client.client import RecordResult
from metering_client.errors import CODES
from support import FIXED_NOW, Clock, running_gateway
from support.recording import running_recorder, wait_for

PRODUCT, DIMENSION = "prod-abc123", "requests"
ACCOUNT, OTHER_ACCOUNT = "111122223333", "444455556666"
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef0"


@pytest.fixture
def client(gateway_target: str) -> MeteringClient:
    with MeteringClient(gateway_target, default_timeout=10) as c:
        yield c


def meter(client: MeteringClient, **kw: object):
    return client.meter_usage(**{"product_code": PRODUCT, "usage_dimension": DIMENSION, "quantity": 1, **kw})


def test_whole_quantity_is_metered_with_a_generated_token(client: MeteringClient, local_aws: LocalAws) -> None:
    first = meter(client, quantity=7)
    second = meter(client, quantity=3, usage_dimension="other")
    [r1, r2] = local_aws.records()
    assert (r1.metering_record_id, r1.quantity, r1.client_token) == (first.metering_record_id, 7, first.client_token)
    assert r2.client_token == second.client_token != first.client_token
    assert uuid.UUID(first.client_token).version == 4


def test_decimal_and_datetime_keywords(client: MeteringClient, local_aws: LocalAws, clock: Clock) -> None:
    when = clock.datetime() - timedelta(hours=2)
    meter(client, quantity=Decimal("1E+2"), timestamp=when)
    meter(client, quantity="2.500001", usage_dimension="other", timestamp=when)
    [hundred, fraction] = local_aws.records()
    assert hundred.quantity == Decimal(100) and fraction.quantity == Decimal("2.500001")
    assert hundred.timestamp == when.replace(microsecond=hundred.timestamp.microsecond)
    assert hundred.hour == when.replace(minute=0, second=0, microsecond=0)


def test_allocations_carry_tags(client: MeteringClient, local_aws: LocalAws) -> None:
    meter(
        client,
        quantity=Decimal("3.5"),
        allocations=[
            Allocation(Decimal("1.5"), {"team": "a"}),
            Allocation("2", {"team": "b", "env": "prod"}),
        ],
    )
    [record] = local_aws.records()
    assert {tuple(sorted(tags)): q for tags, q in record.allocations} == {
        (("team", "a"),): Decimal("1.5"),
        (("env", "prod"), ("team", "b")): Decimal(2),
    }


def test_a_given_token_is_kept_and_replays_are_idempotent(
    client: MeteringClient, local_aws: LocalAws, clock: Clock
) -> None:
    when = clock.datetime()
    first = meter(client, client_token="order-42", timestamp=when)
    again = meter(client, client_token="order-42", timestamp=when)
    assert first == again and first.client_token == "order-42"
    assert len(local_aws.records()) == 1


def test_dry_run(client: MeteringClient, local_aws: LocalAws) -> None:
    result = meter(client, dry_run=True)
    assert result.dry_run and result.metering_record_id == ""
    assert local_aws.records() == []


def test_invalid_request_names_every_field(client: MeteringClient, local_aws: LocalAws) -> None:
    with pytest.raises(InvalidRequest) as caught:
        meter(
            client,
            product_code="bad code!",
            quantity=2,
            allocations=[Allocation(1, {"": "x"}), Allocation(2, {"team": "a"})],
        )
    err = caught.value
    assert isinstance(err, InvalidArgument) and isinstance(err, MeteringError)
    assert (err.code, err.reason, err.domain) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
        "metering-gateway",
    )
    fields = {v.field for v in err.field_violations}
    assert {"product_code", "usage_allocations[0].tags[0].key", "usage_allocations"} <= fields
    assert err.aws_request_id is None and err.retry_delay is None
    assert local_aws.calls == 0


def test_duplicate_request_comes_from_aws(client: MeteringClient, local_aws: LocalAws, clock: Clock) -> None:
    when = clock.datetime()
    meter(client, quantity=1, timestamp=when)
    with pytest.raises(DuplicateRequest) as caught:
        meter(client, quantity=2, timestamp=when)
    err = caught.value
    assert isinstance(err, AlreadyExists) and err.code == grpc.StatusCode.ALREADY_EXISTS
    assert err.domain == "metering.marketplace.amazonaws.com"
    assert err.aws_error_code == "DuplicateRequestException" and err.aws_request_id


def test_idempotency_conflict(client: MeteringClient) -> None:
    meter(client, client_token="tok-1", quantity=1)
    with pytest.raises(IdempotencyConflict):
        meter(client, client_token="tok-1", quantity=5)


def test_timestamp_out_of_bounds(client: MeteringClient, clock: Clock) -> None:
    with pytest.raises(TimestampOutOfBounds) as caught:
        meter(client, timestamp=clock.datetime() - timedelta(hours=7))
    assert caught.value.code == grpc.StatusCode.OUT_OF_RANGE


def test_access_denied_is_a_permission_denied(client: MeteringClient, local_aws: LocalAws) -> None:
    local_aws.inject("AccessDeniedException")
    with pytest.raises(AccessDenied) as caught:
        meter(client)
    assert isinstance(caught.value, PermissionDenied)
    assert caught.value.metadata["awsErrorCode"] == "AccessDeniedException"


def test_unknown_reason_falls_back_to_its_code(client: MeteringClient, local_aws: LocalAws) -> None:
    local_aws.inject("QuotaRedesignException")
    with pytest.raises(Internal) as caught:
        meter(client)
    assert caught.value.reason == "QUOTA_REDESIGN" and type(caught.value) is Internal


def test_the_gateway_retries_throttling_with_the_same_token(local_aws: LocalAws) -> None:
    # One retry layer: the gateway retries AWS; the client's gRPC policy adds no calls.
    local_aws.inject("ThrottlingException", count=2)
    with (
        running_gateway(local_aws.endpoint_url, aws_max_attempts=3) as target,
        MeteringClient(target, retry=RetryPolicy(max_attempts=3, initial_backoff=0.01)) as client,
    ):
        result = meter(client)
    assert local_aws.calls == 3
    [record] = local_aws.records()
    assert (record.metering_record_id, record.client_token) == (result.metering_record_id, result.client_token)


def test_throttled_after_the_gateways_retries_carries_the_retry_delay(local_aws: LocalAws) -> None:
    # The gateway's answer says it called AWS (grpc-retry-pushback-ms < 0): gRPC does not retry.
    local_aws.inject("ThrottlingException", count=100)
    with (
        running_gateway(local_aws.endpoint_url, aws_max_attempts=1) as target,
        MeteringClient(target, retry=RetryPolicy(max_attempts=2, initial_backoff=0.01)) as client,
    ):
        with pytest.raises(Throttled) as caught:
            meter(client)
    assert local_aws.calls == 1
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.retry_delay is not None and caught.value.retry_delay > 0


def test_retries_can_be_turned_off(local_aws: LocalAws) -> None:
    local_aws.inject("InternalServiceErrorException", count=100)
    with (
        running_gateway(local_aws.endpoint_url, aws_max_attempts=1) as target,
        MeteringClient(target, retry=None) as client,
    ):
        with pytest.raises(Unavailable) as caught:
            meter(client)
    assert local_aws.calls == 1 and caught.value.reason == "INTERNAL_SERVICE_ERROR"


def test_the_default_deadline_applies(local_aws: LocalAws) -> None:
    local_aws.inject(SLOW, delay=1.0)
    with running_gateway(local_aws.endpoint_url) as target, MeteringClient(target, default_timeout=0.2) as client:
        with pytest.raises(DeadlineExceeded) as caught:
            meter(client)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_no_server_is_unavailable_without_details() -> None:
    with MeteringClient("127.0.0.1:1", retry=None, default_timeout=5) as client:
        with pytest.raises(Unavailable) as caught:
            meter(client)
    assert caught.value.reason == "" and caught.value.field_violations == ()


def test_every_gateway_reason_has_a_class_under_its_code() -> None:
    for reason in gateway_errors.Reason:
        assert issubclass(REASONS[reason], CODES[gateway_errors.RULES[reason].code]), reason
    assert set(REASONS) == set(gateway_errors.Reason)


def test_every_quantity_goes_out_as_a_decimal() -> None:
    # AWS deprecated the whole-number fields on 2026-10-20: ints go out as decimal strings too.
    when = datetime(2026, 1, 1, 12, tzinfo=UTC)
    for given, sent in [(7, "7"), (0, "0"), (Decimal("1E+2"), "100"), ("2.5", "2.5")]:
        req = convert.meter_usage_request(
            product_code=PRODUCT,
            usage_dimension=DIMENSION,
            quantity=given,
            timestamp_=when,
            allocations=[Allocation(given)],
            dry_run=False,
            client_token="t",
        )
        assert (req.WhichOneof("quantity"), req.usage_quantity_as_decimal) == ("usage_quantity_as_decimal", sent)
        [alloc] = req.usage_allocations
        assert (alloc.WhichOneof("quantity"), alloc.allocated_usage_quantity_as_decimal) == (
            "allocated_usage_quantity_as_decimal",
            sent,
        )
        event = convert.usage_event(UsageEvent("e", PRODUCT, DIMENSION, given, when))
        assert (event.WhichOneof("quantity"), event.usage_quantity_as_decimal) == ("usage_quantity_as_decimal", sent)


def test_a_whole_allocation_message_is_sent_as_a_decimal(client: MeteringClient, local_aws: LocalAws) -> None:
    # A ready-made message with the deprecated field still matches the request's (decimal) kind.
    whole = pb.UsageAllocation(allocated_usage_quantity=2, tags=[pb.Tag(key="team", value="a")])
    meter(client, quantity=2, allocations=[whole])
    [record] = local_aws.records()
    assert {tuple(sorted(tags)): q for tags, q in record.allocations} == {(("team", "a"),): Decimal(2)}
    assert whole.WhichOneof("quantity") == "allocated_usage_quantity"  # the caller's message is left alone


@pytest.mark.parametrize("bad", [1.5, True, None])
def test_inexact_or_odd_quantities_are_refused_locally(bad: object) -> None:
    with MeteringClient("127.0.0.1:1") as client, pytest.raises(TypeError):
        meter(client, quantity=bad)


def test_naive_datetimes_are_refused_locally() -> None:
    with MeteringClient("127.0.0.1:1") as client, pytest.raises(ValueError, match="timezone-aware"):
        meter(client, timestamp=FIXED_NOW.replace(tzinfo=None))


class _FakeRecorder(pb_grpc.UsageRecorderServiceServicer):
    """Stands in for the recorder: the test is about the client's conversions."""

    def __init__(self) -> None:
        self.seen: list[pb.RecordUsageRequest] = []

    def RecordUsage(self, request: pb.RecordUsageRequest, context: grpc.ServicerContext) -> pb.RecordUsageResponse:  # noqa: N802 - gRPC's method name
        self.seen.append(request)
        return pb.RecordUsageResponse(accepted=len(request.events) - 2, duplicates=1, carried=1)

    def ListMeteringRecords(  # noqa: N802 - gRPC's method name
        self, request: pb.ListMeteringRecordsRequest, context: grpc.ServicerContext
    ) -> pb.ListMeteringRecordsResponse:
        return pb.ListMeteringRecordsResponse(
            records=[pb.MeteringRecord(product_code=request.product_code, state=request.state)], next_page_token="p2"
        )


def test_recorder_calls_convert_events() -> None:
    fake = _FakeRecorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_UsageRecorderServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    when = datetime(2026, 1, 1, 12, 30, tzinfo=UTC)
    try:
        with MeteringClient(f"127.0.0.1:{port}") as client:
            result = client.record_usage(
                [
                    UsageEvent("e1", PRODUCT, DIMENSION, 2, when, {"team": "a"}),
                    UsageEvent("e2", PRODUCT, DIMENSION, Decimal("0.25"), when),
                    UsageEvent("e3", PRODUCT, DIMENSION, 1),
                ]
            )
            page = client.list_metering_records(state=pb.MeteringRecord.STATE_SENT, product_code=PRODUCT)
    finally:
        server.stop(0)
    assert result == RecordResult(accepted=1, duplicates=1, carried=1)
    [e1, e2, e3] = fake.seen[0].events
    assert not e3.HasField("timestamp")  # the gateway stamps it: a time made up here would differ on a resend
    assert (e1.event_id, e1.usage_quantity_as_decimal, e1.tags[0].key, e1.timestamp.ToDatetime(tzinfo=UTC)) == (
        "e1",
        "2",
        "team",
        when,
    )
    assert (e2.WhichOneof("quantity"), e2.usage_quantity_as_decimal) == ("usage_quantity_as_decimal", "0.25")
    assert page.next_page_token == "p2" and page.records[0].state == pb.MeteringRecord.STATE_SENT


def test_one_client_serves_many_threads(client: MeteringClient, local_aws: LocalAws) -> None:
    threads = [threading.Thread(target=meter, args=(client,), kwargs={"usage_dimension": f"d{i}"}) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.client_token for r in local_aws.records()}) == 8


def test_a_naive_resend_after_a_lost_reply_records_the_new_events(local_aws: LocalAws, tmp_path, clock: Clock) -> None:
    """The same code run again after a lost reply builds the same events again (no
    timestamps: the client invents none), plus a new one: only the new one counts."""

    def events(*extra: UsageEvent) -> list[UsageEvent]:
        return [
            UsageEvent("order-1001", PRODUCT, DIMENSION, 3),
            UsageEvent("order-1002", PRODUCT, DIMENSION, Decimal("8.5")),
            *extra,
        ]

    with (
        running_recorder(local_aws.endpoint_url, str(tmp_path / "s.db"), clock=clock) as (target, recording),
        MeteringClient(target) as client,
    ):
        assert client.record_usage(events()) == RecordResult(accepted=2, duplicates=0, carried=0)
        clock.advance(61)
        assert client.record_usage(events(UsageEvent("order-1003", PRODUCT, DIMENSION, 1))) == RecordResult(1, 2, 0)
        wait_for(lambda: recording.spool.stats().unassigned_events == 0, what="the events placed")
        (hour,) = client.list_metering_records().records
        assert Decimal(hour.quantity) == Decimal("12.5")


def test_a_conflicting_event_says_what_differs(local_aws: LocalAws, tmp_path, clock: Clock) -> None:
    with (
        running_recorder(local_aws.endpoint_url, str(tmp_path / "s.db"), clock=clock) as (target, _),
        MeteringClient(target) as client,
    ):
        client.record_usage([UsageEvent("order-1001", PRODUCT, DIMENSION, 3)])
        with pytest.raises(EventIdConflict) as caught:
            client.record_usage([UsageEvent("order-1001", PRODUCT, DIMENSION, 4)])
    said = "was accepted before with a different payload: quantity 3 then, 4 now"
    assert [(v.field, v.description) for v in caught.value.field_violations] == [("events[0].event_id", said)]
    assert said in str(caught.value)


def test_meter_usage_needs_a_quantity(client: MeteringClient, local_aws: LocalAws) -> None:
    """A forgotten quantity would meter 0 and take the hour (AWS keeps its first record)."""
    with pytest.raises(TypeError, match="quantity"):
        client.meter_usage(product_code=PRODUCT, usage_dimension=DIMENSION)  # type: ignore[call-arg]
    assert local_aws.calls == 0
    assert meter(client, quantity=0).metering_record_id  # an explicit 0 is a quantity


def test_str_of_an_error_carries_its_violations(local_aws: LocalAws, tmp_path, clock: Clock) -> None:
    with (
        running_recorder(local_aws.endpoint_url, str(tmp_path / "s.db"), clock=clock) as (target, _),
        MeteringClient(target) as client,
        pytest.raises(InvalidRequest) as caught,
    ):
        client.record_usage([UsageEvent(str(i), PRODUCT, DIMENSION, 1) for i in range(1001)])
    assert "events: must hold 1-1000 events, got 1001" in str(caught.value)


def test_str_of_an_error_shows_a_few_violations_and_counts_the_rest() -> None:
    from metering_client.errors import FieldViolation

    many = [FieldViolation(f"events[{i}].event_id", "is required") for i in range(8)]
    err = MeteringError(
        grpc.StatusCode.INVALID_ARGUMENT, "invalid batch", reason="INVALID_REQUEST", field_violations=many
    )
    assert str(err) == (
        "INVALID_ARGUMENT: INVALID_REQUEST: invalid batch (events[0].event_id: is required; "
        "events[1].event_id: is required; events[2].event_id: is required; events[3].event_id: "
        "is required; events[4].event_id: is required; and 3 more)"
    )
    assert len(err.field_violations) == 8  # every one is still there


# -- SaaS: batch_meter_usage, resolve_customer, customers on events ----------------------------


def saas(quantity: object = 1, **kw: object) -> UsageRecord:
    """ACCOUNT's usage of DIMENSION under LICENSE, fields overridden."""
    fields: dict = {"customer_aws_account_id": ACCOUNT, "license_arn": LICENSE, **kw}
    return UsageRecord(fields.pop("dimension", DIMENSION), quantity, **fields)  # type: ignore[arg-type]


@pytest.fixture
def subscribed(local_aws: LocalAws) -> LocalAws:
    local_aws.subscribe(customer_aws_account_id=ACCOUNT, license_arn=LICENSE, product_code=PRODUCT)
    return local_aws


def test_batch_meter_usage_returns_each_records_status(
    client: MeteringClient, subscribed: LocalAws, clock: Clock
) -> None:
    first = client.batch_meter_usage(
        [saas(Decimal("2.50"), allocations=[Allocation(2, {"team": "a"}), Allocation("0.50")])]
    )
    result = client.batch_meter_usage(
        [saas(1, dimension="storage-gb"), saas(1, customer_aws_account_id=OTHER_ACCOUNT), saas(3)]
    )
    assert isinstance(result, BatchMeterResult) and result.unprocessed == ()
    assert [r.status for r in result.results] == [
        RecordStatus.SUCCESS,
        RecordStatus.CUSTOMER_NOT_SUBSCRIBED,
        RecordStatus.DUPLICATE_RECORD,
    ]
    assert [bool(r.metering_record_id) for r in result.results] == [True, False, False]
    [kept] = first.results
    # The record as sent, in the caller's types, stamped with the time of the call.
    assert kept == UsageRecordResult(
        UsageRecord(
            DIMENSION,
            Decimal("2.50"),
            clock.datetime(),
            customer_aws_account_id=ACCOUNT,
            license_arn=LICENSE,
            allocations=[Allocation(Decimal(2), {"team": "a"}), Allocation(Decimal("0.50"), {})],
        ),
        RecordStatus.SUCCESS,
        kept.metering_record_id,
    )
    assert str(kept.record.quantity) == "2.50" and kept.status == "SUCCESS"
    assert sorted(r.metering_record_id for r in subscribed.saas_records()) == sorted(
        [kept.metering_record_id, result.results[0].metering_record_id]
    )


def test_records_sent_again_as_returned_are_the_same_records(client: MeteringClient, subscribed: LocalAws) -> None:
    first = client.batch_meter_usage([saas(i, dimension=f"d{i}") for i in range(3)])
    again = client.batch_meter_usage([r.record for r in first.results])
    assert [r.metering_record_id for r in again.results] == [r.metering_record_id for r in first.results]
    assert len(subscribed.saas_records()) == 3


def test_a_legacy_customer_goes_with_the_product_code(client: MeteringClient, local_aws: LocalAws) -> None:
    local_aws.subscribe_legacy(customer_identifier="cust-7", product_code=PRODUCT)
    result = client.batch_meter_usage([UsageRecord(DIMENSION, 4, customer_identifier="cust-7")], product_code=PRODUCT)
    [only] = result.results
    assert only.status is RecordStatus.SUCCESS and only.record.customer_identifier == "cust-7"
    [usage] = local_aws.saas_usage()
    assert (usage["CustomerIdentifier"], usage["Quantity"]) == ("cust-7", "4")


def test_records_left_unprocessed_come_back_ready_to_resend(subscribed: LocalAws, clock: Clock) -> None:
    subscribed.inject(UNPROCESSED, count=10_000)
    records = [saas(1, dimension=f"d{i}", timestamp=clock.datetime() - timedelta(minutes=i)) for i in range(4)]
    with (
        running_gateway(subscribed.endpoint_url, clock=clock, aws_backoff_base=0.05, aws_backoff_max=0.1) as target,
        MeteringClient(target) as client,
    ):
        result = client.batch_meter_usage(records, timeout=1.0)
        assert [r.record for r in result.results] == records[:3] and result.unprocessed == (records[3],)
        subscribed.clear_faults()
        resent = client.batch_meter_usage(result.unprocessed)
    assert [r.status for r in resent.results] == [RecordStatus.SUCCESS] and len(subscribed.saas_records()) == 4


def test_saas_refusals_are_typed(client: MeteringClient, subscribed: LocalAws, clock: Clock) -> None:
    unknown = LICENSE.replace("abcdef0", "ffffff0")
    with pytest.raises(InvalidLicense) as license_error:
        client.batch_meter_usage([saas(), saas(license_arn=unknown)])
    assert isinstance(license_error.value, InvalidArgument)
    assert license_error.value.aws_error_code == "InvalidLicenseException" and license_error.value.aws_request_id

    with pytest.raises(InvalidRequest) as invalid:
        client.batch_meter_usage([saas(), saas(license_arn="")], product_code=PRODUCT)
    assert [v.field for v in invalid.value.field_violations] == ["product_code", "usage_records[1].license_arn"]

    subscribed.inject("InvalidCustomerIdentifierException", operation="BatchMeterUsage")
    with pytest.raises(InvalidCustomerIdentifier):
        client.batch_meter_usage([UsageRecord(DIMENSION, 1, customer_identifier="cust-x")], product_code=PRODUCT)

    with pytest.raises(TimestampOutOfBounds):
        client.batch_meter_usage([saas(timestamp=clock.datetime() - timedelta(hours=25))])


def test_resolve_customer(client: MeteringClient, local_aws: LocalAws, clock: Clock) -> None:
    token = local_aws.issue_token(
        product_code=PRODUCT, customer_aws_account_id=ACCOUNT, license_arn=LICENSE, customer_identifier="cust-9", ttl=60
    )
    assert client.resolve_customer(token) == Customer("cust-9", PRODUCT, ACCOUNT, LICENSE)
    with pytest.raises(InvalidToken) as invalid:
        client.resolve_customer("not-a-token")
    assert invalid.value.aws_error_code == "InvalidTokenException"
    clock.advance(61)
    with pytest.raises(ExpiredRegistrationToken) as expired:
        client.resolve_customer(token)
    # The buyer's token, not the gateway's credentials: the caller's to handle, not an operator's.
    assert isinstance(expired.value, InvalidArgument) and not isinstance(expired.value, CredentialsRefused)
    assert not isinstance(expired.value, ExpiredToken) and expired.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidRequest):
        client.resolve_customer("")


def test_saas_records_are_checked_locally_like_meter_usage() -> None:
    with MeteringClient("127.0.0.1:1") as client:
        with pytest.raises(TypeError):
            client.batch_meter_usage([saas(1.5)])
        with pytest.raises(ValueError, match="timezone-aware"):
            client.batch_meter_usage([saas(timestamp=FIXED_NOW.replace(tzinfo=None))])


def test_batch_conversions() -> None:
    when = datetime(2026, 1, 1, 12, tzinfo=UTC)
    ready = pb.UsageRecord(customer_identifier="c", dimension=DIMENSION, quantity=5)
    req = convert.batch_meter_usage_request([saas(7), saas(Decimal("1E+2"), timestamp=when), ready], "", now=when)
    first, second, third = req.usage_records
    assert (first.WhichOneof("quantity_value"), first.quantity_as_decimal) == ("quantity_as_decimal", "7")
    assert second.quantity_as_decimal == "100" and first.timestamp == second.timestamp
    assert third is not ready and third == ready  # a ready-made message goes as it is
    # Back: the whole (deprecated) field and an unset quantity read as Decimals.
    assert convert.record_of(ready).quantity == Decimal(5)
    assert convert.record_of(pb.UsageRecord(dimension="d")) == UsageRecord("d", Decimal(0))
    reply = pb.BatchMeterUsageResponse(
        results=[pb.UsageRecordResult(usage_record=first, status=99)], unprocessed_records=[second]
    )
    result = convert.batch_meter_result(reply)
    assert result.results[0].status is RecordStatus.UNSPECIFIED  # a newer gateway's status
    assert result.unprocessed == (UsageRecord(DIMENSION, Decimal(100), when, ACCOUNT, LICENSE),)


def test_usage_events_carry_their_customer() -> None:
    when = datetime(2026, 1, 1, 12, tzinfo=UTC)
    by_license = convert.usage_event(
        UsageEvent("e1", "", DIMENSION, 2, when, customer_aws_account_id=ACCOUNT, license_arn=LICENSE)
    )
    legacy = convert.usage_event(UsageEvent("e2", PRODUCT, DIMENSION, 1, customer_identifier="cust-1"))
    container = convert.usage_event(UsageEvent("e3", PRODUCT, DIMENSION, 1))
    assert (by_license.product_code, by_license.customer_aws_account_id, by_license.license_arn) == (
        "",
        ACCOUNT,
        LICENSE,
    )
    assert (legacy.customer_identifier, legacy.customer_aws_account_id, legacy.license_arn) == ("cust-1", "", "")
    assert not (container.customer_identifier or container.customer_aws_account_id or container.license_arn)


def test_recorded_saas_usage_names_its_customer(local_aws: LocalAws, tmp_path, clock: Clock) -> None:
    with (
        running_recorder(local_aws.endpoint_url, str(tmp_path / "s.db"), clock=clock) as (target, recording),
        MeteringClient(target) as client,
    ):
        event = UsageEvent("order-1", "", DIMENSION, 3, customer_aws_account_id=ACCOUNT, license_arn=LICENSE)
        assert client.record_usage([event]) == RecordResult(accepted=1, duplicates=0, carried=0)
        assert client.record_usage([event]) == RecordResult(accepted=0, duplicates=1, carried=0)
        wait_for(lambda: recording.spool.stats().unassigned_events == 0, what="the event placed")
        [hour] = client.list_metering_records().records
    assert (hour.customer_aws_account_id, hour.license_arn, hour.customer_identifier) == (ACCOUNT, LICENSE, "")
    assert Decimal(hour.quantity) == 3


def test_the_client_imports_no_gateway_code() -> None:
    import ast
    from pathlib import Path

    import metering_client

    for path in Path(metering_client.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "gateway" or n.startswith("gateway.") for n in names), path.name
