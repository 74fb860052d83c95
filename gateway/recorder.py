"""The UsageRecorderService servicer: glue between gRPC and the spool.

RecordUsage: validate the whole batch (every violation, named ``events[i].<field>``)
→ one spool transaction → OK, which means durable. A spool that cannot write
answers UNAVAILABLE ``SPOOL_UNAVAILABLE`` (nothing was committed), and an
event_id reused with another payload ALREADY_EXISTS ``EVENT_ID_CONFLICT``.
ListMeteringRecords only reads: the hourly records as the sender last placed
them, newest hour first, filtered and paged.

The assembly (:mod:`gateway.app`) registers the servicer and wires the spool's
writability to the recorder's health; nothing here imports the assembly.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
import structlog

from gateway import aggregator, errors, validation
from gateway.aggregator import EventRow
from gateway.backend import Backend, RetryPolicy
from gateway.config import ConfigError, Settings
from gateway.sender import Sender
from gateway.service import utcnow
from gateway.spool import FAILED, PENDING, SENT, EventIdConflict, RecordRow, Spool, SpoolError, SpoolUnavailable
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc

PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000
SPOOL_RETRY_DELAY = 1.0  # what RetryInfo tells a caller when the spool cannot write
PROBE_EVERY = 1.0  # seconds between write probes while the spool cannot write
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
    tags = aggregator.tags_key((t.key, t.value) for t in event.tags) if event.tags else ""
    digest = aggregator.event_digest(event.product_code, event.usage_dimension, seconds, nanos, quantity, tags)
    return EventRow(event.event_id, event.product_code, event.usage_dimension, aggregator.hour_of(seconds), tags,
                    quantity, whole, digest)


def record_message(row: RecordRow) -> pb.MeteringRecord:
    content = row.content
    msg = pb.MeteringRecord(
        product_code=row.product_code,
        usage_dimension=row.usage_dimension,
        quantity=row.quantity,
        allocations=aggregator.allocations(content, decimal=row.decimal),
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
        except SpoolUnavailable as exc:  # logged with SQLite's own words by the spool
            raise errors.GatewayError("SPOOL_UNAVAILABLE", f"the spool cannot take events now ({exc}); nothing was "
                                      "stored: retry the same batch", retry_delay=SPOOL_RETRY_DELAY) from None
        structlog.contextvars.bind_contextvars(accepted=accepted, duplicates=duplicates)
        return pb.RecordUsageResponse(accepted=accepted, duplicates=duplicates)

    def ListMeteringRecords(  # noqa: N802
        self, request: pb.ListMeteringRecordsRequest, context: grpc.ServicerContext
    ) -> pb.ListMeteringRecordsResponse:
        if request.page_size < 0:
            raise errors.invalid([validation.Violation("page_size", "must not be negative")])
        size = min(request.page_size or PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)
        after = decode_token(request.page_token) if request.page_token else None
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
    """The recorded-usage parts of a running gateway: spool, servicer, sender.

    While the spool cannot write, a watcher probes it every PROBE_EVERY seconds,
    so that health comes back by itself once it can (a pod taken out of service
    gets no RecordUsage calls that would show it).
    """

    spool: Spool
    servicer: RecorderServicer
    sender: Sender
    _stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None

    def watch_health(self, set_serving: Callable[[bool], None]) -> None:
        """Report the spool's writability through ``set_serving`` from now on."""
        self.spool.on_writable(set_serving)
        set_serving(self.spool.writable)
        self._watcher = threading.Thread(target=self._watch, name="spool-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(PROBE_EVERY):
            try:
                if not self.spool.writable and self.spool.probe():
                    log.info("spool_writable_again", path=self.spool.path)
            except Exception:  # the watcher must outlive any surprise, or health never comes back
                log.exception("spool_watch_failed")

    def close(self, *, flush: bool, budget: float) -> None:
        """After the server drained its calls: stop the sender (flushing the open
        hour if asked), then close the spool, which is consistent at every commit."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        try:
            self.sender.stop(flush=flush, budget=budget)
        finally:
            self.spool.close()


def open_recording(
    settings: Settings, client: Any, *, now: Callable[[], float] | None = None, start: bool = True
) -> Recording:
    """Open ``--spool`` and build the servicer and the (started) sender.

    The sender gets its own Backend with one attempt per call: it retries on its
    own schedule, so every call it makes passes its rate limiter. ``now`` (epoch
    seconds) replaces the wall clock, and ``start=False`` leaves the sender to be
    driven by ``sender.tick()``: both for tests on a simulated clock.
    """
    try:
        spool = Spool(settings.spool)
    except SpoolError as exc:
        raise ConfigError(f"spool: {exc}") from None
    except sqlite3.Error as exc:
        raise ConfigError(f"spool: cannot open {settings.spool!r}: {exc}") from None
    skew = timedelta(seconds=settings.timestamp_skew)
    clock = now or time.time
    servicer = RecorderServicer(spool, future_skew=skew, max_age=timedelta(seconds=settings.event_retention),
                                now=lambda: datetime.fromtimestamp(clock(), timezone.utc))
    backend = Backend(client, RetryPolicy(1, settings.aws_backoff_base, settings.aws_backoff_max))
    sender = Sender(spool, backend, interval=settings.flush_interval, grace=settings.flush_grace,
                    max_rps=settings.aws_max_rps, future_skew=skew, call_timeout=settings.aws_read_timeout * 2,
                    event_retention=settings.event_retention, record_retention=settings.record_retention, now=clock)
    return Recording(spool, servicer, sender.start() if start else sender)
