"""The local backend's SaaS operations (gateway/local_aws/saas.py): BatchMeterUsage and
ResolveCustomer in the Concurrent Agreements model, their control API, their faults.

Everything goes through a real boto3 client over HTTP (or raw HTTP where the bytes
matter). The time is the ``clock`` fixture's (tests/conftest.py), never the wall
clock: the tests that need another instant set it.
"""

from __future__ import annotations

import functools
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import botocore.session
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

from gateway.local_aws import (
    CUSTOMER_NOT_SUBSCRIBED,
    DROP,
    DUPLICATE_RECORD,
    SLOW,
    SUCCESS,
    UNPROCESSED,
    LocalAws,
    Saas,
)
from gateway.local_aws.faults import make_fault
from support import Clock, local_session

PRODUCT = "prod-saas1"
OTHER_PRODUCT = "prod-saas2"
ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef0"
OTHER_LICENSE = "arn:aws:license-manager::123456789012:license:l-0fedcba987654321f"
UNKNOWN_LICENSE = "arn:aws:license-manager::123456789012:license:l-00000000000000000"
CUSTOMER = "cust-legacy-1"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
PRODUCTS = {PRODUCT: ["requests", "storage"], OTHER_PRODUCT: ["requests"]}


# --- fixtures and helpers -------------------------------------------------------


@pytest.fixture
def aws(clock: Clock) -> Iterator[LocalAws]:
    """A backend on the test's clock, one account subscribed under LICENSE and one legacy customer."""
    with LocalAws(quiet=True, clock=clock) as backend:
        backend.subscribe(customer_aws_account_id=ACCOUNT, license_arn=LICENSE, product_code=PRODUCT)
        backend.subscribe_legacy(customer_identifier=CUSTOMER, product_code=PRODUCT, customer_aws_account_id=ACCOUNT)
        yield backend


@pytest.fixture
def products_aws(clock: Clock) -> Iterator[LocalAws]:
    """The same, with products and their dimensions configured."""
    with LocalAws(quiet=True, clock=clock, products=PRODUCTS) as backend:
        backend.subscribe(customer_aws_account_id=ACCOUNT, license_arn=LICENSE, product_code=PRODUCT)
        backend.subscribe_legacy(customer_identifier=CUSTOMER, product_code=PRODUCT)
        yield backend


@functools.cache
def session() -> Any:
    return local_session()


def client(aws: LocalAws, read_timeout: float = 5, **config: Any) -> Any:
    conf = Config(read_timeout=read_timeout, connect_timeout=2, retries={"total_max_attempts": 1}, **config)
    return session().client("meteringmarketplace", endpoint_url=aws.endpoint_url, config=conf)


def lax(aws: LocalAws) -> Any:
    """A client that lets what botocore would refuse reach the backend."""
    return client(aws, parameter_validation=False)


def now_of(clock: Clock) -> datetime:
    return clock.datetime()


def record(clock: Clock, **fields: Any) -> dict[str, Any]:
    """A license record, a minute before the clock, 3 units; fields overridden, None drops one."""
    out: dict[str, Any] = {
        "Timestamp": now_of(clock) - timedelta(minutes=1),
        "Dimension": "requests",
        "Quantity": 3,
        "CustomerAWSAccountId": ACCOUNT,
        "LicenseArn": LICENSE,
    }
    out.update(fields)
    return {k: v for k, v in out.items() if v is not None}


def legacy(clock: Clock, **fields: Any) -> dict[str, Any]:
    """A legacy record (CustomerIdentifier; the request names the product)."""
    return record(clock, **{"CustomerIdentifier": CUSTOMER, "CustomerAWSAccountId": None, "LicenseArn": None, **fields})


def batch(metering: Any, records: list[dict[str, Any]], **request: Any) -> Any:
    return metering.batch_meter_usage(UsageRecords=records, **request)


def statuses(reply: Any) -> list[str]:
    return [r["Status"] for r in reply["Results"]]


def ids(reply: Any) -> list[str | None]:
    return [r.get("MeteringRecordId") for r in reply["Results"]]


def code_of(call: Any, status: int = 400) -> tuple[str, str]:
    """(code, message) of the refusal a call ends in."""
    with pytest.raises(ClientError) as caught:
        call()
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    return str(caught.value.response["Error"]["Code"]), str(caught.value.response["Error"]["Message"])


