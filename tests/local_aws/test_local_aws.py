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
from botocore import handlers
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
    assert caught.value.response["Error"]["Code"] == "InvalidTokenException"  # answered, not faulted
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


# --- Amazon Bedrock AgentCore Runtime's rules ----------------------------------


@pytest.fixture
def agentcore_aws() -> Iterator[LocalAws]:
    backend = LocalAws(quiet=True, clock=lambda: FIXED, agentcore=True).start()
    try:
        yield backend
    finally:
        backend.stop()


def tokenless_client(aws: LocalAws, **config: Any) -> Any:
    """A boto3 client that sends no ClientToken when given none: botocore fills one in
    (the model marks it an idempotency token), and AgentCore Runtime's rule is about its absence."""
    metering = client(aws, **config)
    metering.meta.events.unregister("before-parameter-build", handlers.generate_idempotent_uuid)
    return metering


def code_of(call: Any) -> str:
    with pytest.raises(ClientError) as caught:
        call()
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    return str(caught.value.response["Error"]["Code"])


def test_the_tokenless_client_really_sends_no_token(aws: LocalAws) -> None:
    tokenless_client(aws).meter_usage(**params(ClientToken=None))
    client(aws).meter_usage(**params(ClientToken=None, UsageDimension="other"))
    assert [r.client_token for r in aws.records()][0] == ""
    assert aws.records()[1].client_token  # botocore's own token, when not unregistered


def test_agentcore_takes_many_records_an_hour_and_they_add_up(agentcore_aws: LocalAws) -> None:
    metering = client(agentcore_aws)
    exact = WHEN.replace(microsecond=250_000)
    ids = [
        metering.meter_usage(**params(Timestamp=exact, UsageQuantity=3, ClientToken="t-1"))["MeteringRecordId"],
        metering.meter_usage(**params(Timestamp=exact, UsageQuantity=3, ClientToken="t-2"))["MeteringRecordId"],
        metering.meter_usage(**params(Timestamp=exact, UsageQuantity=4, ClientToken="t-3"))["MeteringRecordId"],
        metering.meter_usage(**params(Timestamp=NOW - timedelta(minutes=19), UsageQuantity=5, ClientToken="t-4"))[
            "MeteringRecordId"
        ],
    ]
    assert len(set(ids)) == 4  # the same timestamp, distinct tokens: separate records, never a duplicate
    records = agentcore_aws.records()
    assert [r.quantity for r in records] == [3, 3, 4, 5]
    assert records[0].timestamp == exact  # kept exact, not rounded down to the hour
    hour = NOW.replace(minute=0, second=0, microsecond=0)
    assert control(agentcore_aws, "GET", "/_local/usage") == [
        {"ProductCode": "prod-abc123", "UsageDimension": "requests", "Hour": hour.isoformat(), "Quantity": "15"}
    ]
    assert [r["ClientToken"] for r in control(agentcore_aws, "GET", "/_local/records")] == ["t-1", "t-2", "t-3", "t-4"]


def test_agentcore_keys_a_record_by_its_token_alone(agentcore_aws: LocalAws) -> None:
    metering = client(agentcore_aws)
    first = metering.meter_usage(**params(ClientToken="t-1"))["MeteringRecordId"]
    assert metering.meter_usage(**params(ClientToken="t-1"))["MeteringRecordId"] == first  # a replay
    assert (
        metering.meter_usage(**params(ClientToken="t-1", UsageQuantityAsDecimal="3.00", UsageQuantity=None))[
            "MeteringRecordId"
        ]
        == first
    )  # quantities compare by value
    for other in ({"UsageQuantity": 4}, {"Timestamp": WHEN + timedelta(seconds=1)}, {"UsageDimension": "other"}):
        assert code_of(lambda o=other: metering.meter_usage(**params(ClientToken="t-1", **o))) == (
            "IdempotencyConflictException"
        )
    assert len(agentcore_aws.records()) == 1


def test_agentcore_requires_a_client_token(agentcore_aws: LocalAws) -> None:
    metering = tokenless_client(agentcore_aws)
    with pytest.raises(ClientError) as caught:
        metering.meter_usage(**params(ClientToken=None))
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    assert "ClientToken" in caught.value.response["Error"]["Message"]
    assert code_of(lambda: metering.meter_usage(**params(ClientToken=None, DryRun=True))) == "ValidationException"
    assert agentcore_aws.records() == []


