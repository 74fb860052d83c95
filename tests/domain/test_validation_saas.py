"""BatchMeterUsage's rules at their boundaries (docs/api.md, Validation): 1-25 records, one
way of naming each customer, product_code exactly with the legacy identifier, the 24-hour
window and the month-end cutoff. The window is also held against the local backend's own
code for it (gateway/local_aws/saas.py), which shares nothing with the gateway's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import botocore.session
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.aws import params
from gateway.domain import errors
from gateway.domain import validation as v
from gateway.local_aws import rules
from gateway.local_aws.saas import window_problems
from marketplace.metering.v1 import metering_pb2 as pb
from support import allocation

NOW = datetime(2026, 11, 23, 12, 30, tzinfo=UTC)
WINDOW = v.Window.for_saas(NOW)
ACCOUNT = "111122223333"
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef0"


def rec(
    *,
    when: datetime | None = NOW,
    account: str = ACCOUNT,
    license_arn: str = LICENSE,
    identifier: str = "",
    dimension: str = "requests",
    quantity: str | None = "1",
    allocations: list[pb.UsageAllocation] | None = None,
) -> pb.UsageRecord:
    msg = pb.UsageRecord(
        customer_aws_account_id=account,
        license_arn=license_arn,
        customer_identifier=identifier,
        dimension=dimension,
        usage_allocations=allocations or [],
    )
    if when is not None:
        msg.timestamp.FromDatetime(when)
    if quantity is not None:
        msg.quantity_as_decimal = quantity
    return msg


def legacy(identifier: str = "cust-1", **kw: Any) -> pb.UsageRecord:
    return rec(identifier=identifier, account="", license_arn="", **kw)


def check(
    *records: pb.UsageRecord,
    product_code: str = "",
    window: v.Window = WINDOW,
    products: v.Products | None = None,
) -> list[v.Violation]:
    return v.validate_batch_meter_usage(
        pb.BatchMeterUsageRequest(usage_records=records, product_code=product_code), window, products
    )


def fields(*records: pb.UsageRecord, **kw: Any) -> list[str]:
    return [x.field for x in check(*records, **kw)]


def test_a_batch_of_either_way_is_valid() -> None:
    assert check(rec(), rec(dimension="storage-gb", account="4" * 12)) == []
    assert check(legacy(), legacy("cust-2"), product_code="prod-abc123") == []


@pytest.mark.parametrize(("n", "ok"), [(0, False), (1, True), (24, True), (25, True), (26, False), (1000, False)])
def test_1_to_25_records(n: int, ok: bool) -> None:
    found = check(*(rec(dimension=f"d{i}") for i in range(n)))
    assert found == ([] if ok else [v.Violation("usage_records", f"must hold 1-25 records, got {n}")])


def test_past_the_limit_no_record_is_looked_at() -> None:
    """26 broken records are one violation: nothing past the limit is examined."""
    assert fields(*(rec(account="", license_arn="", when=None) for _ in range(26))) == ["usage_records"]


@pytest.mark.parametrize(
    ("account", "license_arn", "identifier", "expected"),
    [
        (ACCOUNT, LICENSE, "", []),
        ("", "", "cust-1", []),
        ("", LICENSE, "", ["usage_records[0].customer_aws_account_id"]),
        (ACCOUNT, "", "", ["usage_records[0].license_arn"]),
        ("", "", "", ["usage_records[0].customer_aws_account_id"]),
        (ACCOUNT, LICENSE, "cust-1", ["usage_records[0].customer_identifier"]),
        ("", LICENSE, "cust-1", ["usage_records[0].customer_identifier", "usage_records[0].customer_aws_account_id"]),
        ("1" * 255, LICENSE, "", []),
        ("1" * 256, LICENSE, "", ["usage_records[0].customer_aws_account_id"]),
        ("12345678901a", LICENSE, "", ["usage_records[0].customer_aws_account_id"]),
        ("-1", LICENSE, "", ["usage_records[0].customer_aws_account_id"]),
        ("", "", "x" * 255, []),
        ("", "", "x" * 256, ["usage_records[0].customer_identifier"]),
    ],
)
def test_each_record_names_its_customer_one_way(
    account: str, license_arn: str, identifier: str, expected: list[str]
) -> None:
    way_is_legacy = identifier and not (account or license_arn)
    record = pb.UsageRecord(
        customer_aws_account_id=account,
        license_arn=license_arn,
        customer_identifier=identifier,
        dimension="requests",
        quantity_as_decimal="1",
    )
    record.timestamp.FromDatetime(NOW)
    assert fields(record, product_code="prod-abc123" if way_is_legacy else "") == expected


@pytest.mark.parametrize(
    ("arn", "ok"),
    [
        (LICENSE, True),
        ("arn:aws-cn:license-manager::123456789012:license:l-1", True),
        ("arn:aws-us-gov:license-manager:us-gov-west-1:123456789012:license:l-1", True),
        ("arn:aws:license-manager::123456789012:license/l-1", True),
        ("arn:aws:license-manager::123456789012:", False),  # no resource
        ("arn:aws:license-manager::123456789012:license:" + "x" * 1016, True),  # 1024 characters of resource
        ("arn:aws:license-manager::123456789012:license:" + "x" * 1017, False),
        ("arn:azure:license-manager::123456789012:license:l-1", False),
        ("l-0123456789abcdef0", False),
        (LICENSE + "\n", False),
        (" " + LICENSE, False),
    ],
)
def test_a_license_arn_matches_the_models_pattern(arn: str, ok: bool) -> None:
    assert fields(rec(license_arn=arn)) == ([] if ok else ["usage_records[0].license_arn"])


def test_one_way_for_the_whole_call() -> None:
    """The first record that names a customer sets the call's way; the others keep it."""
    assert fields(rec(), legacy()) == ["usage_records[1].customer_identifier"]
    assert fields(legacy(), rec(), product_code="p") == ["usage_records[1].customer_aws_account_id"]
    # A record naming nobody does not set the way: the next one does.
    assert fields(rec(account="", license_arn=""), legacy(), product_code="p") == [
        "usage_records[0].customer_aws_account_id"
    ]


