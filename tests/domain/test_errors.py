"""The status table (docs/api.md, Status codes; gateway/domain/errors.py), row by row, as pure functions."""

from __future__ import annotations

import re

import grpc
import pytest
from google.rpc import error_details_pb2

from gateway.domain import errors
from gateway.domain.validation import TIMESTAMP_OUT_OF_BOUNDS, Violation
from support.contract import CONTRACT_ROWS, SAAS_CONTRACT_ROWS

C = grpc.StatusCode


def unpack(status: object, kind: type) -> list:
    out = []
    for any_msg in status.details:  # type: ignore[attr-defined]
        if any_msg.Is(kind.DESCRIPTOR):
            m = kind()
            any_msg.Unpack(m)
            out.append(m)
    return out


@pytest.mark.parametrize(("aws_code", "code", "reason"), CONTRACT_ROWS)
def test_aws_exception_row(aws_code: str, code: grpc.StatusCode, reason: str) -> None:
    err = errors.from_aws(aws_code, "said AWS", "req-123", retry_delay=0.25)
    assert (err.code, err.reason, err.domain) == (code, reason, errors.AWS_DOMAIN)
    status = err.to_status_proto()
    assert status.code == code.value[0] and status.message == "said AWS"
    [info] = unpack(status, error_details_pb2.ErrorInfo)
    assert info.reason == reason and info.domain == "metering.marketplace.amazonaws.com"
    assert dict(info.metadata) == {"awsErrorCode": aws_code, "awsRequestId": "req-123"}
    retry = unpack(status, error_details_pb2.RetryInfo)
    assert bool(retry) is (code in (C.RESOURCE_EXHAUSTED, C.UNAVAILABLE))


def test_namespaced_and_suffixless_codes() -> None:
    assert errors.reason_for_aws("com.amazonaws.marketplace#ThrottlingException") == "THROTTLING"
    assert errors.reason_for_aws("DryRunOperation") == "DRY_RUN_OPERATION"
    assert errors.reason_for_aws("KMSInvalidStateException") == "KMS_INVALID_STATE"


def test_botocore_throttling_codes_are_resource_exhausted() -> None:
    err = errors.from_aws("TooManyRequestsException", "", None, retry_delay=1.0)
    assert err.code == C.RESOURCE_EXHAUSTED and err.reason == "TOO_MANY_REQUESTS" and err.retryable


def test_retry_info_carries_the_delay() -> None:
    [retry] = unpack(
        errors.from_aws("ThrottlingException", "", None, retry_delay=1.5).to_status_proto(), error_details_pb2.RetryInfo
    )
    assert retry.retry_delay.ToNanoseconds() == 1_500_000_000


def test_gateway_conditions_have_their_own_domain_and_no_aws_metadata() -> None:
    for reason, code in [
        ("INVALID_REQUEST", C.INVALID_ARGUMENT),
        ("NO_CREDENTIALS", C.FAILED_PRECONDITION),
        ("AWS_UNREACHABLE", C.UNAVAILABLE),
        ("DEADLINE_EXCEEDED", C.DEADLINE_EXCEEDED),
    ]:
        err = errors.GatewayError(reason, "msg")
        [info] = unpack(err.to_status_proto(), error_details_pb2.ErrorInfo)
        assert (err.code, info.domain, dict(info.metadata)) == (code, "metering-gateway", {})


def test_validation_refusal_lists_every_field() -> None:
    err = errors.invalid(
        [Violation("product_code", "is required"), Violation("usage_allocations[2].tags[0].key", "bad")]
    )
    status = err.to_status_proto()
    [bad] = unpack(status, error_details_pb2.BadRequest)
    assert [f.field for f in bad.field_violations] == ["product_code", "usage_allocations[2].tags[0].key"]
    assert (err.code, err.reason) == (C.INVALID_ARGUMENT, "INVALID_REQUEST")


def test_timestamp_outside_window_gets_the_aws_code_and_reason() -> None:
    err = errors.invalid([Violation("timestamp", "is too old", TIMESTAMP_OUT_OF_BOUNDS)])
    assert (err.code, err.reason, err.domain) == (C.OUT_OF_RANGE, "TIMESTAMP_OUT_OF_BOUNDS", "metering-gateway")
    mixed = errors.invalid([Violation("timestamp", "old", TIMESTAMP_OUT_OF_BOUNDS), Violation("product_code", "x")])
    assert mixed.code == C.INVALID_ARGUMENT


def test_every_reason_in_the_table_is_upper_snake() -> None:
    for reason in errors.RULES:
        assert reason == reason.upper() and " " not in reason and not reason.endswith("_EXCEPTION")


