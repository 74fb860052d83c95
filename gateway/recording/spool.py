"""The spool's interface: what the servicer and the sender need of durable storage.

Two implementations keep the same rules: :mod:`gateway.recording.sqlite` (one
file, one pod: the embedded default) and :mod:`gateway.recording.postgres` (one
database shared by any number of replicas). :func:`open_spool` picks one from
the ``--spool`` setting. Nothing above this module knows which one it has.

Life of usage (every implementation):

1. :meth:`Spool.record` stores a batch in one transaction. A repeated
   ``event_id`` with the same digest is a duplicate; with another digest it
   refuses the whole batch (:class:`EventIdConflict`).
2. :meth:`Spool.assign` sums unassigned events into *records* (one per product,
   dimension and hour; :func:`gateway.recording.placement.place` picks the hour).
   A record takes more usage only while no request has gone out for it. Safe
   while several processes place at once: each event goes into one record.
3. :meth:`Spool.begin_attempt` freezes a record *before* the sender calls AWS,
   so a crash mid-call cannot change what a resend sends (same ClientToken).
4. :meth:`Spool.mark_sent`, :meth:`Spool.retry_later`, :meth:`Spool.mark_failed`
   store the outcome; :meth:`Spool.carry` returns a record's events to the pool,
   marks its hour unusable, and places them again in later hours.
5. :meth:`Spool.prune` keeps storage bounded.

:meth:`Spool.leads` says whether this process is the one that sends: sending
is done by one process at a time per spool.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from gateway.config import POSTGRES_SCHEMES
from gateway.recording import placement
from gateway.recording.placement import Content, EventRow

PENDING, SENT, FAILED = "PENDING", "SENT", "FAILED"
DECIMAL_WIRE, WHOLE_WIRE = "decimal", "whole"
LATE = "late_or_too_old"  # why assign() carries: the own hour is taken or too old

log = structlog.get_logger("gateway.spool")


class SpoolError(Exception):
    """The spool cannot be used as it is (a one-line message for a person)."""


class SpoolUnavailable(SpoolError):
    """The database could not write (disk full, I/O error, unreachable). Nothing is
    acknowledged; with PostgreSQL a commit whose answer was lost may have stored the
    batch anyway, so a retry must use the same event ids (they count as duplicates)."""


class EventIdConflict(SpoolError):
    """Event ids accepted before with another payload; ``indices`` index the batch."""

    def __init__(self, indices: Sequence[int]) -> None:
        super().__init__(f"{len(indices)} event id(s) were accepted before with a different payload")
        self.indices = list(indices)


@dataclass(frozen=True)
class RecordRow:
    """One hourly record as stored."""

    id: int
    product_code: str
    usage_dimension: str
    hour: int
    state: str
    allocations: str
    whole: bool
    quantity: str
    client_token: str
    metering_record_id: str
    attempts: int
    last_error: str
    carried_from: str
    next_attempt: float
    in_flight: int = 0
    uncertain: int = 0
    wire: str = DECIMAL_WIRE
    closed_at: float = 0.0

    @property
    def outcome_unknown(self) -> bool:
        """AWS may hold a record of this request that we never heard of. Carrying
        its usage to another hour could bill it twice; only resending the same
        request (which AWS answers idempotently) can settle it."""
        return bool(self.uncertain or self.in_flight)

    @property
    def content(self) -> Content:
        return Content.from_json(self.allocations, bool(self.whole))

    @property
    def decimal(self) -> bool:
        """Sent with the decimal quantity fields (all but legacy frozen records)."""
        return self.wire != WHOLE_WIRE

    @property
    def carried_hours(self) -> list[int]:
        return list(json.loads(self.carried_from))

    @property
    def frozen(self) -> bool:
        """A request went out (or may have): the content must never change again."""
        return self.state != PENDING or self.attempts > 0


@dataclass(frozen=True)
class Carry:
    """Usage that went to another hour than its own (logged by the sender)."""

    product_code: str
    usage_dimension: str
    from_hour: int
    to_hour: int
    quantity: str

    def log(self, reason: str) -> None:
        """Every carry leaves one line: where usage went, and why."""
        log.warning(
            "usage_carried",
            reason=reason,
            product_code=self.product_code,
            usage_dimension=self.usage_dimension,
            from_hour=placement.timestamp_of(self.from_hour).isoformat(),
            to_hour=placement.timestamp_of(self.to_hour).isoformat(),
            quantity=self.quantity,
        )


@dataclass(frozen=True)
class Stats:
    pending: int
    oldest_pending_hour: int | None
    unassigned_events: int


@dataclass(frozen=True)
class Pruned:
    events: int
    records: int
    taken: int


class Spool(Protocol):
    """Durable events and hourly records. Thread-safe in every implementation."""

    @property
    def location(self) -> str:
        """Where it is, fit for a log line (never a password)."""

    @property
    def spool_id(self) -> str:
        """This spool's own id: it salts every ClientToken, so two spools never share one."""

    @property
    def writable(self) -> bool:
        """False from a failed write until a write (or :meth:`probe`) succeeds."""

    def on_writable(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(writable)`` whenever writability changes (health)."""

    def probe(self) -> bool:
        """Try a real write to see whether the spool can take a batch again."""

    def close(self) -> None: ...

    def record(self, events: Sequence[EventRow]) -> tuple[int, int]:
        """Store a batch in one transaction → (accepted, duplicates). Durable on return."""

    def assign(self, now: float, margin: float = placement.SAFETY_MARGIN) -> list[Carry]:
        """Place the events unassigned when the pass starts; returns the carries made."""

    def leads(self) -> bool:
        """True while this process is the spool's one sender (asked before each pass)."""

    def due(self, now: float, grace: float, *, final: bool = False) -> list[RecordRow]:
        """PENDING records whose hour closed ``grace`` ago and whose backoff is over."""

    def begin_attempt(self, record_id: int) -> RecordRow | None:
        """Freeze the record and count the attempt, committed before AWS is called."""

    def mark_sent(self, record_id: int, metering_record_id: str, now: float) -> None: ...

    def settle(self, record_id: int, *, uncertain: bool | None) -> None:
        """The last attempt is over; see :class:`gateway.errors.Delivery`."""

    def retry_later(self, record_id: int, error: str, next_attempt: float) -> None: ...

    def mark_failed(self, record_id: int, error: str, now: float) -> None: ...

    def carry(self, record_id: int, reason: str, now: float, margin: float = placement.SAFETY_MARGIN) -> list[Carry]:
        """Mark the record's hour unusable and place its events again."""

    def prune(self, now: float, *, event_retention: float, record_retention: float) -> Pruned: ...

    def get(self, record_id: int) -> RecordRow | None: ...

    def list_records(self, *, state: str | None = None, product_code: str | None = None,
                     after: tuple[int, int] | None = None, limit: int = 100) -> list[RecordRow]:
        """Records newest hour first; ``after`` is the (hour, id) of the last one seen."""

    def stats(self) -> Stats: ...

    def size(self) -> int:
        """Bytes the spool's data takes in its database."""

    def event_totals(self) -> list[tuple[str, str, str]]:
        """(product, dimension, exact sum) of every stored event, for checks."""


def open_spool(location: str, *, now: Callable[[], float] = time.time, pool_size: int = 4) -> Spool:
    """The spool ``--spool`` names: a ``postgresql://`` URL, or an SQLite path.

    ``now`` dates migrations (tests pass their clock); ``pool_size`` bounds a
    PostgreSQL spool's connections. Raises SpoolError with a one-line message.
    """
    if location.startswith(POSTGRES_SCHEMES):
        from gateway.recording.postgres import PostgresSpool  # psycopg only when asked for

        return PostgresSpool(location, pool_size=pool_size, now=now)
    from gateway.recording.sqlite import SqliteSpool

    return SqliteSpool(location, now=now)
