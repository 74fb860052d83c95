"""The durable spool: events and hourly records in one SQLite file.

Why SQLite: a committed transaction survives ``kill -9`` (WAL, ``synchronous=FULL``),
a batch is all or nothing, and ``event_id`` as primary key makes duplicates
free to recognise across restarts. One connection behind a lock: SQLite runs
one writer at a time anyway, and a lock is simpler than a pool.

Life of usage:

1. :meth:`Spool.record` inserts a batch of events in one transaction (unassigned).
   A repeated ``event_id`` with the same digest is a duplicate; with another
   digest it refuses the whole batch (:class:`EventIdConflict`).
2. :meth:`Spool.assign` sums unassigned events into *records* (one per product,
   dimension and hour), using :func:`gateway.aggregator.place`: a record takes
   more usage only while no request has gone out for it. It works in small
   transactions and steps aside for waiting writers, so RecordUsage never waits
   long behind it.
3. :meth:`Spool.begin_attempt` freezes a record *before* the sender calls AWS,
   so a crash mid-call cannot change what a resend sends (same ClientToken).
4. :meth:`Spool.mark_sent`, :meth:`Spool.retry_later`, :meth:`Spool.mark_failed`
   record the outcome; :meth:`Spool.carry` returns a record's events to the
   pool, marks its hour as unusable, and places them again in later hours.
5. :meth:`Spool.prune` keeps the file bounded: events of records sent longer
   ago than the deduplication window, then records older than the record
   retention, in small transactions.

Every SQLite failure other than a programming error (disk full, I/O error, a
read-only file) is raised as :class:`SpoolUnavailable` with SQLite's own
message, after the transaction was rolled back: nothing half-written is ever
acknowledged. The file carries its schema version (``PRAGMA user_version``);
older files are migrated forward at open, newer ones refused.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import structlog

from gateway import aggregator, validation
from gateway.aggregator import HOUR, Content, EventRow, Piece

PENDING, SENT, FAILED = "PENDING", "SENT", "FAILED"
DECIMAL_WIRE, WHOLE_WIRE = "decimal", "whole"
LATE = "late_or_too_old"  # why assign() carries: the own hour is taken or too old
# Events placed per transaction: a writer waits at most about one chunk's work
# (15-20 ms on the project's 2-core machine).
ASSIGN_CHUNK = 1000
PRUNE_CHUNK = 500  # rows deleted per pruning transaction
# How long placement and pruning step aside, at most, while writers wait for the lock.
YIELD_MAX = 0.05
SCHEMA_VERSION = 2

log = structlog.get_logger("gateway.spool")


class SpoolError(Exception):
    """The spool cannot be used as it is (a one-line message for a person)."""


class SpoolUnavailable(SpoolError):
    """SQLite could not write (disk full, I/O error, read-only): nothing was committed."""


class EventIdConflict(SpoolError):
    """Event ids accepted before with another payload; ``indices`` index the batch."""

    def __init__(self, indices: Sequence[int]) -> None:
        super().__init__(f"{len(indices)} event id(s) were accepted before with a different payload")
        self.indices = list(indices)


# Release 0.1.0's schema (version 1, which set no user_version). A new file gets it
# and then every migration, so a migrated file and a new one are the same.
_SCHEMA_V1 = """
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


def _migrate_1_to_2(db: sqlite3.Connection, now: float) -> None:
    """Digests for new events; the wire form and closing time of records.

    Events of version 1 have no digest: a repeat of one is a duplicate, as it was.
    A record already sent in the whole-number form is resent in that form, since
    a resend must be the identical request; every other record goes out decimal.
    Sent and failed records start their retention at the migration. The spool gets
    an id of its own, and records never sent get tokens salted with it.
    """
    db.execute("ALTER TABLE events ADD COLUMN digest BLOB")
    db.execute(f"ALTER TABLE records ADD COLUMN wire TEXT NOT NULL DEFAULT '{DECIMAL_WIRE}'")
    db.execute("ALTER TABLE records ADD COLUMN closed_at REAL NOT NULL DEFAULT 0")
    db.execute("UPDATE records SET closed_at = ? WHERE state != ?", (now, PENDING))
    legacy = [
        (WHOLE_WIRE, record_id)
        for record_id, quantity in db.execute("SELECT id, quantity FROM records WHERE attempts > 0 AND whole = 1")
        if Decimal(quantity) <= validation.QUANTITY_MAX
    ]
    db.executemany("UPDATE records SET wire = ? WHERE id = ?", legacy)
    db.execute("CREATE INDEX IF NOT EXISTS records_by_closing ON records(state, closed_at)")
    # The spool's own id salts every new ClientToken: two pods' spools never share a token.
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    spool_id = str(uuid.uuid4())
    db.execute("INSERT INTO meta (key, value) VALUES ('spool_id', ?)", (spool_id,))
    db.execute("CREATE TABLE IF NOT EXISTS probe (data BLOB)")  # Spool.probe() writes here
    unsent = db.execute(f"SELECT {_RECORD_COLUMNS_V1} FROM records WHERE state = ? AND attempts = 0", (PENDING,))
    db.executemany("UPDATE records SET client_token = ? WHERE id = ?", [
        (aggregator.client_token(product, dimension, hour, Content.from_json(allocations, bool(whole)), spool_id), rid)
        for rid, product, dimension, hour, allocations, whole in unsent.fetchall()
    ])