REASON_FORM = re.compile(r"^[A-Z][A-Z0-9_]*[A-Z0-9]$")


@pytest.mark.parametrize(
    "aws_code",
    [c for c, _, _ in CONTRACT_ROWS]
    + [c for _, c, _, _, _ in SAAS_CONTRACT_ROWS]
    + ["503", "RequestTimeout", "com.x#FooBarException", "KMSThing"],
)
def test_every_reason_built_from_aws_is_aip193_form(aws_code: str) -> None:
    assert REASON_FORM.match(errors.reason_for_aws(aws_code)), errors.reason_for_aws(aws_code)


@pytest.mark.parametrize(
    ("aws_code", "status"), [("503", 503), ("502", 502), ("RequestTimeout", 408), ("ServiceUnavailable", 503)]
)
def test_transient_answers_are_retryable_unavailable(aws_code: str, status: int) -> None:
    err = errors.from_aws(aws_code, "", None, retry_delay=0.5, http_status=status)
    assert (err.code, err.retryable) == (C.UNAVAILABLE, True) and err.retry_delay == 0.5


def test_an_unmodelled_client_error_stays_internal() -> None:
    err = errors.from_aws("QuotaRedesignException", "", None, http_status=400)
    assert (err.code, err.retryable) == (C.INTERNAL, False)


# What each answer says about whether AWS recorded the request: the rule the
# recorded-usage sender's exactly-once guarantee rests on.
DELIVERY_ROWS = [
    # (AWS code or bare status, HTTP status, what the answer says)
    ("DuplicateRequestException", 400, errors.ABSENT),
    ("IdempotencyConflictException", 400, errors.ABSENT),
    ("ThrottlingException", 400, errors.REFUSED),
    ("TooManyRequestsException", 429, errors.REFUSED),
    ("InvalidProductCodeException", 400, errors.REFUSED),
    ("TimestampOutOfBoundsException", 400, errors.REFUSED),
    ("CustomerNotEntitledException", 400, errors.REFUSED),
    ("QuotaRedesignException", 400, errors.REFUSED),  # any other 4xx
    ("503", 503, errors.REFUSED),  # a bare 503: the front door did not take it
    ("InternalServiceErrorException", 500, errors.UNKNOWN),
    ("500", 500, errors.UNKNOWN),
    ("502", 502, errors.UNKNOWN),
    ("504", 504, errors.UNKNOWN),
    ("ServiceUnavailable", 503, errors.UNKNOWN),  # typed: AWS's own service answered
    ("QuotaRedesignException", 500, errors.UNKNOWN),  # any other 5xx
    ("501", 501, errors.UNKNOWN),
]


@pytest.mark.parametrize(("aws_code", "status", "delivery"), DELIVERY_ROWS)
def test_only_an_answer_that_rules_a_record_out_settles_an_attempt(
    aws_code: str, status: int, delivery: errors.Delivery
) -> None:
    assert errors.from_aws(aws_code, "", None, http_status=status).delivery is delivery


def test_no_answer_after_sending_is_unknown_and_no_connection_is_not() -> None:
    read_timeout = errors.GatewayError("AWS_UNREACHABLE", "read timeout", maybe_delivered=True)
    refused = errors.GatewayError("AWS_UNREACHABLE", "connection refused")
    assert (read_timeout.delivery, refused.delivery) == (errors.UNKNOWN, errors.REFUSED)
    assert read_timeout.code == refused.code == C.UNAVAILABLE


def test_a_gateway_error_is_hashable_and_survives_pickling() -> None:
    import pickle

    err = errors.from_aws("ThrottlingException", "slow down", "req-1", retry_delay=0.5, http_status=400)
    err.aws_attempts = 3
    bad = errors.invalid([Violation("events[2].event_id", "too long")], "batch")
    assert len({err, bad, err}) == 2
    for original in (err, bad):
        copy = pickle.loads(pickle.dumps(original))
        assert type(copy) is errors.GatewayError and str(copy) == str(original)
        assert (copy.reason, copy.code, copy.retry_delay, copy.violations, copy.aws_attempts, copy.delivery) == (
            original.reason,
            original.code,
            original.retry_delay,
            original.violations,
            original.aws_attempts,
            original.delivery,
        )
        assert copy.to_status_proto() == original.to_status_proto()


def test_the_table_reads_no_private_botocore_lists() -> None:
    """The throttling and transient codes are the table's own, not botocore's private attributes."""
    import inspect

    source = inspect.getsource(errors)
    assert "from botocore" not in source and "import botocore" not in source
    assert {"ThrottlingException", "TooManyRequestsException"} <= errors.THROTTLING_CODES