@pytest.mark.parametrize(
    ("records", "product_code", "expected"),
    [
        ([legacy()], "", ["product_code"]),  # required with the legacy identifier
        ([legacy()], "has space", ["product_code"]),
        ([legacy()], "x" * 256, ["product_code"]),
        ([legacy()], "x" * 255, []),
        ([rec()], "prod-abc123", ["product_code"]),  # refused with licenses: AWS would bill twice
        ([rec()], "", []),
        # Naming no customer at all: the records say so, and product_code is no fault of its own.
        ([rec(account="", license_arn="")], "prod-abc123", ["usage_records[0].customer_aws_account_id"]),
    ],
)
def test_product_code_exactly_with_the_legacy_identifier(
    records: list[pb.UsageRecord], product_code: str, expected: list[str]
) -> None:
    assert fields(*records, product_code=product_code) == expected


def test_a_license_refusing_product_code_says_why() -> None:
    [found] = check(rec(), product_code="prod-abc123")
    assert "license names the product" in found.description


def test_products_bound_the_legacy_product_and_its_dimensions_only() -> None:
    products = v.Products({"prod-abc123": frozenset({"requests"})})
    assert fields(legacy(), product_code="prod-other", products=products) == ["product_code"]
    assert fields(legacy(dimension="cpu"), product_code="prod-abc123", products=products) == [
        "usage_records[0].dimension"
    ]
    assert fields(legacy(), product_code="prod-abc123", products=products) == []
    # With a license, the product is AWS's to know: the gateway cannot check its dimensions.
    assert fields(rec(dimension="cpu"), products=products) == []


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (rec(dimension=""), ["usage_records[0].dimension"]),
        (rec(dimension="d" * 255), []),
        (rec(dimension="d" * 256), ["usage_records[0].dimension"]),
        (rec(quantity=None), []),  # unset is AWS's 0
        (rec(quantity="0"), []),
        (rec(quantity="9999999999.999999"), []),
        (rec(quantity="1.1234567"), ["usage_records[0].quantity_as_decimal"]),
        (rec(quantity="-1"), ["usage_records[0].quantity_as_decimal"]),
        (rec(quantity="01"), ["usage_records[0].quantity_as_decimal"]),
        (rec(quantity="3", allocations=[allocation("1", team="a"), allocation("2")]), []),
        (rec(quantity="3", allocations=[allocation("1", team="a")]), ["usage_records[0].usage_allocations"]),
        (rec(quantity="3", allocations=[allocation(3)]), ["usage_records[0].usage_allocations[0].quantity"]),
        (
            rec(quantity="2", allocations=[allocation("1", team="a"), allocation("1", team="a")]),
            ["usage_records[0].usage_allocations[1].tags"],
        ),
        (rec(when=None), ["usage_records[0].timestamp"]),
    ],
)
def test_each_record_keeps_meter_usages_own_rules(record: pb.UsageRecord, expected: list[str]) -> None:
    assert fields(record) == expected


