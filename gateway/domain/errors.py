"""The one table from a condition to a gRPC status, and the status details.

Modelled on googleapis python-api-core's ``exceptions.py``: every condition has a
*reason* (UPPER_SNAKE_CASE, AIP-193) and the table maps reasons to codes. An AWS
exception's reason is its name without ``Exception`` (``DuplicateRequestException``
→ ``DUPLICATE_REQUEST``), so a condition gets the same code and reason whether the
gateway or AWS detects it; only the ErrorInfo ``domain`` says who decided.

The reasons are :class:`Reason`, a StrEnum: the gateway raises its own conditions by
member (``GatewayError(Reason.SPOOL_UNAVAILABLE, ...)``), so a misspelt reason fails
the type check instead of answering INTERNAL. Only the AWS mapping (:func:`from_aws`)
may carry a reason outside the enum: an :data:`AwsReason` made from an exception the
table does not model (``QuotaRedesignException`` → ``QUOTA_REDESIGN``).

Each row also says what the answer tells about delivery (:class:`Delivery`): whether
AWS may have recorded the request anyway. The recorded-usage sender's exactly-once
guarantee rests on that column, so it lives here, once, beside the codes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NewType

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway.domain.validation import Violation, only_timestamp_window

AWS_DOMAIN = "metering.marketplace.amazonaws.com"
GATEWAY_DOMAIN = "metering-gateway"

# The size of an error is bounded, whatever the request or AWS said: a caller's gRPC
# takes 8 KiB of trailers by default, and a larger status would reach it as a bare,
# retryable RESOURCE_EXHAUSTED. The details travel base64-encoded (grpc-status-details-bin:
# 4096 bytes become 5464), the message percent-encoded (grpc-message), plus a few small
# trailers: under 7 KiB in all.
MESSAGE_MAX = 1000  # bytes of the message once percent-encoded for grpc-message
DETAILS_MAX = 4096  # bytes of the serialized google.rpc.Status
VIOLATIONS_MAX = 100  # field violations in a BadRequest at most; ErrorInfo counts them all
DESCRIPTION_MAX = 300  # characters of one violation's field or description
METADATA_VALUE_MAX = 256  # characters of one ErrorInfo metadata value

Code = grpc.StatusCode


class Delivery(enum.Enum):
    """What an answer says about whether AWS recorded the request (exactly-once rests on it).

    Only an answer that rules a record out settles an attempt. Everything else is
    UNKNOWN: AWS may have recorded the request before it failed to answer, so the
    only safe next step is the identical request again (same ClientToken), which
    AWS answers with the existing record if there is one.
    """

    REFUSED = "refused"  # this attempt was not recorded (earlier attempts are as they were)
    ABSENT = "absent"  # AWS holds no record of this request from any attempt
    UNKNOWN = "unknown"  # AWS may have recorded this attempt without our hearing of it


REFUSED, ABSENT, UNKNOWN = Delivery.REFUSED, Delivery.ABSENT, Delivery.UNKNOWN


@dataclass(frozen=True)
class Rule:
    code: grpc.StatusCode
    retryable: bool = False  # a later attempt may succeed: retried, and answered with RetryInfo
    delivery: Delivery = REFUSED


class Reason(enum.StrEnum):
    """Every reason the table has a row for (AIP-193: UPPER_SNAKE_CASE, the wire string).

    Members are ``str``: ErrorInfo, logs and metric labels carry exactly the value.
    Each has its rule in :data:`RULES`, grouped and explained there.
    """

    # The caller's input.
    INVALID_REQUEST = "INVALID_REQUEST"
    INVALID_PRODUCT_CODE = "INVALID_PRODUCT_CODE"
    INVALID_USAGE_DIMENSION = "INVALID_USAGE_DIMENSION"
    INVALID_TAG = "INVALID_TAG"
    INVALID_USAGE_ALLOCATIONS = "INVALID_USAGE_ALLOCATIONS"
    TIMESTAMP_OUT_OF_BOUNDS = "TIMESTAMP_OUT_OF_BOUNDS"
    DUPLICATE_REQUEST = "DUPLICATE_REQUEST"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    # The caller's input, SaaS (BatchMeterUsage, ResolveCustomer).
    INVALID_CUSTOMER_IDENTIFIER = "INVALID_CUSTOMER_IDENTIFIER"
    INVALID_LICENSE = "INVALID_LICENSE"
    INVALID_TOKEN = "INVALID_TOKEN"
    EXPIRED_REGISTRATION_TOKEN = "EXPIRED_REGISTRATION_TOKEN"
    # A SaaS record's status in a BatchMeterUsage answer, as the sender settles it.
    DUPLICATE_RECORD = "DUPLICATE_RECORD"
    CUSTOMER_NOT_SUBSCRIBED = "CUSTOMER_NOT_SUBSCRIBED"
    UNPROCESSED_RECORD = "UNPROCESSED_RECORD"
    # The account or deployment.
    CUSTOMER_NOT_ENTITLED = "CUSTOMER_NOT_ENTITLED"
    INVALID_ENDPOINT_REGION = "INVALID_ENDPOINT_REGION"
    DISABLED_API = "DISABLED_API"
    NO_CREDENTIALS = "NO_CREDENTIALS"
    # AWS refusing the gateway's credentials or signature (CREDENTIALS_REFUSED).
    EXPIRED_TOKEN = "EXPIRED_TOKEN"
    UNRECOGNIZED_CLIENT = "UNRECOGNIZED_CLIENT"
    INVALID_CLIENT_TOKEN_ID = "INVALID_CLIENT_TOKEN_ID"
    SIGNATURE_DOES_NOT_MATCH = "SIGNATURE_DOES_NOT_MATCH"
    INVALID_SIGNATURE = "INVALID_SIGNATURE"
    INCOMPLETE_SIGNATURE = "INCOMPLETE_SIGNATURE"
    MISSING_AUTHENTICATION_TOKEN = "MISSING_AUTHENTICATION_TOKEN"
    REQUEST_EXPIRED = "REQUEST_EXPIRED"
    # Permissions.
    UNAUTHORIZED = "UNAUTHORIZED"
    ACCESS_DENIED = "ACCESS_DENIED"
    CALLER_NOT_ALLOWED = "CALLER_NOT_ALLOWED"
    # Try again later.
    THROTTLING = "THROTTLING"
    CONCURRENCY_LIMIT_EXCEEDED = "CONCURRENCY_LIMIT_EXCEEDED"
    INTERNAL_SERVICE_ERROR = "INTERNAL_SERVICE_ERROR"
    HTTP_500 = "HTTP_500"
    HTTP_502 = "HTTP_502"
    HTTP_503 = "HTTP_503"
    HTTP_504 = "HTTP_504"
    AWS_UNREACHABLE = "AWS_UNREACHABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    # The recorded-usage spool and its operators.
    EVENT_ID_CONFLICT = "EVENT_ID_CONFLICT"
    SPOOL_UNAVAILABLE = "SPOOL_UNAVAILABLE"
    RECORDING_NOT_ENABLED = "RECORDING_NOT_ENABLED"
    RECORD_NOT_FOUND = "RECORD_NOT_FOUND"
    RECORD_NOT_FAILED = "RECORD_NOT_FAILED"
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"
    # Anything else.
    INTERNAL = "INTERNAL"


# A reason made at run time from an AWS error code that Reason does not name
# (reason_for_aws): only the AWS mapping makes one, so a plain string literal is not a
# reason to the type checker. rule_for() answers such codes by their kind and status.
AwsReason = NewType("AwsReason", str)


# AWS refusing the gateway's own credentials or signature: an operator fixes it on the
# gateway's side (credentials, clock). INVALID_SIGNATURE is JSON APIs' word for a
# signature expired by clock skew.
CREDENTIALS_REFUSED: frozenset[Reason] = frozenset(
    {
        Reason.EXPIRED_TOKEN,
        Reason.UNRECOGNIZED_CLIENT,
        Reason.INVALID_CLIENT_TOKEN_ID,
        Reason.SIGNATURE_DOES_NOT_MATCH,
        Reason.INVALID_SIGNATURE,
        Reason.INCOMPLETE_SIGNATURE,
        Reason.MISSING_AUTHENTICATION_TOKEN,
        Reason.REQUEST_EXPIRED,
    }
)

# The table: one rule for every Reason (tests/domain/test_errors.py checks there is
# exactly one). AWS exceptions reach it through reason_for_aws().
RULES: Mapping[Reason, Rule] = {
    # The caller's input: refused before anything was recorded.
    Reason.INVALID_REQUEST: Rule(Code.INVALID_ARGUMENT),
    Reason.INVALID_PRODUCT_CODE: Rule(Code.INVALID_ARGUMENT),
    Reason.INVALID_USAGE_DIMENSION: Rule(Code.INVALID_ARGUMENT),
    Reason.INVALID_TAG: Rule(Code.INVALID_ARGUMENT),
    Reason.INVALID_USAGE_ALLOCATIONS: Rule(Code.INVALID_ARGUMENT),
    Reason.TIMESTAMP_OUT_OF_BOUNDS: Rule(Code.OUT_OF_RANGE),
    # The hour holds another record, or the token was used for another request: an
    # identical resend of a recorded request is answered with its record, never these.
    Reason.DUPLICATE_REQUEST: Rule(Code.ALREADY_EXISTS, delivery=ABSENT),
    Reason.IDEMPOTENCY_CONFLICT: Rule(Code.ALREADY_EXISTS, delivery=ABSENT),
    # SaaS input AWS refused: the whole BatchMeterUsage call (nothing recorded), or a
    # registration token that never was one, or has expired (ExpiredTokenException of
    # ResolveCustomer: not the credentials' EXPIRED_TOKEN, see reason_for_aws).
    Reason.INVALID_CUSTOMER_IDENTIFIER: Rule(Code.INVALID_ARGUMENT),
    Reason.INVALID_LICENSE: Rule(Code.INVALID_ARGUMENT),
    Reason.INVALID_TOKEN: Rule(Code.INVALID_ARGUMENT),
    Reason.EXPIRED_REGISTRATION_TOKEN: Rule(Code.INVALID_ARGUMENT),
    # A record's status in a BatchMeterUsage answer (never a call's status): the sender
    # settles recorded SaaS usage by them. DuplicateRecord: another quantity holds the
    # customer's hour (as DUPLICATE_REQUEST); CustomerNotSubscribed: no agreement, an
    # operator retries once there is one; unprocessed: AWS failed on its side and may
    # hold the record, so only the identical record again settles it.
    Reason.DUPLICATE_RECORD: Rule(Code.ALREADY_EXISTS, delivery=ABSENT),
    Reason.CUSTOMER_NOT_SUBSCRIBED: Rule(Code.FAILED_PRECONDITION),
    Reason.UNPROCESSED_RECORD: Rule(Code.UNAVAILABLE, retryable=True, delivery=UNKNOWN),
    # Something about the account or deployment must change first.
    Reason.CUSTOMER_NOT_ENTITLED: Rule(Code.FAILED_PRECONDITION),
    Reason.INVALID_ENDPOINT_REGION: Rule(Code.FAILED_PRECONDITION),
    Reason.DISABLED_API: Rule(Code.FAILED_PRECONDITION),
    Reason.NO_CREDENTIALS: Rule(Code.FAILED_PRECONDITION),
    # AWS refuses the gateway's own credentials or signature.
    **{reason: Rule(Code.FAILED_PRECONDITION) for reason in CREDENTIALS_REFUSED},
    # The credentials may not do this (including a refused dry run).
    Reason.UNAUTHORIZED: Rule(Code.PERMISSION_DENIED),
    Reason.ACCESS_DENIED: Rule(Code.PERMISSION_DENIED),
    # The mTLS caller may not call this method, or meter this product or dimension (--authz-policy).
    Reason.CALLER_NOT_ALLOWED: Rule(Code.PERMISSION_DENIED),
    # Try again later. Throttling and a bare 503 (the front door did not take the
    # request) rule a record out; AWS's own 5xx answers do not.
    Reason.THROTTLING: Rule(Code.RESOURCE_EXHAUSTED, retryable=True),
    # --max-aws-calls MeterUsage calls wait on AWS already: this one was not sent.
    Reason.CONCURRENCY_LIMIT_EXCEEDED: Rule(Code.RESOURCE_EXHAUSTED, retryable=True),
    Reason.INTERNAL_SERVICE_ERROR: Rule(Code.UNAVAILABLE, retryable=True, delivery=UNKNOWN),
    Reason.HTTP_500: Rule(Code.UNAVAILABLE, retryable=True, delivery=UNKNOWN),
    Reason.HTTP_502: Rule(Code.UNAVAILABLE, retryable=True, delivery=UNKNOWN),
    Reason.HTTP_503: Rule(Code.UNAVAILABLE, retryable=True),
    Reason.HTTP_504: Rule(Code.UNAVAILABLE, retryable=True, delivery=UNKNOWN),
    # No connection: nothing was sent. Once connected (read timeout, dropped
    # connection), the backend says the attempt may have been delivered.
    Reason.AWS_UNREACHABLE: Rule(Code.UNAVAILABLE, retryable=True),
    Reason.DEADLINE_EXCEEDED: Rule(Code.DEADLINE_EXCEEDED),
    # The recorded-usage spool.
    Reason.EVENT_ID_CONFLICT: Rule(Code.ALREADY_EXISTS),
    Reason.SPOOL_UNAVAILABLE: Rule(Code.UNAVAILABLE, retryable=True),
    # UsageRecorderService on a gateway started without --spool: it records nothing.
    Reason.RECORDING_NOT_ENABLED: Rule(Code.FAILED_PRECONDITION),
    # An operator's RetryMeteringRecord: no such record, or one that is not FAILED, or
    # one AWS may hold (reconcile it against the seller reports first).
    Reason.RECORD_NOT_FOUND: Rule(Code.NOT_FOUND),
    Reason.RECORD_NOT_FAILED: Rule(Code.FAILED_PRECONDITION),
    Reason.OUTCOME_UNKNOWN: Rule(Code.FAILED_PRECONDITION),
    # Anything else.
    Reason.INTERNAL: Rule(Code.INTERNAL),
}

# AWS's throttling error codes across services (the ones botocore's standard retry
# mode treats as throttling); any of them is THROTTLING's row.
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    }
)
# Passing faults: retried like AWS being down. A typed 5xx among them (a
# ServiceUnavailable, say) still leaves the outcome unknown; only the bare 503 rules a
# record out, as its row says.
TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException"})
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})

_INTERNAL = RULES[Reason.INTERNAL]
_TRANSIENT_5XX = Rule(Code.UNAVAILABLE, retryable=True, delivery=UNKNOWN)
_TRANSIENT_4XX = Rule(Code.UNAVAILABLE, retryable=True)
_INTERNAL_5XX = Rule(Code.INTERNAL, delivery=UNKNOWN)
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


# ResolveCustomer's ExpiredTokenException is about the buyer's registration token. JSON
# APIs answer expired *credentials* with the same name (and the security token in the
# message), so the name alone cannot tell them apart: the operation and message do.
REGISTRATION_OPERATION = "ResolveCustomer"
_EXPIRED_TOKEN_EXCEPTION = "ExpiredTokenException"
_CREDENTIALS_WORDS = "security token"


def reason_for_aws(aws_code: str, operation: str | None = None, message: str = "") -> Reason | AwsReason:
    """``DuplicateRequestException`` → ``DUPLICATE_REQUEST``; namespaces dropped.

    The Reason member when the table has the row, else the derived name as an AwsReason.
    The one exception to the naming rule: ResolveCustomer's ExpiredTokenException (an
    expired registration token) is EXPIRED_REGISTRATION_TOKEN, never the credentials'
    EXPIRED_TOKEN, so that no two conditions share a reason.
    """
    name = aws_code.rsplit("#", 1)[-1].rsplit(":", 1)[0]
    if (
        name == _EXPIRED_TOKEN_EXCEPTION
        and operation == REGISTRATION_OPERATION
        and _CREDENTIALS_WORDS not in message.lower()
    ):
        return Reason.EXPIRED_REGISTRATION_TOKEN
    if name.isdigit():  # botocore's code for an answer with no error type: its HTTP status
        derived = f"HTTP_{name}"
    else:
        if name.endswith("Exception"):
            name = name[: -len("Exception")]
        derived = _CAMEL_BOUNDARY.sub("_", name).upper() or Reason.INTERNAL
    return Reason(derived) if derived in RULES else AwsReason(derived)


def rule_for(reason: str, aws_code: str | None = None, http_status: int | None = None) -> Rule:
    """The row for a reason; unmodelled AWS codes by their kind and HTTP status."""
    if reason in RULES:
        return RULES[Reason(reason)]
    name = None if aws_code is None else aws_code.rsplit("#", 1)[-1].rsplit(":", 1)[0]
    if name in THROTTLING_CODES or http_status == 429:  # 429: Too Many Requests, typed or bare
        return RULES[Reason.THROTTLING]
    server_side = http_status is not None and http_status >= 500
    if name in TRANSIENT_CODES or http_status in TRANSIENT_STATUSES:
        return _TRANSIENT_5XX if server_side else _TRANSIENT_4XX
    # Any other answer AWS gave after taking the request: a 5xx may follow a record.
    return _INTERNAL_5XX if server_side else _INTERNAL


@dataclass(eq=False)  # an exception: hashed and compared by identity, like any other
class GatewayError(Exception):
    """A refusal on its way to the caller as a gRPC status with details.

    The gateway's own conditions name a :class:`Reason`; an :data:`AwsReason` comes only
    from :func:`from_aws`, for an AWS exception the table does not model.
    """

    reason: Reason | AwsReason
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

    aws_attempts: int = 0  # calls made to AWS for this request (the gateway's own retries)
    # More ErrorInfo metadata (lowerCamel keys), for what the gateway decided alone: e.g.
    # the refused caller's identity and product. The AWS keys above cannot be overridden.
    extra_metadata: Mapping[str, str] = field(default_factory=dict)
    rule: Rule = field(init=False)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        self.rule = rule_for(self.reason, self.aws_code, self.http_status)
        if not self.rule.retryable:
            self.retry_delay = None

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by fields (Exception's default would rebuild from the message alone)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return (_rebuild, (values,))

    @property
    def delivery(self) -> Delivery:
        """Whether AWS may hold a record of this attempt (see :class:`Delivery`)."""
        return UNKNOWN if self.maybe_delivered else self.rule.delivery

    @property
    def code(self) -> grpc.StatusCode:
        return self.rule.code

    @property
    def retryable(self) -> bool:
        return self.rule.retryable

    def pushback_ms(self) -> int | None:
        """The ``grpc-retry-pushback-ms`` trailer's value (gRFC A6 server pushback), or None.

        Negative once the gateway has called AWS: it has spent its ``--aws-max-attempts``
        already, and a client retry would multiply them. Otherwise the RetryInfo delay,
        which only retryable rows keep, so a client retries what the gateway decided alone.
        """
        if self.aws_attempts > 0:
            return -1
        if self.retry_delay is None:
            return None
        return max(0, round(self.retry_delay * 1000))

    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = dict(self.extra_metadata)
        if self.aws_code is not None:
            out["awsErrorCode"] = self.aws_code
        if self.aws_request_id:
            out["awsRequestId"] = self.aws_request_id
        return out

    def to_status_proto(self) -> status_pb2.Status:
        """The status with its details, at most DETAILS_MAX bytes serialized (see MESSAGE_MAX).

        Up to VIOLATIONS_MAX field violations go into the BadRequest, fewer when they
        would not fit; then ErrorInfo's ``violations`` and ``violationsShown`` say how many
        there were and how many are listed, and the message says so too.
        """
        metadata = {k: _clip(v, METADATA_VALUE_MAX) for k, v in self.metadata().items()}
        message = clip_message(self.message)
        if self.violations:
            total = len(self.violations)
            # The room left once everything else is in, with the counts at their longest.
            counted = clip_message(f"{self.message} (first {total} of {total} violations listed)")
            base = self._status(counted, {**metadata, "violations": str(total), "violationsShown": str(total)}, [])
            shown = _fitting(self.violations, DETAILS_MAX - base.ByteSize() - _BAD_REQUEST_PACKING)
            if len(shown) < total:
                metadata |= {"violations": str(total), "violationsShown": str(len(shown))}
                message = clip_message(f"{self.message} (first {len(shown)} of {total} violations listed)")
            return self._status(message, metadata, shown)
        return self._status(message, metadata, [])

    def _status(
        self, message: str, metadata: Mapping[str, str], shown: Sequence[error_details_pb2.BadRequest.FieldViolation]
    ) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code.value[0], message=message)
        status.details.add().Pack(
            error_details_pb2.ErrorInfo(reason=self.reason, domain=self.domain, metadata=metadata)
        )
        if shown:
            status.details.add().Pack(error_details_pb2.BadRequest(field_violations=shown))
        if self.retry_delay is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_delay * 1e9))
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return status

    def to_grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_status_proto())


# A BadRequest's own wrapping in the status: its Any's type URL, tags and lengths.
_BAD_REQUEST_PACKING = 64


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip_message(text: str, limit: int = MESSAGE_MAX) -> str:
    """``text`` cut so that its percent-encoding (how grpc-message carries it) fits ``limit`` bytes."""
    size = 0
    for i, char in enumerate(text):
        size += 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode("utf-8", "surrogatepass"))
        if size > limit - 3:
            return text[:i] + "..."
    return text


def _fitting(violations: Sequence[Violation], room: int) -> list[error_details_pb2.BadRequest.FieldViolation]:
    """The first violations (VIOLATIONS_MAX at most, each clipped) whose entries fit ``room`` bytes."""
    out: list[error_details_pb2.BadRequest.FieldViolation] = []
    for v in violations[:VIOLATIONS_MAX]:
        entry = error_details_pb2.BadRequest.FieldViolation(
            field=_clip(v.field, DESCRIPTION_MAX), description=_clip(v.description, DESCRIPTION_MAX)
        )
        room -= entry.ByteSize() + 3  # its tag and length
        if room < 0:
            break
        out.append(entry)
    return out


def _rebuild(values: dict[str, Any]) -> GatewayError:
    return GatewayError(**values)


def from_aws(
    aws_code: str,
    message: str,
    request_id: str | None,
    retry_delay: float | None = None,
    http_status: int | None = None,
    operation: str | None = None,
) -> GatewayError:
    """An AWS error response to ``operation``'s call, as the caller will see it."""
    return GatewayError(
        reason=reason_for_aws(aws_code, operation, message),
        message=message or aws_code,
        domain=AWS_DOMAIN,
        aws_code=aws_code,
        aws_request_id=request_id,
        retry_delay=retry_delay,
        http_status=http_status,
    )


FIELDS_IN_MESSAGE = 5  # offending fields a refusal's message names; the BadRequest lists more


def invalid(violations: Sequence[Violation], what: str = "request") -> GatewayError:
    """Refused input: INVALID_REQUEST, or TIMESTAMP_OUT_OF_BOUNDS when that is all."""
    if only_timestamp_window(violations):
        return GatewayError(
            Reason.TIMESTAMP_OUT_OF_BOUNDS, f"{violations[0].field} {violations[0].description}", violations=violations
        )
    fields = list(dict.fromkeys(v.field for v in violations))
    named = ", ".join(_clip(f, DESCRIPTION_MAX) for f in fields[:FIELDS_IN_MESSAGE])
    more = f" and {len(fields) - FIELDS_IN_MESSAGE} more fields" if len(fields) > FIELDS_IN_MESSAGE else ""
    return GatewayError(Reason.INVALID_REQUEST, f"invalid {what}: {named}{more}", violations=violations)


def internal(message: str) -> GatewayError:
    return GatewayError(Reason.INTERNAL, message)


# google.rpc.Code and grpc.StatusCode share numbers; keep the import honest.
assert code_pb2.INVALID_ARGUMENT == Code.INVALID_ARGUMENT.value[0]
