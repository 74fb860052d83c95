"""The durable spool: events and hourly records in one SQLite file.

Why SQLite: a committed transaction survives ``kill -9`` (WAL, ``synchronous=FULL``),
a batch is all or nothing, and ``event_id`` as primary key makes duplicates
free to recognise across restarts. One connection behind a lock: SQLite runs
one writer at a time anyway, and a lock is simpler than a pool.

Life of usage:

1. :meth:`Spool.record` inserts a batch of events in one transaction (unassigned).
2. :meth:`Spool.assign` sums unassigned events into *records* (one per product,
   dimension and hour), using :func:`gateway.aggregator.place`: a record takes
   more usage only while no request has gone out for it.
3. :meth:`Spool.begin_attempt` freezes a record *before* the sender calls AWS,
   so a crash mid-call cannot change what a resend sends (same ClientToken).
4. :meth:`Spool.mark_sent`, :meth:`Spool.retry_later`, :meth:`Spool.mark_failed`
   record the outcome; :meth:`Spool.carry` returns a record's events to the
   pool, marks its hour as unusable, and places them again in later hours.

Records are never deleted except by a carry, whose usage moves to another
record in the same transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import structlog

from gateway import aggregator
from gateway.aggregator import HOUR, Content, EventRow, Piece

PENDING, SENT, FAILED = "PENDING", "SENT", "FAILED"
LATE = "late_or_too_old"  # why assign() carries: the own hour is taken or too old
ASSIGN_CHUNK = 50_000  # events placed per transaction, to keep writers waiting briefly

log = structlog.get_logger("gateway.spool")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    product_code TEXT NOT NULL,
    usage_dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    tags TEXT NOT NULL,
    quantity TEXT NOT NULL,
    whole INTEGER NOT NULL,
    record_id INTEGER
);
CREATE INDEX IF NOT EXISTS events_by_record ON events(record_id);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    product_code TEXT NOT NULL,
    usage_dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    state TEXT NOT NULL,
    allocations TEXT NOT NULL,
    whole INTEGER NOT NULL,
    quantity TEXT NOT NULL,
    client_token TEXT NOT NULL,
    metering_record_id TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    carried_from TEXT NOT NULL DEFAULT '[]',
    next_attempt REAL NOT NULL DEFAULT 0,
    -- an attempt is out and its outcome not yet stored (a crash leaves it set)
    in_flight INTEGER NOT NULL DEFAULT 0,
    -- some attempt may have reached AWS without a definite answer
    uncertain INTEGER NOT NULL DEFAULT 0,
    UNIQUE (product_code, usage_dimension, hour)
);
CREATE INDEX IF NOT EXISTS records_by_state ON records(state, hour);
CREATE TABLE IF NOT EXISTS taken (
    product_code TEXT NOT NULL,
    usage_dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (product_code, usage_dimension, hour)
);
"""

_INSERT_EVENT = (
    # Only a repeated event_id is skipped; any other constraint fails the whole batch.
    "INSERT INTO events (event_id, product_code, usage_dimension, hour, tags, quantity, whole) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING"
)
_RECORD_COLUMNS = (
    "id, product_code, usage_dimension, hour, state, allocations, whole, quantity, client_token, "
    "metering_record_id, attempts, last_error, carried_from, next_attempt, in_flight, uncertain"
)


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
            from_hour=aggregator.timestamp_of(self.from_hour).isoformat(),
            to_hour=aggregator.timestamp_of(self.to_hour).isoformat(),
            quantity=self.quantity,
        )


@dataclass(frozen=True)
class Stats:
    pending: int
    oldest_pending_hour: int | None
    unassigned_events: int