def control(aws: LocalAws, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(aws.endpoint_url + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=5) as reply:
        return json.loads(reply.read())


def control_status(aws: LocalAws, method: str, path: str, body: Any) -> tuple[int, str]:
    """The status and message of a control call expected to be refused."""
    with pytest.raises(urllib.error.HTTPError) as caught:
        control(aws, method, path, body)
    return caught.value.code, json.loads(caught.value.read())["message"]


def raw_call(aws: LocalAws, operation: str, data: bytes) -> tuple[int, Any]:
    """One API call of exactly these bytes (signed in form only: the backend checks the header's shape)."""
    headers = {
        "X-Amz-Target": f"AWSMPMeteringService.{operation}",
        "Content-Type": "application/x-amz-json-1.1",
        "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDLOCALTEST/20261123/us-east-1/aws-marketplace/aws4_request, "
        "SignedHeaders=host, Signature=00",
    }
    req = urllib.request.Request(aws.endpoint_url + "/", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def model_statuses() -> set[str]:
    model = botocore.session.get_session().get_service_model("meteringmarketplace")
    return set(model.shape_for("UsageRecordResultStatus").enum)


# --- accepted calls -----------------------------------------------------------


def test_a_batch_succeeds_record_by_record_and_echoes_what_was_sent(aws: LocalAws, clock: Clock) -> None:
    sent = [
        record(clock),
        record(clock, Dimension="storage", Quantity=None, QuantityAsDecimal="2.5"),
        record(
            clock,
            Dimension="tagged",
            UsageAllocations=[{"AllocatedUsageQuantity": 3, "Tags": [{"Key": "team", "Value": "a"}]}],
        ),
    ]
    reply = batch(client(aws), sent)
    assert statuses(reply) == [SUCCESS] * 3 and set(statuses(reply)) <= model_statuses()
    assert all(UUID.fullmatch(i or "") for i in ids(reply)) and len(set(ids(reply))) == 3
    assert [r["UsageRecord"] for r in reply["Results"]] == sent  # as sent, in request order
    assert reply["UnprocessedRecords"] == []
    kept = aws.saas_records()
    assert [r.metering_record_id for r in kept] == ids(reply)
    assert [(r.product_code, r.license_arn, r.customer_aws_account_id, r.customer_identifier) for r in kept] == [
        (PRODUCT, LICENSE, ACCOUNT, "")
    ] * 3
    hour = (now_of(clock) - timedelta(minutes=1)).replace(minute=0, second=0, microsecond=0)
    assert {(u["Dimension"], u["Quantity"], u["Hour"]) for u in aws.saas_usage()} == {
        ("requests", "3", hour.isoformat()),
        ("storage", "2.5", hour.isoformat()),
        ("tagged", "3", hour.isoformat()),
    }


def test_the_answer_is_awss_json_as_botocores_model_has_it(aws: LocalAws, clock: Clock) -> None:
    stamp = int((now_of(clock) - timedelta(minutes=1)).timestamp())
    body = {
        "UsageRecords": [
            {
                "Timestamp": stamp,
                "Dimension": "requests",
                "Quantity": 3,
                "CustomerAWSAccountId": ACCOUNT,
                "LicenseArn": LICENSE,
            }
        ]
    }
    status, answer = raw_call(aws, "BatchMeterUsage", json.dumps(body).encode())
    assert status == 200 and set(answer) == {"Results", "UnprocessedRecords"}
    [result] = answer["Results"]
    assert result["UsageRecord"] == body["UsageRecords"][0]  # epoch seconds back, exactly as sent
    assert result["Status"] == SUCCESS and UUID.fullmatch(result["MeteringRecordId"])


def test_an_identical_resend_and_a_subset_get_the_same_ids(aws: LocalAws, clock: Clock) -> None:
    metering = client(aws)
    sent = [record(clock), record(clock, Dimension="storage")]
    first = batch(metering, sent)
    again = batch(metering, sent)
    assert statuses(again) == [SUCCESS, SUCCESS] and ids(again) == ids(first)
    subset = batch(metering, sent[1:])
    assert ids(subset) == ids(first)[1:]
    assert len(aws.saas_records()) == 2


def test_one_record_per_customer_dimension_and_hour_compared_by_value(aws: LocalAws, clock: Clock) -> None:
    metering = client(aws)
    now = now_of(clock)
    hour = now.replace(minute=0, second=0, microsecond=0)
    [first] = ids(batch(metering, [record(clock, Timestamp=hour, Quantity=17)]))
    same = [
        record(clock, Timestamp=hour + timedelta(seconds=1), Quantity=None, QuantityAsDecimal="17.000"),
        record(clock, Timestamp=now, Quantity=None, QuantityAsDecimal="17"),
    ]
    assert ids(batch(metering, same)) == [first, first]
    assert len(aws.saas_records()) == 1


def test_another_quantity_in_the_hour_is_a_duplicate_record_and_the_first_stays_billed(
    aws: LocalAws, clock: Clock
) -> None:
    metering = client(aws)
    [first] = ids(batch(metering, [record(clock)]))
    reply = batch(metering, [record(clock, Quantity=4), record(clock, Dimension="storage")])
    assert statuses(reply) == [DUPLICATE_RECORD, SUCCESS]
    assert "MeteringRecordId" not in reply["Results"][0] and reply["Results"][1]["MeteringRecordId"] != first
    allocated = [{"AllocatedUsageQuantity": 3, "Tags": [{"Key": "team", "Value": "a"}]}]
    assert statuses(batch(metering, [record(clock, UsageAllocations=allocated)])) == [DUPLICATE_RECORD]
    billed = {u["Dimension"]: u["Quantity"] for u in aws.saas_usage()}
    assert billed == {"requests": "3", "storage": "3"}


def test_within_one_call_the_first_record_of_an_hour_wins(aws: LocalAws, clock: Clock) -> None:
    reply = batch(client(aws), [record(clock), record(clock), record(clock, Quantity=5)])
    assert statuses(reply) == [SUCCESS, SUCCESS, DUPLICATE_RECORD]
    assert ids(reply)[0] == ids(reply)[1]
    assert [u["Quantity"] for u in aws.saas_usage()] == ["3"]


def test_customers_not_subscribed_are_not_honoured(aws: LocalAws, clock: Clock) -> None:
    aws.subscribe(customer_aws_account_id=OTHER_ACCOUNT, license_arn=OTHER_LICENSE, product_code=PRODUCT)
    reply = batch(
        client(aws),
        [
            record(clock, CustomerAWSAccountId="999999999999"),  # a license AWS knows, not this account's
            record(clock),
            record(clock, CustomerAWSAccountId=OTHER_ACCOUNT),  # another license of the product
            record(clock, LicenseArn=OTHER_LICENSE),  # this account has no subscription under it
        ],
    )
    assert statuses(reply) == [CUSTOMER_NOT_SUBSCRIBED, SUCCESS, CUSTOMER_NOT_SUBSCRIBED, CUSTOMER_NOT_SUBSCRIBED]
    assert ids(reply)[0] is None and ids(reply)[2] is None
    assert len(aws.saas_records()) == 1
    legacy_reply = batch(client(aws), [legacy(clock, CustomerIdentifier="nobody")], ProductCode=PRODUCT)
    assert statuses(legacy_reply) == [CUSTOMER_NOT_SUBSCRIBED]


def test_accounts_may_share_a_license_here(aws: LocalAws, clock: Clock) -> None:
    aws.subscribe(customer_aws_account_id=OTHER_ACCOUNT, license_arn=LICENSE, product_code=PRODUCT)
    reply = batch(client(aws), [record(clock), record(clock, CustomerAWSAccountId=OTHER_ACCOUNT)])
    assert statuses(reply) == [SUCCESS, SUCCESS] and ids(reply)[0] != ids(reply)[1]  # two customers, two records
    assert sorted(u["CustomerAWSAccountId"] for u in aws.saas_usage()) == [ACCOUNT, OTHER_ACCOUNT]


def test_an_unsubscribed_customer_is_no_longer_honoured_and_its_records_stay(aws: LocalAws, clock: Clock) -> None:
    metering = client(aws)
    assert statuses(batch(metering, [record(clock)])) == [SUCCESS]
    aws.unsubscribe(customer_aws_account_id=ACCOUNT, license_arn=LICENSE, product_code=PRODUCT)
    assert statuses(batch(metering, [record(clock, Dimension="storage")])) == [CUSTOMER_NOT_SUBSCRIBED]
    assert statuses(batch(metering, [record(clock)])) == [CUSTOMER_NOT_SUBSCRIBED]  # even the identical resend
    aws.unsubscribe(customer_identifier=CUSTOMER, product_code=PRODUCT)
    assert statuses(batch(metering, [legacy(clock)], ProductCode=PRODUCT)) == [CUSTOMER_NOT_SUBSCRIBED]
    assert len(aws.saas_records()) == 1 and [u["Quantity"] for u in aws.saas_usage()] == ["3"]
    with pytest.raises(ValueError, match="not subscribed"):
        aws.unsubscribe(customer_aws_account_id=ACCOUNT, license_arn=LICENSE, product_code=PRODUCT)


def test_the_legacy_identifier_with_the_requests_product_code(aws: LocalAws, clock: Clock) -> None:
    metering = client(aws)
    reply = batch(metering, [legacy(clock), legacy(clock, Dimension="storage")], ProductCode=PRODUCT)
    assert statuses(reply) == [SUCCESS, SUCCESS]
    assert ids(batch(metering, [legacy(clock)], ProductCode=PRODUCT)) == ids(reply)[:1]
    assert statuses(batch(metering, [legacy(clock, Quantity=9)], ProductCode=PRODUCT)) == [DUPLICATE_RECORD]
    # The same buyer by license in the same hour is another customer key: AWS bills both, as it warns.
    assert statuses(batch(metering, [record(clock)])) == [SUCCESS]
    hour = (now_of(clock) - timedelta(minutes=1)).replace(minute=0, second=0, microsecond=0).isoformat()
    assert aws.saas_usage() == [
        {
            "ProductCode": PRODUCT,
            "LicenseArn": "",
            "CustomerAWSAccountId": ACCOUNT,
            "CustomerIdentifier": CUSTOMER,
            "Dimension": "requests",
            "Hour": hour,
            "Quantity": "3",
        },
        {
            "ProductCode": PRODUCT,
            "LicenseArn": "",
            "CustomerAWSAccountId": ACCOUNT,
            "CustomerIdentifier": CUSTOMER,
            "Dimension": "storage",
            "Hour": hour,
            "Quantity": "3",
        },
        {
            "ProductCode": PRODUCT,
            "LicenseArn": LICENSE,
            "CustomerAWSAccountId": ACCOUNT,
            "CustomerIdentifier": "",
            "Dimension": "requests",
            "Hour": hour,
            "Quantity": "3",
        },
    ]


def test_a_license_records_product_is_the_licenses(aws: LocalAws, clock: Clock) -> None:
    aws.subscribe(customer_aws_account_id=ACCOUNT, license_arn=OTHER_LICENSE, product_code=OTHER_PRODUCT)
    assert statuses(batch(client(aws), [record(clock, LicenseArn=OTHER_LICENSE)])) == [SUCCESS]
    assert [u["ProductCode"] for u in aws.saas_usage()] == [OTHER_PRODUCT]


# --- whole-call refusals --------------------------------------------------------

BOTH_WAYS = {"CustomerIdentifier": CUSTOMER}
REFUSED = [
    # (name, records' changes, request, expected code, a piece of the message)
    ("both ways", [BOTH_WAYS], {}, "ValidationException", "both by CustomerIdentifier and by CustomerAWSAccountId"),
    (
        "no customer",
        [{"CustomerAWSAccountId": None, "LicenseArn": None}],
        {},
        "ValidationException",
        "names no customer",
    ),
    ("license alone", [{"CustomerAWSAccountId": None}], {}, "ValidationException", "names no customer"),
    ("account without license", [{"LicenseArn": None}], {}, "ValidationException", "LicenseArn is required"),
    (
        "license on a legacy record",
        [{"CustomerIdentifier": CUSTOMER, "CustomerAWSAccountId": None}],
        {"ProductCode": PRODUCT},
        "ValidationException",
        "LicenseArn must not be given with CustomerIdentifier",
    ),
    ("product code with licenses", [{}], {"ProductCode": PRODUCT}, "ValidationException", "ProductCode must not be"),
    ("empty product code with licenses", [{}], {"ProductCode": ""}, "ValidationException", "ProductCode must not be"),
    (
        "legacy without product code",
        [{"CustomerIdentifier": CUSTOMER, "CustomerAWSAccountId": None, "LicenseArn": None}],
        {},
        "ValidationException",
        "ProductCode is required",
    ),
    (
        "both quantities",
        [{"QuantityAsDecimal": "3"}],
        {},
        "ValidationException",
        "QuantityAsDecimal must not be given together with Quantity",
    ),
    ("no records", [], {}, "ValidationException", "at least one record"),
    ("account not digits", [{"CustomerAWSAccountId": "12a"}], {}, "ValidationException", "CustomerAWSAccountId"),
    ("malformed license", [{"LicenseArn": "license-1"}], {}, "InvalidLicenseException", "LicenseArn must match"),
    ("empty dimension", [{"Dimension": ""}], {}, "InvalidUsageDimensionException", "Dimension"),
    ("negative quantity", [{"Quantity": -1}], {}, "ValidationException", "Quantity"),
    (
        "seven decimal places",
        [{"Quantity": None, "QuantityAsDecimal": "1.1234567"}],
        {},
        "ValidationException",
        "QuantityAsDecimal",
    ),
    (
        "identifier too long",
        [{"CustomerIdentifier": "c" * 256, "CustomerAWSAccountId": None, "LicenseArn": None}],
        {"ProductCode": PRODUCT},
        "InvalidCustomerIdentifierException",
        "CustomerIdentifier must be at most 255",
    ),
    (
        "legacy product code bad pattern",
        [{"CustomerIdentifier": CUSTOMER, "CustomerAWSAccountId": None, "LicenseArn": None}],
        {"ProductCode": "no spaces"},
        "InvalidProductCodeException",
        "ProductCode must match",
    ),
    (
        "allocations not summing",
        [{"UsageAllocations": [{"AllocatedUsageQuantity": 2, "Tags": [{"Key": "k", "Value": "v"}]}]}],
        {},
        "InvalidUsageAllocationsException",
        "not to the record's quantity 3",
    ),
    (
        "allocations of the other kind",
        [{"Quantity": None, "QuantityAsDecimal": "3", "UsageAllocations": [{"AllocatedUsageQuantity": 3}]}],
        {},
        "InvalidUsageAllocationsException",
        "AllocatedUsageQuantityAsDecimal, the same kind as the record's",
    ),
    (
        "bad tag",
        [{"UsageAllocations": [{"AllocatedUsageQuantity": 3, "Tags": [{"Key": "k", "Value": "a~b"}]}]}],
        {},
        "InvalidTagException",
        "UsageRecords[1].UsageAllocations[0].Tags[0].Value",
    ),
]


@pytest.mark.parametrize(
    ("name", "changes", "request_fields", "code", "says"), [pytest.param(*c, id=c[0]) for c in REFUSED]
)
def test_a_call_breaking_a_rule_is_refused_whole(
    aws: LocalAws,
    clock: Clock,
    name: str,
    changes: list[dict[str, Any]],
    request_fields: dict[str, Any],
    code: str,
    says: str,
) -> None:
    records = [record(clock, Dimension="fine")] + [record(clock, **c) for c in changes] if changes else []
    answered, message = code_of(lambda: batch(lax(aws), records, **request_fields))
    assert (answered, says in message) == (code, True), message
    assert aws.saas_records() == []  # the good record too: nothing of a refused call is kept


def test_records_mixing_the_two_ways_are_refused(aws: LocalAws, clock: Clock) -> None:
    code, message = code_of(lambda: batch(lax(aws), [legacy(clock), record(clock)], ProductCode=PRODUCT))
    assert code == "ValidationException" and "mix CustomerIdentifier records" in message
    code, message = code_of(lambda: batch(lax(aws), [legacy(clock), record(clock)]))
    assert code == "ValidationException" and "mix CustomerIdentifier records" in message
    assert aws.saas_records() == []


def test_the_model_takes_25_records_a_call(aws: LocalAws, clock: Clock) -> None:
    many = [record(clock, Dimension=f"d{i}") for i in range(26)]
    assert statuses(batch(client(aws), many[:25])) == [SUCCESS] * 25
    aws.reset()
    code, message = code_of(lambda: batch(lax(aws), many))
    assert code == "ValidationException" and "UsageRecords must be at most 25 items, got 26" in message
    assert aws.saas_records() == []


def padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` as JSON, padded with whitespace to exactly ``size`` bytes."""
    data = json.dumps(body).encode()
    assert len(data) <= size
    return data + b" " * (size - len(data))


def test_a_body_of_1_mb_or_more_is_refused(aws: LocalAws, clock: Clock) -> None:
    stamp = (now_of(clock) - timedelta(minutes=1)).timestamp()
    one = {
        "Timestamp": stamp,
        "Dimension": "requests",
        "Quantity": 3,
        "CustomerAWSAccountId": ACCOUNT,
        "LicenseArn": LICENSE,
    }
    status, answer = raw_call(aws, "BatchMeterUsage", padded({"UsageRecords": [one]}, 1_000_000))
    assert status == 400 and answer["__type"] == "ValidationException" and "less than 1 MB" in answer["message"]
    assert aws.saas_records() == []
    status, answer = raw_call(aws, "BatchMeterUsage", padded({"UsageRecords": [one]}, 999_999))
    assert status == 200 and [r["Status"] for r in answer["Results"]] == [SUCCESS]


def test_a_large_batch_through_boto3_is_refused_for_its_size(aws: LocalAws, clock: Clock) -> None:
    allocations = [
        {"AllocatedUsageQuantity": 0, "Tags": [{"Key": f"key-{j}", "Value": f"{i}-" + "v" * 200} for j in range(3)]}
        for i in range(2500)
    ]
    big = [record(clock, Quantity=0, UsageAllocations=allocations)]
    code, message = code_of(lambda: batch(client(aws), big))
    assert code == "ValidationException" and "1 MB" in message and aws.saas_records() == []


# --- time: the 24-hour window, the future skew, the month-end cutoff ------------


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (timedelta(hours=24) - timedelta(seconds=1), SUCCESS),
        (timedelta(hours=24), SUCCESS),  # "up to 24 hours in the past"
        (timedelta(hours=24, seconds=1), "TimestampOutOfBoundsException"),
        (-timedelta(minutes=5), SUCCESS),
        (-timedelta(minutes=5, seconds=1), "TimestampOutOfBoundsException"),
    ],
    ids=["24h-1s", "24h", "24h+1s", "5min-ahead", "5min1s-ahead"],
)
def test_the_24_hour_window_and_the_future_skew(aws: LocalAws, clock: Clock, age: timedelta, expected: str) -> None:
    records = [record(clock, Dimension="fine"), record(clock, Timestamp=now_of(clock) - age)]
    if expected == SUCCESS:
        assert statuses(batch(client(aws), records)) == [SUCCESS, SUCCESS]
    else:
        code, message = code_of(lambda: batch(client(aws), records))
        assert code == expected and "UsageRecords[1].Timestamp" in message
        assert aws.saas_records() == []  # one record out of bounds: none of the batch is processed


MARCH_31_LATE = datetime(2026, 3, 31, 23, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 4, 1, 5, 0, tzinfo=UTC), SUCCESS),
        (datetime(2026, 4, 1, 5, 59, 59, tzinfo=UTC), SUCCESS),
        (datetime(2026, 4, 1, 6, 0, tzinfo=UTC), "TimestampOutOfBoundsException"),
        (datetime(2026, 4, 1, 7, 30, tzinfo=UTC), "TimestampOutOfBoundsException"),
    ],
    ids=["05:00", "05:59:59", "06:00", "07:30"],
)
def test_the_month_end_cutoff_at_six_on_the_first(aws: LocalAws, clock: Clock, now: datetime, expected: str) -> None:
    clock.now = now.timestamp()
    march = [record(clock, Timestamp=MARCH_31_LATE)]  # within 24 hours at every one of these instants
    if expected == SUCCESS:
        assert statuses(batch(client(aws), march)) == [SUCCESS]
    else:
        code, message = code_of(lambda: batch(client(aws), march))
        assert code == expected and "06:00 UTC on the 1st" in message and aws.saas_records() == []
        assert statuses(batch(client(aws), [record(clock, Timestamp=datetime(2026, 4, 1, 0, 30, tzinfo=UTC))])) == [
            SUCCESS
        ]  # April's usage is taken


def test_the_month_end_cutoff_holds_across_a_year(aws: LocalAws, clock: Clock) -> None:
    clock.now = datetime(2027, 1, 1, 6, 0, tzinfo=UTC).timestamp()
    code, _ = code_of(lambda: batch(client(aws), [record(clock, Timestamp=datetime(2026, 12, 31, 22, tzinfo=UTC))]))
    assert code == "TimestampOutOfBoundsException"


# --- licenses and products ------------------------------------------------------


def test_a_license_aws_never_issued_is_invalid(aws: LocalAws, clock: Clock) -> None:
    code, message = code_of(lambda: batch(client(aws), [record(clock), record(clock, LicenseArn=UNKNOWN_LICENSE)]))
    assert code == "InvalidLicenseException" and UNKNOWN_LICENSE in message and aws.saas_records() == []


def test_licenses_of_two_products_in_one_call_are_invalid(aws: LocalAws, clock: Clock) -> None:
    aws.subscribe(customer_aws_account_id=ACCOUNT, license_arn=OTHER_LICENSE, product_code=OTHER_PRODUCT)
    code, message = code_of(lambda: batch(client(aws), [record(clock), record(clock, LicenseArn=OTHER_LICENSE)]))
    assert code == "InvalidLicenseException" and "more than one product" in message and aws.saas_records() == []


def test_a_license_belongs_to_one_product() -> None:
    saas = Saas()
    saas.subscribe(customer_aws_account_id=ACCOUNT, license_arn=LICENSE, product_code=PRODUCT)
    with pytest.raises(ValueError, match="is a license of prod-saas1"):
        saas.subscribe(customer_aws_account_id=OTHER_ACCOUNT, license_arn=LICENSE, product_code=OTHER_PRODUCT)


def test_with_products_a_dimension_the_product_lacks_is_refused(products_aws: LocalAws, clock: Clock) -> None:
    metering = client(products_aws)
    code, message = code_of(lambda: batch(metering, [record(clock), record(clock, Dimension="gpus")]))
    assert code == "InvalidUsageDimensionException" and "UsageRecords[1].Dimension" in message
    code, _ = code_of(lambda: batch(metering, [legacy(clock, Dimension="gpus")], ProductCode=PRODUCT))
    assert code == "InvalidUsageDimensionException"
    assert statuses(batch(metering, [record(clock), record(clock, Dimension="storage")])) == [SUCCESS, SUCCESS]


def test_with_products_an_unknown_product_code_is_refused(products_aws: LocalAws, clock: Clock) -> None:
    metering = lax(products_aws)
    for product in ("prod-unknown", ""):
        code, _ = code_of(lambda p=product: batch(metering, [legacy(clock)], ProductCode=p))
        assert code == "InvalidProductCodeException", product
    assert products_aws.saas_records() == []
    with pytest.raises(ValueError, match="not one of the configured products"):
        products_aws.subscribe(customer_aws_account_id=ACCOUNT, license_arn=OTHER_LICENSE, product_code="prod-unknown")


def test_the_rate_limit_is_shared_with_the_other_operations(clock: Clock) -> None:
    with LocalAws(quiet=True, clock=clock, max_rps=0.001) as limited:  # one call, then none for 1000 s
        limited.subscribe(customer_aws_account_id=ACCOUNT, license_arn=LICENSE, product_code=PRODUCT)
        token = limited.issue_token(product_code=PRODUCT, customer_aws_account_id=ACCOUNT, license_arn=LICENSE)
        metering = client(limited)
        now = now_of(clock)
        metering.meter_usage(ProductCode=PRODUCT, UsageDimension="requests", Timestamp=now, UsageQuantity=1)
        assert code_of(lambda: batch(metering, [record(clock)]))[0] == "ThrottlingException"
        assert code_of(lambda: metering.resolve_customer(RegistrationToken=token))[0] == "ThrottlingException"
        assert limited.saas_records() == []


# --- ResolveCustomer ----------------------------------------------------------------


def test_a_token_resolves_to_its_customer_until_it_expires(aws: LocalAws, clock: Clock) -> None:
    token = aws.issue_token(
        product_code=OTHER_PRODUCT, customer_aws_account_id=OTHER_ACCOUNT, license_arn=OTHER_LICENSE, ttl=60
    )
    metering = client(aws)
    answer = metering.resolve_customer(RegistrationToken=token)
    assert {k: v for k, v in answer.items() if k != "ResponseMetadata"} == {
        "ProductCode": OTHER_PRODUCT,
        "CustomerAWSAccountId": OTHER_ACCOUNT,
        "LicenseArn": OTHER_LICENSE,
    }  # no CustomerIdentifier: a new integration
    clock.advance(59)
    assert metering.resolve_customer(RegistrationToken=token)["LicenseArn"] == OTHER_LICENSE  # again, still valid
    clock.advance(1)
    code, _ = code_of(lambda: metering.resolve_customer(RegistrationToken=token))
    assert code == "ExpiredTokenException"


def test_a_token_with_an_identifier_resolves_to_all_four(aws: LocalAws, clock: Clock) -> None:
    token = aws.issue_token(
        product_code=PRODUCT, customer_aws_account_id=OTHER_ACCOUNT, license_arn=LICENSE, customer_identifier="cust-9"
    )
    answer = client(aws).resolve_customer(RegistrationToken=token)
    assert (
        answer["CustomerIdentifier"],
        answer["ProductCode"],
        answer["CustomerAWSAccountId"],
        answer["LicenseArn"],
    ) == (
        "cust-9",
        PRODUCT,
        OTHER_ACCOUNT,
        LICENSE,
    )


def test_a_buyer_with_a_token_has_subscribed(aws: LocalAws, clock: Clock) -> None:
    metering = client(aws)
    token = aws.issue_token(product_code=PRODUCT, customer_aws_account_id=OTHER_ACCOUNT, license_arn=OTHER_LICENSE)
    who = metering.resolve_customer(RegistrationToken=token)
    reply = batch(
        metering,
        [record(clock, CustomerAWSAccountId=who["CustomerAWSAccountId"], LicenseArn=who["LicenseArn"])],
    )
    assert statuses(reply) == [SUCCESS]
    legacy_token = aws.issue_token(product_code=PRODUCT, customer_identifier="cust-new")
    assert metering.resolve_customer(RegistrationToken=legacy_token)["CustomerIdentifier"] == "cust-new"
    reply = batch(metering, [legacy(clock, CustomerIdentifier="cust-new")], ProductCode=PRODUCT)
    assert statuses(reply) == [SUCCESS]


def test_unknown_and_empty_tokens_are_refused(aws: LocalAws) -> None:
    metering = client(aws)
    assert code_of(lambda: metering.resolve_customer(RegistrationToken="never-issued"))[0] == "InvalidTokenException"
    assert code_of(lambda: metering.resolve_customer(RegistrationToken=""))[0] == "ValidationException"


def test_bad_tokens_cannot_be_issued(aws: LocalAws) -> None:
    for bad in (
        {"product_code": PRODUCT},  # names no customer
        {"product_code": PRODUCT, "license_arn": OTHER_LICENSE},  # a license without its account
        {"product_code": PRODUCT, "customer_identifier": "c", "ttl": 0},
        {"product_code": "", "customer_identifier": "c"},
    ):
        with pytest.raises(ValueError):
            aws.issue_token(**bad)


# --- the control API over HTTP ----------------------------------------------------


def test_subscriptions_over_http(aws: LocalAws, clock: Clock) -> None:
    aws.reset()
    license_sub = {"customer_aws_account_id": OTHER_ACCOUNT, "license_arn": OTHER_LICENSE, "product_code": PRODUCT}
    legacy_sub = {"customer_identifier": "cust-http", "product_code": PRODUCT, "customer_aws_account_id": ACCOUNT}
    assert control(aws, "POST", "/_local/subscriptions", license_sub) == {"ok": True}
    assert control(aws, "POST", "/_local/subscriptions", legacy_sub) == {"ok": True}
    assert control(aws, "GET", "/_local/subscriptions") == [license_sub, legacy_sub]
    metering = client(aws)
    assert statuses(batch(metering, [record(clock, CustomerAWSAccountId=OTHER_ACCOUNT, LicenseArn=OTHER_LICENSE)])) == [
        SUCCESS
    ]
    assert statuses(batch(metering, [legacy(clock, CustomerIdentifier="cust-http")], ProductCode=PRODUCT)) == [SUCCESS]
    for listed in control(aws, "GET", "/_local/subscriptions"):  # a listed subscription is deleted as it is
        assert control(aws, "DELETE", "/_local/subscriptions", listed) == {"ok": True}
    assert control(aws, "GET", "/_local/subscriptions") == []
    again = batch(metering, [record(clock, CustomerAWSAccountId=OTHER_ACCOUNT, LicenseArn=OTHER_LICENSE)])
    assert statuses(again) == [CUSTOMER_NOT_SUBSCRIBED]  # the license stays AWS's: not an InvalidLicense
    assert len(aws.saas_records()) == 2


def test_control_bodies_are_checked(aws: LocalAws) -> None:
    for method, path, body, says in (
        ("POST", "/_local/subscriptions", {"customer_aws_account_id": ACCOUNT, "license_arn": LICENSE}, "product_code"),
        (
            "POST",
            "/_local/subscriptions",
            {"customer_aws_account_id": ACCOUNT, "license_arn": "l-1", "product_code": PRODUCT},
            "license_arn",
        ),
        (
            "POST",
            "/_local/subscriptions",
            {"customer_aws_account_id": ACCOUNT, "license_arn": LICENSE, "product_code": OTHER_PRODUCT},
            "is a license of",
        ),
        (
            "POST",
            "/_local/subscriptions",
            {"customer_identifier": "c", "product_code": PRODUCT, "colour": 1},
            "unknown fields",
        ),
        ("POST", "/_local/subscriptions", ["not", "an", "object"], "JSON object"),
        (
            "DELETE",
            "/_local/subscriptions",
            {"customer_identifier": "nobody", "product_code": PRODUCT},
            "not subscribed",
        ),
        ("POST", "/_local/tokens", {"product_code": PRODUCT, "customer_identifier": "c", "ttl": -1}, "ttl"),
        ("POST", "/_local/tokens", {"product_code": PRODUCT}, "needs"),
    ):
        status, message = control_status(aws, method, path, body)
        assert status == 400 and says in message, (body, message)


def test_tokens_usage_and_records_over_http(aws: LocalAws, clock: Clock) -> None:
    issued = control(
        aws,
        "POST",
        "/_local/tokens",
        {"product_code": PRODUCT, "customer_aws_account_id": OTHER_ACCOUNT, "license_arn": LICENSE, "ttl": 5},
    )
    metering = client(aws)
    assert metering.resolve_customer(RegistrationToken=issued["registration_token"])["CustomerAWSAccountId"] == (
        OTHER_ACCOUNT
    )
    reply = batch(
        metering, [record(clock, CustomerAWSAccountId=OTHER_ACCOUNT, Quantity=None, QuantityAsDecimal="1.50")]
    )
    [kept] = control(aws, "GET", "/_local/saas-records")
    assert (kept["MeteringRecordId"], kept["Quantity"], kept["CustomerAWSAccountId"]) == (
        ids(reply)[0],
        "1.50",
        OTHER_ACCOUNT,
    )
    assert control(aws, "GET", "/_local/saas-usage") == aws.saas_usage()
    [usage] = aws.saas_usage()
    assert set(usage) == {
        "ProductCode",
        "LicenseArn",
        "CustomerAWSAccountId",
        "CustomerIdentifier",
        "Dimension",
        "Hour",
        "Quantity",
    }
    assert Decimal(usage["Quantity"]) == Decimal("1.5")
    clock.advance(5)
    code, _ = code_of(lambda: metering.resolve_customer(RegistrationToken=issued["registration_token"]))
    assert code == "ExpiredTokenException"


def test_reset_forgets_records_subscriptions_and_tokens(aws: LocalAws, clock: Clock) -> None:
    metering = client(aws)
    token = aws.issue_token(product_code=PRODUCT, customer_identifier="cust-t")
    batch(metering, [record(clock)])
    assert control(aws, "POST", "/_local/reset") == {"ok": True}
    assert aws.saas_records() == [] and aws.saas_usage() == [] and control(aws, "GET", "/_local/subscriptions") == []
    assert code_of(lambda: metering.resolve_customer(RegistrationToken=token))[0] == "InvalidTokenException"
    code, _ = code_of(lambda: batch(metering, [record(clock)]))
    assert code == "InvalidLicenseException"  # the license is forgotten too


# --- faults -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        pytest.param(
            {"error": "InternalServiceErrorException", "status": 500}, ("InternalServiceErrorException", 500), id="ise"
        ),
        pytest.param({"error": "ThrottlingException"}, ("ThrottlingException", 400), id="throttling"),
        pytest.param({"error": "", "status": 503}, ("503", 503), id="bare-503"),
        pytest.param({"error": DROP}, ConnectionClosedError, id="drop"),
    ],
)
def test_a_fault_before_the_call_records_nothing(
    aws: LocalAws, clock: Clock, fault: dict[str, Any], expected: Any
) -> None:
    fault = dict(fault)
    aws.inject(fault.pop("error"), operation="BatchMeterUsage", **fault)
    metering = client(aws)
    if isinstance(expected, tuple):
        assert code_of(lambda: batch(metering, [record(clock)]), expected[1])[0] == expected[0]
    else:
        with pytest.raises(expected):
            batch(metering, [record(clock)])
    assert aws.saas_records() == [] and not aws.faults
    assert statuses(batch(metering, [record(clock)])) == [SUCCESS]


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        pytest.param(
            {"error": "InternalServiceErrorException", "status": 500}, ("InternalServiceErrorException", 500), id="ise"
        ),
        pytest.param({"error": "", "status": 502}, ("502", 502), id="bare-502"),
        pytest.param({"error": DROP}, ConnectionClosedError, id="drop"),
        pytest.param({"error": SLOW, "delay": 1.0}, ReadTimeoutError, id="slow-past-read-timeout"),
    ],
)
def test_a_recording_fault_keeps_the_records_and_loses_the_answer(
    aws: LocalAws, clock: Clock, fault: dict[str, Any], expected: Any
) -> None:
    assert control(aws, "POST", "/_local/faults", {**fault, "record": True, "operation": "BatchMeterUsage"}) == {
        "ok": True
    }
    metering = client(aws, read_timeout=0.3)
    sent = [record(clock), record(clock, Dimension="storage")]
    if isinstance(expected, tuple):
        assert code_of(lambda: batch(metering, sent), expected[1])[0] == expected[0]
    else:
        with pytest.raises(expected):
            batch(metering, sent)
    kept = [r.metering_record_id for r in aws.saas_records()]
    assert len(kept) == 2 and not aws.faults
    again = batch(metering, sent)  # the caller that did not hear back resends the same records
    assert statuses(again) == [SUCCESS, SUCCESS] and ids(again) == kept


def test_a_recording_fault_answers_the_rules_refusal(aws: LocalAws, clock: Clock) -> None:
    aws.inject("InternalServiceErrorException", record=True, operation="BatchMeterUsage")
    code, _ = code_of(lambda: batch(client(aws), [record(clock, LicenseArn=UNKNOWN_LICENSE)]))
    assert code == "InvalidLicenseException" and aws.saas_records() == [] and not aws.faults


def test_unprocessed_hands_back_the_last_half_unkept(aws: LocalAws, clock: Clock) -> None:
    aws.inject(UNPROCESSED)
    metering = client(aws)
    sent = [record(clock, Dimension=f"d{i}") for i in range(5)]
    reply = batch(metering, sent)
    assert [r["UsageRecord"] for r in reply["Results"]] == sent[:2] and statuses(reply) == [SUCCESS, SUCCESS]
    assert reply["UnprocessedRecords"] == sent[2:]  # ceil(5/2) = 3, exactly as sent
    assert [r.dimension for r in aws.saas_records()] == ["d0", "d1"] and not aws.faults
    retried = batch(metering, reply["UnprocessedRecords"])  # what AWS says to do
    assert statuses(retried) == [SUCCESS] * 3 and retried["UnprocessedRecords"] == []
    assert len(aws.saas_records()) == 5


def test_unprocessed_with_record_kept_them_anyway(aws: LocalAws, clock: Clock) -> None:
    aws.inject(UNPROCESSED, record=True, operation="BatchMeterUsage")
    metering = client(aws)
    sent = [record(clock, Dimension=f"d{i}") for i in range(4)]
    reply = batch(metering, sent)
    assert len(reply["Results"]) == 2 and reply["UnprocessedRecords"] == sent[2:]
    kept = {r.dimension: r.metering_record_id for r in aws.saas_records()}
    assert sorted(kept) == ["d0", "d1", "d2", "d3"]  # a hostile AWS: the unprocessed half is billed
    again = batch(metering, reply["UnprocessedRecords"])
    assert statuses(again) == [SUCCESS, SUCCESS] and ids(again) == [kept["d2"], kept["d3"]]
    changed = batch(metering, [record(clock, Dimension="d3", Quantity=4)])
    assert statuses(changed) == [DUPLICATE_RECORD]  # only the identical resend settles them


def test_unprocessed_of_one_record_returns_no_results(aws: LocalAws, clock: Clock) -> None:
    aws.inject(UNPROCESSED)
    reply = batch(client(aws), [record(clock)])
    assert reply["Results"] == [] and reply["UnprocessedRecords"] == [record(clock)]
    assert aws.saas_records() == []


def test_unprocessed_waits_for_a_batch_call(aws: LocalAws, clock: Clock) -> None:
    aws.inject(UNPROCESSED)  # no operation named: it is BatchMeterUsage's all the same
    metering = client(aws)
    token = aws.issue_token(product_code=PRODUCT, customer_identifier="cust-u")
    metering.meter_usage(ProductCode=PRODUCT, UsageDimension="requests", Timestamp=now_of(clock), UsageQuantity=1)
    assert metering.resolve_customer(RegistrationToken=token)["CustomerIdentifier"] == "cust-u"
    assert [f.error for f in aws.faults] == [UNPROCESSED]
    assert len(batch(metering, [record(clock), record(clock, Dimension="x")])["UnprocessedRecords"]) == 1
    assert not aws.faults


def test_unprocessed_belongs_to_batch_meter_usage_only(aws: LocalAws) -> None:
    for operation in ("MeterUsage", "ResolveCustomer"):
        with pytest.raises(ValueError, match="BatchMeterUsage only"):
            aws.inject(UNPROCESSED, operation=operation)
        status, _ = control_status(aws, "POST", "/_local/faults", {"error": UNPROCESSED, "operation": operation})
        assert status == 400
    assert make_fault(UNPROCESSED, record=True).record  # status irrelevant: record=True is allowed
    assert control(aws, "POST", "/_local/faults", {"error": UNPROCESSED, "count": 2, "record": True}) == {"ok": True}
    [shown] = control(aws, "GET", "/_local/faults")
    assert (shown["error"], shown["remaining"], shown["record"]) == (UNPROCESSED, 2, True)


def test_faults_scoped_to_one_saas_operation_pass_the_others(aws: LocalAws, clock: Clock) -> None:
    metering = client(aws)
    token = aws.issue_token(product_code=PRODUCT, customer_identifier="cust-s")
    aws.inject("InternalServiceErrorException", operation="ResolveCustomer")
    assert statuses(batch(metering, [record(clock)])) == [SUCCESS]
    metering.meter_usage(ProductCode=PRODUCT, UsageDimension="requests", Timestamp=now_of(clock), UsageQuantity=1)
    assert len(aws.faults) == 1
    assert (
        code_of(lambda: metering.resolve_customer(RegistrationToken=token), 500)[0] == "InternalServiceErrorException"
    )
    aws.inject("ThrottlingException", operation="BatchMeterUsage")
    assert metering.resolve_customer(RegistrationToken=token)["ProductCode"] == PRODUCT
    assert code_of(lambda: batch(metering, [record(clock)]))[0] == "ThrottlingException"
    assert not aws.faults


def test_resolve_customer_under_a_recording_fault_still_resolves_later(aws: LocalAws) -> None:
    token = aws.issue_token(product_code=PRODUCT, customer_identifier="cust-r")
    aws.inject(DROP, record=True, operation="ResolveCustomer")
    metering = client(aws)
    with pytest.raises(ConnectionClosedError):
        metering.resolve_customer(RegistrationToken=token)
    assert (
        metering.resolve_customer(RegistrationToken=token)["CustomerIdentifier"] == "cust-r"
    )  # a token resolves again


def test_unscoped_error_faults_take_saas_calls_too(aws: LocalAws, clock: Clock) -> None:
    aws.inject("ThrottlingException", count=2)
    metering = client(aws)
    assert code_of(lambda: batch(metering, [record(clock)]))[0] == "ThrottlingException"
    assert code_of(lambda: metering.resolve_customer(RegistrationToken="x"))[0] == "ThrottlingException"
    assert not aws.faults and aws.saas_records() == []


# --- in process -------------------------------------------------------------------------


def test_the_bookkeeping_takes_boto3_params_in_process(clock: Clock) -> None:
    saas = Saas()
    saas.subscribe(customer_aws_account_id=ACCOUNT, license_arn=LICENSE, product_code=PRODUCT)
    now = now_of(clock)
    accepted = saas.accept({"UsageRecords": [record(clock)]}, now)
    [result] = [saas.meter(accepted, r) for r in accepted.records]
    assert result.status == SUCCESS and accepted.product_code == PRODUCT
    as_json = saas.accept(
        {
            "UsageRecords": [
                record(clock, Timestamp=record(clock)["Timestamp"].timestamp(), Quantity=None, QuantityAsDecimal="3.0")
            ]
        },
        now,
    )
    assert saas.meter(as_json, as_json.records[0]).metering_record_id == result.metering_record_id
