"""End to end, SaaS: BatchMeterUsage and ResolveCustomer through a real gateway on loopback,
a real gRPC channel, real boto3 over HTTP, and the local backend's SaaS bookkeeping.

What is checked: each record's status mapped and its record echoed exactly as sent; an
identical resend answered with the same ids; every input rule refused before AWS, naming
the field; AWS's refusals mapped to their rows (tests/support/contract.py); records AWS
leaves unprocessed resent identically within the caller's deadline, the rest handed back;
and a call AWS recorded without answering billed once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from gateway.aws import params
from gateway.domain import validation
from gateway.local_aws import DROP, UNPROCESSED, LocalAws
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import Clock, Details, allocation, default_clock, details, running_gateway
from support.contract import RECORD_STATUS_ROWS, SAAS_CONTRACT_ROWS

C = grpc.StatusCode
S = pb.UsageRecordResult
PRODUCT = "prod-abc123"
ACCOUNT, OTHER_ACCOUNT = "111122223333", "444455556666"
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef0"
UNKNOWN_LICENSE = "arn:aws:license-manager::123456789012:license:l-ffffffffffffffff0"
LEGACY_CUSTOMER = "cust-Legacy-42"
AWS = "metering.marketplace.amazonaws.com"
GATEWAY = "metering-gateway"


@pytest.fixture
def subscribed(local_aws: LocalAws) -> LocalAws:
    """The local AWS with ACCOUNT subscribed under LICENSE (of PRODUCT), and LEGACY_CUSTOMER to PRODUCT."""
    local_aws.subscribe(customer_aws_account_id=ACCOUNT, license_arn=LICENSE, product_code=PRODUCT)
    local_aws.subscribe_legacy(customer_identifier=LEGACY_CUSTOMER, product_code=PRODUCT)
    return local_aws


@pytest.fixture
def seen(local_aws: LocalAws) -> list[dict[str, Any]]:
    """The JSON body of every BatchMeterUsage call the local backend receives."""
    bodies: list[dict[str, Any]] = []
    original = local_aws.handle

    def spy(target: str, body: Any, identity: str, size: int | None = None) -> Any:
        if target.endswith(".BatchMeterUsage"):
            bodies.append(dict(body))
        return original(target, body, identity, size)

    local_aws.handle = spy  # type: ignore[method-assign]
    return bodies


def record(
    *,
    when: datetime | None = None,
    account: str = ACCOUNT,
    license_arn: str = LICENSE,
    identifier: str = "",
    dimension: str = "requests",
    quantity: str | int | None = "1",
    allocations: list[pb.UsageAllocation] | None = None,
) -> pb.UsageRecord:
    """A record of ACCOUNT's usage now (on the test's clock), fields overridden; ``identifier``
    makes it a legacy record (no account, no license)."""
    if identifier:
        account = license_arn = ""
    msg = pb.UsageRecord(
        customer_aws_account_id=account,
        license_arn=license_arn,
        customer_identifier=identifier,
        dimension=dimension,
        usage_allocations=allocations or [],
    )
    msg.timestamp.FromDatetime(when or default_clock().datetime())
    if isinstance(quantity, str):
        msg.quantity_as_decimal = quantity
    elif quantity is not None:
        msg.quantity = quantity
    return msg


def batch(*records: pb.UsageRecord, product_code: str = "") -> pb.BatchMeterUsageRequest:
    return pb.BatchMeterUsageRequest(usage_records=records, product_code=product_code)


def batch_error(stub: pb_grpc.MeteringServiceStub, req: pb.BatchMeterUsageRequest, timeout: float = 10) -> Details:
    with pytest.raises(grpc.RpcError) as caught:
        stub.BatchMeterUsage(req, timeout=timeout)
    return details(caught.value)


def resolve_error(stub: pb_grpc.MeteringServiceStub, token: str) -> Details:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ResolveCustomer(pb.ResolveCustomerRequest(registration_token=token), timeout=10)
    return details(caught.value)


def statuses(reply: pb.BatchMeterUsageResponse) -> list[int]:
    return [r.status for r in reply.results]


# -- BatchMeterUsage: statuses and records ---------------------------------------------------


def test_each_status_is_mapped_and_each_record_echoed_as_sent(
    stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws
) -> None:
    first = stub.BatchMeterUsage(
        batch(record(quantity="2.50", allocations=[allocation("2", team="a"), allocation("0.50")])), timeout=10
    )
    [kept] = first.results
    assert kept.status == S.STATUS_SUCCESS and kept.metering_record_id

    req = batch(
        record(dimension="storage-gb", quantity="1.000"),  # new: kept
        record(account=OTHER_ACCOUNT),  # not subscribed under the license
        record(quantity="3"),  # the hour of "requests" holds 2.50 already
    )
    reply = stub.BatchMeterUsage(req, timeout=10)
    assert statuses(reply) == [S.STATUS_SUCCESS, S.STATUS_CUSTOMER_NOT_SUBSCRIBED, S.STATUS_DUPLICATE_RECORD]
    assert [bool(r.metering_record_id) for r in reply.results] == [True, False, False]
    # The records exactly as sent: "1.000" stays "1.000", allocations and all.
    assert [r.usage_record for r in reply.results] == list(req.usage_records)
    assert first.results[0].usage_record.usage_allocations[1].allocated_usage_quantity_as_decimal == "0.50"
    assert list(reply.unprocessed_records) == []
    hour = default_clock().datetime().replace(minute=0, second=0, microsecond=0).isoformat()
    assert subscribed.saas_usage() == [
        {
            "ProductCode": PRODUCT,
            "LicenseArn": LICENSE,
            "CustomerAWSAccountId": ACCOUNT,
            "CustomerIdentifier": "",
            "Dimension": d,
            "Hour": hour,
            "Quantity": q,
        }
        for d, q in [("requests", "2.50"), ("storage-gb", "1.000")]
    ]


def test_an_identical_resend_returns_the_same_ids_and_bills_nothing_more(
    stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws
) -> None:
    req = batch(*(record(dimension=f"dim-{i}", quantity=str(i + 1)) for i in range(3)))
    first = stub.BatchMeterUsage(req, timeout=10)
    again = stub.BatchMeterUsage(req, timeout=10)
    subset = stub.BatchMeterUsage(batch(req.usage_records[1]), timeout=10)
    ids = [r.metering_record_id for r in first.results]
    assert statuses(first) == statuses(again) == [S.STATUS_SUCCESS] * 3
    assert len(set(ids)) == 3 and [r.metering_record_id for r in again.results] == ids
    assert [r.metering_record_id for r in subset.results] == [ids[1]]
    assert sorted(r.metering_record_id for r in subscribed.saas_records()) == sorted(ids)


def test_a_legacy_customer_is_metered_with_the_product_code(
    stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws
) -> None:
    reply = stub.BatchMeterUsage(
        batch(record(identifier=LEGACY_CUSTOMER), record(identifier="cust-nobody"), product_code=PRODUCT), timeout=10
    )
    assert statuses(reply) == [S.STATUS_SUCCESS, S.STATUS_CUSTOMER_NOT_SUBSCRIBED]
    [usage] = subscribed.saas_usage()
    assert (usage["CustomerIdentifier"], usage["LicenseArn"], usage["ProductCode"]) == (LEGACY_CUSTOMER, "", PRODUCT)


@pytest.mark.parametrize(("aws_status", "status"), RECORD_STATUS_ROWS)
def test_every_record_status_of_the_contract_is_reached(
    stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws, aws_status: str, status: int
) -> None:
    """Each AWS status, made by the local backend's own rules, arrives as its proto status."""
    stub.BatchMeterUsage(batch(record(quantity="5")), timeout=10)
    make = {
        "Success": lambda: record(quantity="5.0"),  # the same quantity by value: the kept record
        "CustomerNotSubscribed": lambda: record(account=OTHER_ACCOUNT),
        "DuplicateRecord": lambda: record(quantity="6"),
    }
    [result] = stub.BatchMeterUsage(batch(make[aws_status]()), timeout=10).results
    assert result.status == status


