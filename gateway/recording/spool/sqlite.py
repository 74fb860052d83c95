"""The SQLite spool: events and hourly records in one file, for one pod.

Why SQLite: a committed transaction survives ``kill -9`` (WAL, ``synchronous=FULL``),
a batch is all or nothing, and ``event_id`` as primary key makes duplicates
free to recognise across restarts. One connection behind a lock: SQLite runs
one writer at a time anyway, and a lock is simpler than a pool. One process
sends (``--processes`` above 1 is refused with an SQLite spool).

Every SQLite failure other than a programming error (disk full, I/O error, a
read-only file) is raised as :class:`SpoolUnavailable` with SQLite's own
message, after the transaction was rolled back: nothing half-written is ever
acknowledged. The file carries its schema version (``PRAGMA user_version``);
older files are migrated forward at open, newer ones refused.

The rules themselves live once, in :class:`gateway.recording.sql.SqlSpool`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal

import structlog

from gateway.domain import validation
from gateway.domain.clock import HOUR
from gateway.recording import placement
from gateway.recording.placement import Content, EventRow
from gateway.recording.spool.base import (
    CREATE,
    CREATE_IF_MOUNTED,
    DECIMAL_WIRE,
    NEVER_CREATE,
    NEW_SPOOL,
    PENDING,
    SCHEMA_VERSION,
    WHOLE_WIRE,
    Recorded,
    SpoolError,
    SpoolUnavailable,
    check_schema,
)
from gateway.recording.spool.sql import ZERO_HOURS_TABLE, SqlSpool

# How long placement and pruning step aside, at most, while writers wait for the lock.
YIELD_MAX = 0.05

log = structlog.get_logger("gateway.spool")


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
    db.executemany(
        "UPDATE records SET client_token = ? WHERE id = ?",
        [
            (
                placement.client_token(product, dimension, hour, Content.from_json(allocations, bool(whole)), spool_id),
                rid,
            )
            for rid, product, dimension, hour, allocations, whole in unsent.fetchall()
        ],
    )


def _migrate_2_to_3(db: sqlite3.Connection, now: float) -> None:
    """Each event's timestamp as the caller sent it ("" when the gateway stamped it),
    so that a conflicting resend can be told which field differs, and how. Events
    stored before have none (NULL): their conflicts name the timestamp only when
    nothing else differs."""
    db.execute("ALTER TABLE events ADD COLUMN timestamp TEXT")


def _migrate_3_to_4(db: sqlite3.Connection, now: float) -> None:
    """Zero-usage hours: per product and dimension, the next hour to look at."""
    db.execute(ZERO_HOURS_TABLE)


# Version 5's records and taken hours: unique per product, customer, dimension and hour.
_RECORDS_V5 = f"""
CREATE TABLE records (
    id INTEGER PRIMARY KEY,
    product_code TEXT NOT NULL,
    customer TEXT NOT NULL DEFAULT '',
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
    in_flight INTEGER NOT NULL DEFAULT 0,
    uncertain INTEGER NOT NULL DEFAULT 0,
    wire TEXT NOT NULL DEFAULT '{DECIMAL_WIRE}',
    closed_at REAL NOT NULL DEFAULT 0,
    UNIQUE (product_code, customer, usage_dimension, hour)
)"""
_TAKEN_V5 = """
CREATE TABLE taken (
    product_code TEXT NOT NULL,
    customer TEXT NOT NULL DEFAULT '',
    usage_dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (product_code, customer, usage_dimension, hour)
)"""
# The columns version 4 had, copied as they are (every row's customer is '': container usage).
_RECORDS_V4_COLUMNS = (
    "id, product_code, usage_dimension, hour, state, allocations, whole, quantity, client_token, "
    "metering_record_id, attempts, last_error, carried_from, next_attempt, in_flight, uncertain, wire, closed_at"
)
_TAKEN_V4_COLUMNS = "product_code, usage_dimension, hour, reason"


def _migrate_4_to_5(db: sqlite3.Connection, now: float) -> None:
    """SaaS usage: each event, record and taken hour names its customer ('' for container
    usage, which every row kept is), and records and taken hours are unique per
    product, customer, dimension and hour. SQLite cannot change a table's constraints,
    so records and taken are made anew and every row copied, ids and all (events
    point at their records by id)."""
    db.execute("ALTER TABLE events ADD COLUMN customer TEXT NOT NULL DEFAULT ''")
    for table, create, columns in (
        ("records", _RECORDS_V5, _RECORDS_V4_COLUMNS),
        ("taken", _TAKEN_V5, _TAKEN_V4_COLUMNS),
    ):
        db.execute(f"ALTER TABLE {table} RENAME TO {table}_v4")
        db.execute(create)
        db.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}_v4")
        db.execute(f"DROP TABLE {table}_v4")  # its indexes go with it
    db.execute("CREATE INDEX records_by_state ON records(state, hour)")
    db.execute("CREATE INDEX records_by_closing ON records(state, closed_at)")


# MIGRATIONS[v] takes a file from version v to v + 1, inside one transaction.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection, float], None]] = {
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
    3: _migrate_3_to_4,
    4: _migrate_4_to_5,
}
assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION))

_INSERT_EVENT = (
    # Only a repeated event_id is skipped; any other constraint fails the whole batch.
    "INSERT INTO events (event_id, product_code, usage_dimension, hour, tags, quantity, whole, digest, timestamp, "
    "customer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING"
)
_RECORD_COLUMNS_V1 = "id, product_code, usage_dimension, hour, allocations, whole"
# Errors of our own making, not of the disk: raised as they are.
_PROGRAMMING_ERRORS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)


def _unavailable(exc: sqlite3.Error) -> SpoolUnavailable:
    code = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
    return SpoolUnavailable(f"{code}: {exc}")


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``; None when none is there (or for ``:memory:``)."""
    if path == ":memory:":
        return None
    try:
        found = os.stat(path)
    except OSError:
        return (-1, -1)
    return found.st_dev, found.st_ino


