"""The contract's rows of the status table, written out: the specification that the
status table (gateway/domain/errors.py) and the whole path (tests/metering/) are held to."""

from __future__ import annotations

import grpc

from marketplace.metering.v1 import metering_pb2 as pb

C = grpc.StatusCode

CONTRACT_ROWS = [
    ("InvalidProductCodeException", C.INVALID_ARGUMENT, "INVALID_PRODUCT_CODE"),
    ("InvalidUsageDimensionException", C.INVALID_ARGUMENT, "INVALID_USAGE_DIMENSION"),
    ("InvalidTagException", C.INVALID_ARGUMENT, "INVALID_TAG"),
    ("InvalidUsageAllocationsException", C.INVALID_ARGUMENT, "INVALID_USAGE_ALLOCATIONS"),
    ("TimestampOutOfBoundsException", C.OUT_OF_RANGE, "TIMESTAMP_OUT_OF_BOUNDS"),
    ("DuplicateRequestException", C.ALREADY_EXISTS, "DUPLICATE_REQUEST"),
    ("IdempotencyConflictException", C.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT"),
    ("CustomerNotEntitledException", C.FAILED_PRECONDITION, "CUSTOMER_NOT_ENTITLED"),
    ("InvalidEndpointRegionException", C.FAILED_PRECONDITION, "INVALID_ENDPOINT_REGION"),
    ("DisabledApiException", C.FAILED_PRECONDITION, "DISABLED_API"),
    ("UnauthorizedException", C.PERMISSION_DENIED, "UNAUTHORIZED"),
    ("AccessDeniedException", C.PERMISSION_DENIED, "ACCESS_DENIED"),
    ("ThrottlingException", C.RESOURCE_EXHAUSTED, "THROTTLING"),
    ("InternalServiceErrorException", C.UNAVAILABLE, "INTERNAL_SERVICE_ERROR"),
    ("QuotaRedesignException", C.INTERNAL, "QUOTA_REDESIGN"),
]

# The SaaS operations' rows (BatchMeterUsage, ResolveCustomer): (operation, AWS exception, its
# message, code, reason). The message matters for one name only: ResolveCustomer's
# ExpiredTokenException is the buyer's registration token (EXPIRED_REGISTRATION_TOKEN,
# INVALID_ARGUMENT) unless it names the security token, which is the gateway's own
# credentials (EXPIRED_TOKEN, FAILED_PRECONDITION), as for every other operation.
SAAS_CONTRACT_ROWS = [
    (
        "BatchMeterUsage",
        "InvalidCustomerIdentifierException",
        "no such customer",
        C.INVALID_ARGUMENT,
        "INVALID_CUSTOMER_IDENTIFIER",
    ),
    ("BatchMeterUsage", "InvalidLicenseException", "no such license", C.INVALID_ARGUMENT, "INVALID_LICENSE"),
    ("BatchMeterUsage", "InvalidProductCodeException", "no such product", C.INVALID_ARGUMENT, "INVALID_PRODUCT_CODE"),
    (
        "BatchMeterUsage",
        "InvalidUsageDimensionException",
        "no such dimension",
        C.INVALID_ARGUMENT,
        "INVALID_USAGE_DIMENSION",
    ),
    ("BatchMeterUsage", "InvalidTagException", "bad tag", C.INVALID_ARGUMENT, "INVALID_TAG"),
    (
        "BatchMeterUsage",
        "InvalidUsageAllocationsException",
        "bad allocations",
        C.INVALID_ARGUMENT,
        "INVALID_USAGE_ALLOCATIONS",
    ),
    ("BatchMeterUsage", "TimestampOutOfBoundsException", "too old", C.OUT_OF_RANGE, "TIMESTAMP_OUT_OF_BOUNDS"),
    ("BatchMeterUsage", "DisabledApiException", "disabled", C.FAILED_PRECONDITION, "DISABLED_API"),
    ("BatchMeterUsage", "ThrottlingException", "Rate exceeded", C.RESOURCE_EXHAUSTED, "THROTTLING"),
    ("BatchMeterUsage", "InternalServiceErrorException", "oops", C.UNAVAILABLE, "INTERNAL_SERVICE_ERROR"),
    ("ResolveCustomer", "InvalidTokenException", "Registration token is invalid", C.INVALID_ARGUMENT, "INVALID_TOKEN"),
    (
        "ResolveCustomer",
        "ExpiredTokenException",
        "Registration token has expired",
        C.INVALID_ARGUMENT,
        "EXPIRED_REGISTRATION_TOKEN",
    ),
    (
        "ResolveCustomer",
        "ExpiredTokenException",
        "The security token included in the request is expired",
        C.FAILED_PRECONDITION,
        "EXPIRED_TOKEN",
    ),
    ("ResolveCustomer", "DisabledApiException", "disabled", C.FAILED_PRECONDITION, "DISABLED_API"),
    ("ResolveCustomer", "ThrottlingException", "Rate exceeded", C.RESOURCE_EXHAUSTED, "THROTTLING"),
    ("ResolveCustomer", "InternalServiceErrorException", "oops", C.UNAVAILABLE, "INTERNAL_SERVICE_ERROR"),
]

# A BatchMeterUsage record's status, as AWS names it → the proto's UsageRecordResult.Status.
RECORD_STATUS_ROWS = [
    ("Success", pb.UsageRecordResult.STATUS_SUCCESS),
    ("CustomerNotSubscribed", pb.UsageRecordResult.STATUS_CUSTOMER_NOT_SUBSCRIBED),
    ("DuplicateRecord", pb.UsageRecordResult.STATUS_DUPLICATE_RECORD),
]
