"""BatchMeterUsage's parameters (gateway/aws/params.py): what boto3 is given, how an echoed
record is matched to the one sent, and how large botocore will make the body."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import botocore.session
import pytest
from botocore.serialize import create_serializer
from botocore.validate import ParamValidator
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.aws import params
from marketplace.metering.v1 import metering_pb2 as pb
from support import allocation

WHEN = datetime(2026, 11, 23, 10, 2, 30, 123456, tzinfo=UTC)
ACCOUNT = "111122223333"
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef0"
OPERATION = botocore.session.get_session().get_service_model("meteringmarketplace").operation_model("BatchMeterUsage")


def rec(**fields: Any) -> pb.UsageRecord:
    when = fields.pop("when", WHEN)
    msg = pb.UsageRecord(**{"dimension": "requests", **fields})
    msg.timestamp.FromDatetime(when)
    return msg


def body_of(aws: params.BatchMeterUsageParams) -> bytes:
    """The body botocore sends for these parameters."""
    body: bytes = create_serializer("json").serialize_to_request(aws, OPERATION)["body"]
    return body


def test_a_license_record_goes_out_with_its_customer_and_no_product_code() -> None:
    req = pb.BatchMeterUsageRequest(
        usage_records=[
            rec(
                customer_aws_account_id=ACCOUNT,
                license_arn=LICENSE,
                quantity_as_decimal="2.50",
                usage_allocations=[allocation("2", team="a"), allocation("0.50")],
            )
        ]
    )
    assert params.batch_to_aws(req) == {
        "UsageRecords": [
            {
                "Timestamp": WHEN,
                "Dimension": "requests",
                "CustomerAWSAccountId": ACCOUNT,
                "LicenseArn": LICENSE,
                "QuantityAsDecimal": "2.50",  # as sent: AWS compares by value, the caller reads it back
                "UsageAllocations": [
                    {"AllocatedUsageQuantityAsDecimal": "2", "Tags": [{"Key": "team", "Value": "a"}]},
                    {"AllocatedUsageQuantityAsDecimal": "0.50"},
                ],
            }
        ]
    }


def test_a_legacy_record_goes_out_with_the_product_code() -> None:
    req = pb.BatchMeterUsageRequest(
        usage_records=[rec(customer_identifier="cust-1", quantity=3), rec(customer_identifier="cust-2")],
        product_code="prod-abc123",
    )
    aws = params.batch_to_aws(req)
    assert aws["ProductCode"] == "prod-abc123"
    assert aws["UsageRecords"] == [
        {"Timestamp": WHEN, "Dimension": "requests", "CustomerIdentifier": "cust-1", "Quantity": 3},
        {"Timestamp": WHEN, "Dimension": "requests", "CustomerIdentifier": "cust-2"},  # unset: AWS's 0
    ]
    assert aws["UsageRecords"][0]["Timestamp"].tzinfo is UTC


def test_what_goes_out_is_what_botocore_takes() -> None:
    """botocore's own parameter check, on both ways of naming a customer."""
    for req in (
        pb.BatchMeterUsageRequest(
            usage_records=[
                rec(customer_aws_account_id=ACCOUNT, license_arn=LICENSE, quantity_as_decimal="1.5"),
                rec(
                    customer_aws_account_id=ACCOUNT,
                    license_arn=LICENSE,
                    quantity=2,
                    usage_allocations=[allocation(2, team="a")],
                ),
            ]
        ),
        pb.BatchMeterUsageRequest(usage_records=[rec(customer_identifier="c")], product_code="prod-abc123"),
    ):
        report = ParamValidator().validate(params.batch_to_aws(req), OPERATION.input_shape)
        assert not report.has_errors(), report.generate_report()


def test_the_echo_of_a_record_is_matched_to_the_record_sent() -> None:
    [sent] = params.batch_to_aws(
        pb.BatchMeterUsageRequest(
            usage_records=[rec(customer_aws_account_id=ACCOUNT, license_arn=LICENSE, quantity_as_decimal="17")]
        )
    )["UsageRecords"]
    # botocore parses an echoed timestamp into an aware datetime in the local zone; AWS may
    # write the quantity another way. Same instant, same value: the same record.
    echoed = {
        **sent,
        "Timestamp": WHEN.astimezone(timezone(timedelta(hours=-7))),
        "QuantityAsDecimal": "17.000",
    }
    assert params.record_key(echoed) == params.record_key(sent)
    assert params.record_key({**sent, "Timestamp": WHEN.timestamp()}) == params.record_key(sent)  # epoch seconds
    whole = {k: v for k, v in sent.items() if k != "QuantityAsDecimal"} | {"Quantity": 17}
    assert params.record_key(whole) == params.record_key(sent)


