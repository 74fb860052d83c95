"""The PostgreSQL spool: one database that any number of replicas share.

Why PostgreSQL: stateless replicas behind one Service need one memory of
``event_id``s (a resend that lands on another replica is still a duplicate) and
storage that outlives any pod. RDS and Aurora run it for AWS sellers.

How replicas share it safely:

- **Recording**: the batch is one ``INSERT … ON CONFLICT (event_id) DO NOTHING``
  in event-id order, so two replicas taking overlapping batches never deadlock,
  and each event is stored once.
- **Placement** may run in every replica at once: a pass claims unassigned
  events with ``FOR UPDATE SKIP LOCKED`` (no event is placed by two passes), and
  holds a transaction-scoped advisory lock per product, customer and dimension
  while it reads and changes that key's records (no hour gets two records, no frozen
  record grows). Keys are locked in one order, so passes never deadlock.
- **Sending** is done by one replica at a time: the *leader*, which holds a
  session-level advisory lock on a connection of its own (:meth:`leads`). Why a
  leader rather than row leases: ``--aws-max-rps`` stays one budget for the
  seller account however many replicas run, and a leader that dies (SIGKILL, a
  lost node) releases the lock the moment PostgreSQL sees its connection close,
  with no lease to wait out and no pod clocks to compare. A record its sender
  left in flight is resent identically (same ClientToken) by the next leader.
  Should two replicas ever send at once (a leader cut off mid-call), both send
  the identical frozen request, which AWS answers idempotently.

Every failure of the database or the connection (unreachable, shutting down,
failing over, read-only, disk full) is raised as :class:`SpoolUnavailable` after
the transaction was rolled back, and the broken connection is dropped; the pool
opens fresh ones when the database is back. The password is never logged.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import structlog
from psycopg import conninfo, errors
from psycopg_pool import ConnectionPool, PoolTimeout

from gateway.config import SPOOL_POOL_WAIT
from gateway.domain.clock import HOUR
from gateway.recording.placement import EventRow
from gateway.recording.spool.base import (
    CREATE,
    NEVER_CREATE,
    NEW_SPOOL,
    SCHEMA_VERSION,
    Recorded,
    SpoolError,
    SpoolUnavailable,
    check_schema,
)
from gateway.recording.spool.sql import ZERO_HOURS_TABLE, Cursor, SqlSpool

_LOCKS = 0x6D67  # advisory lock space of this program ("mg"): (_LOCKS, n) pairs
_MIGRATION_LOCK, _SENDER_LOCK, _KEY_LOCKS = 1, 2, 3
# Libpq settings used unless the DSN sets its own: fail fast on a dead peer.
CONNECTION_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "application_name": "metering-gateway",
}

log = structlog.get_logger("gateway.spool")

_SCHEMA = (
    """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
    event_id TEXT PRIMARY KEY,
    seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    product_code TEXT NOT NULL,
    usage_dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    tags TEXT NOT NULL,
    quantity TEXT NOT NULL,
    whole INTEGER NOT NULL,
    digest BYTEA,
    record_id BIGINT,
    timestamp TEXT,
    customer TEXT NOT NULL
);
CREATE INDEX events_unassigned ON events (seq) WHERE record_id IS NULL;
CREATE INDEX events_by_record ON events (record_id);
CREATE TABLE records (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_code TEXT NOT NULL,
    usage_dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    state TEXT NOT NULL,
    allocations TEXT NOT NULL,
    whole INTEGER NOT NULL,
    quantity TEXT NOT NULL,
    client_token TEXT NOT NULL,
    metering_record_id TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    carried_from TEXT NOT NULL DEFAULT '[]',
    next_attempt DOUBLE PRECISION NOT NULL DEFAULT 0,
    in_flight INTEGER NOT NULL DEFAULT 0,
    uncertain INTEGER NOT NULL DEFAULT 0,
    wire TEXT NOT NULL DEFAULT 'decimal',
    closed_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    customer TEXT NOT NULL,
    UNIQUE (product_code, customer, usage_dimension, hour)
);
CREATE INDEX records_by_state ON records (state, hour);
CREATE INDEX records_by_closing ON records (state, closed_at);
CREATE TABLE taken (
    product_code TEXT NOT NULL,
    usage_dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    reason TEXT NOT NULL,
    customer TEXT NOT NULL,
    PRIMARY KEY (product_code, customer, usage_dimension, hour)
);
CREATE TABLE probe (data BYTEA);
"""
    + ZERO_HOURS_TABLE
    + ";\n"
)


# MIGRATIONS[v] takes a database from version v to v + 1, inside one transaction.
def _migrate_2_to_3(db: Any, now: float) -> None:
    """Each event's timestamp as the caller sent it (as SQLite's version 3)."""
    db.execute("ALTER TABLE events ADD COLUMN timestamp TEXT")


def _migrate_3_to_4(db: Any, now: float) -> None:
    """Zero-usage hours: per product and dimension, the next hour to look at (as SQLite's version 4)."""
    db.conn.execute(ZERO_HOURS_TABLE)


def _migrate_4_to_5(db: Any, now: float) -> None:
    """SaaS usage: each event, record and taken hour names its customer ('' for container
    usage, which every row kept is), and records and taken hours are unique per product,
    customer, dimension and hour (as SQLite's version 5). The columns go last, as in a
    new spool's tables; adding a column with a constant default rewrites no row."""
    for table in ("events", "records", "taken"):
        db.execute(f"ALTER TABLE {table} ADD COLUMN customer TEXT NOT NULL DEFAULT ''")
        # No default from now on: a replica of an older release, which names no customer,
        # fails to write (and acknowledges nothing) instead of placing SaaS usage as a container's.
        db.execute(f"ALTER TABLE {table} ALTER COLUMN customer DROP DEFAULT")
    # records' one unique constraint, named by PostgreSQL when version 2 made the table
    for (name,) in db.execute(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'records'::regclass AND contype = 'u'"
    ).fetchall():
        db.execute(f'ALTER TABLE records DROP CONSTRAINT "{name}"')
    db.execute("ALTER TABLE records ADD UNIQUE (product_code, customer, usage_dimension, hour)")
    db.execute("ALTER TABLE taken DROP CONSTRAINT taken_pkey")
    db.execute("ALTER TABLE taken ADD PRIMARY KEY (product_code, customer, usage_dimension, hour)")


MIGRATIONS: dict[int, Callable[[Any, float], None]] = {2: _migrate_2_to_3, 3: _migrate_3_to_4, 4: _migrate_4_to_5}
assert sorted(MIGRATIONS) == list(range(2, SCHEMA_VERSION))

_INSERT_EVENTS = (
    # Event-id order: two replicas inserting overlapping batches take row locks in
    # the same order, so they never deadlock. A repeated id is skipped, not an error.
    # Binary parameters (%b): psycopg's text quoting of the arrays cost 40% of a
    # process's time at 1000-event batches (benchmarks/record_usage.py --only spools).
    "INSERT INTO events (event_id, product_code, usage_dimension, hour, tags, quantity, whole, digest, timestamp, "
    "customer) SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::bigint[], %b::text[], %b::text[], "
    "%b::int[], %b::bytea[], %b::text[], %b::text[]) ORDER BY 1 ON CONFLICT (event_id) DO NOTHING"
)
# Errors that say the database, not our SQL, is the problem: the call answers SPOOL_UNAVAILABLE.
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, errors.ReadOnlySqlTransaction)
# Of those, the SQLSTATE classes and codes that mean an outage (the database is gone,
# shutting down, read-only after a failover, out of disk or memory): calls stop and
# health turns NOT_SERVING until a probe succeeds. Anything else (a deadlock, a
# serialization failure, a timeout, a busy pool) fails that one call only.
_OUTAGE_CLASSES = ("08", "53", "58")
_OUTAGE_CODES = frozenset({"57P01", "57P02", "57P03", "25006"})
# Set on every connection: a commit is durable whatever the database's default, and the
# server side of the connection notices a vanished peer in about 25 s (its defaults are
# about two hours), so a dead leader's lock goes too.
_SESSION = (
    "SET synchronous_commit = on",
    "SET tcp_keepalives_idle = 10",
    "SET tcp_keepalives_interval = 5",
    "SET tcp_keepalives_count = 3",
    "SET tcp_user_timeout = 25000",
)


