"""The spool's rules in SQL, once, for both databases.

:class:`SqlSpool` holds everything the two implementations share: placement,
freezing, outcomes, carrying, pruning and reading. Its SQL is written with
``?`` placeholders and the subset SQLite and PostgreSQL both speak. A subclass
supplies transactions, the schema, the bulk insert of :meth:`record`, and a few
dialect hooks: how rows are locked (PostgreSQL serialises placement per product,
customer and dimension, so replicas can place at once; SQLite has one writer anyway).

Records are kept per product (or license), customer, dimension and hour: container
usage has the customer "" (:func:`gateway.recording.placement.customer_key`), so
every row an older release wrote is container usage, keyed as it always was.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from decimal import Decimal
from typing import Any, Protocol

import structlog

from gateway.domain.clock import HOUR
from gateway.recording import placement
from gateway.recording.placement import Content, EventRow, Piece
from gateway.recording.spool.base import (
    FAILED,
    PENDING,
    SENT,
    Carry,
    EventIdConflict,
    OutcomeUnknown,
    Pruned,
    RecordNotFailed,
    RecordNotFound,
    RecordRow,
    Requeue,
    SpoolError,
    SpoolUnavailable,
    Stats,
    ZeroHours,
    customer_fields,
)

# Events placed per transaction: a writer waits at most about one chunk's work.
ASSIGN_CHUNK = 1000
PRUNE_CHUNK = 500  # rows deleted per pruning transaction
IN_CHUNK = 500  # values a query's IN list takes (_select_in): far under any database's limit on parameters
PROBE_SIZE = 262_144  # bytes a health probe writes: about one large batch

RECORD_COLUMNS = (
    "id, product_code, usage_dimension, hour, state, allocations, whole, quantity, client_token, "
    "metering_record_id, attempts, last_error, carried_from, next_attempt, in_flight, uncertain, wire, closed_at, "
    "customer"
)
# An event as placement.group() reads it (placement.GroupRow).
_GROUP_COLUMNS = "product_code, customer, usage_dimension, hour, tags, quantity, whole"
CONTAINER = ""  # the customer of container usage (placement.customer_key of nothing)

# Zero-usage hours (schema version 4): per product and dimension, the next hour to look
# at. One statement for both databases (SQLite takes BIGINT as an integer).
ZERO_HOURS_TABLE = """
CREATE TABLE zero_hours (
    product_code TEXT NOT NULL,
    usage_dimension TEXT NOT NULL,
    next_hour BIGINT NOT NULL,
    PRIMARY KEY (product_code, usage_dimension)
)"""

log = structlog.get_logger("gateway.spool")


def _token(key: placement.Key, hour: int, content: Content, spool_id: str) -> str:
    """The ClientToken of the record of ``key`` (product, customer, dimension) and ``hour``."""
    product_code, customer, usage_dimension = key
    return placement.client_token(product_code, usage_dimension, hour, content, spool_id, customer)


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """One connection inside a transaction, taking ``?`` placeholders."""

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, args: Sequence[Sequence[Any]], /) -> Any: ...


def _select_in(db: Db, query: str, values: Sequence[object]) -> Iterator[Any]:
    """The rows of ``query`` (whose ``{marks}`` is its IN list) for every one of
    ``values``, asked IN_CHUNK at a time."""
    for start in range(0, len(values), IN_CHUNK):
        chunk = list(values[start : start + IN_CHUNK])
        yield from db.execute(query.format(marks=", ".join("?" * len(chunk))), chunk).fetchall()


class SqlSpool(ABC):
    """The shared rules; see :mod:`gateway.recording.spool.base` for the life of usage.

    A backend subclasses it and provides the abstract hooks (its transactions), and
    may override the others (locks, stepping aside); the rules never know which
    database runs them, and this module imports neither backend."""

    # -- what a subclass provides -------------------------------------------------

    SEQ = "rowid"  # the events' arrival order column
    LOCK_ROWS = ""  # suffix of a SELECT whose rows this transaction will change
    CLAIM_ROWS = ""  # suffix of a SELECT of events for placement (others skip them)
    location: str
    spool_id: str
    span: int = HOUR  # seconds one record covers (Spool.span); set before the spool opens

    @abstractmethod
    def _transaction(self, *, writer: bool = False) -> AbstractContextManager[Db]:
        """One write transaction, committed on exit, rolled back on any exception;
        a database failure leaves as SpoolUnavailable. ``writer``: RecordUsage's."""

    @abstractmethod
    def _reading(self) -> AbstractContextManager[Db]:
        """A connection for one consistent read."""

    # The dialect's plain substring search, (text, part) → 1-based position, 0 when absent
    # (no wildcards, unlike LIKE, and case-sensitive in both): instr, or PostgreSQL's strpos.
    FIND = "instr"

    def _lock_key(self, db: Db, product_code: str, customer: str, usage_dimension: str) -> None:  # noqa: B027 - a hook that SQLite needs not, PostgreSQL overrides
        """Hold placement of this product, customer and dimension for the transaction."""

    def _step_aside(self) -> None:  # noqa: B027 - a hook that only SQLite overrides
        """Between two chunks of background work: let waiting writers go first."""

    def _assign_events(self, db: Db, record_id: int, ids: Sequence[int]) -> None:
        db.executemany(f"UPDATE events SET record_id = ? WHERE {self.SEQ} = ?", [(record_id, i) for i in ids])

    # -- health ------------------------------------------------------------------

    _writable = True
    _on_writable: Callable[[bool], None] | None = None

    @property
    def writable(self) -> bool:
        return self._writable

    def on_writable(self, callback: Callable[[bool], None]) -> None:
        self._on_writable = callback

    def _set_writable(self, writable: bool) -> None:
        if writable == self._writable:
            return
        self._writable = writable
        if self._on_writable is not None:
            self._on_writable(writable)

    def probe(self) -> bool:
        """Write (then delete) about one large batch's worth of bytes; True when it could."""
        try:
            with self._transaction() as db:
                self._write_probe(db)
        except SpoolUnavailable:
            return False
        return True

    def verify(self) -> bool:
        return True

    @staticmethod
    def _write_probe(db: Db) -> None:
        """The probe's write, inside the caller's transaction: room for a large batch?"""
        db.execute("INSERT INTO probe (data) VALUES (?)", (bytes(PROBE_SIZE),))
        db.execute("DELETE FROM probe")

    def leads(self) -> bool:
        return True

    def _settle_span(self, db: Db) -> None:
        """Keep a spool to one way of cutting time: hourly records and AgentCore Runtime's
        per-interval ones never mix in one spool (an hourly record among interval ones
        would be sent under AWS's hourly rules, or the other way round). Called at open.
        Between two AgentCore intervals a change is fine: records never overlap in AWS's
        eyes there, and each keeps its own ClientToken."""
        row = db.execute("SELECT value FROM meta WHERE key = 'span'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta (key, value) VALUES ('span', ?)", (str(self.span),))
            return
        stored = int(row[0])
        if stored == self.span:
            return
        if HOUR in (stored, self.span):
            hourly, other = ("hourly", "AgentCore Runtime") if stored == HOUR else ("AgentCore Runtime", "hourly")
            raise SpoolError(
                f"spool {self.location} holds {hourly} records: a {other} gateway needs a spool of its own "
                "(--agentcore is set on one and not the other)"
            )
        db.execute("UPDATE meta SET value = ? WHERE key = 'span'", (str(self.span),))
        log.info("spool_span_changed", location=self.location, was_s=stored, now_s=self.span)

    # -- recording ---------------------------------------------------------------

    @staticmethod
    def _conflicts(db: Db, events: Sequence[EventRow]) -> list[tuple[int, EventRow]]:
        """Events whose id is stored with another digest: (index, the stored event)."""
        stored: dict[str, EventRow] = {}
        ids = list(dict.fromkeys(e.event_id for e in events))
        for event_id, product, dimension, hour, tags, quantity, whole, digest, timestamp, customer in _select_in(
            db,
            "SELECT event_id, product_code, usage_dimension, hour, tags, quantity, whole, digest, timestamp, "
            "customer FROM events WHERE event_id IN ({marks})",
            ids,
        ):
            if digest is not None:  # without one (schema version 1) it cannot be compared: a duplicate
                stored[event_id] = EventRow(
                    event_id, product, dimension, hour, tags, quantity, bool(whole), bytes(digest), timestamp, customer
                )
        return [
            (i, stored[e.event_id])
            for i, e in enumerate(events)
            if e.event_id in stored and stored[e.event_id].digest != e.digest
        ]

    def _check_conflicts(self, db: Db, events: Sequence[EventRow], accepted: int) -> None:
        if accepted < len(events):
            conflicts = self._conflicts(db, events)
            if conflicts:
                raise EventIdConflict(conflicts)

    # -- placing usage into records ------------------------------------------------

    def assign(self, now: float, margin: float = placement.SAFETY_MARGIN) -> list[Carry]:
        """Place the events unassigned when the pass starts; returns the carries made.

        Works in transactions of ASSIGN_CHUNK events and steps aside for writers
        between them. Events recorded meanwhile wait for the next pass: under a load
        faster than placing, a pass still ends, and the sender still sends.
        """
        carries: list[Carry] = []
        with self._reading() as db:
            (last,) = db.execute(f"SELECT MAX({self.SEQ}) FROM events").fetchone()
        if last is None:
            return carries

        def place_chunk(db: Db) -> int:
            unassigned = f"record_id IS NULL AND {self.SEQ} <= ?"
            # The keys first, then the events: a placer never waits for a key while it
            # holds events, and every placer takes keys in one order, so replicas
            # placing (and carrying) at once never wait on each other in a circle.
            keys = sorted(
                {
                    (p, c, d)
                    for p, c, d in db.execute(
                        f"SELECT product_code, customer, usage_dimension FROM events WHERE {unassigned} ORDER BY "
                        f"{self.SEQ} LIMIT ?",
                        (last, ASSIGN_CHUNK),
                    )
                }
            )
            if not keys:
                return 0
            # Locked as records are kept: a license's usage under no product (placement.keyed_product).
            for key in sorted({(placement.keyed_product(p, c), c, d) for p, c, d in keys}):
                self._lock_key(db, *key)
            rows = db.execute(
                f"SELECT {self.SEQ}, {_GROUP_COLUMNS} FROM events "
                f"WHERE {unassigned} AND (product_code, customer, usage_dimension) IN (VALUES "
                f"{', '.join(['(?, ?, ?)'] * len(keys))}) "
                f"ORDER BY {self.SEQ} LIMIT ?{self.CLAIM_ROWS}",
                (last, *[part for key in keys for part in key], ASSIGN_CHUNK),
            ).fetchall()
            fallback = placement.too_old_goes_to(now, self.span)
            for piece in placement.group(rows):
                carry = self._place(db, piece, self._earliest(piece, now, margin), fallback)
                if carry is not None:
                    carries.append(carry)
            return len(rows)

        self._in_chunks(place_chunk, ASSIGN_CHUNK)
        return carries

    def _in_chunks(self, work: Callable[[Db], int], size: int) -> int:
        """Background work (placing, pruning) as one transaction per chunk of ``size``
        rows, stepping aside for writers in between, until a chunk comes up short.
        ``work`` does one chunk and says how many rows it handled; returns the total."""
        total = 0
        while True:
            with self._transaction() as db:
                count = work(db)
            total += count
            if count < size:
                return total
            self._step_aside()

    def _earliest(self, piece: Piece, now: float, margin: float) -> int:
        """The first hour ``piece`` may be placed in: AWS's window is the piece's own,
        six hours for container usage, 24 hours and the month-end cutoff for SaaS usage."""
        return placement.earliest_hour(now, margin, self.span, saas=bool(piece.customer))

    def _place(self, db: Db, piece: Piece, earliest: int, fallback: int | None = None) -> Carry | None:
        """Put one piece into the first hour that can take it (the key is locked)."""
        key = piece.key
        of_key = "product_code = ? AND customer = ? AND usage_dimension = ? AND hour >= ?"
        taken = {h for (h,) in db.execute(f"SELECT hour FROM taken WHERE {of_key}", (*key, earliest))}
        existing = {r.hour: r for r in self._records(db, of_key, (*key, earliest), lock=True)}

        def can_take(hour: int) -> bool:
            if hour in taken:
                return False
            record = existing.get(hour)
            return record is None or (not record.frozen and record.content.fits(piece.content))

        hour = placement.place(piece.hour, earliest, can_take, self.span, fallback)
        carried = [piece.hour] if hour != piece.hour else []
        record = existing.get(hour)
        if record is None:
            content = piece.content
            record_id = self._new_record(db, key, hour, content, carried)
        else:
            content = record.content
            content.add(piece.content)
            carried = sorted(set(record.carried_hours) | set(carried))
            record_id = record.id
            db.execute(
                "UPDATE records SET allocations = ?, whole = ?, quantity = ?, client_token = ?, carried_from "
                "= ? WHERE id = ?",
                (
                    content.to_json(),
                    int(content.whole),
                    placement.format_decimal(content.total),
                    _token(key, hour, content, self.spool_id),
                    json.dumps(carried),
                    record_id,
                ),
            )
        self._assign_events(db, record_id, piece.ids)
        if hour == piece.hour:
            return None
        return Carry(
            piece.product_code,
            piece.usage_dimension,
            piece.hour,
            hour,
            placement.format_decimal(piece.content.total),
            piece.customer,
        )

    def _new_record(self, db: Db, key: placement.Key, hour: int, content: Content, carried: list[int]) -> int:
        """Insert a PENDING record (the key is locked); its id."""
        (record_id,) = db.execute(
            "INSERT INTO records (product_code, customer, usage_dimension, hour, state, allocations, whole, "
            "quantity, client_token, carried_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                *key,
                hour,
                PENDING,
                content.to_json(),
                int(content.whole),
                placement.format_decimal(content.total),
                _token(key, hour, content, self.spool_id),
                json.dumps(carried),
            ),
        ).fetchone()
        return int(record_id)

    # -- zero-usage hours ------------------------------------------------------------

    def fill_zero_hours(
        self, keys: Collection[tuple[str, str]], now: float, margin: float = placement.SAFETY_MARGIN
    ) -> ZeroHours:
        """A zero record for each closed hour without one, per key, from the hour the key
        was first seen here (``zero_hours.next_hour``, which then moves to the open hour).

        One transaction, each key locked as placement locks it: a placer never puts an
        event in an hour while a zero record is made for it, and usage placed later
        joins the zero record until it is sent (then it is carried, as any late usage).
        Each hour is looked at once, ever, whatever is pruned later: exactly once across
        restarts and replicas. Never the open hour: AWS keeps an hour's first record,
        so an early zero would take the hour from its real usage. An hour that AWS's
        window has left meanwhile (the gateway was down) is missed, and said so.
        Container usage only: ``keys`` are (product, dimension) pairs, and their
        records name no customer (a SaaS customer's hours are never filled).
        """
        made: list[tuple[str, str, int]] = []
        missed: list[tuple[str, str, int]] = []
        if not keys:
            return ZeroHours()
        open_hour = placement.hour_of(now)
        earliest = placement.earliest_hour(now, margin)
        with self._transaction() as db:
            for key in sorted(set(keys)):
                product, dimension = key
                self._lock_key(db, product, CONTAINER, dimension)
                row = db.execute(
                    "SELECT next_hour FROM zero_hours WHERE product_code = ? AND usage_dimension = ?", key
                ).fetchone()
                if row is None:  # first seen: from the open hour on
                    db.execute(
                        "INSERT INTO zero_hours (product_code, usage_dimension, next_hour) VALUES (?, ?, ?)",
                        (*key, open_hour),
                    )
                    continue
                start = int(row[0])
                if start >= open_hour:
                    continue
                first = min(max(start, earliest), open_hour)
                if first > start:
                    missed.append((*key, (first - start) // HOUR))
                between = (product, CONTAINER, dimension, first, open_hour)
                busy = {
                    int(h)
                    for table in ("records", "taken")
                    for (h,) in db.execute(
                        f"SELECT hour FROM {table} WHERE product_code = ? AND customer = ? AND usage_dimension = ? "
                        "AND hour >= ? AND hour < ?",
                        between,
                    )
                }
                for hour in range(first, open_hour, HOUR):
                    if hour not in busy:
                        self._new_record(db, (product, CONTAINER, dimension), hour, Content({"": Decimal(0)}), [])
                        made.append((*key, hour))
                db.execute(
                    "UPDATE zero_hours SET next_hour = ? WHERE product_code = ? AND usage_dimension = ?",
                    (open_hour, *key),
                )
        return ZeroHours(tuple(made), tuple(missed))

    # -- sending -----------------------------------------------------------------

    def due(self, now: float, grace: float, *, final: bool = False) -> list[RecordRow]:
        """PENDING records whose hour closed ``grace`` ago and whose backoff is over.

        ``final`` (the flush at shutdown): every PENDING record up to the
        current hour, ignoring grace and backoff.
        """
        with self._reading() as db:
            if final:
                return self._records(
                    db, "state = ? AND hour <= ?", (PENDING, placement.hour_of(now, self.span)), order="hour"
                )
            return self._records(
                db,
                "state = ? AND hour <= ? AND next_attempt <= ?",
                (PENDING, now - self.span - grace, now),
                order="hour",
            )

    def begin_attempt(self, record_id: int) -> RecordRow | None:
        """Freeze the record and count the attempt, committed before AWS is called.

        An attempt still marked in flight (its sender died mid-call) makes the
        outcome unknown: AWS may hold it.
        """
        with self._transaction() as db:
            db.execute(
                "UPDATE records SET attempts = attempts + 1, "
                "uncertain = CASE WHEN in_flight = 1 THEN 1 ELSE uncertain END, in_flight = 1 "
                "WHERE id = ? AND state = ?",
                (record_id, PENDING),
            )
            rows = self._records(db, "id = ? AND state = ?", (record_id, PENDING))
        return rows[0] if rows else None

    def product_hints(self, record_ids: Sequence[int]) -> dict[int, str]:
        """The product some event of each record named (records of a license are kept
        under no product): what lets the sender put many customers' licenses of one
        product in one call. Records none of whose events named one are left out."""
        with self._reading() as db:
            return {
                int(record_id): str(product)
                for record_id, product in _select_in(
                    db,
                    "SELECT record_id, MIN(product_code) FROM events WHERE record_id IN ({marks}) "
                    "AND product_code <> '' GROUP BY record_id",
                    record_ids,
                )
            }

    def _lock_keys_of(self, db: Db, record_ids: Sequence[int]) -> None:
        """The keys of records about to be written together, locked first and in the
        placer's order (sorted): a transaction that writes many records then never holds
        one record a placer waits for while it waits for another the placer holds."""
        keys = {
            (str(p), str(c), str(d))
            for p, c, d in _select_in(
                db, "SELECT product_code, customer, usage_dimension FROM records WHERE id IN ({marks})", record_ids
            )
        }
        for key in sorted(keys):
            self._lock_key(db, *key)

    def begin_attempts(self, record_ids: Sequence[int]) -> list[RecordRow]:
        """:meth:`begin_attempt` for the records of one BatchMeterUsage call, in one
        transaction: the call's records are frozen together, before AWS hears of any.
        In id order, as every transaction that locks several records takes them (so two
        never wait on each other); the rows come back in that order."""
        with self._transaction() as db:
            self._lock_keys_of(db, record_ids)
            out = []
            for record_id in sorted(record_ids):
                db.execute(
                    "UPDATE records SET attempts = attempts + 1, "
                    "uncertain = CASE WHEN in_flight = 1 THEN 1 ELSE uncertain END, in_flight = 1 "
                    "WHERE id = ? AND state = ?",
                    (record_id, PENDING),
                )
                out += self._records(db, "id = ? AND state = ?", (record_id, PENDING))
        return out

    def mark_all_sent(self, sent: Sequence[tuple[int, str]], now: float) -> list[bool]:
        """:meth:`mark_sent` for each (record id, AWS's record id) of one call, in one transaction
        (in id order, as :meth:`begin_attempts`); the flags in the order given."""
        made: dict[int, bool] = {}
        with self._transaction() as db:
            self._lock_keys_of(db, [record_id for record_id, _ in sent])
            for record_id, metering_record_id in sorted(sent):
                made[record_id] = (
                    db.execute(
                        "UPDATE records SET state = ?, metering_record_id = ?, last_error = '', in_flight = 0, "
                        "uncertain = 0, closed_at = ? WHERE id = ? AND state <> ?",
                        (SENT, metering_record_id, now, record_id, SENT),
                    ).rowcount
                    > 0
                )
        return [made[record_id] for record_id, _ in sent]

    def requeue(self, retries: Sequence[Requeue]) -> None:
        """:meth:`settle`, then :meth:`retry_later`, for each record of one call, in one
        transaction (in id order, as :meth:`begin_attempts`)."""
        with self._transaction() as db:
            self._lock_keys_of(db, [r.record_id for r in retries])
            for r in sorted(retries, key=lambda r: r.record_id):
                if r.uncertain is None:
                    db.execute(
                        "UPDATE records SET in_flight = 0, last_error = ?, next_attempt = ? WHERE id = ? AND state = ?",
                        (r.error, r.next_attempt, r.record_id, PENDING),
                    )
                else:
                    db.execute(
                        "UPDATE records SET in_flight = 0, uncertain = ?, last_error = ?, next_attempt = ? "
                        "WHERE id = ? AND state = ?",
                        (int(r.uncertain), r.error, r.next_attempt, r.record_id, PENDING),
                    )

    def mark_sent(self, record_id: int, metering_record_id: str, now: float) -> bool:
        """AWS's answer is the truth, whatever another sender stored meanwhile (a
        FAILED record becomes SENT). True when this call made the record SENT; False
        when it already was (another sender heard the same answer first) or is gone."""
        with self._transaction() as db:
            return (
                db.execute(
                    "UPDATE records SET state = ?, metering_record_id = ?, last_error = '', in_flight = 0, "
                    "uncertain = 0, "
                    "closed_at = ? WHERE id = ? AND state <> ?",
                    (SENT, metering_record_id, now, record_id, SENT),
                ).rowcount
                > 0
            )

    def settle(self, record_id: int, *, uncertain: bool | None) -> None:
        """The last attempt is over. ``uncertain``: True when AWS may have recorded
        it unheard; False when AWS's answer rules out any record of this request
        (DUPLICATE_REQUEST: the hour holds another); None when the answer rules
        out only this attempt (throttling, a 4xx, a bare 503)."""
        with self._transaction() as db:
            if uncertain is None:
                db.execute("UPDATE records SET in_flight = 0 WHERE id = ? AND state = ?", (record_id, PENDING))
            else:
                db.execute(
                    "UPDATE records SET in_flight = 0, uncertain = ? WHERE id = ? AND state = ?",
                    (int(uncertain), record_id, PENDING),
                )

    def retry_later(self, record_id: int, error: str, next_attempt: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE records SET last_error = ?, next_attempt = ? WHERE id = ? AND state = ?",
                (error, next_attempt, record_id, PENDING),
            )

    def mark_failed(self, record_id: int, error: str, now: float) -> bool:
        """True when this call made the PENDING record FAILED (False: it no longer was)."""
        with self._transaction() as db:
            # An attempt still in flight (its sender died mid-call) may sit in AWS: the
            # record keeps saying so once FAILED (RecordRow.outcome_unknown).
            return (
                db.execute(
                    "UPDATE records SET state = ?, last_error = ?, uncertain = CASE WHEN in_flight = 1 THEN 1 ELSE "
                    "uncertain END, in_flight = 0, closed_at = ? WHERE id = ? AND state = ?",
                    (FAILED, error, now, record_id, PENDING),
                ).rowcount
                > 0
            )

    def retry_failed(self, record_id: int, *, reconciled: bool, now: float) -> RecordRow:
        """A FAILED record back to PENDING, due at ``now``; see :meth:`Spool.retry_failed`.

        The row is locked for the transaction, so of two retries at once (two
        replicas, two operators) one wins and the other finds the record PENDING.
        Content, ClientToken and attempts stay: the resend is the identical request.
        """
        with self._transaction() as db:
            rows = self._records(db, "id = ?", (record_id,), lock=True)
            if not rows:
                raise RecordNotFound(record_id)
            row = rows[0]
            if row.state != FAILED:
                raise RecordNotFailed(row)
            if row.outcome_unknown and not reconciled:
                raise OutcomeUnknown(row)
            note = f"retried by operator at {placement.timestamp_of(int(now)).isoformat()}"
            if row.outcome_unknown:
                note += " (reconciled: AWS held no record of it)"
            # Cleared flags: AWS holds nothing of it (the operator's word, or a known
            # outcome), so the sender may carry it if its hour has left AWS's window.
            db.execute(
                "UPDATE records SET state = ?, next_attempt = ?, last_error = ?, in_flight = 0, uncertain = 0, "
                "closed_at = 0 WHERE id = ?",
                (PENDING, now, f"{note}; was: {row.last_error}" if row.last_error else note, record_id),
            )
            (retried,) = self._records(db, "id = ?", (record_id,))
        log.warning(
            "record_retried_by_operator",
            record_id=record_id,
            product_code=row.product_code,
            usage_dimension=row.usage_dimension,
            hour=placement.timestamp_of(row.hour).isoformat(),
            quantity=row.quantity,
            client_token=row.client_token,
            attempts=row.attempts,
            reconciled=row.outcome_unknown,
            previous_error=row.last_error,
            **customer_fields(row.customer),
        )
        return retried

    def carry(self, record_id: int, reason: str, now: float, margin: float = placement.SAFETY_MARGIN) -> list[Carry]:
        """The record's hour cannot take its usage: mark the hour unusable for this
        product, customer and dimension, and place its events again, in one transaction."""
        with self._transaction() as db:
            found = self._records(db, "id = ?", (record_id,))
            if not found:
                return []
            self._lock_key(db, *found[0].key)
            # Never a record whose outcome is unknown: AWS may hold it (the sender checks too).
            rows = self._records(
                db, "id = ? AND state = ? AND in_flight = 0 AND uncertain = 0", (record_id, PENDING), lock=True
            )
            if not rows:
                return []
            record = rows[0]
            db.execute(
                "INSERT INTO taken (product_code, customer, usage_dimension, hour, reason) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (product_code, customer, usage_dimension, hour) DO UPDATE SET reason = excluded.reason",
                (*record.key, record.hour, reason),
            )
            events = db.execute(
                f"SELECT {self.SEQ}, {_GROUP_COLUMNS} FROM events WHERE record_id = ? ORDER BY {self.SEQ}",
                (record_id,),
            ).fetchall()
            db.execute("DELETE FROM records WHERE id = ?", (record_id,))
            fallback = placement.too_old_goes_to(now, self.span)
            carries = []
            for piece in placement.group(events):
                placed = self._place(db, piece, self._earliest(piece, now, margin), fallback)
                # A carry out of a record is a carry even when the event's own hour is its new home.
                carries.append(
                    placed
                    or Carry(
                        piece.product_code,
                        piece.usage_dimension,
                        record.hour,
                        piece.hour,
                        placement.format_decimal(piece.content.total),
                        piece.customer,
                    )
                )
            return carries

    # -- keeping storage bounded ---------------------------------------------------

    def prune(self, now: float, *, event_retention: float, record_retention: float) -> Pruned:
        """Delete what no rule needs any more, PRUNE_CHUNK rows per transaction.

        - events of SENT records closed more than ``event_retention`` ago (their ids
          are then no longer recognised: the deduplication window);
        - SENT and FAILED records closed more than ``record_retention`` ago, with
          any events they still hold;
        - hours marked taken that placement can no longer choose (older than AWS's
          window, the wider SaaS one included, with a day to spare).
        """

        def delete(sql: str, *args: Any) -> Callable[[Db], int]:
            return lambda db: int(db.execute(sql, (*args, PRUNE_CHUNK)).rowcount)

        def delete_old_records(db: Db) -> int:
            old = "state IN (?, ?) AND closed_at < ?"
            ids = [
                i
                for (i,) in db.execute(
                    f"SELECT id FROM records WHERE {old} LIMIT ?", (SENT, FAILED, now - record_retention, PRUNE_CHUNK)
                )
            ]
            if not ids:
                return 0
            # The selection took no locks: an operator's retry (FAILED → PENDING) on another
            # replica may commit before the delete. The delete checks again (PostgreSQL
            # re-evaluates a row changed meanwhile), and only its rows lose their events.
            marks = ",".join("?" * len(ids))
            deleted = [
                (i,)
                for (i,) in db.execute(
                    f"DELETE FROM records WHERE id IN ({marks}) AND {old} RETURNING id",
                    (*ids, SENT, FAILED, now - record_retention),
                ).fetchall()
            ]
            if deleted:
                db.executemany("DELETE FROM events WHERE record_id = ?", deleted)
            return len(deleted)  # short of a chunk after a race: the rest waits for the next pass

        events = self._in_chunks(
            delete(
                "DELETE FROM events WHERE event_id IN (SELECT e.event_id FROM records r JOIN events e ON "
                "e.record_id = r.id "
                "WHERE r.state = ? AND r.closed_at < ? LIMIT ?)",
                SENT,
                now - event_retention,
            ),
            PRUNE_CHUNK,
        )
        records = self._in_chunks(delete_old_records, PRUNE_CHUNK)
        # SaaS usage goes back 24 hours (container usage six): the older of the two windows.
        oldest = min(placement.earliest_hour(now, 0, self.span, saas=saas) for saas in (False, True))
        horizon = oldest - 24 * HOUR
        taken = self._in_chunks(
            delete(
                "DELETE FROM taken WHERE (product_code, customer, usage_dimension, hour) IN "
                "(SELECT product_code, customer, usage_dimension, hour FROM taken WHERE hour < ? LIMIT ?)",
                horizon,
            ),
            PRUNE_CHUNK,
        )
        return Pruned(events, records, taken)

    # -- reading -----------------------------------------------------------------

    def get(self, record_id: int) -> RecordRow | None:
        with self._reading() as db:
            rows = self._records(db, "id = ?", (record_id,))
        return rows[0] if rows else None

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
        ``customer_aws_account_id``/``license_arn``: only SaaS records of that account
        or license. The customer is stored as one canonical text (placement.customer_key):
        the account is its first element, the license its second, each found as the
        exact JSON text it is stored as (FIND: no wildcards, case-sensitive)."""
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if state:
            where.append("state = ?")
            args.append(state)
        if product_code:
            where.append("product_code = ?")
            args.append(product_code)
        if customer_aws_account_id:  # '["<account>",' opens the key
            where.append(f"{self.FIND}(customer, ?) = 1")
            args.append(json.dumps([customer_aws_account_id])[:-1] + ",")
        if license_arn:  # ',"<license>",' only at the second element: a JSON string escapes every quote in it
            where.append(f"{self.FIND}(customer, ?) > 0")
            args.append("," + json.dumps(license_arn) + ",")
        if since is not None:
            where.append("hour >= ?")
            args.append(int(since))
        if until is not None:
            where.append("hour < ?")
            args.append(int(until))
        if after is not None:
            where.append("(hour < ? OR (hour = ? AND id < ?))")
            args += [after[0], after[0], after[1]]
        with self._reading() as db:
            return self._records(db, " AND ".join(where), tuple(args), order="hour DESC, id DESC", limit=limit)

    def stats(self) -> Stats:
        with self._reading() as db:
            pending, oldest = db.execute(
                "SELECT COUNT(*), MIN(hour) FROM records WHERE state = ?", (PENDING,)
            ).fetchone()
            (unassigned,) = db.execute("SELECT COUNT(*) FROM events WHERE record_id IS NULL").fetchone()
            counts = {state: int(n) for state, n in db.execute("SELECT state, COUNT(*) FROM records GROUP BY state")}
            (unknown,) = db.execute(
                "SELECT COUNT(*) FROM records WHERE state = ? AND (uncertain = 1 OR in_flight = 1)", (FAILED,)
            ).fetchone()
        return Stats(
            int(pending),
            None if oldest is None else int(oldest),
            int(unassigned),
            sent=counts.get(SENT, 0),
            failed=counts.get(FAILED, 0),
            failed_outcome_unknown=int(unknown),
        )

    def _records(
        self,
        db: Db,
        where: str,
        args: Sequence[Any],
        *,
        order: str = "id",
        limit: int | None = None,
        lock: bool = False,
    ) -> list[RecordRow]:
        sql = f"SELECT {RECORD_COLUMNS} FROM records WHERE {where} ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        if lock:
            sql += self.LOCK_ROWS
        return [RecordRow(*row) for row in db.execute(sql, args)]
