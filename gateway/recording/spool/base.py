"""The spool's interface: what the servicer and the sender need of durable storage.

This module is the interface alone: it imports no backend, no metrics and no
settings; the backends import it, never the other way round.

Two implementations keep the same rules: :mod:`gateway.recording.sqlite` (one
file, one pod: the embedded default) and :mod:`gateway.recording.postgres` (one
database shared by any number of replicas). :func:`open_spool` picks one from
the ``--spool`` setting. Nothing above this module knows which one it has.

Life of usage (every implementation):

1. :meth:`Spool.record` stores a batch in one transaction. A repeated
   ``event_id`` with the same digest is a duplicate; with another digest it
   refuses the whole batch (:class:`EventIdConflict`).
2. :meth:`Spool.assign` sums unassigned events into *records* (one per product or
   license, customer, dimension and hour; container usage names no customer, SaaS
   usage one each; :func:`gateway.recording.placement.place` picks the hour, inside
   the window AWS keeps for that kind of usage).
   A record takes more usage only while no request has gone out for it. Safe
   while several processes place at once: each event goes into one record.
3. :meth:`Spool.begin_attempt` freezes a record *before* the sender calls AWS,
   so a crash mid-call cannot change what a resend sends (same ClientToken).
4. :meth:`Spool.mark_sent`, :meth:`Spool.retry_later`, :meth:`Spool.mark_failed`
   store the outcome; :meth:`Spool.carry` returns a record's events to the pool,
   marks its hour unusable, and places them again in later hours. An operator's
   :meth:`Spool.retry_failed` puts a FAILED record back, its request unchanged.
5. :meth:`Spool.prune` keeps storage bounded.

:meth:`Spool.leads` says whether this process is the one that sends: sending
is done by one process at a time per spool.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.domain.states import RecordState, SpoolCreate
from gateway.recording import placement
from gateway.recording.placement import Content, EventRow

PENDING, SENT, FAILED = RecordState.PENDING, RecordState.SENT, RecordState.FAILED
DECIMAL_WIRE, WHOLE_WIRE = "decimal", "whole"
# --spool-create: whether a spool that is not there yet may be made.
CREATE, NEVER_CREATE, CREATE_IF_MOUNTED = SpoolCreate.YES, SpoolCreate.NO, SpoolCreate.IF_MOUNTED
# The note of the warning every implementation logs when it makes a new spool.
NEW_SPOOL = (
    "a new, empty spool: nothing was recorded here before (if something was, the gateway is not "
    "looking at it: see --spool-create)"
)
# Both databases' schemas are numbered alike (version 2 is the first PostgreSQL has);
# each backend migrates up to this one. Version 5: each event, record and taken hour
# names its customer (SaaS usage).
SCHEMA_VERSION = 5
LATE = "late_or_too_old"  # why assign() carries: the own hour is taken or too old


class SpoolError(Exception):
    """The spool cannot be used as it is (a one-line message for a person)."""


def check_schema(where: str, version: int) -> None:
    """SpoolError unless this release can use a spool of schema ``version``: one written by
    a newer release may hold what this one would misread. ``where`` as a log line shows it."""
    if version > SCHEMA_VERSION:
        raise SpoolError(
            f"spool {where} has schema version {version}, newer than this release's "
            f"{SCHEMA_VERSION}: it was written by a newer metering-gateway; run that release or newer"
        )


class SpoolUnavailable(SpoolError):
    """The database could not write (disk full, I/O error, unreachable). Nothing is
    acknowledged; with PostgreSQL a commit whose answer was lost may have stored the
    batch anyway, so a retry must use the same event ids (they count as duplicates)."""


class EventIdConflict(SpoolError):
    """Event ids accepted before with another payload: ``conflicts`` pairs each one's
    index in the batch with the event as stored, so the refusal can say what differs."""

    def __init__(self, conflicts: Sequence[tuple[int, EventRow]]) -> None:
        super().__init__(f"{len(conflicts)} event id(s) were accepted before with a different payload")
        self.conflicts = list(conflicts)

    @property
    def indices(self) -> list[int]:
        return [i for i, _ in self.conflicts]


class RetryRefused(Exception):
    """An operator's retry (:meth:`Spool.retry_failed`) that the record's state rules out."""


class RecordNotFound(RetryRefused):
    def __init__(self, record_id: int) -> None:
        super().__init__(f"no record {record_id}")
        self.record_id = record_id


class RecordNotFailed(RetryRefused):
    """Only a FAILED record goes back in the queue: a PENDING one is queued already
    (another retry may just have won), a SENT one is billed."""

    def __init__(self, row: RecordRow) -> None:
        super().__init__(f"record {row.id} is {row.state}, not {FAILED}")
        self.row = row


class OutcomeUnknown(RetryRefused):
    """AWS may hold the record: a retry needs the operator's word that it does not."""

    def __init__(self, row: RecordRow) -> None:
        super().__init__(f"record {row.id}: AWS may hold it (outcome unknown); reconcile first")
        self.row = row


