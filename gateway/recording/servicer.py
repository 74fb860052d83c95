"""The UsageRecorderService servicer: glue between gRPC and the spool.

RecordUsage: validate the whole batch (every violation, named ``events[i].<field>``)
→ one spool transaction → OK, which means durable. A spool that cannot write
answers UNAVAILABLE ``SPOOL_UNAVAILABLE`` (nothing was committed), and an
event_id reused with another payload ALREADY_EXISTS ``EVENT_ID_CONFLICT``. An
event that names a customer is SaaS usage: kept in records of that customer, and
carried only once older than AWS's SaaS window (24 hours, the month-end cutoff).
ListMeteringRecords only reads: the hourly records as the sender last placed
them, newest hour first, filtered and paged. RetryMeteringRecord is an
operator's: a FAILED record back in the queue, the identical request again, and
never one AWS may hold unless the operator reconciled it (``OUTCOME_UNKNOWN``).

The assembly (:mod:`gateway.assembly.app`) registers the servicer and wires the spool's
writability to the recorder's health; nothing here imports the assembly, and
nothing here knows which database the spool is.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import NoReturn

import grpc
import structlog

from gateway.domain import errors, validation
from gateway.domain.clock import HOUR, utcnow
from gateway.observability import metrics
from gateway.recording import placement
from gateway.recording.placement import EventRow
from gateway.recording.spool import (
    FAILED,
    PENDING,
    SENT,
    EventIdConflict,
    OutcomeUnknown,
    RecordNotFailed,
    RecordNotFound,
    RecordRow,
    Spool,
    SpoolUnavailable,
)
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc

PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000
SPOOL_RETRY_DELAY = 1.0  # what RetryInfo tells a caller when the spool cannot write
RECORD_ID_MAX = 2**63 - 1  # both databases' record ids are 64-bit
_RECORD_ID = re.compile(r"[0-9]{1,19}")  # RECORD_ID_MAX has 19 digits: longer is never one, and never converted
# A page token is base64 of "[hour,record_id]", two such numbers: nothing else is even parsed.
_TOKEN = re.compile(r"\[([0-9]{1,19}),\s?([0-9]{1,19})\]")
_TOKEN_MAX = 64
# google.protobuf.Timestamp's own range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_TIMESTAMP_MIN, _TIMESTAMP_MAX = -62_135_596_800, 253_402_300_799
NOT_ENABLED = (
    "this gateway records no usage: it was started without a spool. Start it with --spool PATH "
    "(an SQLite file; or a postgresql:// URL), or METERING_GATEWAY_SPOOL; `make serve` does"
)
CONFLICTS_IN_MESSAGE = 3  # the status message names this many; the BadRequest all of them

log = structlog.get_logger("gateway.recorder")

_STATE_NAMES = {
    pb.MeteringRecord.STATE_PENDING: PENDING,
    pb.MeteringRecord.STATE_SENT: SENT,
    pb.MeteringRecord.STATE_FAILED: FAILED,
}
_STATE_VALUES = {name: value for value, name in _STATE_NAMES.items()}


def event_row(event: pb.UsageEvent, stamp: float | None = None, span: int = HOUR) -> EventRow:
    """A validated event as the spool stores it. One without a timestamp is placed
    at ``stamp`` (when the gateway accepts it); its digest leaves the time out, so an
    identical resend, again without one, is a duplicate whenever it comes. Its own
    "hour" is the start of the bucket of ``span`` seconds it falls in (:attr:`Spool.span`).
    Its customer (SaaS usage) is part of what it says: the same id for another
    customer is a conflict, never a duplicate."""
    if event.WhichOneof("quantity") == "usage_quantity":
        quantity, whole = str(event.usage_quantity), True
    else:
        quantity, whole = event.usage_quantity_as_decimal, False
    tags = placement.tags_key((t.key, t.value) for t in event.tags) if event.tags else ""
    seconds: int | None
    if event.HasField("timestamp"):
        seconds, nanos = event.timestamp.seconds, event.timestamp.nanos
        hour, shown = placement.hour_of(seconds, span), placement.event_time(seconds, nanos)
    elif stamp is None:
        raise ValueError(f"event {event.event_id!r} has no timestamp, and no stamp was given")
    else:
        seconds, nanos, hour, shown = None, 0, placement.hour_of(stamp, span), ""
    customer = placement.customer_key(event.customer_aws_account_id, event.license_arn, event.customer_identifier)
    digest = placement.event_digest(event.product_code, event.usage_dimension, seconds, nanos, quantity, tags, customer)
    return EventRow(
        event.event_id, event.product_code, event.usage_dimension, hour, tags, quantity, whole, digest, shown, customer
    )


def conflict(path: str, differences: list[tuple[str, str, str]], before: str) -> validation.Violation:
    """``events[i].event_id`` refused, saying which fields differ from ``before`` and how."""
    said = "; ".join(f"{name} {old} then, {new} now" for name, old, new in differences)
    return validation.Violation(f"{path}.event_id", f"{before} with a different payload: {said}")


def spool_unavailable(exc: SpoolUnavailable, cannot: str, then: str) -> errors.GatewayError:
    """UNAVAILABLE ``SPOOL_UNAVAILABLE`` with RetryInfo: the spool could not ``cannot`` (its own
    words were logged by the spool), and what the caller does ``then``."""
    return errors.GatewayError(
        errors.Reason.SPOOL_UNAVAILABLE, f"the spool cannot {cannot} now ({exc}); {then}", retry_delay=SPOOL_RETRY_DELAY
    )


def conflicts(summary: str, violations: list[validation.Violation]) -> errors.GatewayError:
    """EVENT_ID_CONFLICT: the first few conflicts in the message, every one in the BadRequest."""
    shown = "; ".join(f"{v.field} {v.description}" for v in violations[:CONFLICTS_IN_MESSAGE])
    more = f"; and {len(violations) - CONFLICTS_IN_MESSAGE} more" if len(violations) > CONFLICTS_IN_MESSAGE else ""
    return errors.GatewayError(errors.Reason.EVENT_ID_CONFLICT, f"{summary}: {shown}{more}", violations=violations)


def repeats(rows: list[EventRow]) -> list[validation.Violation]:
    """An event_id twice in one batch with different payloads: the batch contradicts
    itself, whatever was accepted before, so it is refused before the spool is
    asked, and says so. An identical repeat is one event."""
    first: dict[str, int] = {}
    out = []
    for i, row in enumerate(rows):
        j = first.setdefault(row.event_id, i)
        if j != i and rows[j].digest != row.digest:
            out.append(
                conflict(
                    f"events[{i}]", placement.differences(rows[j], row), f"repeats events[{j}].event_id in this batch"
                )
            )
    return out


def record_message(row: RecordRow) -> pb.MeteringRecord:
    """A stored record as ListMeteringRecords shows it, with its customer for SaaS usage."""
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
        record_id=str(row.id),
        outcome_unknown=row.outcome_unknown,
        customer_aws_account_id=row.customer_aws_account_id,
        license_arn=row.license_arn,
        customer_identifier=row.customer_identifier,
    )
    msg.hour.FromDatetime(placement.timestamp_of(row.hour))
    for hour in row.carried_hours:
        msg.carried_from.add().FromDatetime(placement.timestamp_of(hour))
    return msg


def record_id_of(text: str) -> int:
    """RetryMeteringRecord's ``record_id``: the decimal digits ListMeteringRecords gave."""
    if not _RECORD_ID.fullmatch(text) or int(text) > RECORD_ID_MAX:
        raise errors.invalid(
            [
                validation.Violation(
                    "record_id", "must be a record_id as ListMeteringRecords returns it (decimal digits)"
                )
            ]
        )
    return int(text)


