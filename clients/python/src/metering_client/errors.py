"""Typed exceptions built from the gateway's status details.

Every refusal from the gateway carries a ``google.rpc.Status`` with one
``ErrorInfo``; its ``reason`` picks the exception class from :data:`REASONS`, so a
caller writes ``except DuplicateRequest:`` instead of comparing codes and strings.
A reason this client does not know yet (a new AWS exception, say) still gets the
class of its gRPC code, and a status without details (the transport's own
UNAVAILABLE, a deadline that ran out in the client) gets one too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One refused field, named by its proto path (``usage_allocations[2].tags[0].key``)."""

    field: str
    description: str


class MeteringError(Exception):
    """A failed call. ``reason`` and ``domain`` come from ErrorInfo (AIP-193)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {reason + ': ' if reason else ''}{message}{_violations_text(field_violations)}")
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = dict(metadata or {})
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.retry_delay = retry_delay  # seconds, from RetryInfo; None when a retry cannot help

    @property
    def aws_error_code(self) -> str | None:
        """The exception name as AWS sent it, when AWS answered."""
        return self.metadata.get("awsErrorCode")

    @property
    def aws_request_id(self) -> str | None:
        """AWS's request id, for a support case, when AWS answered."""
        return self.metadata.get("awsRequestId")


VIOLATIONS_IN_TEXT = 5  # str(error) shows this many field violations; .field_violations has every one


def _violations_text(violations: Sequence[FieldViolation]) -> str:
    """The violations for str(error), where a log line or a traceback shows them:
    ``(events: must hold 1-1000 events, got 1001)``."""
    if not violations:
        return ""
    shown = "; ".join(
        f"{v.field}: {v.description}" if v.field else v.description for v in violations[:VIOLATIONS_IN_TEXT]
    )
    more = f"; and {len(violations) - VIOLATIONS_IN_TEXT} more" if len(violations) > VIOLATIONS_IN_TEXT else ""
    return f" ({shown}{more})"


# One class per gRPC code the gateway uses ...
class InvalidArgument(MeteringError): ...


class OutOfRange(MeteringError): ...


class AlreadyExists(MeteringError): ...


class NotFound(MeteringError): ...


class FailedPrecondition(MeteringError): ...


class PermissionDenied(MeteringError): ...


class ResourceExhausted(MeteringError): ...


class Unavailable(MeteringError): ...


class DeadlineExceeded(MeteringError): ...


class Internal(MeteringError): ...


class Unauthenticated(MeteringError): ...


class Cancelled(MeteringError): ...


# ... and one per reason, under the class of its code.
class InvalidRequest(InvalidArgument):
    """The gateway refused the request before calling AWS; see ``field_violations``."""


class InvalidProductCode(InvalidArgument): ...


class InvalidUsageDimension(InvalidArgument): ...


class InvalidTag(InvalidArgument): ...


class InvalidUsageAllocations(InvalidArgument): ...


class TimestampOutOfBounds(OutOfRange): ...


class InvalidCustomerIdentifier(InvalidArgument):
    """BatchMeterUsage: AWS knows no such legacy customer_identifier; nothing of the call was recorded."""


class InvalidLicense(InvalidArgument):
    """BatchMeterUsage: a license_arn AWS never issued, or licenses of two products in one call;
    nothing of the call was recorded."""


class InvalidToken(InvalidArgument):
    """ResolveCustomer: the registration token is not one AWS issued (mangled, or for another seller)."""


class ExpiredRegistrationToken(InvalidArgument):
    """ResolveCustomer: the buyer's registration token has expired; the buyer must come through
    AWS Marketplace again for a new one. Not :class:`ExpiredToken`, which is the gateway's own
    credentials expiring (an operator's problem)."""


class DuplicateRequest(AlreadyExists):
    """The hour already has a record for this dimension, with another quantity."""


class IdempotencyConflict(AlreadyExists):
    """The ClientToken was used before for a different request."""


class CustomerNotEntitled(FailedPrecondition): ...


class InvalidEndpointRegion(FailedPrecondition): ...


class DisabledApi(FailedPrecondition): ...


class NoCredentials(FailedPrecondition): ...


class CredentialsRefused(FailedPrecondition):
    """AWS refused the gateway's own credentials (expired, unknown, badly signed): an operator must fix them."""


class ExpiredToken(CredentialsRefused): ...


class UnrecognizedClient(CredentialsRefused): ...


class InvalidClientTokenId(CredentialsRefused): ...


class SignatureDoesNotMatch(CredentialsRefused): ...


class InvalidSignature(CredentialsRefused): ...


class IncompleteSignature(CredentialsRefused): ...


class MissingAuthenticationToken(CredentialsRefused): ...


class RequestExpired(CredentialsRefused): ...


class Unauthorized(PermissionDenied): ...


class AccessDenied(PermissionDenied): ...


class CallerNotAllowed(PermissionDenied):
    """The gateway's --authz-policy refuses this mTLS caller the method, product or dimension; see ``metadata``."""


class RecordNotFound(NotFound):
    """RetryMeteringRecord: no record has that record_id."""


class RecordNotFailed(FailedPrecondition):
    """RetryMeteringRecord: the record is not FAILED (already queued again, or sent)."""


class OutcomeUnknown(FailedPrecondition):
    """RetryMeteringRecord: AWS may hold the record; reconcile it first, then retry with ``reconciled=True``."""


class Throttled(ResourceExhausted):
    """AWS kept throttling after the gateway's and this client's retries; see ``retry_delay``."""


class ConcurrencyLimitExceeded(ResourceExhausted):
    """The gateway already had its --max-aws-calls calls waiting on AWS (a slow AWS); this one was not sent."""


class InternalServiceError(Unavailable): ...