def test_a_whole_quantity_still_passes() -> None:
    record = rec(quantity=None)
    record.quantity = 2_147_483_647
    assert check(record) == []
    record.quantity = 2_147_483_648
    assert fields(record) == ["usage_records[0].quantity"]


# -- the window -------------------------------------------------------------------------------


MICRO = timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("when", "ok"),
    [
        (NOW - timedelta(hours=24), True),  # exactly 24 hours: taken
        (NOW - timedelta(hours=24) - MICRO, False),
        (NOW - timedelta(hours=7), True),  # MeterUsage's six hours do not apply
        (NOW + timedelta(minutes=5), True),
        (NOW + timedelta(minutes=5) + MICRO, False),
    ],
)
def test_24_hours_back_and_the_skew_ahead(when: datetime, ok: bool) -> None:
    found = check(rec(when=when))
    assert found == [] if ok else [x.field for x in found] == ["usage_records[0].timestamp"]
    assert ok or (found[0].aws_error == v.TIMESTAMP_OUT_OF_BOUNDS and v.only_timestamp_window(found))


FIRST = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "when", "ok", "said"),
    [
        # Until 06:00 UTC on the 1st, the previous month's last 24 hours are taken ...
        (FIRST + timedelta(hours=6) - MICRO, FIRST - MICRO, True, ""),
        (FIRST + timedelta(hours=6) - MICRO, FIRST + timedelta(hours=6) - MICRO - timedelta(hours=24), True, ""),
        # ... from 06:00, nothing of it, however recent.
        (FIRST + timedelta(hours=6), FIRST - MICRO, False, "previous month"),
        (FIRST + timedelta(hours=6), FIRST, True, ""),
        (FIRST + timedelta(hours=20), FIRST, True, ""),
        # Once 24 hours reach past the month's start, the 24 hours are what refuses.
        (FIRST + timedelta(days=1, hours=3), FIRST + timedelta(hours=2), False, "24 hours"),
        # The year turns like any month.
        (datetime(2027, 1, 1, 6, tzinfo=UTC), datetime(2026, 12, 31, 23, tzinfo=UTC), False, "previous month"),
        (datetime(2027, 1, 1, 5, tzinfo=UTC), datetime(2026, 12, 31, 23, tzinfo=UTC), True, ""),
    ],
)
def test_the_month_end_cutoff(now: datetime, when: datetime, ok: bool, said: str) -> None:
    found = check(rec(when=when), window=v.Window.for_saas(now))
    assert (found == []) is ok
    if not ok:
        [only] = found
        assert only.field == "usage_records[0].timestamp" and said in only.description
        assert errors.invalid(found).reason == "TIMESTAMP_OUT_OF_BOUNDS"