def hour_range(request: pb.ListMeteringRecordsRequest) -> tuple[int | None, int | None]:
    """start_time and end_time as bounds on a record's hour, which starts on a whole
    second: ``hour >= 10.5`` is ``hour >= 11``, and so is ``hour < 10.5`` ``hour < 11``."""
    violations = []
    bounds: list[int | None] = []
    for name in ("start_time", "end_time"):
        if not request.HasField(name):
            bounds.append(None)
            continue
        stamp = getattr(request, name)
        if not 0 <= stamp.nanos < 1_000_000_000:
            violations.append(validation.Violation(name, "nanos must be between 0 and 999999999"))
        if not _TIMESTAMP_MIN <= stamp.seconds <= _TIMESTAMP_MAX:
            violations.append(
                validation.Violation(name, "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z")
            )
        bounds.append(stamp.seconds + (1 if stamp.nanos > 0 else 0))
    start, end = request.start_time, request.end_time
    if not violations and None not in bounds and (end.seconds, end.nanos) <= (start.seconds, start.nanos):
        violations.append(validation.Violation("end_time", "must be after start_time"))
    if violations:
        raise errors.invalid(violations)
    return bounds[0], bounds[1]


def _not_failed(row: RecordRow) -> str:
    why = {
        PENDING: "it is queued already and is sent when due",
        SENT: f"AWS accepted it (metering record id {row.metering_record_id})",
    }.get(row.state, "")
    return f"record {row.id} is {row.state}, not FAILED: {why}"