def redact(url: str) -> str:
    """The DSN as a log line may show it: user, host, port and database, no password."""
    try:
        parts = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable DSN)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


def _configure(conn: psycopg.Connection[Any]) -> None:
    for statement in _SESSION:
        conn.execute(statement)


def _with_defaults(url: str) -> str:
    given = conninfo.conninfo_to_dict(url)
    return conninfo.make_conninfo(url, **{k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given})


@functools.lru_cache(maxsize=256)
def _placeholders(query: str) -> str:
    """The shared SQL's ``?`` as psycopg's ``%s`` (the shared SQL has no ``%``)."""
    return query.replace("?", "%s")


class _Db:
    """A psycopg connection taking the shared SQL's ``?`` placeholders."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, query: str, args: Sequence[Any] = ()) -> Cursor:
        return self.conn.execute(_placeholders(query), args)

    def executemany(self, query: str, args: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(_placeholders(query), args)


class PostgresSpool(SqlSpool):
    """A spool in a PostgreSQL database; see the module's docstring for sharing."""

    SEQ = "seq"
    LOCK_ROWS = " FOR UPDATE"
    CLAIM_ROWS = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        now: Callable[[], float] = time.time,
        create: str = CREATE,
        span: int = HOUR,
    ) -> None:
        self.location = redact(url)
        self.span = span
        try:
            self._url = _with_defaults(url)
        except psycopg.ProgrammingError:  # libpq's message may quote the password
            raise SpoolError(
                f"the PostgreSQL DSN {self.location} cannot be parsed "
                "(is a special character in the password percent-encoded?)"
            ) from None
        self._leader: psycopg.Connection[Any] | None = None
        self._leading = False
        self._leader_guard = threading.Lock()
        self._pool_size = max(2, pool_size)
        self._pool = self._new_pool()
        self._last_error = ""
        # Bumped when an outage closes the gate and when a probe opens it: a call that
        # began in another generation never changes the state (its news is stale).
        self._generation = 0
        self._health = threading.Lock()
        try:
            self._connect_or_fail()
            self._open(now(), create)
        except BaseException:
            self._pool.close()
            raise

    def _new_pool(self) -> ConnectionPool[Any]:
        return ConnectionPool(
            self._url,
            min_size=1,
            max_size=self._pool_size,
            open=False,
            timeout=SPOOL_POOL_WAIT,
            kwargs={"autocommit": True},
            configure=_configure,
            check=ConnectionPool.check_connection,
            name="spool",
        )

    def _connect_or_fail(self) -> None:
        """Start-up needs the database once (to check its schema): a one-line error if not."""
        try:
            with psycopg.connect(self._url, autocommit=True) as conn:
                conn.execute("SELECT 1")
                info = conn.info  # what libpq chose, PG* variables included: for log lines
                self.location = f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"
        except psycopg.Error as exc:
            raise SpoolError(f"cannot connect to {self.location}: {_first_line(exc)}") from None
        self._pool.open(wait=True, timeout=SPOOL_POOL_WAIT * 2)

    def _open(self, now: float, create: str) -> None:
        with self._transaction() as db:
            # Replicas starting together: one creates or migrates, the others then find it done.
            db.execute("SELECT pg_advisory_xact_lock(?, ?)", (_LOCKS, _MIGRATION_LOCK))
            (exists,) = db.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
            if not exists:
                if create == NEVER_CREATE:
                    raise SpoolError(
                        f"{self.location} holds no spool, and --spool-create is no: is it the right database?"
                    )
                db.conn.execute(_SCHEMA)
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("schema_version", str(SCHEMA_VERSION)), ("spool_id", str(uuid.uuid4()))],
                )
                log.warning("spool_created", location=self.location, schema_version=SCHEMA_VERSION, note=NEW_SPOOL)
            version = int(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
            check_schema(self.location, version)
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](db, now)
                version += 1
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
                log.info("spool_migrated", location=self.location, schema_version=version)
            (self.spool_id,) = db.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()
            self._settle_span(db)

    def close(self) -> None:
        with self._leader_guard:
            self._drop_leader()  # closing its connection releases the sender lock at once
        self._pool.close()

    # -- transactions --------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, writer: bool = False) -> Iterator[_Db]:
        """One transaction on a pooled connection. Its commit never reopens a closed gate:
        one that asked for its connection before an outage was noticed may get it after
        the database is back, and proves nothing; only :meth:`probe` reopens, on a fresh
        pool (and the watcher says so)."""
        with self._connection() as conn, conn.transaction():
            yield _Db(conn)

    @contextmanager
    def _reading(self) -> Iterator[_Db]:
        with self._connection() as conn:
            yield _Db(conn)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; a database failure leaves as SpoolUnavailable.

        An outage closes a gate: from then on calls fail at once, without waiting on
        the pool, until :meth:`probe` finds the database back; callers get
        SPOOL_UNAVAILABLE within their deadline, and the pool's reconnection backoff
        never delays the recovery. A connection that failed is dropped (after a
        failover it may point at a node that is now read-only).
        """
        if not self._writable:
            raise SpoolUnavailable(f"the database is unavailable ({self._last_error}); nothing was stored")
        generation = self._generation
        try:
            with self._pool.connection() as conn:
                try:
                    yield conn
                except _UNAVAILABLE:
                    conn.close()  # the pool discards a closed connection
                    raise
        except _UNAVAILABLE as exc:
            error = SpoolUnavailable(_unavailable_message(exc))
            log.error("spool_unavailable", location=self.location, error=str(error))
            if self._is_outage(exc):
                self._close_gate(generation, str(error))
            raise error from exc

    def _is_outage(self, exc: BaseException) -> bool:
        if isinstance(exc, PoolTimeout):  # every connection busy, or none can be made?
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return False
            except psycopg.Error:
                return True
        code = getattr(exc, "sqlstate", None) or ""
        if not code:  # no answer from the server at all: the connection is gone
            return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
        return code[:2] in _OUTAGE_CLASSES or code in _OUTAGE_CODES

    def _close_gate(self, generation: int, error: str) -> None:
        with self._health:
            if generation != self._generation or not self._writable:
                return  # already closed, or news from before the last reopening
            self._generation += 1
            self._last_error = error
            self._set_writable(False)

    def probe(self) -> bool:
        """Write (then delete) about one large batch's worth of bytes on a connection
        of its own; when that works, calls go through a fresh pool again."""
        try:
            with psycopg.connect(self._url, autocommit=True) as conn, conn.transaction():
                self._write_probe(_Db(conn))
        except _UNAVAILABLE as exc:
            self._last_error = _unavailable_message(exc)
            return False
        with self._health:
            if not self._writable:
                stale, self._pool = self._pool, self._new_pool()
                self._pool.open(wait=False)
                threading.Thread(
                    target=stale.close, kwargs={"timeout": SPOOL_POOL_WAIT}, name="spool-pool-close", daemon=True
                ).start()
                self._generation += 1
                self._set_writable(True)
        return True

    FIND = "strpos"

    def _lock_key(self, db: Any, product_code: str, customer: str, usage_dimension: str) -> None:
        # One 64-bit lock per key: placers lock keys in sorted order, and a collision of
        # two keys' hashes (about 2**-64) would only serialise them more. A container
        # key's lock is the one older releases take, so a replica not yet upgraded and
        # an upgraded one still serialise on it.
        name = f"{product_code}\x1f{usage_dimension}" + (f"\x1f{customer}" if customer else "")
        db.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, ?))", (name, _LOCKS + _KEY_LOCKS))

    def _assign_events(self, db: Any, record_id: int, ids: Sequence[int]) -> None:
        db.execute("UPDATE events SET record_id = ? WHERE seq = ANY(?)", (record_id, list(ids)))

    # -- recording ---------------------------------------------------------------

    def record(self, events: Sequence[EventRow]) -> Recorded:
        """Store a batch in one transaction → (accepted, duplicates). Durable on return.

        Raises EventIdConflict (and stores nothing) when an event id was accepted
        before, or earlier in the batch, with another digest.
        """
        columns = list(zip(*events, strict=True)) if events else [()] * len(EventRow._fields)
        with self._transaction(writer=True) as db:
            cur = db.conn.execute(
                _INSERT_EVENTS,
                [list(c) for c in columns[:6]] + [[int(w) for w in columns[6]], *(list(c) for c in columns[7:])],
            )
            accepted = max(cur.rowcount, 0)
            self._check_conflicts(db, events, accepted)
            # Rows this transaction inserted carry its id (a replica's concurrent ones, theirs).
            return Recorded.of(
                events,
                accepted,
                lambda: [
                    i
                    for (i,) in db.conn.execute(
                        "SELECT event_id FROM events WHERE event_id = ANY(%s) AND xmin = pg_current_xact_id()::xid",
                        (list(columns[0]),),
                    )
                ],
            )

    # -- one sender ----------------------------------------------------------------

    def leads(self) -> bool:
        """True while this process holds the sender lock (asked before every pass).

        The lock lives on a connection of its own: it is held for as long as that
        connection is, and released by PostgreSQL when the connection closes, for
        whatever reason. A broken connection means the lock may be someone else's:
        the lead is lost, and asked for again at once on a new connection. So a
        replica whose database came back leads again on its next pass, and a flush
        at shutdown (one pass) still sends instead of finding only the dead
        connection of before the outage.
        """
        with self._leader_guard:
            if self._leading and not self._still_leading():
                self._drop_leader()
            try:
                if self._leader is None or self._leader.closed:
                    self._leader = psycopg.connect(self._url, autocommit=True)
                    _configure(self._leader)
                if not self._leading:
                    self._leading = bool(
                        _one(self._leader.execute("SELECT pg_try_advisory_lock(%s, %s)", (_LOCKS, _SENDER_LOCK)))
                    )
                    if self._leading:
                        log.info("sender_leading", location=self.location)
                return self._leading
            except psycopg.Error:
                self._drop_leader()
                return False

    def _still_leading(self) -> bool:
        """Whether the connection holding the lock lives (so the lock is still ours)."""
        assert self._leader is not None
        try:
            self._leader.execute("SELECT 1")
            return True
        except psycopg.Error as exc:
            log.warning("sender_lead_lost", location=self.location, error=_first_line(exc))
            return False

    def _drop_leader(self) -> None:
        self._leading = False
        if self._leader is not None:
            self._leader.close()
            self._leader = None

    # -- size ----------------------------------------------------------------------

    def size(self) -> int:
        """Bytes of the spool's tables and indexes."""
        with self._reading() as db:
            return int(
                _one(
                    db.conn.execute(
                        "SELECT COALESCE(SUM(pg_total_relation_size(t::regclass)), 0) FROM "
                        "unnest(ARRAY['events', 'records', 'taken', 'meta', 'probe', 'zero_hours']) AS t"
                    )
                )
            )


def _unavailable_message(exc: BaseException) -> str:
    """What failed, in one line, for SpoolUnavailable and the log."""
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _one(cur: psycopg.Cursor[Any]) -> Any:
    """The one value of a one-row, one-column answer."""
    row = cur.fetchone()
    assert row is not None
    return row[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