class Spool:
    """The SQLite spool. Thread-safe; ``path`` may be ``:memory:`` for tests."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                self._db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; rolled back on any exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- recording ---------------------------------------------------------

    def record(self, events: Sequence[EventRow]) -> tuple[int, int]:
        """Store a batch in one transaction → (accepted, duplicates). Durable on return."""
        with self._transaction() as db:
            accepted = db.executemany(_INSERT_EVENT, events).rowcount
        return accepted, len(events) - accepted

    # -- placing usage into records ------------------------------------------

    def assign(self, now: float, margin: float = aggregator.SAFETY_MARGIN) -> list[Carry]:
        """Place every unassigned event into a record; returns the carries made."""
        carries: list[Carry] = []
        while True:
            with self._transaction() as db:
                rows = db.execute(
                    "SELECT rowid, product_code, usage_dimension, hour, tags, quantity, whole FROM events "
                    "WHERE record_id IS NULL LIMIT ?",
                    (ASSIGN_CHUNK,),
                ).fetchall()
                if not rows:
                    return carries
                earliest = aggregator.earliest_hour(now, margin)
                for piece in aggregator.group(rows):
                    carry = self._place(db, piece, earliest)
                    if carry is not None:
                        carries.append(carry)

    def _place(self, db: sqlite3.Connection, piece: Piece, earliest: int) -> Carry | None:
        key = (piece.product_code, piece.usage_dimension)
        taken = {h for (h,) in db.execute(
            "SELECT hour FROM taken WHERE product_code = ? AND usage_dimension = ? AND hour >= ?", (*key, earliest)
        )}
        existing = {r.hour: r for r in self._records(db, "product_code = ? AND usage_dimension = ? AND hour >= ?", (*key, earliest))}

        def can_take(hour: int) -> bool:
            if hour in taken:
                return False
            record = existing.get(hour)
            return record is None or (not record.frozen and record.content.fits(piece.content))

        hour = aggregator.place(piece.hour, earliest, can_take)
        carried = [piece.hour] if hour != piece.hour else []
        record = existing.get(hour)
        if record is None:
            content = piece.content
            record_id = db.execute(
                "INSERT INTO records (product_code, usage_dimension, hour, state, allocations, whole, quantity, "
                "client_token, carried_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, hour, PENDING, content.to_json(), int(content.whole), aggregator.format_decimal(content.total),
                 aggregator.client_token(*key, hour, content), json.dumps(carried)),
            ).lastrowid
        else:
            content = record.content
            content.add(piece.content)
            carried = sorted(set(record.carried_hours) | set(carried))
            record_id = record.id
            db.execute(
                "UPDATE records SET allocations = ?, whole = ?, quantity = ?, client_token = ?, carried_from = ? WHERE id = ?",
                (content.to_json(), int(content.whole), aggregator.format_decimal(content.total),
                 aggregator.client_token(*key, hour, content), json.dumps(carried), record_id),
            )
        db.executemany("UPDATE events SET record_id = ? WHERE rowid = ?", [(record_id, i) for i in piece.ids])
        if hour == piece.hour:
            return None
        return Carry(*key, piece.hour, hour, aggregator.format_decimal(piece.content.total))

    # -- sending -------------------------------------------------------------

    def due(self, now: float, grace: float, *, final: bool = False) -> list[RecordRow]:
        """PENDING records whose hour closed ``grace`` ago and whose backoff is over.

        ``final`` (the flush at shutdown): every PENDING record up to the
        current hour, ignoring grace and backoff.
        """
        with self._lock:
            if final:
                return self._records(self._db, "state = ? AND hour <= ?", (PENDING, aggregator.hour_of(now)), order="hour")
            return self._records(
                self._db, "state = ? AND hour <= ? AND next_attempt <= ?", (PENDING, now - HOUR - grace, now), order="hour"
            )

    def begin_attempt(self, record_id: int) -> RecordRow | None:
        """Freeze the record and count the attempt, committed before AWS is called."""
        with self._transaction() as db:
            db.execute(
                "UPDATE records SET attempts = attempts + 1, uncertain = (uncertain OR in_flight), in_flight = 1 "
                "WHERE id = ? AND state = ?",
                (record_id, PENDING),
            )
            rows = self._records(db, "id = ? AND state = ?", (record_id, PENDING))
        return rows[0] if rows else None

    def mark_sent(self, record_id: int, metering_record_id: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE records SET state = ?, metering_record_id = ?, last_error = '', in_flight = 0, uncertain = 0 "
                "WHERE id = ?",
                (SENT, metering_record_id, record_id),
            )

    def settle(self, record_id: int, *, uncertain: bool | None) -> None:
        """The last attempt is over. ``uncertain``: True when AWS may have recorded
        it unheard (no answer, a 5xx); False when AWS's answer rules out a record of
        this request (DUPLICATE_REQUEST: the hour holds another); None when the
        answer says nothing about earlier attempts (throttling)."""
        with self._transaction() as db:
            if uncertain is None:
                db.execute("UPDATE records SET in_flight = 0 WHERE id = ?", (record_id,))
            else:
                db.execute("UPDATE records SET in_flight = 0, uncertain = ? WHERE id = ?", (int(uncertain), record_id))

    def retry_later(self, record_id: int, error: str, next_attempt: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE records SET last_error = ?, next_attempt = ? WHERE id = ?", (error, next_attempt, record_id))

    def mark_failed(self, record_id: int, error: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE records SET state = ?, last_error = ?, in_flight = 0 WHERE id = ?", (FAILED, error, record_id))

    def carry(self, record_id: int, reason: str, now: float, margin: float = aggregator.SAFETY_MARGIN) -> list[Carry]:
        """The record's hour cannot take its usage: mark the hour unusable for this
        product and dimension, and place its events again, in one transaction."""
        with self._transaction() as db:
            rows = self._records(db, "id = ? AND state = ?", (record_id, PENDING))
            if not rows:
                return []
            record = rows[0]
            db.execute(
                "INSERT OR REPLACE INTO taken (product_code, usage_dimension, hour, reason) VALUES (?, ?, ?, ?)",
                (record.product_code, record.usage_dimension, record.hour, reason),
            )
            events = db.execute(
                "SELECT rowid, product_code, usage_dimension, hour, tags, quantity, whole FROM events WHERE record_id = ?",
                (record_id,),
            ).fetchall()
            db.execute("DELETE FROM records WHERE id = ?", (record_id,))
            earliest = aggregator.earliest_hour(now, margin)
            carries = []
            for piece in aggregator.group(events):
                placed = self._place(db, piece, earliest)
                # A carry out of a record is a carry even when the event's own hour is its new home.
                carries.append(placed or Carry(piece.product_code, piece.usage_dimension, record.hour, piece.hour,
                                               aggregator.format_decimal(piece.content.total)))
            return carries

    # -- reading -------------------------------------------------------------

    def get(self, record_id: int) -> RecordRow | None:
        with self._lock:
            rows = self._records(self._db, "id = ?", (record_id,))
        return rows[0] if rows else None

    def list_records(self, *, state: str | None = None, product_code: str | None = None,
             after: tuple[int, int] | None = None, limit: int = 100) -> list[RecordRow]:
        """Records newest hour first; ``after`` is the (hour, id) of the last one seen."""
        where: list[str] = ["1"]
        args: list[Any] = []
        if state:
            where.append("state = ?")
            args.append(state)
        if product_code:
            where.append("product_code = ?")
            args.append(product_code)
        if after is not None:
            where.append("(hour < ? OR (hour = ? AND id < ?))")
            args += [after[0], after[0], after[1]]
        with self._lock:
            return self._records(self._db, " AND ".join(where), tuple(args), order="hour DESC, id DESC", limit=limit)

    def stats(self) -> Stats:
        with self._lock:
            pending, oldest = self._db.execute("SELECT COUNT(*), MIN(hour) FROM records WHERE state = ?", (PENDING,)).fetchone()
            (unassigned,) = self._db.execute("SELECT COUNT(*) FROM events WHERE record_id IS NULL").fetchone()
        return Stats(pending, oldest, unassigned)

    def event_totals(self) -> list[tuple[str, str, str]]:
        """(product, dimension, exact sum) of every stored event, for checks."""
        with self._lock:
            rows = self._db.execute("SELECT product_code, usage_dimension, quantity FROM events").fetchall()
        sums: dict[tuple[str, str], Decimal] = {}
        for product, dimension, quantity in rows:
            sums[(product, dimension)] = sums.get((product, dimension), Decimal(0)) + Decimal(quantity)
        return [(p, d, aggregator.format_decimal(q)) for (p, d), q in sorted(sums.items())]

    @staticmethod
    def _records(db: sqlite3.Connection, where: str, args: tuple[Any, ...], *, order: str = "id", limit: int | None = None) -> list[RecordRow]:
        sql = f"SELECT {_RECORD_COLUMNS} FROM records WHERE {where} ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [RecordRow(*row) for row in db.execute(sql, args)]