def _reconcile_first(row: RecordRow) -> str:
    """What the operator checks before retrying a record AWS may hold, and how to confirm."""
    return (
        f"record {row.id}: AWS may hold it (outcome unknown after {row.attempts} attempt(s)). Reconcile first: "
        f"look in the seller's AWS usage reports for {row.product_code} / {row.usage_dimension}, hour "
        f"{placement.timestamp_of(row.hour).isoformat()}, quantity {row.quantity} (ClientToken {row.client_token}). "
        f"Only if AWS holds no such record, retry with reconciled set "
        f"(metering-gateway records retry {row.id} --reconciled); if it does, leave this record FAILED"
    )


def encode_token(row: RecordRow) -> str:
    return base64.urlsafe_b64encode(json.dumps([row.hour, row.id]).encode()).decode()


def decode_token(token: str) -> tuple[int, int]:
    """``[hour, record_id]`` from a token encode_token made; anything else is INVALID_ARGUMENT."""
    try:
        match = (
            _TOKEN.fullmatch(base64.urlsafe_b64decode(token.encode()).decode()) if len(token) <= _TOKEN_MAX else None
        )
    except (ValueError, binascii.Error):  # not base64, or not text
        match = None
    if match is None or max(int(match[1]), int(match[2])) > RECORD_ID_MAX:
        raise errors.invalid([validation.Violation("page_token", "is not a token this server returned")])
    return int(match[1]), int(match[2])