# -- BatchMeterUsage: refused before AWS ------------------------------------------------------


def _over(n: int, **kw: Any) -> Callable[[], pb.BatchMeterUsageRequest]:
    return lambda: batch(*(record(dimension=f"d{i}", **kw) for i in range(n)))


INVALID = {
    "license without account": (lambda: batch(record(account="")), ["usage_records[0].customer_aws_account_id"]),
    "account without license": (lambda: batch(record(license_arn="")), ["usage_records[0].license_arn"]),
    "a license that is no ARN": (lambda: batch(record(license_arn="l-0123")), ["usage_records[0].license_arn"]),
    "an account id with a letter": (
        lambda: batch(record(account="11112222333a")),
        ["usage_records[0].customer_aws_account_id"],
    ),
    "both ways in one record": (
        lambda: batch(pb.UsageRecord(**_fields(record()), customer_identifier=LEGACY_CUSTOMER)),
        ["usage_records[0].customer_identifier"],
    ),
    "two ways in one call": (
        lambda: batch(record(), record(identifier=LEGACY_CUSTOMER)),
        ["usage_records[1].customer_identifier"],
    ),
    "no customer": (lambda: batch(record(account="", license_arn="")), ["usage_records[0].customer_aws_account_id"]),
    "legacy without product_code": (lambda: batch(record(identifier=LEGACY_CUSTOMER)), ["product_code"]),
    "license with product_code": (lambda: batch(record(), product_code=PRODUCT), ["product_code"]),
    "no records": (lambda: batch(), ["usage_records"]),
    "26 records": (_over(26), ["usage_records"]),
    "no dimension": (lambda: batch(record(dimension="")), ["usage_records[0].dimension"]),
    "a bad decimal": (lambda: batch(record(quantity="1.1234567")), ["usage_records[0].quantity_as_decimal"]),
    "allocations that do not add up": (
        lambda: batch(record(quantity="3", allocations=[allocation("1", team="a")])),
        ["usage_records[0].usage_allocations"],
    ),
    "no timestamp": (lambda: batch(_without_timestamp(record())), ["usage_records[0].timestamp"]),
    "the second record bad": (
        lambda: batch(record(), record(license_arn="")),
        ["usage_records[1].license_arn"],
    ),
}


