"""The command line's gRPC client of a running gateway: the channel (``--target`` and its
TLS flags), and the calls health, ``meter`` and ``records`` make, with the paging and
the repeated reads a consistent listing needs. Printing is the commands' job."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc

PAGE_SIZE = 1000  # records per ListMeteringRecords call (the server's most)
EXPORT_READS = 3  # full reads of a month at most, for two in a row that agree
RECORD_STATES = {
    "pending": pb.MeteringRecord.STATE_PENDING,
    "sent": pb.MeteringRecord.STATE_SENT,
    "failed": pb.MeteringRecord.STATE_FAILED,
}


def channel(target: str, tls_ca: str, tls_cert: str, tls_key: str) -> grpc.Channel:
    """Plain text to ``target``, or TLS when a CA is given (mTLS with a certificate and key)."""
    if not tls_ca:
        return grpc.insecure_channel(target)
    key = Path(tls_key).read_bytes() if tls_key else None
    cert = Path(tls_cert).read_bytes() if tls_cert else None
    creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes(), key, cert)
    return grpc.secure_channel(target, creds)


def failure(exc: grpc.RpcError) -> str:
    """``CODE: details [REASON]``: the status, and the ErrorInfo reason when the gateway sent one;
    then a line ``  field: description`` per BadRequest field violation, every field to fix."""
    text = f"{exc.code().name}: {exc.details() or ''}"
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:  # details that contradict the status: show the status alone
        status = None
    reason, violations = "", []
    for detail in status.details if status is not None else ():
        if not reason and detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [f"\n  {v.field}: {v.description}" for v in bad.field_violations]
    return (f"{text} [{reason}]" if reason else text) + "".join(violations)


def health(channel: grpc.Channel, service: str, timeout: float) -> health_pb2.HealthCheckResponse:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)


def meter_request(
    product: str,
    dimension: str,
    quantity: str,
    when: datetime,
    *,
    dry_run: bool,
    token: str,
    tags: Sequence[tuple[str, str]],
) -> pb.MeterUsageRequest:
    """One MeterUsage request, the quantity sent as typed; with ``tags``, the whole quantity
    allocated to one bucket carrying them."""
    request = pb.MeterUsageRequest(
        product_code=product,
        usage_dimension=dimension,
        usage_quantity_as_decimal=quantity,
        dry_run=dry_run,
        client_token=token,
    )
    request.timestamp.FromDatetime(when)
    if tags:
        request.usage_allocations.add(
            allocated_usage_quantity_as_decimal=quantity, tags=[pb.Tag(key=key, value=value) for key, value in tags]
        )
    return request


def meter_usage(channel: grpc.Channel, request: pb.MeterUsageRequest, timeout: float) -> pb.MeterUsageResponse:
    return pb_grpc.MeteringServiceStub(channel).MeterUsage(request, timeout=timeout)


def every_record(
    channel: grpc.Channel, request: pb.ListMeteringRecordsRequest, timeout: float, limit: int = 0
) -> list[pb.MeteringRecord]:
    """Every page of a listing, newest hour first (at most ``limit`` records when set)."""
    stub = pb_grpc.UsageRecorderServiceStub(channel)
    found: list[pb.MeteringRecord] = []
    request.page_size = min(limit, PAGE_SIZE) if limit else PAGE_SIZE
    while True:
        reply = stub.ListMeteringRecords(request, timeout=timeout)
        found.extend(reply.records)
        if not reply.next_page_token or (limit and len(found) >= limit):
            return found[:limit] if limit else found
        request.page_token = reply.next_page_token


def agreed(read: Callable[[], list[pb.MeteringRecord]], tries: int = EXPORT_READS) -> list[pb.MeteringRecord] | None:
    """``read()`` again until two reads in a row agree; None after ``tries`` reads.

    A listing pages newest hour first over a live table: a carry between two pages can
    move usage from a record not yet read into one already read, and one read would
    miss it. Two identical reads in a row saw no such move.
    """
    last = read()
    for _ in range(tries - 1):
        again = read()
        if again == last:
            return again
        last = again
    return None


def month_records(
    channel: grpc.Channel, start: datetime, end: datetime, timeout: float
) -> list[pb.MeteringRecord] | None:
    """Every record of the hours from ``start`` to ``end``, newest first, as two full reads
    in a row agree on them (:func:`agreed`); None when they kept changing."""
    request = pb.ListMeteringRecordsRequest()
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(end)

    def read() -> list[pb.MeteringRecord]:
        pages = pb.ListMeteringRecordsRequest()
        pages.CopyFrom(request)  # from the first page each time
        return every_record(channel, pages, timeout)

    return agreed(read)


def retry_record(channel: grpc.Channel, record_id: str, reconciled: bool, timeout: float) -> pb.MeteringRecord:
    """A FAILED record back in the queue; the record as it is now."""
    reply = pb_grpc.UsageRecorderServiceStub(channel).RetryMeteringRecord(
        pb.RetryMeteringRecordRequest(record_id=record_id, reconciled=reconciled), timeout=timeout
    )
    return reply.record
