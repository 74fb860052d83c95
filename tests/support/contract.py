"""The contract's rows of the status table, written out: the specification that the
status table (gateway/domain/errors.py) and the whole path (tests/metering/) are held to."""

from __future__ import annotations

import grpc

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
