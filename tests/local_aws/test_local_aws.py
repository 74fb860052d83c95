"""The local AWS backend on its own: its rules, its bookkeeping, its faults.

Everything goes through a real boto3 client over HTTP unless it is about the
pure parts. The clock is fixed, so no test depends on the hour it runs in.
"""

from __future__ import annotations

import ast
import functools
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

from gateway.domain import validation
from gateway.local_aws import DROP, SLOW, AwsError, LocalAws, State, rules
from support import local_session
from support.aws_params import from_aws

FIXED = 1_763_893_200.0 + 1200  # 20 minutes into an hour
NOW = datetime.fromtimestamp(FIXED, UTC)
WHEN = NOW - timedelta(minutes=1)
PACKAGE = Path(__file__).resolve().parents[2] / "gateway" / "local_aws"


@pytest.fixture
def aws() -> Iterator[LocalAws]:
    backend = LocalAws(quiet=True, clock=lambda: FIXED).start()
    try:
        yield backend
    finally:
        backend.stop()


@functools.cache
def session() -> Any:
    return local_session()  # one session: each new one reads botocore's models again


def client(aws: LocalAws, **config: Any) -> Any:
    """One attempt, a short read timeout; ``parameter_validation=False`` lets bad requests reach the backend."""
    conf = Config(read_timeout=0.3, connect_timeout=2, retries={"total_max_attempts": 1}, **config)
    return session().client("meteringmarketplace", endpoint_url=aws.endpoint_url, config=conf)


def params(**fields: Any) -> dict[str, Any]:
    """A valid MeterUsage request (a minute before FIXED, 3 units) with fields overridden; None drops one."""
    out: dict[str, Any] = {
        "ProductCode": "prod-abc123",
        "UsageDimension": "requests",
        "Timestamp": WHEN,
        "UsageQuantity": 3,
        "ClientToken": "token-1",
    }
    out.update(fields)
    return {k: v for k, v in out.items() if v is not None}


