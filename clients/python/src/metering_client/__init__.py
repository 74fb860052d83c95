"""Python client for the metering gateway.

    from metering_client import MeteringClient, DuplicateRequest

    with MeteringClient("127.0.0.1:50051") as client:
        result = client.meter_usage(product_code="prod-abc123", usage_dimension="requests", quantity=3)
"""

from metering_client.client import MeteringClient, MeterResult, RecordResult, RetryPolicy
from metering_client.convert import Allocation, UsageEvent
from metering_client.errors import (
    REASONS,
    AccessDenied,
    AlreadyExists,
    AwsUnreachable,
    CallerNotAllowed,
    Cancelled,
    CredentialsRefused,
    CustomerNotEntitled,
    DeadlineExceeded,
    DisabledApi,
    DuplicateRequest,
    EventIdConflict,
    ExpiredToken,
    ConcurrencyLimitExceeded,
    FailedPrecondition,
    FieldViolation,
    HttpError,
    IdempotencyConflict,
    IncompleteSignature,
    Internal,
    InternalServiceError,
    InvalidArgument,
    InvalidClientTokenId,
    InvalidEndpointRegion,
    InvalidProductCode,
    InvalidRequest,
    InvalidSignature,
    InvalidTag,
    InvalidUsageAllocations,
    InvalidUsageDimension,
    MeteringError,
    MissingAuthenticationToken,
    NoCredentials,
    NotFound,
    OutcomeUnknown,
    OutOfRange,
    PermissionDenied,
    RecordNotFailed,
    RecordNotFound,
    RecordingNotEnabled,
    RequestExpired,
    ResourceExhausted,
    SignatureDoesNotMatch,
    SpoolUnavailable,
    Throttled,
    TimestampOutOfBounds,
    Unauthenticated,
    Unauthorized,
    Unavailable,
    UnrecognizedClient,
)

__all__ = [
    "REASONS", "AccessDenied", "Allocation", "AlreadyExists", "AwsUnreachable", "CallerNotAllowed", "Cancelled",
    "ConcurrencyLimitExceeded",
    "CredentialsRefused",
    "EventIdConflict", "ExpiredToken", "HttpError", "InvalidClientTokenId", "SignatureDoesNotMatch", "SpoolUnavailable",
    "UnrecognizedClient", "InvalidSignature", "IncompleteSignature", "MissingAuthenticationToken", "RequestExpired",
    "CustomerNotEntitled", "DeadlineExceeded", "DisabledApi", "DuplicateRequest", "FailedPrecondition",
    "FieldViolation", "IdempotencyConflict", "Internal", "InternalServiceError", "InvalidArgument",
    "InvalidEndpointRegion", "InvalidProductCode", "InvalidRequest", "InvalidTag", "InvalidUsageAllocations",
    "InvalidUsageDimension", "MeterResult", "MeteringClient", "MeteringError", "NoCredentials", "NotFound", "OutOfRange", "OutcomeUnknown",
    "PermissionDenied", "RecordNotFailed", "RecordNotFound", "RecordResult", "RecordingNotEnabled", "ResourceExhausted", "RetryPolicy", "Throttled",
    "TimestampOutOfBounds", "Unauthenticated", "Unauthorized", "Unavailable", "UsageEvent",
]