def customer_fields(customer: str) -> dict[str, str]:
    """A customer (placement.customer_key) as a log line's fields: none for container
    usage, so its lines stay as they were. Never a metric label: customers are unbounded."""
    if not customer:
        return {}
    account_id, license_arn, identifier = placement.customer_of(customer)
    return {"customer_aws_account_id": account_id, "license_arn": license_arn, "customer_identifier": identifier}


@dataclass(frozen=True)
class RecordRow:
    """One hourly record as stored: of one product (or license), customer, dimension and hour."""

    id: int
    product_code: str
    usage_dimension: str
    hour: int
    state: RecordState  # as stored: text, made the enum on reading
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
    customer: str = ""  # placement.customer_key(): "" for container usage

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", RecordState(self.state))  # a state no release writes fails here

    @property
    def outcome_unknown(self) -> bool:
        """AWS may hold a record of this request that we never heard of. Carrying
        its usage to another hour could bill it twice; only resending the same
        request (which AWS answers idempotently) can settle it."""
        return bool(self.uncertain or self.in_flight)

    @property
    def saas(self) -> bool:
        """SaaS usage (it names a customer): metered with BatchMeterUsage, not MeterUsage."""
        return self.customer != ""

    @property
    def customer_aws_account_id(self) -> str:
        return placement.customer_of(self.customer)[0]

    @property
    def license_arn(self) -> str:
        return placement.customer_of(self.customer)[1]

    @property
    def customer_identifier(self) -> str:
        return placement.customer_of(self.customer)[2]

    @property
    def key(self) -> placement.Key:
        """(product_code, customer, usage_dimension): what records are kept per, with the hour."""
        return self.product_code, self.customer, self.usage_dimension

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
    """Usage that went to another hour than its own (logged by the sender), within
    its customer's records (``customer`` "" for container usage)."""

    product_code: str
    usage_dimension: str
    from_hour: int
    to_hour: int
    quantity: str
    customer: str = ""


@dataclass(frozen=True)
class Stats:
    pending: int
    oldest_pending_hour: int | None
    unassigned_events: int
    sent: int = 0
    failed: int = 0
    failed_outcome_unknown: int = 0  # FAILED records AWS may hold (RecordRow.outcome_unknown)


class Recorded(tuple[int, int]):
    """What :meth:`Spool.record` did: ``(accepted, duplicates)``, and ``new``, the
    indices of the batch's events stored by this call (an event_id repeated within
    the batch counts once, at its first index), for what was recorded per product."""

    new: tuple[int, ...]

    def __new__(cls, accepted: int, duplicates: int, new: Sequence[int] = ()) -> Recorded:
        self = super().__new__(cls, (accepted, duplicates))
        self.new = tuple(new)
        return self

    @classmethod
    def of(cls, events: Sequence[EventRow], accepted: int, stored: Callable[[], Collection[str]]) -> Recorded:
        """``stored()`` gives the event ids this transaction inserted; asked only when
        the batch was part new, part duplicate (a resent batch), never on the common paths."""
        if accepted == len(events):
            return cls(accepted, 0, range(len(events)))
        if accepted == 0:
            return cls(0, len(events))
        inserted = set(stored())
        first: dict[str, int] = {}
        for i, event in enumerate(events):
            if event.event_id in inserted:
                first.setdefault(event.event_id, i)
        return cls(accepted, len(events) - accepted, sorted(first.values()))


@dataclass(frozen=True)
class ZeroHours:
    """What :meth:`Spool.fill_zero_hours` did: the (product, dimension, hour) records it
    made, and per key the closed hours it could no longer meter (older than AWS's window)."""

    made: tuple[tuple[str, str, int], ...] = ()
    missed: tuple[tuple[str, str, int], ...] = ()  # (product, dimension, hours missed)