# MIGRATIONS[v] takes a file from version v to v + 1, inside one transaction.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection, float], None]] = {1: _migrate_1_to_2}
assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION))

_INSERT_EVENT = (
    # Only a repeated event_id is skipped; any other constraint fails the whole batch.
    "INSERT INTO events (event_id, product_code, usage_dimension, hour, tags, quantity, whole, digest) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING"
)
_RECORD_COLUMNS = (
    "id, product_code, usage_dimension, hour, state, allocations, whole, quantity, client_token, "
    "metering_record_id, attempts, last_error, carried_from, next_attempt, in_flight, uncertain, wire, closed_at"
)
_EVENT_COLUMNS = "rowid, product_code, usage_dimension, hour, tags, quantity, whole"
_RECORD_COLUMNS_V1 = "id, product_code, usage_dimension, hour, allocations, whole"
# Errors of our own making, not of the disk: raised as they are.
_PROGRAMMING_ERRORS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)


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
            from_hour=aggregator.timestamp_of(self.from_hour).isoformat(),
            to_hour=aggregator.timestamp_of(self.to_hour).isoformat(),
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


def _unavailable(exc: sqlite3.Error) -> SpoolUnavailable:
    code = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
    return SpoolUnavailable(f"{code}: {exc}")


class Spool:
    """The SQLite spool. Thread-safe; ``path`` may be ``:memory:`` for tests.

    ``now`` is used only to date migrations; every other time is passed in.
    """

    def __init__(self, path: str, *, now: Callable[[], float] = time.time) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._waiting = 0  # writers waiting for the lock: placement and pruning step aside
        self._counter = threading.Lock()  # guards _waiting
        self._writable = True
        self._on_writable: Callable[[bool], None] | None = None
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            # After a checkpoint the WAL file is cut back to this size, so it cannot keep
            # what one large transaction once needed.
            self._db.execute("PRAGMA journal_size_limit=67108864")
            self._open(now())
        except BaseException:
            self._db.close()
            raise

    def _open(self, now: float) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"spool {self.path!r} has schema version {version}, newer than this release's "
                f"{SCHEMA_VERSION}: it was written by a newer metering-gateway; run that release or newer"
            )
        existing = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'records'").fetchone() is not None
        if version == 0:  # a new file, or one from release 0.1.0 (which set no version)
            self._db.executescript(_SCHEMA_V1)
            version = 1
        while version < SCHEMA_VERSION:
            with self._transaction() as db:
                MIGRATIONS[version](db, now)
                version += 1
                db.execute(f"PRAGMA user_version = {version}")
            if existing:
                log.info("spool_migrated", path=self.path, schema_version=version)
        (self.spool_id,) = self._db.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- health ----------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """False from a failed write until a write (or :meth:`probe`) succeeds."""
        return self._writable

    def on_writable(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(writable)`` whenever writability changes (health)."""
        self._on_writable = callback

    def _set_writable(self, writable: bool) -> None:
        if writable == self._writable:
            return
        self._writable = writable
        if self._on_writable is not None:
            self._on_writable(writable)

    def probe(self, size: int = 262_144) -> bool:
        """Try a real write of ``size`` bytes (then delete it) to see whether the
        spool can take a batch again; True when it could."""
        try:
            with self._transaction() as db:
                db.execute("INSERT INTO probe VALUES (zeroblob(?))", (size,))
                db.execute("DELETE FROM probe")
        except SpoolUnavailable:
            return False
        return True

    # -- transactions ------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, writer: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; rolled back on any exception.

        A failure of SQLite itself leaves as SpoolUnavailable carrying SQLite's own
        message: when COMMIT fails, SQLite may already have rolled back, and a
        second ROLLBACK would only say "no transaction is active".
        """
        if writer:
            with self._counter:
                self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            if writer:
                with self._counter:
                    self._waiting -= 1
        try:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error as rollback:  # the first error is the one to report
                        log.warning("spool_rollback_failed", error=str(rollback))
                raise
            self._set_writable(True)  # under the lock: the last transaction's outcome is the state
        except _PROGRAMMING_ERRORS:
            raise
        except sqlite3.Error as exc:
            error = _unavailable(exc)
            log.error("spool_unavailable", path=self.path, error=str(error))
            self._set_writable(False)
            raise error from exc
        finally:
            self._lock.release()

    def _step_aside(self) -> None:
        """Between two chunks of background work: let waiting writers go first."""
        deadline = time.monotonic() + YIELD_MAX
        while self._waiting and time.monotonic() < deadline:
            time.sleep(0.0005)

    # -- recording ---------------------------------------------------------

    def record(self, events: Sequence[EventRow]) -> tuple[int, int]:
        """Store a batch in one transaction → (accepted, duplicates). Durable on return.

        Raises EventIdConflict (and stores nothing) when an event id was accepted
        before, or earlier in the batch, with another digest.
        """
        with self._transaction(writer=True) as db:
            before = db.total_changes
            db.executemany(_INSERT_EVENT, events)
            accepted = db.total_changes - before
            if accepted < len(events):
                conflicts = self._conflicts(db, events)
                if conflicts:
                    raise EventIdConflict(conflicts)
        return accepted, len(events) - accepted

    @staticmethod
    def _conflicts(db: sqlite3.Connection, events: Sequence[EventRow]) -> list[int]:
        stored: dict[str, bytes | None] = {}
        ids = list(dict.fromkeys(e.event_id for e in events))
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            marks = ",".join("?" * len(part))
            stored.update(db.execute(f"SELECT event_id, digest FROM events WHERE event_id IN ({marks})", part).fetchall())
        # A stored event without a digest (schema version 1) cannot be compared: a duplicate.
        return [i for i, e in enumerate(events) if stored.get(e.event_id) not in (None, e.digest)]

    # -- placing usage into records ------------------------------------------

    def assign(self, now: float, margin: float = aggregator.SAFETY_MARGIN) -> list[Carry]:
        """Place the events unassigned when the pass starts; returns the carries made.

        Works in transactions of ASSIGN_CHUNK events and steps aside for writers
        between them, so a large backlog never holds RecordUsage up for long. Events
        recorded meanwhile wait for the next pass: under a load faster than placing,
        a pass still ends, and the sender still sends.
        """
        carries: list[Carry] = []
        with self._lock:
            (last,) = self._db.execute("SELECT MAX(rowid) FROM events").fetchone()
        if last is None:
            return carries

        def place_chunk(db: sqlite3.Connection) -> int:
            rows = db.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE record_id IS NULL AND rowid <= ? LIMIT ?",
                (last, ASSIGN_CHUNK),
            ).fetchall()
            earliest = aggregator.earliest_hour(now, margin)
            for piece in aggregator.group(rows):
                carry = self._place(db, piece, earliest)
                if carry is not None:
                    carries.append(carry)
            return len(rows)

        self._in_chunks(place_chunk, ASSIGN_CHUNK)
        return carries

    def _in_chunks(self, work: Callable[[sqlite3.Connection], int], size: int) -> int:
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
                 aggregator.client_token(*key, hour, content, self.spool_id), json.dumps(carried)),
            ).lastrowid
        else:
            content = record.content
            content.add(piece.content)
            carried = sorted(set(record.carried_hours) | set(carried))
            record_id = record.id
            db.execute(
                "UPDATE records SET allocations = ?, whole = ?, quantity = ?, client_token = ?, carried_from = ? WHERE id = ?",
                (content.to_json(), int(content.whole), aggregator.format_decimal(content.total),
                 aggregator.client_token(*key, hour, content, self.spool_id), json.dumps(carried), record_id),
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

    def mark_sent(self, record_id: int, metering_record_id: str, now: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE records SET state = ?, metering_record_id = ?, last_error = '', in_flight = 0, uncertain = 0, "
                "closed_at = ? WHERE id = ?",
                (SENT, metering_record_id, now, record_id),
            )

    def settle(self, record_id: int, *, uncertain: bool | None) -> None:
        """The last attempt is over. ``uncertain``: True when AWS may have recorded
        it unheard; False when AWS's answer rules out any record of this request
        (DUPLICATE_REQUEST: the hour holds another); None when the answer rules
        out only this attempt (throttling, a 4xx, a bare 503)."""
        with self._transaction() as db:
            if uncertain is None:
                db.execute("UPDATE records SET in_flight = 0 WHERE id = ?", (record_id,))
            else:
                db.execute("UPDATE records SET in_flight = 0, uncertain = ? WHERE id = ?", (int(uncertain), record_id))

    def retry_later(self, record_id: int, error: str, next_attempt: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE records SET last_error = ?, next_attempt = ? WHERE id = ?", (error, next_attempt, record_id))

    def mark_failed(self, record_id: int, error: str, now: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE records SET state = ?, last_error = ?, in_flight = 0, closed_at = ? WHERE id = ?",
                       (FAILED, error, now, record_id))

    def carry(self, record_id: int, reason: str, now: float, margin: float = aggregator.SAFETY_MARGIN) -> list[Carry]:
        """The record's hour cannot take its usage: mark the hour unusable for this
        product and dimension, and place its events again, in one transaction."""
        with self._transaction() as db:
            # Never a record whose outcome is unknown: AWS may hold it (the sender checks too).
            rows = self._records(db, "id = ? AND state = ? AND in_flight = 0 AND uncertain = 0", (record_id, PENDING))
            if not rows:
                return []
            record = rows[0]
            db.execute(
                "INSERT OR REPLACE INTO taken (product_code, usage_dimension, hour, reason) VALUES (?, ?, ?, ?)",
                (record.product_code, record.usage_dimension, record.hour, reason),
            )
            events = db.execute(f"SELECT {_EVENT_COLUMNS} FROM events WHERE record_id = ?", (record_id,)).fetchall()
            db.execute("DELETE FROM records WHERE id = ?", (record_id,))
            earliest = aggregator.earliest_hour(now, margin)
            carries = []
            for piece in aggregator.group(events):
                placed = self._place(db, piece, earliest)
                # A carry out of a record is a carry even when the event's own hour is its new home.
                carries.append(placed or Carry(piece.product_code, piece.usage_dimension, record.hour, piece.hour,
                                               aggregator.format_decimal(piece.content.total)))
            return carries

    # -- keeping the file bounded -------------------------------------------------

    def prune(self, now: float, *, event_retention: float, record_retention: float) -> Pruned:
        """Delete what no rule needs any more, PRUNE_CHUNK rows per transaction.

        - events of SENT records closed more than ``event_retention`` ago (their ids
          are then no longer recognised: the deduplication window);
        - SENT and FAILED records closed more than ``record_retention`` ago, with
          any events they still hold;
        - hours marked taken that placement can no longer choose (older than AWS's
          window, with a day to spare).
        """
        def delete(sql: str, *args: Any) -> Callable[[sqlite3.Connection], int]:
            return lambda db: int(db.execute(sql, (*args, PRUNE_CHUNK)).rowcount)

        def delete_old_records(db: sqlite3.Connection) -> int:
            ids = [(i,) for (i,) in db.execute("SELECT id FROM records WHERE state IN (?, ?) AND closed_at < ? LIMIT ?",
                                               (SENT, FAILED, now - record_retention, PRUNE_CHUNK))]
            db.executemany("DELETE FROM events WHERE record_id = ?", ids)
            db.executemany("DELETE FROM records WHERE id = ?", ids)
            return len(ids)

        events = self._in_chunks(delete(
            "DELETE FROM events WHERE rowid IN (SELECT e.rowid FROM records r JOIN events e ON e.record_id = r.id "
            "WHERE r.state = ? AND r.closed_at < ? LIMIT ?)", SENT, now - event_retention), PRUNE_CHUNK)
        records = self._in_chunks(delete_old_records, PRUNE_CHUNK)
        horizon = aggregator.earliest_hour(now, 0) - 24 * HOUR
        taken = self._in_chunks(delete(
            "DELETE FROM taken WHERE rowid IN (SELECT rowid FROM taken WHERE hour < ? LIMIT ?)", horizon), PRUNE_CHUNK)
        return Pruned(events, records, taken)

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

    def size(self) -> int:
        """Bytes of the database's pages in use (the file may hold free pages too)."""
        with self._lock:
            (pages,) = self._db.execute("PRAGMA page_count").fetchone()
            (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
            (page_size,) = self._db.execute("PRAGMA page_size").fetchone()
        return int((pages - free) * page_size)

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