def _held_descriptor(path: str) -> str:
    """``/proc/PID/fd/N``, through which this process still holds a deleted ``path``, or ""."""
    fds = f"/proc/{os.getpid()}/fd"
    try:
        for fd in os.listdir(fds):
            with contextlib.suppress(OSError):
                if os.readlink(f"{fds}/{fd}") == f"{os.path.abspath(path)} (deleted)":
                    return f"{fds}/{fd}"
    except OSError:
        pass
    return ""


def _may_create(path: str, create: str) -> None:
    """SpoolError unless ``--spool-create`` lets a new spool be made at ``path``."""
    if create == NEVER_CREATE:
        raise SpoolError(
            f"{path} does not exist, and --spool-create is no: is the volume that holds the spool mounted?"
        )
    if create == CREATE_IF_MOUNTED:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.ismount(directory):
            raise SpoolError(
                f"{path} does not exist, and {directory} is not a mount point (--spool-create if-mounted): "
                "the volume that holds the spool did not mount, so no new spool is made here"
            )


class SqliteSpool(SqlSpool):
    """The SQLite spool. Thread-safe; ``path`` may be ``:memory:`` for tests.

    ``now`` is used only to date migrations; every other time is passed in.
    """

    def __init__(
        self, path: str, *, now: Callable[[], float] = time.time, create: str = CREATE, span: int = HOUR
    ) -> None:
        self.location = path
        self.span = span
        self._lock = threading.Lock()
        self._waiting = 0  # writers waiting for the lock: placement and pruning step aside
        self._counter = threading.Lock()  # guards _waiting
        new = path != ":memory:" and not os.path.exists(path)
        if new:
            _may_create(path, create)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open {path!r}: {exc}") from None
        if new:
            log.warning("spool_created", path=path, note=NEW_SPOOL)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            # After a checkpoint the WAL file is cut back to this size, so it cannot keep
            # what one large transaction once needed.
            self._db.execute("PRAGMA journal_size_limit=67108864")
            self._file = _identity(path)  # the file now exists: what every write compares the path with
            self._open(now())
        except sqlite3.Error as exc:
            self._db.close()
            raise SpoolError(f"cannot open {path!r}: {exc}") from None
        except BaseException:
            self._db.close()
            raise

    def _open(self, now: float) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        check_schema(repr(self.location), version)
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
                log.info("spool_migrated", path=self.location, schema_version=version)
        (self.spool_id,) = self._db.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()
        with self._transaction() as db:
            self._settle_span(db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

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
                self._still_there()  # a commit into a deleted file is no acknowledgement
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
            log.error("spool_unavailable", path=self.location, error=str(error))
            self._set_writable(False)
            raise error from exc
        except SpoolUnavailable:
            self._set_writable(False)
            raise
        finally:
            self._lock.release()

    def _still_there(self) -> None:
        """SpoolUnavailable (logged) when the file at the spool's path is no longer the one open."""
        if self._file is None or _identity(self.location) == self._file:
            return
        held = _held_descriptor(self.location)
        error = (
            f"the spool file {self.location} was deleted or replaced while in use: RecordUsage is refused; "
            "what was acknowledged before is in the file still open"
            + (f" ({held}: copy it before the gateway stops)" if held else "")
            + "; put the file back, or restart on a restored copy"
        )
        log.error("spool_file_vanished", path=self.location, error=error)
        raise SpoolUnavailable(error)

    def verify(self) -> bool:
        with self._lock:
            try:
                self._still_there()
            except SpoolUnavailable:
                self._set_writable(False)
                return False
        return True

    def _step_aside(self) -> None:
        """Between two chunks of background work: let waiting writers go first."""
        deadline = time.monotonic() + YIELD_MAX
        while self._waiting and time.monotonic() < deadline:
            time.sleep(0.0005)

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read under the lock; SQLite failing (a corrupt file, say) leaves as SpoolUnavailable."""
        with self._lock:
            try:
                yield self._db
            except _PROGRAMMING_ERRORS:
                raise
            except sqlite3.Error as exc:
                error = _unavailable(exc)
                log.error("spool_unreadable", path=self.location, error=str(error))
                raise error from exc

    def record(self, events: Sequence[EventRow]) -> Recorded:
        """Store a batch in one transaction → (accepted, duplicates). Durable on return.

        Raises EventIdConflict (and stores nothing) when an event id was accepted
        before, or earlier in the batch, with another digest.
        """
        with self._transaction(writer=True) as db:
            # New rows get rowids above the largest one (one writer at a time): which are ours.
            (top,) = db.execute("SELECT COALESCE(MAX(rowid), 0) FROM events").fetchone()
            before = db.total_changes
            db.executemany(_INSERT_EVENT, events)
            accepted = db.total_changes - before
            self._check_conflicts(db, events, accepted)
            return Recorded.of(
                events,
                accepted,
                lambda: [i for (i,) in db.execute("SELECT event_id FROM events WHERE rowid > ?", (top,))],
            )

    def size(self) -> int:
        """Bytes of the database's pages in use (the file may hold free pages too)."""
        with self._lock:
            (pages,) = self._db.execute("PRAGMA page_count").fetchone()
            (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
            (page_size,) = self._db.execute("PRAGMA page_size").fetchone()
        return int((pages - free) * page_size)