def control(aws: LocalAws, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(aws.endpoint_url + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=5) as reply:
        return json.loads(reply.read())


# --- record, then fail -------------------------------------------------------

RECORD_THEN_FAIL = [
    pytest.param(
        {"error": "InternalServiceErrorException", "status": 500}, ("InternalServiceErrorException", 500), id="ise-500"
    ),
    pytest.param({"error": "", "status": 500}, ("500", 500), id="bare-500"),
    pytest.param({"error": "", "status": 502}, ("502", 502), id="bare-502"),
    pytest.param({"error": "", "status": 503}, ("503", 503), id="bare-503"),
    pytest.param({"error": "", "status": 504}, ("504", 504), id="bare-504"),
    pytest.param({"error": DROP}, ConnectionClosedError, id="drop"),
    pytest.param({"error": SLOW, "delay": 1.0}, ReadTimeoutError, id="slow-past-read-timeout"),
]


def assert_fails_as(expected: Any, call: Any) -> None:
    if isinstance(expected, tuple):
        with pytest.raises(ClientError) as caught:
            call()
        code, status = expected
        assert caught.value.response["Error"]["Code"] == code
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    else:
        with pytest.raises(expected):
            call()


def assert_recorded_once_and_replayable(aws: LocalAws, metering: Any, request: dict[str, Any]) -> None:
    [record] = aws.records()
    assert (record.usage_dimension, record.quantity, record.client_token) == (
        request["UsageDimension"],
        Decimal(3),
        "token-1",
    )
    again = metering.meter_usage(**request)
    assert again["MeteringRecordId"] == record.metering_record_id
    assert len(aws.records()) == 1 and not aws.faults


@pytest.mark.parametrize(("fault", "expected"), RECORD_THEN_FAIL)
def test_record_then_fail_in_process(aws: LocalAws, fault: dict[str, Any], expected: Any) -> None:
    metering = client(aws)
    request = params()
    fault = dict(fault)
    aws.inject(fault.pop("error"), record=True, **fault)
    assert_fails_as(expected, lambda: metering.meter_usage(**request))
    assert_recorded_once_and_replayable(aws, metering, request)


@pytest.mark.parametrize(("fault", "expected"), RECORD_THEN_FAIL)
def test_record_then_fail_over_the_control_api(aws: LocalAws, fault: dict[str, Any], expected: Any) -> None:
    metering = client(aws)
    request = params()
    assert control(aws, "POST", "/_local/faults", {**fault, "record": True, "operation": "MeterUsage"}) == {"ok": True}
    [shown] = control(aws, "GET", "/_local/faults")
    assert (shown["error"], shown["remaining"], shown["record"], shown["operation"]) == (
        fault["error"],
        1,
        True,
        "MeterUsage",
    )
    assert_fails_as(expected, lambda: metering.meter_usage(**request))
    assert control(aws, "GET", "/_local/faults") == []
    assert_recorded_once_and_replayable(aws, metering, request)
    [listed] = control(aws, "GET", "/_local/records")
    assert listed["MeteringRecordId"] == aws.records()[0].metering_record_id


@pytest.mark.parametrize(("fault", "expected"), RECORD_THEN_FAIL[:-1])
def test_without_record_a_fault_records_nothing(aws: LocalAws, fault: dict[str, Any], expected: Any) -> None:
    metering = client(aws)
    fault = dict(fault)
    aws.inject(fault.pop("error"), **fault)
    assert_fails_as(expected, lambda: metering.meter_usage(**params()))
    assert aws.records() == []


def test_a_slow_answer_within_the_timeout_is_the_normal_answer(aws: LocalAws) -> None:
    aws.inject(SLOW, delay=0.1, record=True)
    reply = client(aws).meter_usage(**params())
    assert reply["MeteringRecordId"] == aws.records()[0].metering_record_id


def test_a_recording_fault_answers_the_rules_refusal(aws: LocalAws) -> None:
    metering = client(aws)
    first = metering.meter_usage(**params())["MeteringRecordId"]
    aws.inject("InternalServiceErrorException", record=True)
    with pytest.raises(ClientError) as caught:  # same hour, another quantity: refused, so nothing to lose
        metering.meter_usage(**params(UsageQuantity=4, ClientToken="token-2"))
    assert caught.value.response["Error"]["Code"] == "DuplicateRequestException"
    assert [r.metering_record_id for r in aws.records()] == [first] and not aws.faults


def test_a_dry_run_under_a_recording_fault_records_nothing_and_fails(aws: LocalAws) -> None:
    aws.inject("", status=503, record=True)
    with pytest.raises(ClientError) as caught:
        client(aws).meter_usage(**params(DryRun=True))
    assert caught.value.response["Error"]["Code"] == "503" and aws.records() == []


def test_faults_scoped_to_meter_usage_pass_other_operations(aws: LocalAws) -> None:
    metering = client(aws)
    aws.inject("InternalServiceErrorException", operation="MeterUsage")
    with pytest.raises(ClientError) as caught:
        metering.resolve_customer(RegistrationToken="x")
    assert caught.value.response["Error"]["Code"] == "UnknownOperationException"
    assert len(aws.faults) == 1  # still waiting for a MeterUsage call
    with pytest.raises(ClientError) as caught:
        metering.meter_usage(**params())
    assert caught.value.response["Error"]["Code"] == "InternalServiceErrorException" and not aws.faults


def test_unscoped_faults_take_any_operation_as_before(aws: LocalAws) -> None:
    aws.inject("ThrottlingException")
    with pytest.raises(ClientError) as caught:
        client(aws).resolve_customer(RegistrationToken="x")
    assert caught.value.response["Error"]["Code"] == "ThrottlingException" and not aws.faults


def test_impossible_faults_are_refused(aws: LocalAws) -> None:
    with pytest.raises(ValueError, match="record"):
        aws.inject("ThrottlingException", record=True)  # AWS never records and then answers 400
    for bad in (
        {"error": "ThrottlingException", "record": True},
        {"error": "", "status": 503, "record": "yes"},
        {"error": DROP, "count": 0},
        {"count": 1},
        {"error": SLOW, "delay": -1},
        {"error": DROP, "colour": 1},
    ):
        with pytest.raises(urllib.error.HTTPError) as caught:
            control(aws, "POST", "/_local/faults", bad)
        assert caught.value.code == 400, bad
    assert not aws.faults


# --- independence and the model ----------------------------------------------

# Everything of the gateway's but the stand-in itself (tests/repo/test_architecture.py says the same of every package).
FORBIDDEN = (
    "gateway.domain",
    "gateway.aws",
    "gateway.metering",
    "gateway.recording",
    "gateway.rpc",
    "gateway.config",
    "gateway.observability",
    "gateway.assembly",
    "gateway.cli",
    "marketplace",
)


def imported_modules(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_backend_shares_no_code_with_the_gateways_rules() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "rules.py", "state.py", "faults.py", "server.py"}
    assert not (PACKAGE.parent / "local_aws.py").exists()
    for path in files:
        for name in imported_modules(path.read_text()):
            assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), f"{path.name} imports {name}"
            assert not name.startswith("gateway.") or name.startswith("gateway.local_aws"), (
                f"{path.name} imports {name}"
            )


