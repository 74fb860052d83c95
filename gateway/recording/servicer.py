"""The UsageRecorderService servicer: glue between gRPC and the spool.

RecordUsage: validate the whole batch (every violation, named ``events[i].<field>``)
→ one spool transaction → OK, which means durable. A spool that cannot write
answers UNAVAILABLE ``SPOOL_UNAVAILABLE`` (nothing was committed), and an
event_id reused with another payload ALREADY_EXISTS ``EVENT_ID_CONFLICT``.
ListMeteringRecords only reads: the hourly records as the sender last placed
them, newest hour first, filtered and paged.

The assembly (:mod:`gateway.app`) registers the servicer and wires the spool's
writability to the recorder's health; nothing here imports the assembly, and
nothing here knows which database the spool is.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import datetime, timedelta

import grpc
import structlog

from gateway import errors, validation
from gateway.recording import placement
from gateway.recording.placement import EventRow
from gateway.recording.spool import FAILED, PENDING, SENT, EventIdConflict, RecordRow, Spool, SpoolUnavailable
from gateway.service import utcnow
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc

PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000
SPOOL_RETRY_DELAY = 1.0  # what RetryInfo tells a caller when the spool cannot write
CONFLICT = "was accepted before with a different product, dimension, timestamp, quantity or tags"

log = structlog.get_logger("gateway.recorder")

_STATE_NAMES = {pb.MeteringRecord.STATE_PENDING: PENDING, pb.MeteringRecord.STATE_SENT: SENT,
                pb.MeteringRecord.STATE_FAILED: FAILED}
_STATE_VALUES = {name: value for value, name in _STATE_NAMES.items()}


def event_row(event: pb.UsageEvent) -> EventRow:
    """A validated event as the spool stores it."""
    if event.WhichOneof("quantity") == "usage_quantity":
        quantity, whole = str(event.usage_quantity), True
    else:
        quantity, whole = event.usage_quantity_as_decimal, False
    seconds, nanos = event.timestamp.seconds, event.timestamp.nanos
    tags = placement.tags_key((t.key, t.value) for t in event.tags) if event.tags else ""
    digest = placement.event_digest(event.product_code, event.usage_dimension, seconds, nanos, quantity, tags)
    return EventRow(event.event_id, event.product_code, event.usage_dimension, placement.hour_of(seconds), tags,
                    quantity, whole, digest)


def record_message(row: RecordRow) -> pb.MeteringRecord:
    content = row.content
    msg = pb.MeteringRecord(
        product_code=row.product_code,
        usage_dimension=row.usage_dimension,
        quantity=row.quantity,
        allocations=placement.allocations(content, decimal=row.decimal),
        state=_STATE_VALUES[row.state],
        metering_record_id=row.metering_record_id,
        attempts=row.attempts,
        last_error=row.last_error,
        client_token=row.client_token,
    )
    msg.hour.FromDatetime(placement.timestamp_of(row.hour))
    for hour in row.carried_hours:
        msg.carried_from.add().FromDatetime(placement.timestamp_of(hour))
    return msg


def encode_token(row: RecordRow) -> str:
    return base64.urlsafe_b64encode(json.dumps([row.hour, row.id]).encode()).decode()


def decode_token(token: str) -> tuple[int, int]:
    try:
        hour, record_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(hour), int(record_id)
    except (ValueError, TypeError, binascii.Error):
        raise errors.invalid([validation.Violation("page_token", "is not a token this server returned")]) from None


class RecorderServicer(pb_grpc.UsageRecorderServiceServicer):
    def __init__(
        self,
        spool: Spool,
        *,
        future_skew: timedelta,
        max_age: timedelta,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self._spool = spool
        self._future_skew = future_skew
        self._now = now
        self._max_age = max_age  # the deduplication window: an older event may be forgotten already

    def RecordUsage(self, request: pb.RecordUsageRequest, context: grpc.ServicerContext) -> pb.RecordUsageResponse:  # noqa: N802
        structlog.contextvars.bind_contextvars(events=len(request.events))
        window = validation.Window(self._now(), self._future_skew, self._max_age, validation.TOO_OLD_TO_DEDUPLICATE)
        violations = validation.validate_record_usage(request.events, window)
        if violations:
            raise errors.invalid(violations, "batch")
        try:
            accepted, duplicates = self._spool.record([event_row(e) for e in request.events])
        except EventIdConflict as exc:
            violations = [validation.Violation(f"events[{i}].event_id", CONFLICT) for i in exc.indices]
            raise errors.GatewayError("EVENT_ID_CONFLICT", f"{exc}: " + ", ".join(v.field for v in violations),
                                      violations=violations) from None
        except SpoolUnavailable as exc:  # logged with the database's own words by the spool
            raise errors.GatewayError("SPOOL_UNAVAILABLE", f"the spool cannot take events now ({exc}); nothing was "
                                      "acknowledged: retry the same batch, with the same event ids", retry_delay=SPOOL_RETRY_DELAY) from None
        structlog.contextvars.bind_contextvars(accepted=accepted, duplicates=duplicates)
        return pb.RecordUsageResponse(accepted=accepted, duplicates=duplicates)

    def ListMeteringRecords(  # noqa: N802
        self, request: pb.ListMeteringRecordsRequest, context: grpc.ServicerContext
    ) -> pb.ListMeteringRecordsResponse:
        if request.page_size < 0:
            raise errors.invalid([validation.Violation("page_size", "must not be negative")])
        size = min(request.page_size or PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)
        after = decode_token(request.page_token) if request.page_token else None
        try:
            rows = self._spool.list_records(
                state=_STATE_NAMES.get(request.state), product_code=request.product_code or None, after=after,
                limit=size + 1,
            )
        except SpoolUnavailable as exc:
            raise errors.GatewayError("SPOOL_UNAVAILABLE", f"the spool cannot be read now ({exc}); retry",
                                      retry_delay=SPOOL_RETRY_DELAY) from None
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListMeteringRecordsResponse(
            records=[record_message(r) for r in rows],
            next_page_token=encode_token(rows[-1]) if more else "",
        )