def test_month_cutoff_and_saas_oldest() -> None:
    assert v.month_cutoff(FIRST + timedelta(hours=5, minutes=59)) is None
    assert v.month_cutoff(FIRST + timedelta(hours=6)) == FIRST
    assert v.month_cutoff(FIRST + timedelta(days=20)) == FIRST
    assert v.saas_oldest(FIRST + timedelta(hours=5)) == FIRST + timedelta(hours=5) - timedelta(hours=24)
    assert v.saas_oldest(FIRST + timedelta(hours=6)) == FIRST
    assert v.saas_oldest(FIRST + timedelta(days=1, hours=7)) == FIRST + timedelta(hours=7)
    # The same instant in another zone: the month is UTC's.
    tokyo = (FIRST + timedelta(hours=6)).astimezone(timezone(timedelta(hours=9)))
    assert v.month_cutoff(tokyo) == FIRST and v.Window.for_saas(tokyo).earliest == FIRST


def test_only_the_saas_window_has_the_cutoff() -> None:
    now = FIRST + timedelta(hours=6)
    assert v.Window(now).earliest == now - v.MAX_AGE  # MeterUsage: six hours, no month
    assert v.Window.for_saas(now).earliest == FIRST


def test_a_bad_timestamp_among_other_faults_is_invalid_request() -> None:
    found = check(rec(when=NOW - timedelta(days=2)), rec(license_arn=""))
    assert [x.field for x in found] == ["usage_records[0].timestamp", "usage_records[1].license_arn"]
    assert (errors.invalid(found).reason, errors.invalid(found).code.name) == ("INVALID_REQUEST", "INVALID_ARGUMENT")


instants = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC))


@settings(max_examples=300, deadline=None)
@given(
    now=instants | st.sampled_from([datetime(2027, m, 1, 6, tzinfo=UTC) for m in range(1, 13)]),
    back=st.one_of(
        st.timedeltas(min_value=timedelta(hours=-1), max_value=timedelta(hours=50)),
        st.sampled_from(
            [timedelta(hours=24), timedelta(hours=24) + MICRO, -timedelta(minutes=5), -timedelta(minutes=5) - MICRO]
        ),
    ),
)
def test_the_gateway_and_the_local_backend_keep_one_window(now: datetime, back: timedelta) -> None:
    """Two codes for one rule: the gateway refuses a timestamp exactly when AWS's stand-in
    would, at any instant (the month's turn included), so nothing valid is refused and
    nothing refused reaches AWS."""
    when = now - back
    request = pb.BatchMeterUsageRequest(usage_records=[rec(when=when)])
    gateway_refuses = bool(v.validate_batch_meter_usage(request, v.Window.for_saas(now)))
    records = rules.usage_records_of(params.batch_to_aws(request))
    assert gateway_refuses is bool(window_problems(records, now))
    assert gateway_refuses is (when < v.saas_oldest(now) or when > now + timedelta(minutes=5))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(min_value=0, max_value=40), legacy_way=st.booleans())
def test_only_the_count_refuses_well_formed_batches(n: int, legacy_way: bool) -> None:
    records = [legacy(dimension=f"d{i}") if legacy_way else rec(dimension=f"d{i}") for i in range(n)]
    found = check(*records, product_code="prod-abc123" if legacy_way else "")
    assert (found == []) is (1 <= n <= 25)


def test_the_limits_are_the_models() -> None:
    model = botocore.session.get_session().get_service_model("meteringmarketplace")
    record = model.shape_for("UsageRecord").members
    assert model.shape_for("UsageRecordList").metadata["max"] == v.BATCH_RECORDS_MAX
    assert record["CustomerIdentifier"].metadata["max"] == v.CUSTOMER_ID_MAX
    assert record["CustomerAWSAccountId"].metadata["max"] == v.CUSTOMER_ID_MAX
    assert record["CustomerAWSAccountId"].metadata["pattern"] == "^" + v.ACCOUNT_ID_RE.pattern + "$"
    assert record["LicenseArn"].metadata["pattern"] == "^" + v.LICENSE_ARN_RE.pattern + "$"
    assert v.BATCH_BYTES_MAX == rules.MAX_BATCH_BYTES  # "each request must be less than 1 MB"


def test_registration_token() -> None:
    assert v.check_registration_token("") == [v.Violation("registration_token", "is required")]
    assert v.check_registration_token("x") == []