def _fields(msg: pb.UsageRecord) -> dict[str, Any]:
    return {f.name: v for f, v in msg.ListFields()}


def _without_timestamp(msg: pb.UsageRecord) -> pb.UsageRecord:
    msg.ClearField("timestamp")
    return msg


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_input_is_refused_before_aws_naming_the_field(
    stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws, case: str
) -> None:
    make, fields = INVALID[case]
    d = batch_error(stub, make())
    assert (d.code, d.info.reason, d.info.domain) == (C.INVALID_ARGUMENT, "INVALID_REQUEST", GATEWAY)
    assert d.fields == fields and all(description for _, description in d.violations)
    assert dict(d.info.metadata) == {} and subscribed.calls == 0


def test_25_records_are_taken(stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws) -> None:
    reply = stub.BatchMeterUsage(_over(25)(), timeout=10)
    assert statuses(reply) == [S.STATUS_SUCCESS] * 25 and subscribed.calls == 1


def test_products_limit_the_legacy_product_and_its_dimensions(subscribed: LocalAws, clock: Clock) -> None:
    with (
        running_gateway(subscribed.endpoint_url, clock=clock, products=f"{PRODUCT}=requests") as target,
        grpc.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.MeteringServiceStub(channel)
        other = batch_error(stub, batch(record(identifier=LEGACY_CUSTOMER), product_code="prod-other"))
        dimension = batch_error(stub, batch(record(identifier=LEGACY_CUSTOMER, dimension="cpu"), product_code=PRODUCT))
        ok = stub.BatchMeterUsage(batch(record(identifier=LEGACY_CUSTOMER), product_code=PRODUCT), timeout=10)
    assert (other.code, other.fields) == (C.INVALID_ARGUMENT, ["product_code"])
    assert (dimension.code, dimension.fields) == (C.INVALID_ARGUMENT, ["usage_records[0].dimension"])
    assert statuses(ok) == [S.STATUS_SUCCESS] and subscribed.calls == 1


def test_the_saas_window_is_24_hours(stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws, clock: Clock) -> None:
    now = clock.datetime()
    # MeterUsage's six hours do not apply: 23 h 59 min back is taken, by the gateway and AWS.
    taken = stub.BatchMeterUsage(batch(record(when=now - timedelta(hours=23, minutes=59))), timeout=10)
    assert statuses(taken) == [S.STATUS_SUCCESS]
    for when, said in [(now - timedelta(hours=24, seconds=1), "24 hours"), (now + timedelta(minutes=6), "future")]:
        d = batch_error(stub, batch(record(dimension="other"), record(when=when)))
        assert (d.code, d.info.reason, d.info.domain) == (C.OUT_OF_RANGE, "TIMESTAMP_OUT_OF_BOUNDS", GATEWAY)
        assert d.fields == ["usage_records[1].timestamp"] and said in d.violations[0][1]
    assert subscribed.calls == 1


def test_the_previous_month_closes_at_six_on_the_first(
    stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws, clock: Clock
) -> None:
    """Usage of November 30th, well inside 24 hours, is taken until 06:00 UTC on December 1st
    and refused from then on (the gateway's and AWS's clock: the test's, never the wall clock)."""
    late_november = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)
    clock.now = datetime(2026, 12, 1, 5, 59, 59, tzinfo=UTC).timestamp()
    taken = stub.BatchMeterUsage(batch(record(when=late_november)), timeout=10)
    assert statuses(taken) == [S.STATUS_SUCCESS]
    clock.now = datetime(2026, 12, 1, 6, 0, 0, tzinfo=UTC).timestamp()
    d = batch_error(stub, batch(record(when=late_november, dimension="storage-gb")))
    assert (d.code, d.info.reason, d.fields) == (
        C.OUT_OF_RANGE,
        "TIMESTAMP_OUT_OF_BOUNDS",
        ["usage_records[0].timestamp"],
    )
    assert "previous month" in d.violations[0][1]
    assert subscribed.calls == 1
    # December's own usage, an hour old, goes on as usual.
    fresh = stub.BatchMeterUsage(batch(record(when=clock.datetime() - timedelta(hours=1))), timeout=10)
    assert statuses(fresh) == [S.STATUS_SUCCESS]