@dataclass(frozen=True)
class Requeue:
    """One record of a call to try again later (:meth:`Spool.requeue`): what the attempt's
    answer says about delivery (as :meth:`Spool.settle`'s ``uncertain``), and the error."""

    record_id: int
    uncertain: bool | None
    error: str
    next_attempt: float


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
    def span(self) -> int:
        """Seconds one record covers: an hour, or one flush interval in AgentCore Runtime mode."""

    @property
    def writable(self) -> bool:
        """False from a failed write until a write (or :meth:`probe`) succeeds."""

    def on_writable(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(writable)`` whenever writability changes (health)."""

    def probe(self) -> bool:
        """Try a real write to see whether the spool can take a batch again."""

    def verify(self) -> bool:
        """Whether the spool is still the one opened (its file not deleted or replaced);
        when not, it turns unwritable and says so. Cheap: the health watcher asks every second."""

    def close(self) -> None: ...

    def record(self, events: Sequence[EventRow]) -> Recorded:
        """Store a batch in one transaction → (accepted, duplicates). Durable on return."""

    def assign(self, now: float, margin: float = placement.SAFETY_MARGIN) -> list[Carry]:
        """Place the events unassigned when the pass starts; returns the carries made."""

    def leads(self) -> bool:
        """True while this process is the spool's one sender (asked before each pass)."""

    def fill_zero_hours(
        self, keys: Collection[tuple[str, str]], now: float, margin: float = placement.SAFETY_MARGIN
    ) -> ZeroHours:
        """A zero record for each closed hour of each (product, dimension) of ``keys``
        that has none, from the hour the key was first seen, each hour once ever.
        Container usage only: the zero records name no customer."""

    def due(self, now: float, grace: float, *, final: bool = False) -> list[RecordRow]:
        """PENDING records whose hour closed ``grace`` ago and whose backoff is over."""

    def begin_attempt(self, record_id: int) -> RecordRow | None:
        """Freeze the record and count the attempt, committed before AWS is called."""

    def product_hints(self, record_ids: Sequence[int]) -> dict[int, str]:
        """The product some event of each record named, for records kept under none (a license's)."""

    def begin_attempts(self, record_ids: Sequence[int]) -> list[RecordRow]:
        """:meth:`begin_attempt` for the records of one BatchMeterUsage call, in one transaction."""

    def mark_all_sent(self, sent: Sequence[tuple[int, str]], now: float) -> list[bool]:
        """:meth:`mark_sent` for each (record id, AWS's record id) of one call, in one transaction."""

    def requeue(self, retries: Sequence[Requeue]) -> None:
        """:meth:`settle` then :meth:`retry_later` for records of one call, in one transaction."""

    def mark_sent(self, record_id: int, metering_record_id: str, now: float) -> bool:
        """Store AWS's OK (over a FAILED another sender stored). True when this call
        made the record SENT: count it then only (two senders may hear one OK)."""

    def settle(self, record_id: int, *, uncertain: bool | None) -> None:
        """The last attempt is over; see :class:`gateway.domain.errors.Delivery`."""

    def retry_later(self, record_id: int, error: str, next_attempt: float) -> None: ...

    def mark_failed(self, record_id: int, error: str, now: float) -> bool:
        """A PENDING record FAILED with ``error``. True when this call failed it (False:
        no longer PENDING, another sender settled it): count it then only."""

    def carry(self, record_id: int, reason: str, now: float, margin: float = placement.SAFETY_MARGIN) -> list[Carry]:
        """Mark the record's hour unusable (for its product, customer and dimension)
        and place its events again, in later hours of the same customer."""

    def prune(self, now: float, *, event_retention: float, record_retention: float) -> Pruned: ...

    def get(self, record_id: int) -> RecordRow | None: ...

    def retry_failed(self, record_id: int, *, reconciled: bool, now: float) -> RecordRow:
        """A FAILED record back to PENDING, due at ``now``, with its frozen request
        (same content, same ClientToken). With ``reconciled`` (the operator found no
        record of it in AWS's reports), an unknown outcome is cleared: the record is
        then as if never sent, and may be carried. Raises RecordNotFound,
        RecordNotFailed, or OutcomeUnknown (outcome unknown and not ``reconciled``)."""

    def list_records(
        self,
        *,
        state: str | None = None,
        product_code: str | None = None,
        after: tuple[int, int] | None = None,
        limit: int = 100,
        since: int | None = None,
        until: int | None = None,
        customer_aws_account_id: str | None = None,
        license_arn: str | None = None,
    ) -> list[RecordRow]:
        """Records newest hour first; ``after`` is the (hour, id) of the last one seen;
        ``since``/``until``: only hours starting at or after ``since``, before ``until``;
        ``customer_aws_account_id``, ``license_arn``: only SaaS records of that account,
        of that license."""

    def stats(self) -> Stats: ...

    def size(self) -> int:
        """Bytes the spool's data takes in its database."""