def test_the_limits_come_from_botocores_model() -> None:
    spec = rules.meter_usage_spec()
    assert spec.required == ("ProductCode", "Timestamp", "UsageDimension")
    assert (spec.members["ProductCode"].max, spec.members["ClientToken"].max) == (255, 64)
    allocations = spec.members["UsageAllocations"]
    assert (allocations.min, allocations.max) == (1, 2500)
    assert allocations.member is not None
    tags = allocations.member.members["Tags"]
    assert tags.max == 5 and tags.member is not None and tags.member.required == ("Key", "Value")
    assert rules.compile_pattern("^[a-z]*$").search("abc\n") is None  # `$` would let the newline through


def test_boto3_params_and_aws_json_are_booked_alike() -> None:
    state = State()
    as_boto3 = state.meter_usage(params(), "AKID", NOW)
    as_json = state.meter_usage(
        params(Timestamp=WHEN.timestamp(), UsageQuantityAsDecimal="3.000", UsageQuantity=None), "AKID", NOW
    )
    assert as_boto3 is not None and as_json is as_boto3
    with pytest.raises(AwsError) as caught:
        state.meter_usage(params(UsageQuantity="3"), "AKID", NOW)
    assert caught.value.code == "SerializationException"


def test_messages_name_the_aws_field() -> None:
    allocs = [
        {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "a", "Value": "1"}]},
        {"AllocatedUsageQuantity": 2, "Tags": [{"Key": "", "Value": "v"}]},
    ]
    with pytest.raises(AwsError) as caught:
        State().meter_usage(params(UsageAllocations=allocs), "AKID", NOW)
    assert caught.value.code == "InvalidTagException"
    assert caught.value.message.startswith("UsageAllocations[1].Tags[0].Key ")


# --- differential: the local backend against the gateway's validation --------


def tags(n: int, **extra: str) -> list[dict[str, str]]:
    return [{"Key": f"k{i}", "Value": "v"} for i in range(n)] + [{"Key": k, "Value": v} for k, v in extra.items()]


