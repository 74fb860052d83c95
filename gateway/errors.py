"""The one table from a condition to a gRPC status, and the status details.

Modelled on googleapis python-api-core's ``exceptions.py``: every condition has a
*reason* (UPPER_SNAKE_CASE, AIP-193) and the table maps reasons to codes. An AWS
exception's reason is its name without ``Exception`` (``DuplicateRequestException``
→ ``DUPLICATE_REQUEST``), so a condition gets the same code and reason whether the
gateway or AWS detects it; only the ErrorInfo ``domain`` says who decided.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from botocore.retries.standard import ThrottledRetryableChecker, TransientRetryableChecker
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway.validation import Violation, only_timestamp_window

AWS_DOMAIN = "metering.marketplace.amazonaws.com"
GATEWAY_DOMAIN = "metering-gateway"

Code = grpc.StatusCode


@dataclass(frozen=True)
class Rule:
    code: grpc.StatusCode
    retryable: bool = False  # a later attempt may succeed: retried, and answered with RetryInfo


# The table. Keys are reasons; AWS exceptions reach it through reason_for_aws().
RULES: Mapping[str, Rule] = {
    # The caller's input.
    "INVALID_REQUEST": Rule(Code.INVALID_ARGUMENT),
    "INVALID_PRODUCT_CODE": Rule(Code.INVALID_ARGUMENT),
    "INVALID_USAGE_DIMENSION": Rule(Code.INVALID_ARGUMENT),
    "INVALID_TAG": Rule(Code.INVALID_ARGUMENT),
    "INVALID_USAGE_ALLOCATIONS": Rule(Code.INVALID_ARGUMENT),
    "TIMESTAMP_OUT_OF_BOUNDS": Rule(Code.OUT_OF_RANGE),
    # The record exists already, or the token was used for another request.
    "DUPLICATE_REQUEST": Rule(Code.ALREADY_EXISTS),
    "IDEMPOTENCY_CONFLICT": Rule(Code.ALREADY_EXISTS),
    # Something about the account or deployment must change first.
    "CUSTOMER_NOT_ENTITLED": Rule(Code.FAILED_PRECONDITION),
    "INVALID_ENDPOINT_REGION": Rule(Code.FAILED_PRECONDITION),
    "DISABLED_API": Rule(Code.FAILED_PRECONDITION),
    "NO_CREDENTIALS": Rule(Code.FAILED_PRECONDITION),
    # The credentials may not do this (including a refused dry run).
    "UNAUTHORIZED": Rule(Code.PERMISSION_DENIED),
    "ACCESS_DENIED": Rule(Code.PERMISSION_DENIED),
    # Try again later.
    "THROTTLING": Rule(Code.RESOURCE_EXHAUSTED, retryable=True),
    "INTERNAL_SERVICE_ERROR": Rule(Code.UNAVAILABLE, retryable=True),
    "AWS_UNREACHABLE": Rule(Code.UNAVAILABLE, retryable=True),
    "DEADLINE_EXCEEDED": Rule(Code.DEADLINE_EXCEEDED),
    # Anything else.
    "INTERNAL": Rule(Code.INTERNAL),
}

_INTERNAL = RULES["INTERNAL"]
_THROTTLING_CODES = frozenset(ThrottledRetryableChecker._THROTTLED_ERROR_CODES)
# botocore's own notion of a passing fault: these codes, and 5xx answers with no
# modelled exception (a load balancer's bare 503), say nothing about the request.
_TRANSIENT_CODES = frozenset(TransientRetryableChecker._TRANSIENT_ERROR_CODES)
_TRANSIENT_STATUSES = frozenset(TransientRetryableChecker._TRANSIENT_STATUS_CODES)
_TRANSIENT = Rule(Code.UNAVAILABLE, retryable=True)
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def reason_for_aws(aws_code: str) -> str:
    """``DuplicateRequestException`` → ``DUPLICATE_REQUEST``; namespaces dropped."""
    name = aws_code.rsplit("#", 1)[-1].rsplit(":", 1)[0]
    if name.isdigit():  # botocore's code for an answer with no error type: its HTTP status
        return f"HTTP_{name}"
    if name.endswith("Exception"):
        name = name[: -len("Exception")]
    return _CAMEL_BOUNDARY.sub("_", name).upper() or "INTERNAL"


def rule_for(reason: str, aws_code: str | None = None, http_status: int | None = None) -> Rule:
    if reason in RULES:
        return RULES[reason]
    if aws_code is not None and aws_code in _THROTTLING_CODES:
        return RULES["THROTTLING"]  # botocore's own list of throttling codes
    if (aws_code is not None and aws_code in _TRANSIENT_CODES) or http_status in _TRANSIENT_STATUSES:
        return _TRANSIENT
    return _INTERNAL


@dataclass
class GatewayError(Exception):
    """A refusal on its way to the caller as a gRPC status with details."""

    reason: str
    message: str
    domain: str = GATEWAY_DOMAIN
    aws_code: str | None = None
    aws_request_id: str | None = None
    violations: Sequence[Violation] = ()
    retry_delay: float | None = None
    http_status: int | None = None
    # The request may have reached AWS and been recorded though no answer came back
    # (read timeout, dropped connection): only a resend of the same request can tell.
    maybe_delivered: bool = False
    rule: Rule = field(init=False)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        self.rule = rule_for(self.reason, self.aws_code, self.http_status)
        if not self.rule.retryable:
            self.retry_delay = None

    @property
    def code(self) -> grpc.StatusCode:
        return self.rule.code

    @property
    def retryable(self) -> bool:
        return self.rule.retryable

    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.aws_code is not None:
            out["awsErrorCode"] = self.aws_code
        if self.aws_request_id:
            out["awsRequestId"] = self.aws_request_id
        return out

    def to_status_proto(self) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=self.domain, metadata=self.metadata())
        status.details.add().Pack(info)
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            status.details.add().Pack(bad)
        if self.retry_delay is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_delay * 1e9))
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return status

    def to_grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_status_proto())


def from_aws(
    aws_code: str, message: str, request_id: str | None, retry_delay: float | None = None, http_status: int | None = None
) -> GatewayError:
    """An AWS error response, as the caller will see it."""
    return GatewayError(
        reason=reason_for_aws(aws_code),
        message=message or aws_code,
        domain=AWS_DOMAIN,
        aws_code=aws_code,
        aws_request_id=request_id,
        retry_delay=retry_delay,
        http_status=http_status,
    )


def invalid(violations: Sequence[Violation], what: str = "request") -> GatewayError:
    """Refused input: INVALID_REQUEST, or TIMESTAMP_OUT_OF_BOUNDS when that is all."""
    fields = ", ".join(dict.fromkeys(v.field for v in violations))
    if only_timestamp_window(violations):
        return GatewayError("TIMESTAMP_OUT_OF_BOUNDS", f"{violations[0].field} {violations[0].description}", violations=violations)
    return GatewayError("INVALID_REQUEST", f"invalid {what}: {fields}", violations=violations)


def internal(message: str) -> GatewayError:
    return GatewayError("INTERNAL", message)


# google.rpc.Code and grpc.StatusCode share numbers; keep the import honest.
assert code_pb2.INVALID_ARGUMENT == Code.INVALID_ARGUMENT.value[0]