def test_agentcore_refuses_usage_allocations(agentcore_aws: LocalAws) -> None:
    metering = client(agentcore_aws)
    tagged = [alloc(2, tags(1)), alloc(1)]
    assert code_of(lambda: metering.meter_usage(**params(UsageAllocations=tagged))) == (
        "InvalidUsageAllocationsException"
    )
    assert code_of(lambda: metering.meter_usage(**params(UsageAllocations=[alloc(3)]))) == (
        "InvalidUsageAllocationsException"
    )  # even one untagged bucket: no allocations at all
    assert agentcore_aws.records() == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"Timestamp": NOW - timedelta(hours=6, seconds=1)}, "TimestampOutOfBoundsException"),
        ({"Timestamp": NOW + timedelta(minutes=5, seconds=1)}, "TimestampOutOfBoundsException"),
        ({"ClientToken": "t" * 65}, "ValidationException"),
        ({"UsageQuantity": -1}, "ValidationException"),
        ({"ProductCode": "no spaces"}, "InvalidProductCodeException"),
    ],
)
def test_agentcore_keeps_the_other_rules(agentcore_aws: LocalAws, changes: dict[str, Any], expected: str) -> None:
    metering = client(agentcore_aws, parameter_validation=False)
    assert code_of(lambda: metering.meter_usage(**params(**changes))) == expected
    assert agentcore_aws.records() == []


def test_hourly_mode_is_unchanged(aws: LocalAws) -> None:
    assert control(aws, "GET", "/_local/mode") == {"agentcore": False}
    metering = tokenless_client(aws)
    first = metering.meter_usage(**params(ClientToken=None))["MeteringRecordId"]  # no token needed
    same_hour = WHEN.replace(minute=5, microsecond=0)
    assert metering.meter_usage(**params(ClientToken="t-2", Timestamp=same_hour))["MeteringRecordId"] == first
    assert code_of(lambda: metering.meter_usage(**params(ClientToken="t-3", UsageQuantity=4))) == (
        "DuplicateRequestException"
    )
    assert metering.meter_usage(**params(UsageAllocations=[alloc(3, tags(1))], UsageDimension="tagged"))
    assert [r.hour.minute for r in aws.records()] == [0, 0]
    assert [u["Quantity"] for u in control(aws, "GET", "/_local/usage")] == ["3", "3"]


def test_the_control_api_switches_the_rules(aws: LocalAws) -> None:
    client(aws).meter_usage(**params())
    assert control(aws, "POST", "/_local/reset", {"agentcore": True}) == {"ok": True}
    assert control(aws, "GET", "/_local/mode") == {"agentcore": True} and aws.records() == []
    metering = tokenless_client(aws)
    assert code_of(lambda: metering.meter_usage(**params(ClientToken=None))) == "ValidationException"
    assert control(aws, "POST", "/_local/reset") == {"ok": True}  # no body: the rules stay
    assert aws.agentcore
    control(aws, "POST", "/_local/reset", {"agentcore": False})
    assert metering.meter_usage(**params(ClientToken=None))["MeteringRecordId"]
    with pytest.raises(urllib.error.HTTPError) as caught:
        control(aws, "POST", "/_local/reset", {"agentcore": "yes"})
    assert caught.value.code == 400 and not aws.agentcore


AGENTCORE_CASES = [
    ("with a token", {}, OK),
    ("without a token", {"ClientToken": None}, "ValidationException"),
    ("with allocations", {"UsageAllocations": [alloc(2, tags(1)), alloc(1)]}, "InvalidUsageAllocationsException"),
]


@pytest.mark.parametrize(("name", "changes", "expected"), [pytest.param(*c, id=c[0]) for c in AGENTCORE_CASES])
def test_agentcore_backend_and_gateway_validation_agree(
    agentcore_aws: LocalAws, name: str, changes: dict[str, Any], expected: str
) -> None:
    request = params(**changes)
    try:
        tokenless_client(agentcore_aws).meter_usage(**request)
        answered = OK
    except ClientError as exc:
        answered = exc.response["Error"]["Code"]
    assert answered == expected
    violations = validation.validate_meter_usage(from_aws(request), validation.Window(now=NOW), agentcore=True)
    assert [v.aws_error for v in violations] == ([] if expected == OK else [expected])