def _large(allocations: int) -> pb.BatchMeterUsageRequest:
    """25 records with many small allocations: a JSON body far larger than the protobuf."""
    return batch(
        *(
            record(
                dimension=f"d{i}",
                quantity=str(allocations),
                allocations=[allocation("1", **{f"k{k}": f"{j}" for k in range(5)}) for j in range(allocations)],
            )
            for i in range(25)
        )
    )


def _size(req: pb.BatchMeterUsageRequest) -> int:
    return params.json_size(params.batch_to_aws(req))


def test_the_1_mb_limit_is_aws_body_and_the_gateway_keeps_under_it(
    stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws
) -> None:
    """The largest request the gateway lets through is one AWS takes (its limit is on the
    body as botocore writes it); one allocation more a record is refused before AWS."""
    low, high = 1, 400  # the most allocations a record that fit, and the fewest that do not
    assert _size(_large(low)) < validation.BATCH_BYTES_MAX <= _size(_large(high))
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if _size(_large(mid)) < validation.BATCH_BYTES_MAX else (low, mid)
    fits, over = _large(low), _large(high)
    assert over.ByteSize() < 1024 * 1024  # gRPC's own limit is not what refuses it
    reply = stub.BatchMeterUsage(fits, timeout=30)
    assert statuses(reply) == [S.STATUS_SUCCESS] * 25 and subscribed.calls == 1
    d = batch_error(stub, over, timeout=30)
    assert (d.code, d.info.reason, d.fields) == (C.INVALID_ARGUMENT, "INVALID_REQUEST", ["usage_records"])
    assert "1 MB" in d.violations[0][1] and subscribed.calls == 1


# -- AWS's refusals ------------------------------------------------------------------------------


def test_an_unknown_license_is_refused_by_aws(stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws) -> None:
    d = batch_error(stub, batch(record(), record(license_arn=UNKNOWN_LICENSE)))
    assert (d.code, d.info.reason, d.info.domain) == (C.INVALID_ARGUMENT, "INVALID_LICENSE", AWS)
    assert d.info.metadata["awsErrorCode"] == "InvalidLicenseException" and d.info.metadata["awsRequestId"]
    assert d.retry is None and subscribed.calls == 1 and subscribed.saas_records() == []  # nothing of the call kept