@pytest.mark.parametrize(
    "change",
    [
        {"CustomerAWSAccountId": "444455556666"},
        {"LicenseArn": LICENSE + "1"},
        {"Dimension": "storage-gb"},
        {"Timestamp": WHEN + timedelta(microseconds=1)},
        {"QuantityAsDecimal": "17.000001"},
    ],
)
def test_records_that_differ_in_anything_aws_keys_on_have_other_keys(change: dict[str, Any]) -> None:
    sent = {
        "Timestamp": WHEN,
        "Dimension": "requests",
        "CustomerAWSAccountId": ACCOUNT,
        "LicenseArn": LICENSE,
        "QuantityAsDecimal": "17",
    }
    assert params.record_key({**sent, **change}) != params.record_key(sent)


def test_a_legacy_customer_is_not_an_account_of_the_same_digits() -> None:
    base = {"Timestamp": WHEN, "Dimension": "requests", "Quantity": 1}
    assert params.record_key({**base, "CustomerIdentifier": ACCOUNT}) != params.record_key(
        {**base, "CustomerAWSAccountId": ACCOUNT}
    )


def test_an_unset_quantity_is_zero_either_way() -> None:
    base = {"Timestamp": WHEN, "Dimension": "requests", "CustomerIdentifier": "c"}
    assert params.record_key(base) == params.record_key({**base, "Quantity": 0})
    assert params.record_key({**base, "QuantityAsDecimal": "0.0"}) == params.record_key(base)


def test_a_quantity_aws_would_not_write_is_still_a_key() -> None:
    base = {"Timestamp": WHEN, "Dimension": "requests", "CustomerIdentifier": "c"}
    assert params.record_key({**base, "QuantityAsDecimal": "n/a"})[-1] == "n/a"


decimals = st.decimals(min_value=0, max_value=Decimal("9999999999.999999"), places=6, allow_nan=False)
texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=25),
    dimension=texts,
    identifier=texts,
    quantity=decimals,
    tags=st.integers(min_value=0, max_value=5),
    microsecond=st.integers(min_value=0, max_value=999_999),
    legacy=st.booleans(),
)
def test_json_size_never_falls_short_of_botocores_body(
    n: int, dimension: str, identifier: str, quantity: Decimal, tags: int, microsecond: int, legacy: bool
) -> None:
    """AWS's 1 MB limit is on the body botocore writes (``json.dumps`` with its default
    separators, non-ASCII escaped, timestamps as epoch seconds): the gateway's estimate is
    never below it, and barely above it (the ISO timestamps), so it refuses only what AWS would."""
    customer = {"customer_identifier": identifier} if legacy else {"customer_aws_account_id": ACCOUNT}
    records = [
        rec(
            when=WHEN.replace(microsecond=microsecond),
            dimension=dimension,
            license_arn="" if legacy else LICENSE,
            quantity_as_decimal=format(quantity, "f"),
            usage_allocations=[allocation(format(quantity, "f"), **{f"k{k}": "v" for k in range(tags)})],
            **customer,
        )
        for _ in range(n)
    ]
    aws = params.batch_to_aws(
        pb.BatchMeterUsageRequest(usage_records=records, product_code="prod-abc123" if legacy else "")
    )
    actual = len(body_of(aws))
    assert actual <= params.json_size(aws) <= actual + 25 * n


def test_json_size_of_a_large_request_matches_botocore() -> None:
    """Many small allocations: the body's separators weigh more than its text, where a
    compact estimate would fall ~12% short and let a too-large call reach AWS."""
    record = rec(
        customer_aws_account_id=ACCOUNT,
        license_arn=LICENSE,
        quantity_as_decimal="100",
        usage_allocations=[allocation("1", **{f"k{k}": str(j) for k in range(5)}) for j in range(100)],
    )
    aws = params.batch_to_aws(pb.BatchMeterUsageRequest(usage_records=[record] * 25))
    actual = len(body_of(aws))
    assert actual > 400_000 and 0 <= params.json_size(aws) - actual <= 25 * 25