class RecorderServicer(pb_grpc.UsageRecorderServiceServicer):
    def __init__(
        self,
        spool: Spool,
        *,
        future_skew: timedelta,
        max_age: timedelta,
        now: Callable[[], datetime] = utcnow,
        products: validation.Products | None = None,
        placer: Callable[[], None] | None = None,
        agentcore: bool = False,
        saas: bool = False,
    ) -> None:
        self._spool = spool
        self._agentcore = agentcore  # --agentcore: events carry no tags (AgentCore Runtime takes none)
        self._saas = saas  # --saas: every event names its customer (SaaS usage only)
        self._future_skew = future_skew
        self._now = now
        self._products = products  # --products: anything else is refused
        self._placer = placer  # asked after each accepted batch, so records show it within a second
        self._max_age = max_age  # the deduplication window: an older event may be forgotten already

    def RecordUsage(self, request: pb.RecordUsageRequest, context: grpc.ServicerContext) -> pb.RecordUsageResponse:  # noqa: N802 - gRPC's method name
        structlog.contextvars.bind_contextvars(events=len(request.events))
        now = self._now()
        window = validation.Window(now, self._future_skew, self._max_age, validation.TOO_OLD_TO_DEDUPLICATE)
        violations = validation.validate_record_usage(
            request.events, window, self._products, agentcore=self._agentcore, saas=self._saas
        )
        if violations:
            raise errors.invalid(violations, "batch")
        rows = [event_row(e, now.timestamp(), self._spool.span) for e in request.events]
        violations = repeats(rows)
        if violations:
            raise conflicts(f"{len(violations)} event id(s) repeat in this batch with a different payload", violations)
        try:
            recorded = self._spool.record(rows)
        except EventIdConflict as exc:
            raise conflicts(
                str(exc),
                [
                    conflict(f"events[{i}]", placement.differences(stored, rows[i]), "was accepted before")
                    for i, stored in exc.conflicts
                ],
            ) from None
        except SpoolUnavailable as exc:  # logged with the database's own words by the spool
            raise spool_unavailable(
                exc, "take events", "nothing was acknowledged: retry the same batch, with the same event ids"
            ) from None
        accepted, duplicates = recorded
        metrics.usage_recorded(
            ((rows[i].product_code, rows[i].usage_dimension, rows[i].quantity) for i in recorded.new),
            accepted,
            duplicates,
        )
        # Usage AWS can no longer take under its own hour: recorded, and carried later. The
        # window is the usage's own (SaaS: 24 hours and the month-end cutoff), as the placer decides it.
        earliest = {
            saas: placement.earliest_hour(now.timestamp(), span=self._spool.span, saas=saas) for saas in (False, True)
        }
        carried = sum(1 for i in recorded.new if rows[i].hour < earliest[bool(rows[i].customer)])
        structlog.contextvars.bind_contextvars(accepted=accepted, duplicates=duplicates, carried=carried)
        if self._placer is not None:
            self._placer()
        return pb.RecordUsageResponse(accepted=accepted, duplicates=duplicates, carried=carried)

    def ListMeteringRecords(  # noqa: N802 - gRPC's method name
        self, request: pb.ListMeteringRecordsRequest, context: grpc.ServicerContext
    ) -> pb.ListMeteringRecordsResponse:
        if request.page_size < 0:
            raise errors.invalid([validation.Violation("page_size", "must not be negative")])
        if request.state not in _STATE_NAMES and request.state != pb.MeteringRecord.STATE_UNSPECIFIED:
            raise errors.invalid(
                [validation.Violation("state", "must be STATE_PENDING, STATE_SENT, STATE_FAILED or unset")]
            )
        size = min(request.page_size or PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)
        since, until = hour_range(request)
        after = decode_token(request.page_token) if request.page_token else None
        try:
            rows = self._spool.list_records(
                state=_STATE_NAMES.get(request.state),
                product_code=request.product_code or None,
                after=after,
                limit=size + 1,
                since=since,
                until=until,
            )
        except SpoolUnavailable as exc:
            raise spool_unavailable(exc, "be read", "retry") from None
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListMeteringRecordsResponse(
            records=[record_message(r) for r in rows],
            next_page_token=encode_token(rows[-1]) if more else "",
        )

    def RetryMeteringRecord(  # noqa: N802 - gRPC's method name
        self, request: pb.RetryMeteringRecordRequest, context: grpc.ServicerContext
    ) -> pb.RetryMeteringRecordResponse:
        """An operator's call: a FAILED record back in the queue (the spool logs who and what)."""
        record_id = record_id_of(request.record_id)
        structlog.contextvars.bind_contextvars(record_id=record_id, reconciled=request.reconciled)
        try:
            row = self._spool.retry_failed(record_id, reconciled=request.reconciled, now=self._now().timestamp())
        except RecordNotFound:
            raise errors.GatewayError(
                errors.Reason.RECORD_NOT_FOUND,
                f"no record {record_id} (it may have been pruned "
                "after --record-retention, or carried into another record)",
            ) from None
        except RecordNotFailed as exc:
            raise errors.GatewayError(errors.Reason.RECORD_NOT_FAILED, _not_failed(exc.row)) from None
        except OutcomeUnknown as exc:
            raise errors.GatewayError(errors.Reason.OUTCOME_UNKNOWN, _reconcile_first(exc.row)) from None
        except SpoolUnavailable as exc:
            raise spool_unavailable(exc, "be written", "nothing changed: retry") from None
        return pb.RetryMeteringRecordResponse(record=record_message(row))


class RecordingNotEnabled(pb_grpc.UsageRecorderServiceServicer):
    """UsageRecorderService on a gateway started without ``--spool``: every call is
    refused with FAILED_PRECONDITION ``RECORDING_NOT_ENABLED``, which says how to turn
    recording on (gRPC's own answer would be a bare UNIMPLEMENTED), and shows in the
    access log like any call. Health has no status for the service."""

    def _refuse(self) -> NoReturn:
        raise errors.GatewayError(errors.Reason.RECORDING_NOT_ENABLED, NOT_ENABLED)

    def RecordUsage(self, request: pb.RecordUsageRequest, context: grpc.ServicerContext) -> pb.RecordUsageResponse:  # noqa: N802 - gRPC's method name
        self._refuse()

    def ListMeteringRecords(  # noqa: N802 - gRPC's method name
        self, request: pb.ListMeteringRecordsRequest, context: grpc.ServicerContext
    ) -> pb.ListMeteringRecordsResponse:
        self._refuse()

    def RetryMeteringRecord(  # noqa: N802 - gRPC's method name
        self, request: pb.RetryMeteringRecordRequest, context: grpc.ServicerContext
    ) -> pb.RetryMeteringRecordResponse:
        self._refuse()