def alloc(quantity: int | str | None, tag_list: list[dict[str, str]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(quantity, str):
        out["AllocatedUsageQuantityAsDecimal"] = quantity
    elif quantity is not None:
        out["AllocatedUsageQuantity"] = quantity
    if tag_list is not None:
        out["Tags"] = tag_list
    return out


OK = "OK"
CASES = [
    ("valid", {}, OK),
    (
        "valid decimal allocations summing by value",
        {
            "UsageQuantity": None,
            "UsageQuantityAsDecimal": "2.5",
            "UsageAllocations": [alloc("1.50", tags(1)), alloc("1")],
        },
        OK,
    ),
    ("no quantity, allocations of 0", {"UsageQuantity": None, "UsageAllocations": [alloc(0, tags(1)), alloc(0)]}, OK),
    ("6h minus a second old", {"Timestamp": NOW - timedelta(hours=6) + timedelta(seconds=1)}, OK),
    ("product code too long", {"ProductCode": "p" * 256}, "InvalidProductCodeException"),
    ("product code bad pattern", {"ProductCode": "no spaces"}, "InvalidProductCodeException"),
    ("product code trailing newline", {"ProductCode": "prod\n"}, "InvalidProductCodeException"),
    ("product code empty", {"ProductCode": ""}, "InvalidProductCodeException"),
    ("product code missing", {"ProductCode": None}, "InvalidProductCodeException"),
    ("usage dimension empty", {"UsageDimension": ""}, "InvalidUsageDimensionException"),
    ("usage dimension too long", {"UsageDimension": "d" * 256}, "InvalidUsageDimensionException"),
    ("quantity above int32", {"UsageQuantity": 2**31}, "ValidationException"),
    ("quantity negative", {"UsageQuantity": -1}, "ValidationException"),
    ("decimal with 7 places", {"UsageQuantity": None, "UsageQuantityAsDecimal": "1.1234567"}, "ValidationException"),
    ("decimal with a leading zero", {"UsageQuantity": None, "UsageQuantityAsDecimal": "01.5"}, "ValidationException"),
    ("decimal with a sign", {"UsageQuantity": None, "UsageQuantityAsDecimal": "-1"}, "ValidationException"),
    ("decimal with 11 digits", {"UsageQuantity": None, "UsageQuantityAsDecimal": "12345678901"}, "ValidationException"),
    ("both quantities", {"UsageQuantityAsDecimal": "3"}, "ValidationException"),
    ("empty tag list", {"UsageAllocations": [alloc(3, [])]}, "InvalidTagException"),
    (
        "allocation sum mismatch",
        {"UsageAllocations": [alloc(2, tags(1)), alloc(2)]},
        "InvalidUsageAllocationsException",
    ),
    (
        "no quantity, allocation of 1",
        {"UsageQuantity": None, "UsageAllocations": [alloc(1)]},
        "InvalidUsageAllocationsException",
    ),
    (
        "mixed kinds",
        {"UsageQuantity": None, "UsageQuantityAsDecimal": "3", "UsageAllocations": [alloc(3)]},
        "InvalidUsageAllocationsException",
    ),
    (
        "allocation without quantity",
        {"UsageAllocations": [alloc(3, tags(1)), alloc(None)]},
        "InvalidUsageAllocationsException",
    ),
    (
        "allocation with both quantities",
        {"UsageAllocations": [{**alloc(3), "AllocatedUsageQuantityAsDecimal": "3"}]},
        "InvalidUsageAllocationsException",
    ),
    (
        "malformed allocation decimal",
        {"UsageQuantity": None, "UsageQuantityAsDecimal": "3", "UsageAllocations": [alloc("3.0000000")]},
        "InvalidUsageAllocationsException",
    ),
    (
        "duplicate tag sets",
        {"UsageAllocations": [alloc(1, tags(0, a="1", b="2")), alloc(2, tags(0, b="2", a="1"))]},
        "InvalidUsageAllocationsException",
    ),
    ("two untagged allocations", {"UsageAllocations": [alloc(1), alloc(2)]}, "InvalidUsageAllocationsException"),
    ("6 tags", {"UsageAllocations": [alloc(3, tags(6))]}, "InvalidTagException"),
    ("empty tag key", {"UsageAllocations": [alloc(3, [{"Key": "", "Value": "v"}])]}, "InvalidTagException"),
    ("tag value too long", {"UsageAllocations": [alloc(3, [{"Key": "k", "Value": "v" * 257}])]}, "InvalidTagException"),
    ("tag value bad pattern", {"UsageAllocations": [alloc(3, [{"Key": "k", "Value": "a~b"}])]}, "InvalidTagException"),
    (
        "repeated tag key",
        {"UsageAllocations": [alloc(3, [{"Key": "k", "Value": "1"}, {"Key": "k", "Value": "2"}])]},
        "InvalidTagException",
    ),
    ("client token too long", {"ClientToken": "t" * 65}, "ValidationException"),
    ("timestamp missing", {"Timestamp": None}, "ValidationException"),
    ("old timestamp", {"Timestamp": NOW - timedelta(hours=6, seconds=1)}, "TimestampOutOfBoundsException"),
    ("future timestamp", {"Timestamp": NOW + timedelta(minutes=5, seconds=1)}, "TimestampOutOfBoundsException"),
]


# What the gateway's proto cannot even express (a oneof holds one quantity; no tags is no list).
ONLY_AWS_SEES = {"both quantities", "empty tag list"}


@pytest.mark.parametrize(("name", "changes", "expected"), [pytest.param(*case, id=case[0]) for case in CASES])
def test_local_backend_and_gateway_validation_agree(
    aws: LocalAws, name: str, changes: dict[str, Any], expected: str
) -> None:
    request = params(**changes)
    metering = client(aws, parameter_validation=False)
    try:
        metering.meter_usage(**request)
        answered = OK
    except ClientError as exc:
        answered = exc.response["Error"]["Code"]
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert answered == expected
    assert len(aws.records()) == (1 if expected == OK else 0)

    violations = validation.validate_meter_usage(from_aws(request), validation.Window(now=NOW))
    assert bool(violations) == (expected != OK and name not in ONLY_AWS_SEES)
    for v in violations:  # where the gateway refuses too, it names AWS's exception
        assert v.aws_error == answered, v
