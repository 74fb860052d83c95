"""The UsageRecorderService servicer: glue between gRPC and the spool.

RecordUsage: validate the whole batch (every violation, named ``events[i].<field>``)
→ one spool transaction → OK, which means durable. ListMeteringRecords: the
hourly records, newest hour first, filtered and paged.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import grpc
import structlog

from gateway import aggregator, errors, validation
from gateway.aggregator import EventRow
from gateway.backend import Backend, RetryPolicy
from gateway.config import ConfigError, Settings
from gateway.sender import Sender
from gateway.server import RECORDER_SERVICE, Servicer
from gateway.service import utcnow
from gateway.spool import FAILED, LATE, PENDING, SENT, RecordRow, Spool
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc

PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000

_STATE_NAMES = {pb.MeteringRecord.STATE_PENDING: PENDING, pb.MeteringRecord.STATE_SENT: SENT,
                pb.MeteringRecord.STATE_FAILED: FAILED}
_STATE_VALUES = {name: value for value, name in _STATE_NAMES.items()}


def event_row(event: pb.UsageEvent) -> EventRow:
    """A validated event as the spool stores it."""
    if event.WhichOneof("quantity") == "usage_quantity":
        quantity, whole = str(event.usage_quantity), True
    else:
        quantity, whole = event.usage_quantity_as_decimal, False
    seconds = event.timestamp.seconds
    tags = aggregator.tags_key((t.key, t.value) for t in event.tags) if event.tags else ""
    return EventRow(event.event_id, event.product_code, event.usage_dimension, aggregator.hour_of(seconds), tags, quantity, whole)


def record_message(row: RecordRow) -> pb.MeteringRecord:
    content = row.content
    msg = pb.MeteringRecord(
        product_code=row.product_code,
        usage_dimension=row.usage_dimension,
        quantity=row.quantity,
        allocations=aggregator.allocations(content),
        state=_STATE_VALUES[row.state],
        metering_record_id=row.metering_record_id,
        attempts=row.attempts,
        last_error=row.last_error,
        client_token=row.client_token,
    )
    msg.hour.FromDatetime(aggregator.timestamp_of(row.hour))
    for hour in row.carried_hours:
        msg.carried_from.add().FromDatetime(aggregator.timestamp_of(hour))
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
        now: Callable[[], datetime] = utcnow,
        margin: float = aggregator.SAFETY_MARGIN,
    ) -> None:
        self._spool = spool
        self._future_skew = future_skew
        self._now = now
        self._margin = margin

    def RecordUsage(self, request: pb.RecordUsageRequest, context: grpc.ServicerContext) -> pb.RecordUsageResponse:  # noqa: N802
        structlog.contextvars.bind_contextvars(events=len(request.events))
        window = validation.Window(self._now(), self._future_skew, validation.EVENT_MAX_AGE)
        violations = validation.validate_record_usage(request.events, window)
        if violations:
            raise errors.invalid(violations, "batch")
        accepted, duplicates = self._spool.record([event_row(e) for e in request.events])
        structlog.contextvars.bind_contextvars(accepted=accepted, duplicates=duplicates)
        return pb.RecordUsageResponse(accepted=accepted, duplicates=duplicates)

    def ListMeteringRecords(  # noqa: N802
        self, request: pb.ListMeteringRecordsRequest, context: grpc.ServicerContext
    ) -> pb.ListMeteringRecordsResponse:
        if request.page_size < 0:
            raise errors.invalid([validation.Violation("page_size", "must not be negative")])
        size = min(request.page_size or PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)
        after = decode_token(request.page_token) if request.page_token else None
        # Place events recorded since the sender's last pass, so the listing is current.
        for carry in self._spool.assign(self._now().timestamp(), self._margin):
            carry.log(LATE)
        rows = self._spool.list_records(
            state=_STATE_NAMES.get(request.state), product_code=request.product_code or None, after=after, limit=size + 1
        )
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListMeteringRecordsResponse(
            records=[record_message(r) for r in rows],
            next_page_token=encode_token(rows[-1]) if more else "",
        )


@dataclass
class Recording:
    """The recorded-usage parts of a running gateway: spool, servicer, sender."""

    spool: Spool
    servicer: Servicer
    sender: Sender

    def close(self, *, flush: bool, budget: float) -> None:
        """After the server drained its calls: stop the sender (flushing the open
        hour if asked), then close the spool, which is consistent at every commit."""
        try:
            self.sender.stop(flush=flush, budget=budget)
        finally:
            self.spool.close()


def open_recording(settings: Settings, client: Any) -> Recording:
    """Open ``--spool`` and build the servicer and the (started) sender.

    The sender gets its own Backend with one attempt per call: it retries on its
    own schedule, so every call it makes passes its rate limiter.
    """
    try:
        spool = Spool(settings.spool)
    except sqlite3.Error as exc:
        raise ConfigError(f"spool: cannot open {settings.spool!r}: {exc}") from None
    skew = timedelta(seconds=settings.timestamp_skew)
    servicer = Servicer(RECORDER_SERVICE, RecorderServicer(spool, future_skew=skew),
                        pb_grpc.add_UsageRecorderServiceServicer_to_server)
    backend = Backend(client, RetryPolicy(1, settings.aws_backoff_base, settings.aws_backoff_max))
    sender = Sender(spool, backend, interval=settings.flush_interval, grace=settings.flush_grace,
                    max_rps=settings.aws_max_rps, future_skew=skew, call_timeout=settings.aws_read_timeout * 2)
    return Recording(spool, servicer, sender.start())