def test_a_reason_outside_the_enum_is_no_reason_of_the_gateways() -> None:
    """A misspelt reason fails (mypy at the call site, ValueError here) instead of answering INTERNAL."""
    with pytest.raises(ValueError, match="SPOOL_UNAVAILBLE"):
        errors.Reason("SPOOL_UNAVAILBLE")
    assert errors.Reason("SPOOL_UNAVAILABLE") is errors.Reason.SPOOL_UNAVAILABLE
    assert not hasattr(errors.Reason, "SPOOL_UNAVAILBLE")


def test_every_reason_has_exactly_one_rule_and_is_its_own_wire_string() -> None:
    import ast
    import inspect
    from collections import Counter

    assert len(errors.RULES) == len(errors.Reason) and set(errors.RULES) == set(errors.Reason)
    assert all(isinstance(reason, errors.Reason) for reason in errors.RULES)
    assert len(errors.Reason.__members__) == len(errors.Reason), "a member is an alias of another"
    assert all(reason.name == reason.value == str(reason) for reason in errors.Reason)
    # A key written twice in the table's literal would silently keep the last rule.
    [table] = [
        n.value
        for n in ast.walk(ast.parse(inspect.getsource(errors)))
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == "RULES"
    ]
    assert isinstance(table, ast.Dict)
    written = Counter(ast.unparse(k) for k in table.keys if k is not None)
    written.update(f"Reason.{r.name}" for r in errors.CREDENTIALS_REFUSED)  # the ** row
    assert [k for k, n in written.items() if n > 1] == []
    assert set(written) == {f"Reason.{r.name}" for r in errors.Reason}


def test_a_member_and_its_string_make_the_same_status_bytes() -> None:
    import json

    for reason in errors.Reason:
        member = errors.GatewayError(reason, "msg", retry_delay=0.5)
        plain = errors.GatewayError(reason.value, "msg", retry_delay=0.5)  # type: ignore[arg-type]  # a str, as before
        assert type(plain.reason) is str and member.rule == plain.rule
        assert member.to_status_proto().SerializeToString() == plain.to_status_proto().SerializeToString()
        assert json.dumps({"reason": member.reason}) == json.dumps({"reason": reason.value})
        assert f"{member.reason}" == reason.value


def test_aws_codes_become_members_and_unmodelled_ones_stay_derived_strings() -> None:
    throttled = errors.from_aws("com.amazonaws.marketplace#ThrottlingException", "", None)
    assert throttled.reason is errors.Reason.THROTTLING
    unmodelled = errors.from_aws("QuotaRedesignException", "", None, http_status=400)
    assert unmodelled.reason == "QUOTA_REDESIGN" and not isinstance(unmodelled.reason, errors.Reason)
    assert unmodelled.code == C.INTERNAL and errors.reason_for_aws("501") == "HTTP_501"
    assert errors.reason_for_aws("503") is errors.Reason.HTTP_503


# -- SaaS (BatchMeterUsage, ResolveCustomer) ---------------------------------------------------


@pytest.mark.parametrize(("operation", "aws_code", "message", "code", "reason"), SAAS_CONTRACT_ROWS)
def test_saas_exception_row(operation: str, aws_code: str, message: str, code: grpc.StatusCode, reason: str) -> None:
    err = errors.from_aws(aws_code, message, "req-9", retry_delay=0.25, operation=operation)
    assert (err.code, err.reason, err.domain) == (code, reason, errors.AWS_DOMAIN)
    assert isinstance(err.reason, errors.Reason), "every SaaS row is one of the table's own"
    [info] = unpack(err.to_status_proto(), error_details_pb2.ErrorInfo)
    assert (info.reason, dict(info.metadata)) == (reason, {"awsErrorCode": aws_code, "awsRequestId": "req-9"})
    assert err.retryable is (code in (C.RESOURCE_EXHAUSTED, C.UNAVAILABLE))


SECURITY_TOKEN_EXPIRED = "The security token included in the request is expired"

