"""SaaS records → BatchMeterUsage calls, and AWS's per-record statuses → what the sender
does, as pure functions (the sender does the I/O).

A call holds at most 25 records of one product (or, when the caller gave no product,
one license: AWS refuses a call whose licenses name two products), all naming their
customers the same way. Only a call-wide refusal that one record can cause (an unknown
license, dimension or customer, a bad tag, a timestamp out of bounds, a record the
gateway's own check refuses) is worth splitting the call for (:func:`record_caused`).

Each record is the spool's frozen bucket of one customer, dimension and hour,
timestamped at the hour's start, so the same record again is the same request
record: BatchMeterUsage has no ClientToken, and AWS keeps one record per customer,
dimension and hour, answering an identical one with the record it kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from gateway.domain import errors, validation
from gateway.recording import placement
from gateway.recording.spool import RecordRow
from marketplace.metering.v1 import metering_pb2 as pb

SUCCESS, CUSTOMER_NOT_SUBSCRIBED, DUPLICATE_RECORD = "Success", "CustomerNotSubscribed", "DuplicateRecord"
# AWS's record statuses that settle a record other than as sent, and the table's reasons for them.
_STATUS_REASONS = {
    DUPLICATE_RECORD: errors.Reason.DUPLICATE_RECORD,
    CUSTOMER_NOT_SUBSCRIBED: errors.Reason.CUSTOMER_NOT_SUBSCRIBED,
}


def call_key(row: RecordRow, hints: Mapping[int, str]) -> tuple[str, str]:
    """Which records may share a call: the product (a license's record: the product its
    events named, ``hints``), else the license; and the way the customer is named (legacy
    records carry the product in the request, the others must not). A wrong hint costs
    calls, never money: AWS refuses a call whose licenses name two products, and the
    sender splits it."""
    way = validation.customer_way(row.customer_aws_account_id, row.license_arn, row.customer_identifier)
    return (row.product_code or hints.get(row.id) or row.license_arn, way)


def batches(
    rows: Iterable[RecordRow], hints: Mapping[int, str] | None = None, size: int = validation.BATCH_RECORDS_MAX
) -> list[list[RecordRow]]:
    """SaaS records in calls of at most ``size`` (and under AWS's 1 MB), one product (or
    license) and one way of naming customers each, oldest hour first (the first to leave
    AWS's window)."""
    groups: dict[tuple[str, str], list[list[RecordRow]]] = {}
    room: dict[tuple[str, str], int] = {}
    for row in sorted(rows, key=lambda r: (r.hour, r.id)):
        key = call_key(row, hints or {})
        calls = groups.setdefault(key, [[]])
        need = row_bytes(row)
        if len(calls[-1]) >= size or (calls[-1] and need > room[key]):
            calls.append([])
        if not calls[-1]:
            room[key] = CALL_BYTES
        calls[-1].append(row)
        room[key] -= need
    return sorted((c for calls in groups.values() for c in calls), key=lambda b: (b[0].hour, b[0].id))


# What the records of one call may take, about (row_bytes): under AWS's 1 MB, with room to spare.
CALL_BYTES = 900_000


def row_bytes(row: RecordRow) -> int:
    """About the bytes (an overestimate) a record takes in AWS's request: its customer and
    dimension, and its allocations (:func:`gateway.recording.placement.allocation_bytes`)."""
    fixed = 200 + len(row.usage_dimension) + len(row.customer)
    return fixed + row.content.size


def usage_record(row: RecordRow) -> pb.UsageRecord:
    """The UsageRecord of a frozen SaaS bucket: at its hour's start, decimal quantities."""
    record = pb.UsageRecord(
        dimension=row.usage_dimension,
        customer_aws_account_id=row.customer_aws_account_id,
        license_arn=row.license_arn,
        customer_identifier=row.customer_identifier,
        quantity_as_decimal=row.quantity,
        usage_allocations=placement.allocations(row.content),
    )
    record.timestamp.FromDatetime(placement.timestamp_of(row.hour))
    return record


def build_batch(rows: Sequence[RecordRow]) -> pb.BatchMeterUsageRequest:
    """The BatchMeterUsage request for records of one :func:`call_key`."""
    legacy = bool(rows[0].customer_identifier)
    return pb.BatchMeterUsageRequest(
        usage_records=[usage_record(r) for r in rows], product_code=rows[0].product_code if legacy else ""
    )


def status_error(status: str, request_id: str | None) -> errors.GatewayError | None:
    """What a record's status in AWS's answer means for it: None for Success; else the
    refusal it amounts to. A status this release does not know leaves the record's fate
    unknown, so it is treated as unprocessed (resent identically, never carried)."""
    if status == SUCCESS:
        return None
    reason = _STATUS_REASONS.get(status)
    if reason is None:
        return unprocessed(f"AWS answered the record with status {status!r}, unknown to this release", request_id)
    return errors.GatewayError(
        reason, f"AWS answered the record {status}", errors.AWS_DOMAIN, aws_code=status, aws_request_id=request_id
    )


def unprocessed(message: str = "AWS left the record unprocessed", request_id: str | None = None) -> errors.GatewayError:
    """A record AWS did not process (or whose answer never came): it may hold it anyway."""
    return errors.GatewayError(
        errors.Reason.UNPROCESSED_RECORD, message, errors.AWS_DOMAIN, aws_request_id=request_id, maybe_delivered=True
    )


# Refusals of a whole call that one of its records can cause: split the call to find it.
# Any other (throttling, credentials, a disabled API, an unknown legacy product code, a
# request botocore refused) is the call's, and every record would meet it alone too.
_RECORD_CAUSED = frozenset(
    {
        errors.Reason.INVALID_LICENSE,
        errors.Reason.INVALID_USAGE_DIMENSION,
        errors.Reason.INVALID_CUSTOMER_IDENTIFIER,
        errors.Reason.INVALID_TAG,
        errors.Reason.INVALID_USAGE_ALLOCATIONS,
        errors.Reason.TIMESTAMP_OUT_OF_BOUNDS,
    }
)


def record_caused(error: errors.GatewayError) -> bool:
    """Whether one record of the call may be what AWS (or the gateway's check) refused it for."""
    if error.reason == errors.Reason.INVALID_REQUEST:
        return bool(error.violations)  # the gateway's own check names fields; botocore's refusal does not
    return error.reason in _RECORD_CAUSED