@pytest.mark.parametrize(("operation", "aws_code", "message", "code", "reason"), SAAS_CONTRACT_ROWS)
def test_every_saas_error_row_end_to_end(
    stub: pb_grpc.MeteringServiceStub,
    subscribed: LocalAws,
    operation: str,
    aws_code: str,
    message: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    subscribed.inject(aws_code, count=10, message=message, operation=operation)
    if operation == "BatchMeterUsage":
        d = batch_error(stub, batch(record()))
    else:
        d = resolve_error(stub, "a-token-the-fault-answers")
    assert (d.code, d.info.reason, d.info.domain) == (code, reason, AWS)
    assert d.info.metadata["awsErrorCode"] == aws_code and d.info.metadata["awsRequestId"]
    assert d.message == message
    retryable = code in (C.RESOURCE_EXHAUSTED, C.UNAVAILABLE)
    assert (d.retry is not None) is retryable
    assert subscribed.calls == (4 if retryable else 1)  # the default aws_max_attempts


# -- ResolveCustomer ---------------------------------------------------------------------------


def test_resolve_customer_returns_all_four_fields_and_they_meter(
    stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws
) -> None:
    token = local_aws.issue_token(
        product_code=PRODUCT, customer_aws_account_id=ACCOUNT, license_arn=LICENSE, customer_identifier=LEGACY_CUSTOMER
    )
    customer = stub.ResolveCustomer(pb.ResolveCustomerRequest(registration_token=token), timeout=10)
    assert customer == pb.ResolveCustomerResponse(
        customer_identifier=LEGACY_CUSTOMER, product_code=PRODUCT, customer_aws_account_id=ACCOUNT, license_arn=LICENSE
    )
    again = stub.ResolveCustomer(pb.ResolveCustomerRequest(registration_token=token), timeout=10)
    assert again == customer  # as often as asked, until it expires
    reply = stub.BatchMeterUsage(
        batch(record(account=customer.customer_aws_account_id, license_arn=customer.license_arn)), timeout=10
    )
    assert statuses(reply) == [S.STATUS_SUCCESS]


def test_a_new_integration_has_no_customer_identifier(stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws) -> None:
    token = local_aws.issue_token(product_code=PRODUCT, customer_aws_account_id=ACCOUNT, license_arn=LICENSE)
    customer = stub.ResolveCustomer(pb.ResolveCustomerRequest(registration_token=token), timeout=10)
    assert (customer.customer_identifier, customer.customer_aws_account_id, customer.license_arn) == (
        "",
        ACCOUNT,
        LICENSE,
    )


def test_an_unknown_token_is_invalid(stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws) -> None:
    d = resolve_error(stub, "not-a-token-aws-issued")
    assert (d.code, d.info.reason, d.info.domain) == (C.INVALID_ARGUMENT, "INVALID_TOKEN", AWS)
    assert d.info.metadata["awsErrorCode"] == "InvalidTokenException" and local_aws.calls == 1


def test_an_expired_token_is_the_buyers_not_the_gateways_credentials(
    stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws, clock: Clock
) -> None:
    token = local_aws.issue_token(product_code=PRODUCT, customer_aws_account_id=ACCOUNT, license_arn=LICENSE, ttl=60)
    assert stub.ResolveCustomer(pb.ResolveCustomerRequest(registration_token=token), timeout=10).license_arn
    clock.advance(61)
    d = resolve_error(stub, token)
    # INVALID_ARGUMENT, never FAILED_PRECONDITION EXPIRED_TOKEN: no operator can fix a buyer's old token.
    assert (d.code, d.info.reason, d.info.domain) == (C.INVALID_ARGUMENT, "EXPIRED_REGISTRATION_TOKEN", AWS)
    assert d.info.metadata["awsErrorCode"] == "ExpiredTokenException" and d.retry is None
    assert local_aws.calls == 2


def test_an_empty_token_is_refused_before_aws(stub: pb_grpc.MeteringServiceStub, local_aws: LocalAws) -> None:
    d = resolve_error(stub, "")
    assert (d.code, d.info.reason, d.info.domain, d.fields) == (
        C.INVALID_ARGUMENT,
        "INVALID_REQUEST",
        GATEWAY,
        ["registration_token"],
    )
    assert local_aws.calls == 0


# -- unprocessed records, and answers lost after AWS recorded --------------------------------------


def test_unprocessed_records_are_resent_identically_within_the_call(
    stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws, seen: list[dict[str, Any]]
) -> None:
    subscribed.inject(UNPROCESSED, count=1)
    req = batch(*(record(dimension=f"dim-{i}", quantity=f"{i}.5") for i in range(4)))
    reply = stub.BatchMeterUsage(req, timeout=10)
    assert statuses(reply) == [S.STATUS_SUCCESS] * 4 and list(reply.unprocessed_records) == []
    assert [r.usage_record for r in reply.results] == list(req.usage_records)
    assert len(seen) == 2 and seen[1]["UsageRecords"] == seen[0]["UsageRecords"][2:]  # the last half, as it was
    assert sorted(r.metering_record_id for r in subscribed.saas_records()) == sorted(
        r.metering_record_id for r in reply.results
    )


def test_unprocessed_records_aws_kept_anyway_come_back_with_the_kept_ids(
    stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws
) -> None:
    subscribed.inject(UNPROCESSED, count=1, record=True)
    reply = stub.BatchMeterUsage(batch(*(record(dimension=f"dim-{i}") for i in range(4))), timeout=10)
    assert statuses(reply) == [S.STATUS_SUCCESS] * 4 and subscribed.calls == 2
    kept = subscribed.saas_records()
    assert len(kept) == 4
    assert sorted(r.metering_record_id for r in reply.results) == sorted(r.metering_record_id for r in kept)


def test_records_still_unprocessed_at_the_deadline_are_handed_back(subscribed: LocalAws, clock: Clock) -> None:
    subscribed.inject(UNPROCESSED, count=10_000)
    req = batch(*(record(dimension=f"dim-{i}") for i in range(4)))
    with (
        running_gateway(subscribed.endpoint_url, clock=clock, aws_backoff_base=0.05, aws_backoff_max=0.1) as target,
        grpc.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.MeteringServiceStub(channel)
        started = time.monotonic()
        reply = stub.BatchMeterUsage(req, timeout=1.5)  # OK, within the deadline
        took = time.monotonic() - started
        # 4 → 2 → 1 → 1 → ...: the last record never gets through while the fault lasts.
        assert [r.usage_record for r in reply.results] == list(req.usage_records[:3])
        assert statuses(reply) == [S.STATUS_SUCCESS] * 3
        assert list(reply.unprocessed_records) == [req.usage_records[3]]
        assert took < 1.5 and subscribed.calls >= 4
        subscribed.clear_faults()
        resent = stub.BatchMeterUsage(batch(*reply.unprocessed_records), timeout=10)
    assert statuses(resent) == [S.STATUS_SUCCESS] and len(subscribed.saas_records()) == 4


@pytest.mark.parametrize(
    ("error", "status"), [("InternalServiceErrorException", None), ("", 502), (DROP, None)], ids=["500", "502", "drop"]
)
def test_an_answer_lost_after_aws_recorded_bills_once(
    stub: pb_grpc.MeteringServiceStub, subscribed: LocalAws, error: str, status: int | None
) -> None:
    subscribed.inject(error, count=1, status=status, record=True, operation="BatchMeterUsage")
    reply = stub.BatchMeterUsage(batch(record(quantity="7"), record(dimension="storage-gb", quantity="2")), timeout=10)
    assert statuses(reply) == [S.STATUS_SUCCESS] * 2 and subscribed.calls == 2  # the gateway's one retry
    kept = subscribed.saas_records()
    assert sorted(r.metering_record_id for r in reply.results) == sorted(r.metering_record_id for r in kept)
    assert [(u["Dimension"], u["Quantity"]) for u in subscribed.saas_usage()] == [
        ("requests", "7"),
        ("storage-gb", "2"),
    ]