class AwsUnreachable(Unavailable): ...


class HttpError(Unavailable):
    """AWS's front door answered a bare HTTP 5xx (no error type); ``reason`` is HTTP_500, HTTP_503, ..."""


# A SaaS record's status, as a reason (the recorded-usage sender settles records by them, and
# ListMeteringRecords' last_error names them). A BatchMeterUsage call never fails with one: its
# results carry each record's status (metering_client.RecordStatus) instead.
class DuplicateRecord(AlreadyExists):
    """A SaaS record: the customer's hour of this dimension holds another quantity, which stays billed."""


class CustomerNotSubscribed(FailedPrecondition):
    """A SaaS record: the customer has no subscription (agreement) for the product; nothing was kept."""


class UnprocessedRecord(Unavailable):
    """A SaaS record AWS did not process (it may hold it anyway): only the identical record again settles it."""


class EventIdConflict(AlreadyExists):
    """RecordUsage: an event_id was accepted before with another payload; ``field_violations`` name them."""


class RecordingNotEnabled(FailedPrecondition):
    """UsageRecorderService: this gateway was started without a spool (--spool), so it records nothing."""


class SpoolUnavailable(Unavailable):
    """RecordUsage: the gateway could not store the batch (nothing was stored); resend it after ``retry_delay``."""


# The table: ErrorInfo.reason → class. Reasons are the gateway's (docs/api.md, Status codes), kept as
# strings: this distribution does not import the gateway (tests/client checks every gateway Reason is here).
REASONS: Mapping[str, type[MeteringError]] = {
    "INVALID_REQUEST": InvalidRequest,
    "INVALID_PRODUCT_CODE": InvalidProductCode,
    "INVALID_USAGE_DIMENSION": InvalidUsageDimension,
    "INVALID_TAG": InvalidTag,
    "INVALID_USAGE_ALLOCATIONS": InvalidUsageAllocations,
    "TIMESTAMP_OUT_OF_BOUNDS": TimestampOutOfBounds,
    "DUPLICATE_REQUEST": DuplicateRequest,
    "IDEMPOTENCY_CONFLICT": IdempotencyConflict,
    "INVALID_CUSTOMER_IDENTIFIER": InvalidCustomerIdentifier,
    "INVALID_LICENSE": InvalidLicense,
    "INVALID_TOKEN": InvalidToken,
    "EXPIRED_REGISTRATION_TOKEN": ExpiredRegistrationToken,
    "DUPLICATE_RECORD": DuplicateRecord,
    "CUSTOMER_NOT_SUBSCRIBED": CustomerNotSubscribed,
    "UNPROCESSED_RECORD": UnprocessedRecord,
    "CUSTOMER_NOT_ENTITLED": CustomerNotEntitled,
    "INVALID_ENDPOINT_REGION": InvalidEndpointRegion,
    "DISABLED_API": DisabledApi,
    "NO_CREDENTIALS": NoCredentials,
    "EXPIRED_TOKEN": ExpiredToken,
    "UNRECOGNIZED_CLIENT": UnrecognizedClient,
    "INVALID_CLIENT_TOKEN_ID": InvalidClientTokenId,
    "SIGNATURE_DOES_NOT_MATCH": SignatureDoesNotMatch,
    "INVALID_SIGNATURE": InvalidSignature,
    "INCOMPLETE_SIGNATURE": IncompleteSignature,
    "MISSING_AUTHENTICATION_TOKEN": MissingAuthenticationToken,
    "REQUEST_EXPIRED": RequestExpired,
    "UNAUTHORIZED": Unauthorized,
    "ACCESS_DENIED": AccessDenied,
    "CALLER_NOT_ALLOWED": CallerNotAllowed,
    "THROTTLING": Throttled,
    "CONCURRENCY_LIMIT_EXCEEDED": ConcurrencyLimitExceeded,
    "INTERNAL_SERVICE_ERROR": InternalServiceError,
    "AWS_UNREACHABLE": AwsUnreachable,
    "HTTP_500": HttpError,
    "HTTP_502": HttpError,
    "HTTP_503": HttpError,
    "HTTP_504": HttpError,
    "EVENT_ID_CONFLICT": EventIdConflict,
    "SPOOL_UNAVAILABLE": SpoolUnavailable,
    "RECORDING_NOT_ENABLED": RecordingNotEnabled,
    "RECORD_NOT_FOUND": RecordNotFound,
    "RECORD_NOT_FAILED": RecordNotFailed,
    "OUTCOME_UNKNOWN": OutcomeUnknown,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "INTERNAL": Internal,
}

# The fallback for an unknown reason or a status without details.
CODES: Mapping[grpc.StatusCode, type[MeteringError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def _class_for(code: grpc.StatusCode, reason: str) -> type[MeteringError]:
    cls = REASONS.get(reason)
    if cls is not None and issubclass(cls, CODES.get(code, MeteringError)):
        return cls
    return CODES.get(code, MeteringError)  # a reason under an unexpected code: trust the code


def from_status(code: grpc.StatusCode, message: str, status: status_pb2.Status | None) -> MeteringError:
    """The exception for a status and its (optional) ``google.rpc.Status`` details."""
    info = error_details_pb2.ErrorInfo()
    violations: list[FieldViolation] = []
    retry_delay: float | None = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
    cls = _class_for(code, info.reason)
    return cls(
        code,
        message,
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        field_violations=violations,
        retry_delay=retry_delay,
    )


def from_rpc_error(exc: grpc.RpcError) -> MeteringError:
    """The typed exception for a failed call (``exc`` is a grpc.Call too)."""
    call: grpc.Call = exc  # type: ignore[assignment]
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # details that contradict the status: keep the code, drop the details
        status = None
    return from_status(call.code(), call.details() or "", status)