EXPIRED_TOKEN_ROWS = [
    # (operation, AWS code, message, reason): one name, two conditions.
    ("ResolveCustomer", "ExpiredTokenException", "Registration token has expired", "EXPIRED_REGISTRATION_TOKEN"),
    ("ResolveCustomer", "ExpiredTokenException", "", "EXPIRED_REGISTRATION_TOKEN"),
    ("ResolveCustomer", "com.amazonaws.marketplace#ExpiredTokenException", "expired", "EXPIRED_REGISTRATION_TOKEN"),
    ("ResolveCustomer", "ExpiredTokenException", SECURITY_TOKEN_EXPIRED, "EXPIRED_TOKEN"),
    ("ResolveCustomer", "ExpiredTokenException", SECURITY_TOKEN_EXPIRED.upper(), "EXPIRED_TOKEN"),
    ("ResolveCustomer", "ExpiredToken", "Registration token has expired", "EXPIRED_TOKEN"),  # STS's name: credentials
    ("MeterUsage", "ExpiredTokenException", "Registration token has expired", "EXPIRED_TOKEN"),
    ("MeterUsage", "ExpiredTokenException", SECURITY_TOKEN_EXPIRED, "EXPIRED_TOKEN"),
    ("MeterUsage", "ExpiredToken", SECURITY_TOKEN_EXPIRED, "EXPIRED_TOKEN"),
    ("BatchMeterUsage", "ExpiredTokenException", SECURITY_TOKEN_EXPIRED, "EXPIRED_TOKEN"),
    ("BatchMeterUsage", "ExpiredTokenException", "", "EXPIRED_TOKEN"),
    (None, "ExpiredTokenException", "", "EXPIRED_TOKEN"),
]


@pytest.mark.parametrize(("operation", "aws_code", "message", "reason"), EXPIRED_TOKEN_ROWS)
def test_an_expired_registration_token_is_not_expired_credentials(
    operation: str | None, aws_code: str, message: str, reason: str
) -> None:
    """ResolveCustomer's ExpiredTokenException is the buyer's token (the caller's input:
    INVALID_ARGUMENT); the same name anywhere else, or naming the security token, is the
    gateway's own credentials (an operator's problem: FAILED_PRECONDITION)."""
    assert errors.reason_for_aws(aws_code, operation, message) == reason
    err = errors.from_aws(aws_code, message, "rid", operation=operation)
    expected = C.INVALID_ARGUMENT if reason == "EXPIRED_REGISTRATION_TOKEN" else C.FAILED_PRECONDITION
    assert (err.reason, err.code, err.retryable) == (reason, expected, False)
    assert (errors.Reason(reason) in errors.CREDENTIALS_REFUSED) is (reason == "EXPIRED_TOKEN")


RECORD_STATUS_REASONS = [
    # (reason, code, retryable, delivery): how the recorded-usage sender settles a record by its status.
    (errors.Reason.DUPLICATE_RECORD, C.ALREADY_EXISTS, False, errors.ABSENT),
    (errors.Reason.CUSTOMER_NOT_SUBSCRIBED, C.FAILED_PRECONDITION, False, errors.REFUSED),
    (errors.Reason.UNPROCESSED_RECORD, C.UNAVAILABLE, True, errors.UNKNOWN),
]


@pytest.mark.parametrize(("reason", "code", "retryable", "delivery"), RECORD_STATUS_REASONS)
def test_a_record_status_has_its_row(
    reason: errors.Reason, code: grpc.StatusCode, retryable: bool, delivery: errors.Delivery
) -> None:
    err = errors.GatewayError(reason, "a record's status", retry_delay=0.5)
    assert (err.code, err.retryable, err.delivery) == (code, retryable, delivery)
    assert (err.retry_delay is not None) is retryable


@pytest.mark.parametrize(
    ("aws_code", "status", "delivery"),
    [
        ("InvalidLicenseException", 400, errors.REFUSED),
        ("InvalidCustomerIdentifierException", 400, errors.REFUSED),
        ("InvalidTokenException", 400, errors.REFUSED),
    ],
)
def test_a_refused_saas_call_recorded_nothing(aws_code: str, status: int, delivery: errors.Delivery) -> None:
    assert errors.from_aws(aws_code, "", None, http_status=status, operation="BatchMeterUsage").delivery is delivery


def test_every_modelled_saas_exception_has_a_contract_row() -> None:
    """Each exception botocore's model gives BatchMeterUsage and ResolveCustomer is a row of
    SAAS_CONTRACT_ROWS (driven end to end in tests/metering/test_saas.py), with a reason of the table."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("meteringmarketplace")
    rows = {(operation, aws_code) for operation, aws_code, *_ in SAAS_CONTRACT_ROWS}
    for operation in ("BatchMeterUsage", "ResolveCustomer"):
        for shape in model.operation_model(operation).error_shapes:
            assert (operation, shape.name) in rows, (operation, shape.name)
            assert errors.reason_for_aws(shape.name, operation) in errors.RULES, shape.name
