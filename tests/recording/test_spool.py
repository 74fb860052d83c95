"""The spool's rules, once, on both databases: every test here runs against the
SQLite file and against a real PostgreSQL (started by the tests). Durable across
reopen, all-or-nothing batches, duplicates and conflicts, placement, carry,
listing, schema versions, retention. What only one database has lives in
test_spool_sqlite.py and test_spool_postgres.py."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

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
    Spool,
    SpoolError,
    open_spool,
)
from gateway.recording.spool.postgres import SCHEMA_VERSION as POSTGRES_SCHEMA
from gateway.recording.spool.sql import ASSIGN_CHUNK
from gateway.recording.spool.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA
from support.recording import event_totals

NOW = 1_750_000_000.0
HOUR = placement.HOUR
DAY = 24 * HOUR
Store = Callable[..., str]


def row(
    event_id: str,
    hour_back: int = 1,
    quantity: str = "1",
    whole: bool = True,
    tags: str = "",
    product: str = "prod-a",
    second: int = 0,
) -> EventRow:
    hour = placement.hour_of(NOW) - hour_back * HOUR
    digest = placement.event_digest(product, "requests", hour + second, 0, quantity, tags)
    return EventRow(
        event_id, product, "requests", hour, tags, quantity, whole, digest, placement.event_time(hour + second, 0)
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """``store(name)`` → where a spool called ``name`` lives: the same name, the same
    store (a reopen), another name, another store (another pod's spool)."""
    made: dict[str, str] = {}

    def location(name: str = "spool") -> str:
        if name not in made:
            if request.param == "sqlite":
                made[name] = str(tmp_path / f"{name}.db")
            else:
                made[name] = request.getfixturevalue("postgres_server").create_database(f"spool_{uuid.uuid4().hex}")
        return made[name]

    yield location


def reopen(store: Store, name: str = "spool") -> Spool:
    return open_spool(store(name))


def test_events_and_duplicates_survive_reopen(store: Store) -> None:
    spool = reopen(store)
    assert spool.record([row("a"), row("b", quantity="2.5", whole=False)]) == (2, 0)
    spool.close()
    spool = reopen(store)
    assert spool.record([row("a"), row("c")]) == (1, 1)
    assert event_totals(spool) == [("prod-a", "requests", "4.5")]
    spool.close()


def test_a_failing_batch_stores_nothing(store: Store) -> None:
    spool = reopen(store)
    broken = row("b")._replace(quantity=None)  # NOT NULL
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        spool.record([row("a"), broken])
    assert event_totals(spool) == []
    assert spool.record([row("a")]) == (1, 0)  # and the spool still works


def test_a_reused_event_id_with_another_payload_refuses_the_whole_batch(store: Store) -> None:
    spool = reopen(store)
    assert spool.record([row("a", quantity="3"), row("b")]) == (2, 0)
    for changed in (
        row("a", quantity="4"),
        row("a", quantity="3", product="prod-b"),
        row("a", quantity="3", second=1),
        row("a", quantity="3", tags='[["t","1"]]'),
        row("a", hour_back=2, quantity="3"),
    ):
        with pytest.raises(EventIdConflict) as caught:
            spool.record([row("new-1"), row("b"), changed])
        assert caught.value.indices == [2]
    # Identical repeats are duplicates; 3 and 3.0 are one quantity, as to AWS.
    assert spool.record([row("a", quantity="3.0", whole=False), row("b"), row("new-2")]) == (1, 2)
    with pytest.raises(EventIdConflict) as caught:  # within one batch too
        spool.record([row("c", quantity="1"), row("c", quantity="1"), row("c", quantity="2")])
    assert caught.value.indices == [2]
    assert event_totals(spool) == [("prod-a", "requests", "5")]  # a, b, new-2: nothing of the refused batches


def test_a_record_is_frozen_before_aws_hears_of_it(store: Store) -> None:
    spool = reopen(store)
    spool.record([row("a", quantity="3")])
    spool.assign(NOW)
    (record,) = spool.due(NOW, grace=0)
    frozen = spool.begin_attempt(record.id)
    assert frozen is not None and frozen.attempts == 1 and frozen.client_token == record.client_token
    spool.close()  # a crash while the request is out
    spool = reopen(store)
    spool.record([row("late", quantity="4")])
    carries = spool.assign(NOW)
    (again,) = [r for r in spool.list_records() if r.id == record.id]
    assert again.quantity == "3" and again.client_token == record.client_token  # the resend is the same request
    assert again.outcome_unknown
    assert [(c.from_hour, c.to_hour, c.quantity) for c in carries] == [(record.hour, record.hour + HOUR, "4")]
    spool.mark_sent(again.id, "mr-1", NOW)
    assert {r.state for r in spool.list_records()} == {SENT, PENDING}


def test_carry_moves_usage_and_marks_the_hour(store: Store) -> None:
    spool = reopen(store)
    spool.record([row("a", 2, "5", tags='[["t","1"]]'), row("b", 2, "6")])
    spool.assign(NOW)
    (record,) = spool.list_records()
    carries = spool.carry(record.id, "DUPLICATE_REQUEST", NOW)
    assert [c.to_hour for c in carries] == [record.hour + HOUR]
    (moved,) = spool.list_records()
    assert moved.hour == record.hour + HOUR and moved.quantity == "11" and moved.carried_hours == [record.hour]
    assert moved.client_token != record.client_token
    spool.record([row("c", 2, "1")])  # the taken hour stays taken for later events
    spool.assign(NOW)
    (merged,) = spool.list_records()
    assert merged.quantity == "12"


def test_placement_in_chunks_places_every_event_once(store: Store) -> None:
    spool = reopen(store)
    count = ASSIGN_CHUNK * 3 + 7
    for start in range(0, count, 1000):
        spool.record([row(f"e{i}", hour_back=1 + i % 3, quantity="2") for i in range(start, min(count, start + 1000))])
    spool.assign(NOW)
    assert spool.stats().unassigned_events == 0
    records = spool.list_records()
    assert len(records) == 3 and sum(int(r.quantity) for r in records) == 2 * count


def test_a_placement_pass_ends_though_writers_keep_coming(store: Store) -> None:
    """Events recorded during a pass wait for the next one, so a pass always ends."""
    spool = reopen(store)
    spool.record([row(f"old-{i}", quantity="1") for i in range(ASSIGN_CHUNK + 1)])
    original = spool._step_aside
    written = []

    def writer_between_chunks() -> None:  # a caller records while placement steps aside
        written.append(spool.record([row(f"new-{len(written)}-{i}", quantity="1") for i in range(ASSIGN_CHUNK)]))
        original()

    spool._step_aside = writer_between_chunks  # type: ignore[method-assign]
    spool.assign(NOW)
    assert written and spool.stats().unassigned_events == ASSIGN_CHUNK * len(written)
    spool._step_aside = original  # type: ignore[method-assign]
    spool.assign(NOW)
    assert spool.stats().unassigned_events == 0


def test_two_spools_never_share_a_client_token(store: Store) -> None:
    """Two pods metering the same usage for the same hour must not send one request
    twice under one token (AWS would answer the second with the first's record)."""
    tokens = []
    for name in ("pod-a", "pod-b", "pod-a"):
        spool = reopen(store, name)
        spool.record([row("same", quantity="1")])
        spool.assign(NOW)
        (record,) = spool.list_records()
        tokens.append((spool.spool_id, record.client_token))
        spool.close()
    (a_id, a_token), (b_id, b_token), (a_again_id, a_again_token) = tokens
    assert a_id != b_id and a_token != b_token
    assert (a_again_id, a_again_token) == (a_id, a_token)  # the same spool keeps its id: a resend is the same request


def test_stats_count_pending_records(store: Store) -> None:
    spool = reopen(store)
    spool.record([row("a", 1), row("b", 3)])
    assert spool.stats().unassigned_events == 2
    spool.assign(NOW)
    stats = spool.stats()
    assert (stats.pending, stats.oldest_pending_hour, stats.unassigned_events) == (
        2,
        placement.hour_of(NOW) - 3 * HOUR,
        0,
    )


# -- pruning -----------------------------------------------------------------------


def send_all(spool: Spool, now: float) -> None:
    spool.assign(now)
    for record in spool.due(now, grace=0):
        spool.begin_attempt(record.id)
        spool.mark_sent(record.id, f"mr-{record.id}", now)


def test_pruning_forgets_events_after_the_window_and_records_after_retention(store: Store) -> None:
    spool = reopen(store)
    spool.record([row("a", 2), row("b", 3)])
    send_all(spool, NOW)
    spool.record([row("pending", 1)])
    spool.assign(NOW)
    assert spool.prune(NOW + 7 * DAY - 1, event_retention=7 * DAY, record_retention=30 * DAY).events == 0
    assert spool.record([row("a", 2)]) == (0, 1)  # still recognised inside the window
    pruned = spool.prune(NOW + 7 * DAY + 1, event_retention=7 * DAY, record_retention=30 * DAY)
    assert (pruned.events, pruned.records) == (2, 0)
    assert {r.state for r in spool.list_records()} == {SENT, PENDING}
    assert spool.stats().unassigned_events == 0 and event_totals(spool) == [("prod-a", "requests", "1")]
    pruned = spool.prune(NOW + 31 * DAY, event_retention=7 * DAY, record_retention=30 * DAY)
    assert pruned.records == 2
    (left,) = spool.list_records()
    assert left.state == PENDING  # pending usage is never pruned


def test_failed_records_keep_their_events_until_record_retention(store: Store) -> None:
    spool = reopen(store)
    spool.record([row("a", 2)])
    spool.assign(NOW)
    (record,) = spool.list_records()
    spool.mark_failed(record.id, "CUSTOMER_NOT_ENTITLED: no", NOW)
    assert spool.prune(NOW + 10 * DAY, event_retention=DAY, record_retention=30 * DAY).events == 0
    assert spool.prune(NOW + 31 * DAY, event_retention=DAY, record_retention=30 * DAY).records == 1
    assert spool.list_records() == [] and event_totals(spool) == []


def test_pruning_spares_a_record_an_operator_retried_meanwhile(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prune picks old FAILED records without locking them; on PostgreSQL an operator's
    retry (FAILED → PENDING) on another replica can commit before the delete. The retried
    record and its usage must stay; the old SENT record beside it still goes."""
    from gateway.recording.spool import postgres

    spool, other = reopen(store), reopen(store)  # two replicas on one database
    if not isinstance(spool, postgres.PostgresSpool):
        pytest.skip("SQLite has one writer: the prune's transaction holds the write lock, no retry gets between")
    spool.record([row("a", hour_back=3), row("b", hour_back=3, quantity="2", product="prod-b")])
    spool.assign(NOW)
    failed, sent = spool.list_records(product_code="prod-a") + spool.list_records(product_code="prod-b")
    spool.begin_attempt(failed.id)
    spool.settle(failed.id, uncertain=None)
    assert spool.mark_failed(failed.id, "CUSTOMER_NOT_ENTITLED: no", NOW)
    spool.begin_attempt(sent.id)
    assert spool.mark_sent(sent.id, "mr-1", NOW)
    later = NOW + 40 * DAY
    execute = postgres._Db.execute
    retried: list[Any] = []

    def retry_after_the_selection(self: Any, query: str, args: Any = ()) -> Any:
        if not query.startswith("SELECT id FROM records WHERE state IN") or retried:
            return execute(self, query, args)
        selected = execute(self, query, args).fetchall()
        retried.append(other.retry_failed(failed.id, reconciled=False, now=later))  # committed meanwhile
        return selected

    monkeypatch.setattr(postgres._Db, "execute", retry_after_the_selection)
    pruned = spool.prune(later, event_retention=7 * DAY, record_retention=30 * DAY)
    assert retried, "the prune no longer selects as this test expects"
    kept = spool.get(failed.id)
    assert kept is not None and kept.state == PENDING, "a record retried by an operator was pruned"
    assert spool.get(sent.id) is None and pruned.records == 1
    assert event_totals(spool) == [("prod-a", "requests", "1")], "the retried record's usage was deleted"
    other.close()
    spool.close()


def test_taken_hours_older_than_any_placement_are_pruned(store: Store) -> None:
    spool = reopen(store)
    spool.record([row("a", 2)])
    spool.assign(NOW)
    (record,) = spool.list_records()
    spool.carry(record.id, "DUPLICATE_REQUEST", NOW)
    assert spool.prune(NOW, event_retention=DAY, record_retention=DAY).taken == 0
    assert spool.prune(NOW + 2 * DAY, event_retention=DAY, record_retention=DAY).taken == 1


def test_listing_filters_and_pages_newest_hour_first(store: Store) -> None:
    spool = reopen(store)
    spool.record([row("a", 1), row("b", 2), row("c", 3), row("d", 2, product="prod-b")])
    spool.assign(NOW)
    (other,) = [r for r in spool.list_records() if r.product_code == "prod-b"]
    spool.mark_failed(other.id, "CUSTOMER_NOT_ENTITLED: no", NOW)
    everything = spool.list_records()
    assert [(r.hour, r.id) for r in everything] == sorted(((r.hour, r.id) for r in everything), reverse=True)
    assert len(everything) == 4
    first = spool.list_records(limit=3)
    rest = spool.list_records(limit=3, after=(first[-1].hour, first[-1].id))
    assert first + rest == everything
    assert [(r.product_code, r.last_error) for r in spool.list_records(state=FAILED)] == [
        ("prod-b", "CUSTOMER_NOT_ENTITLED: no")
    ]
    assert len(spool.list_records(product_code="prod-a")) == 3
    assert spool.list_records(state=PENDING, product_code="prod-b") == []


def test_listing_by_hour_range_pages_within_it(store: Store) -> None:
    spool = reopen(store)
    spool.record([row(f"{p}{h}", h, product=p) for h in range(1, 6) for p in ("prod-a", "prod-b")])
    spool.assign(NOW)
    current = placement.hour_of(NOW)
    since, until = current - 4 * HOUR, current - HOUR  # hours 4, 3 and 2 back: [since, until)
    inside = spool.list_records(since=since, until=until)
    assert sorted({r.hour for r in inside}) == [since, since + HOUR, since + 2 * HOUR] and len(inside) == 6
    first = spool.list_records(since=since, until=until, limit=4)
    rest = spool.list_records(since=since, until=until, limit=4, after=(first[-1].hour, first[-1].id))
    assert first + rest == inside and len(rest) == 2
    assert [r.hour for r in spool.list_records(since=current - HOUR)] == [current - HOUR] * 2
    assert len(spool.list_records(until=since, product_code="prod-b")) == 1


# -- an operator's retry -------------------------------------------------------------


def failed_record(spool: Spool, *, unknown: bool = False, event_id: str = "a") -> int:
    """A record FAILED by AWS (CUSTOMER_NOT_ENTITLED), after an unknown outcome if ``unknown``."""
    spool.record([row(event_id, 2, "3", tags='[["t","1"]]')])
    spool.assign(NOW)
    (record,) = [r for r in spool.due(NOW, grace=0)]
    spool.begin_attempt(record.id)
    if unknown:  # a read timeout: AWS may hold it; the resend is refused
        spool.settle(record.id, uncertain=True)
        spool.begin_attempt(record.id)
        spool.settle(record.id, uncertain=None)
    else:
        spool.settle(record.id, uncertain=None)
    spool.mark_failed(record.id, "CUSTOMER_NOT_ENTITLED: no", NOW)
    return record.id


def test_a_failed_record_goes_back_in_the_queue_as_the_same_request(store: Store) -> None:
    spool = reopen(store)
    record_id = failed_record(spool)
    before = spool.get(record_id)
    assert before is not None and before.state == FAILED and spool.due(NOW + 60, grace=0) == []
    retried = spool.retry_failed(record_id, reconciled=False, now=NOW + 60)
    assert retried.state == PENDING and retried.next_attempt == NOW + 60
    assert (retried.client_token, retried.allocations, retried.quantity, retried.attempts) == (
        before.client_token,
        before.allocations,
        before.quantity,
        before.attempts,
    )
    assert retried.last_error.startswith("retried by operator at ") and retried.last_error.endswith(
        "; was: CUSTOMER_NOT_ENTITLED: no"
    )
    assert [r.id for r in spool.due(NOW + 60, grace=0)] == [record_id]  # due now, not after a backoff
    spool.record([row("late", 2, "1")])  # later usage of that hour does not change the frozen request
    spool.assign(NOW + 60)
    again = spool.get(record_id)
    assert again is not None and (again.quantity, again.client_token) == ("3", before.client_token)


def test_a_retry_is_refused_for_a_missing_or_unfailed_record(store: Store) -> None:
    spool = reopen(store)
    with pytest.raises(RecordNotFound):
        spool.retry_failed(12345, reconciled=False, now=NOW)
    spool.record([row("p", 1), row("s", 2)])
    spool.assign(NOW)
    pending, sent = sorted(spool.list_records(), key=lambda r: -r.hour)
    spool.begin_attempt(sent.id)
    spool.mark_sent(sent.id, "mr-1", NOW)
    for record_id, state in ((pending.id, PENDING), (sent.id, SENT)):
        with pytest.raises(RecordNotFailed) as caught:
            spool.retry_failed(record_id, reconciled=True, now=NOW)
        assert caught.value.row.state == state
    stored = spool.get(sent.id)
    assert stored is not None and (stored.state, stored.metering_record_id) == (SENT, "mr-1")


def test_an_unknown_outcome_is_retried_only_once_reconciled(store: Store) -> None:
    spool = reopen(store)
    record_id = failed_record(spool, unknown=True)
    with pytest.raises(OutcomeUnknown) as caught:
        spool.retry_failed(record_id, reconciled=False, now=NOW)
    assert caught.value.row.outcome_unknown
    kept = spool.get(record_id)
    assert kept is not None and kept.state == FAILED and kept.outcome_unknown  # refused: nothing changed
    retried = spool.retry_failed(record_id, reconciled=True, now=NOW)
    assert retried.state == PENDING and not retried.outcome_unknown and (retried.in_flight, retried.uncertain) == (0, 0)
    assert "(reconciled: AWS held no record of it)" in retried.last_error
    assert retried.client_token == kept.client_token and retried.attempts == kept.attempts == 2
    # As never sent: its usage may now be carried (it could not while AWS might hold it).
    carries = spool.carry(record_id, "six_hour_limit", NOW)
    assert [c.quantity for c in carries] == ["3"]
    (moved,) = spool.list_records()
    assert (moved.state, moved.hour, moved.carried_hours) == (PENDING, kept.hour + HOUR, [kept.hour])


def test_two_retries_at_once_one_wins(store: Store) -> None:
    """Two replicas (or operators) retry one record together: the second waits for the
    first's row lock, then finds the record PENDING and is refused."""
    first, second = reopen(store), reopen(store)
    record_id = failed_record(first)
    read, go = threading.Event(), threading.Event()
    records = first._records  # type: ignore[attr-defined]

    def pause_after_the_locked_read(*args: Any, **kwargs: Any) -> Any:
        found = records(*args, **kwargs)
        if kwargs.get("lock"):
            read.set()
            go.wait(10)
        return found

    first._records = pause_after_the_locked_read  # type: ignore[attr-defined]
    outcomes: dict[str, Any] = {}

    def retry(name: str, spool: Spool) -> None:
        try:
            outcomes[name] = spool.retry_failed(record_id, reconciled=False, now=NOW)
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcomes[name] = exc

    a = threading.Thread(target=retry, args=("first", first))
    a.start()
    assert read.wait(10)
    b = threading.Thread(target=retry, args=("second", second))
    b.start()
    b.join(0.5)
    assert b.is_alive(), f"the second retry did not wait for the first: {outcomes}"
    go.set()
    a.join(10)
    b.join(15)
    assert outcomes["first"].state == PENDING
    assert isinstance(outcomes["second"], RecordNotFailed) and outcomes["second"].row.state == PENDING
    first.close()
    second.close()


def test_a_former_senders_late_outcome_never_undoes_a_sent_record(store: Store) -> None:
    """Two senders on one record (a leader cut off mid-call, its successor resending):
    whichever hears AWS's OK stores it, and the other's late refusal changes nothing."""
    spool = reopen(store)
    spool.record([row("a", 2)])
    spool.assign(NOW)
    (record,) = spool.due(NOW, grace=0)
    spool.begin_attempt(record.id)
    resend = spool.begin_attempt(record.id)  # the successor finds it in flight
    assert (
        resend is not None and resend.attempts == 2 and resend.uncertain and resend.client_token == record.client_token
    )
    assert spool.mark_sent(record.id, "mr-1", NOW) is True
    assert spool.mark_sent(record.id, "mr-1", NOW + 1) is False  # the other sender heard the same OK: counted once
    spool.retry_later(record.id, "THROTTLING: late", NOW + 60)
    assert spool.mark_failed(record.id, "ACCESS_DENIED: late", NOW) is False
    spool.settle(record.id, uncertain=True)
    final = spool.get(record.id)
    assert final is not None
    assert (final.state, final.metering_record_id, final.last_error, final.uncertain) == (SENT, "mr-1", "", 0)


def test_a_spool_that_cannot_be_opened_says_so_in_one_line(store: Store, tmp_path: Path) -> None:
    bad = str(tmp_path / "no-such-dir" / "spool.db") if store().endswith(".db") else store() + "_missing"
    with pytest.raises(SpoolError) as caught:
        open_spool(bad)
    assert "\n" not in str(caught.value) and "password" not in str(caught.value)


def schema_version(location: str, set_to: int | None = None) -> int:
    """The version a spool's store says it has (set first, when ``set_to`` is given)."""
    if location.startswith("postgresql://"):
        with psycopg.connect(location) as conn:
            if set_to is not None:
                conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(set_to),))
            found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            assert found is not None
            return int(found[0])
    db = sqlite3.connect(location)
    try:
        if set_to is not None:
            db.execute(f"PRAGMA user_version = {int(set_to)}")
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def test_schema_versions_are_kept_and_a_newer_one_is_refused(store: Store) -> None:
    assert SQLITE_SCHEMA == POSTGRES_SCHEMA  # one numbering for both databases
    spool = reopen(store)
    spool_id = spool.spool_id
    spool.close()
    assert schema_version(store()) == SQLITE_SCHEMA
    again = reopen(store)  # opening again migrates nothing and keeps the spool's identity
    assert again.spool_id == spool_id and schema_version(store()) == SQLITE_SCHEMA
    again.close()
    schema_version(store(), set_to=SQLITE_SCHEMA + 1)
    with pytest.raises(SpoolError) as caught:
        reopen(store)
    message = str(caught.value)
    assert "\n" not in message and f"schema version {SQLITE_SCHEMA + 1}" in message and "newer" in message


# Schema version 4 as its release made it, before SaaS usage: written out here, never
# derived from today's code, so a migration is tested from what such a spool really holds.
SQLITE_V4_TABLES = {
    "events": """CREATE TABLE events (
    event_id TEXT PRIMARY KEY,
    product_code TEXT NOT NULL,
    usage_dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    tags TEXT NOT NULL,
    quantity TEXT NOT NULL,
    whole INTEGER NOT NULL,
    record_id INTEGER,
    digest BLOB,
    timestamp TEXT
)""",
    "records": """CREATE TABLE records (
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
    in_flight INTEGER NOT NULL DEFAULT 0,
    uncertain INTEGER NOT NULL DEFAULT 0,
    wire TEXT NOT NULL DEFAULT 'decimal',
    closed_at REAL NOT NULL DEFAULT 0,
    UNIQUE (product_code, usage_dimension, hour)
)""",
    "taken": """CREATE TABLE taken (
    product_code TEXT NOT NULL,
    usage_dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (product_code, usage_dimension, hour)
)""",
    "meta": "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "probe": "CREATE TABLE probe (data BLOB)",
    "zero_hours": """CREATE TABLE zero_hours (
    product_code TEXT NOT NULL,
    usage_dimension TEXT NOT NULL,
    next_hour BIGINT NOT NULL,
    PRIMARY KEY (product_code, usage_dimension)
)""",
}
SQLITE_V4_INDEXES = {
    "events": ("CREATE INDEX events_by_record ON events(record_id)",),
    "records": (
        "CREATE INDEX records_by_state ON records(state, hour)",
        "CREATE INDEX records_by_closing ON records(state, closed_at)",
    ),
}
POSTGRES_V4 = """
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
    timestamp TEXT
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
    UNIQUE (product_code, usage_dimension, hour)
);
CREATE INDEX records_by_state ON records (state, hour);
CREATE INDEX records_by_closing ON records (state, closed_at);
CREATE TABLE taken (
    product_code TEXT NOT NULL,
    usage_dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (product_code, usage_dimension, hour)
);
CREATE TABLE probe (data BYTEA);
CREATE TABLE zero_hours (
    product_code TEXT NOT NULL,
    usage_dimension TEXT NOT NULL,
    next_hour BIGINT NOT NULL,
    PRIMARY KEY (product_code, usage_dimension)
);
"""


def v4_columns(table: str) -> list[str]:
    """The columns of a version-4 SQLite table, in order."""
    scratch = sqlite3.connect(":memory:")
    try:
        scratch.execute(SQLITE_V4_TABLES[table])
        return [column[1] for column in scratch.execute(f"PRAGMA table_info({table})")]
    finally:
        scratch.close()


def _without_customers_sqlite(db: sqlite3.Connection) -> None:
    """Version 5 undone in an SQLite file: records and taken hours made again as version 4
    made them (SQLite drops no column of a constraint), every row copied but its customer."""
    db.execute("ALTER TABLE events DROP COLUMN customer")
    for table in ("records", "taken"):
        columns = ", ".join(v4_columns(table))
        db.execute(f"ALTER TABLE {table} RENAME TO {table}_v5")
        db.execute(SQLITE_V4_TABLES[table])
        db.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}_v5")
        db.execute(f"DROP TABLE {table}_v5")
        for index in SQLITE_V4_INDEXES.get(table, ()):
            db.execute(index)


def _without_customers_postgres(conn: psycopg.Connection[Any]) -> None:
    """Version 5 undone in a PostgreSQL spool: no customer column, version 4's constraints."""
    for table in ("events", "records", "taken"):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN customer")  # its constraints go with it
    conn.execute("ALTER TABLE records ADD UNIQUE (product_code, usage_dimension, hour)")
    conn.execute("ALTER TABLE taken ADD PRIMARY KEY (product_code, usage_dimension, hour)")


# What each schema version added, undone: (version before it, SQL, or a step per database).
_UNDO: dict[int, tuple[str, ...]] = {
    4: (),  # customers: _without_customers_*
    3: ("DROP TABLE zero_hours", "DELETE FROM meta WHERE key = 'span'"),
    2: ("ALTER TABLE events DROP COLUMN timestamp",),
}


def downgrade(location: str, version: int) -> None:
    """Make a spool of today's schema one of ``version``, as an older release left it."""
    statements = [sql for v in sorted(_UNDO, reverse=True) if v >= version for sql in _UNDO[v]]
    if location.startswith("postgresql://"):
        with psycopg.connect(location) as conn:
            if version <= 4:
                _without_customers_postgres(conn)
            for sql in statements:
                conn.execute(sql)
    else:
        db = sqlite3.connect(location)
        if version <= 4:
            _without_customers_sqlite(db)
        for sql in statements:
            db.execute(sql)
        db.commit()
        db.close()
    schema_version(location, set_to=version)


def test_a_version_2_spool_gains_event_timestamps_and_its_old_events_still_conflict(store: Store) -> None:
    """Version 3 stores each event's timestamp; events from before have none, and a
    conflicting repeat of one still says which field differs, or that it cannot know."""
    spool = reopen(store)
    spool.record([row("old-a", quantity="2"), row("old-b", quantity="2")])
    spool.close()
    location = store()
    downgrade(location, 2)
    spool = reopen(store)
    assert schema_version(location) == SQLITE_SCHEMA
    assert spool.record([row("old-a", quantity="2"), row("new", quantity="1")]) == (1, 1)  # still a duplicate
    with pytest.raises(EventIdConflict) as caught:
        spool.record([row("old-a", quantity="3"), row("old-b", quantity="2", second=5)])
    (i, a), (j, b) = caught.value.conflicts
    assert (i, j) == (0, 1) and a.timestamp is None and b.timestamp is None
    assert placement.differences(a, row("old-a", quantity="3")) == [("quantity", "2", "3")]
    assert placement.differences(b, row("old-b", quantity="2", second=5)) == [
        ("timestamp", "(not stored by the release that accepted it)", row("old-b", second=5).timestamp)
    ]
    with pytest.raises(EventIdConflict) as caught:  # a new event's timestamp is stored
        spool.record([row("new", quantity="1", second=5)])
    ((_, stored),) = caught.value.conflicts
    assert placement.differences(stored, row("new", quantity="1", second=5)) == [
        ("timestamp", row("new").timestamp, row("new", second=5).timestamp)
    ]
    spool.close()


# --- Zero-usage hours (--zero-usage-hours) ---------------------------------------------

KEY = ("prod-a", "requests")
H0 = placement.hour_of(NOW)  # NOW is 20 minutes into this hour


def zeros(spool: Spool) -> list[tuple[int, str, str]]:
    """(hour, quantity, state) of every record, oldest first."""
    return sorted((r.hour, r.quantity, r.state) for r in spool.list_records(limit=1000))


def test_a_zero_record_for_each_closed_hour_once_and_never_the_open_one(store: Store) -> None:
    spool = reopen(store)
    assert spool.fill_zero_hours([KEY], NOW).made == ()  # first seen: from this (open) hour on
    assert spool.fill_zero_hours([KEY], H0 + HOUR - 1).made == ()  # still open: no zero yet
    made = spool.fill_zero_hours([KEY], H0 + HOUR + 1).made
    assert made == ((*KEY, H0),) and zeros(spool) == [(H0, "0", PENDING)]
    assert spool.fill_zero_hours([KEY], H0 + HOUR + 2).made == ()  # each hour once
    (record,) = spool.due(H0 + HOUR + 1, grace=0)
    assert record.content.total == 0 and record.content.allocations == {"": 0}


def test_an_hour_with_usage_gets_no_zero(store: Store) -> None:
    spool = reopen(store)
    spool.fill_zero_hours([KEY], NOW)
    event = row("u", hour_back=0, quantity="4")
    spool.record([event])
    spool.assign(NOW)
    assert spool.fill_zero_hours([KEY], H0 + 2 * HOUR + 1).made == ((*KEY, H0 + HOUR),)
    assert zeros(spool) == [(H0, "4", PENDING), (H0 + HOUR, "0", PENDING)]


def test_usage_placed_before_the_zero_went_out_joins_it(store: Store) -> None:
    spool = reopen(store)
    spool.fill_zero_hours([KEY], NOW)
    spool.fill_zero_hours([KEY], H0 + HOUR + 1)
    spool.record([row("late", hour_back=0, quantity="3")])  # hour H0's usage, accepted after it closed
    spool.assign(H0 + HOUR + 2)
    ((hour, quantity, _),) = zeros(spool)
    assert (hour, quantity) == (H0, "3")


def test_usage_of_an_hour_whose_zero_was_sent_is_carried(store: Store) -> None:
    spool = reopen(store)
    spool.fill_zero_hours([KEY], NOW)
    spool.fill_zero_hours([KEY], H0 + HOUR + 1)
    (zero,) = spool.due(H0 + HOUR + 1, grace=0)
    spool.begin_attempt(zero.id)
    spool.mark_sent(zero.id, "mr-zero", H0 + HOUR + 2)
    spool.record([row("late", hour_back=0, quantity="3")])
    (carry,) = spool.assign(H0 + HOUR + 3)
    assert (carry.from_hour, carry.to_hour, carry.quantity) == (H0, H0 + HOUR, "3")
    assert zeros(spool) == [(H0, "0", SENT), (H0 + HOUR, "3", PENDING)]
    # The hour the usage went to has a record now: no zero for it either.
    assert spool.fill_zero_hours([KEY], H0 + 2 * HOUR + 1).made == ()


def test_zero_hours_survive_a_restart_and_are_never_made_twice(store: Store) -> None:
    spool = reopen(store)
    spool.fill_zero_hours([KEY], NOW)
    spool.fill_zero_hours([KEY], H0 + HOUR + 1)
    spool.close()
    spool = reopen(store)  # down for three hours: the hours it missed are still within AWS's window
    made = spool.fill_zero_hours([KEY], H0 + 4 * HOUR + 1).made
    assert [h for _, _, h in made] == [H0 + HOUR, H0 + 2 * HOUR, H0 + 3 * HOUR]
    spool.close()
    spool = reopen(store)
    assert spool.fill_zero_hours([KEY], H0 + 4 * HOUR + 2).made == ()
    assert [h for h, q, _ in zeros(spool)] == [H0 + i * HOUR for i in range(4)]


def test_hours_past_the_window_are_missed_and_said_so(store: Store) -> None:
    spool = reopen(store)
    spool.fill_zero_hours([KEY], NOW)
    later = H0 + 10 * HOUR + 1  # down for ten hours: AWS takes nothing older than six
    filled = spool.fill_zero_hours([KEY], later)
    earliest = placement.earliest_hour(later)
    assert [h for _, _, h in filled.made] == list(range(earliest, H0 + 10 * HOUR, HOUR))
    assert filled.missed == ((*KEY, (earliest - H0) // HOUR),)


def test_a_key_opted_in_later_starts_from_its_own_first_hour(store: Store) -> None:
    spool = reopen(store)
    other = ("prod-a", "storage")
    spool.fill_zero_hours([KEY], NOW)
    made = spool.fill_zero_hours([KEY, other], H0 + HOUR + 1).made  # `other` first seen now
    assert made == ((*KEY, H0),)
    made = spool.fill_zero_hours([KEY, other], H0 + 2 * HOUR + 1).made
    assert sorted(made) == [(*KEY, H0 + HOUR), (*other, H0 + HOUR)]


def test_a_taken_hour_gets_no_zero(store: Store) -> None:
    """An hour AWS holds another record for (DUPLICATE_REQUEST) is metered already."""
    spool = reopen(store)
    spool.fill_zero_hours([KEY], NOW)
    spool.record([row("u", hour_back=0, quantity="4")])
    spool.assign(NOW)
    (record,) = spool.list_records()
    spool.carry(record.id, "DUPLICATE_REQUEST", H0 + HOUR + 1)  # H0 taken; its usage moves to H0 + 1h
    assert spool.fill_zero_hours([KEY], H0 + 3 * HOUR + 1).made == ((*KEY, H0 + 2 * HOUR),)


def test_two_replicas_filling_at_once_make_each_zero_once(store: Store) -> None:
    first, second = reopen(store), reopen(store)
    first.fill_zero_hours([KEY], NOW)
    later = H0 + 4 * HOUR + 1
    results: list[tuple[tuple[str, str, int], ...]] = []
    barrier = threading.Barrier(2)

    def fill(spool: Spool) -> None:
        barrier.wait()
        results.append(spool.fill_zero_hours([KEY], later).made)

    threads = [threading.Thread(target=fill, args=(s,)) for s in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r) for r in results) == [0, 4]
    assert len(zeros(first)) == 4


def test_a_version_3_spool_gains_zero_hours(store: Store) -> None:
    spool = reopen(store)
    spool.record([row("a")])
    spool.close()
    downgrade(store(), 3)
    spool = reopen(store)
    assert schema_version(store()) == SQLITE_SCHEMA
    spool.fill_zero_hours([KEY], NOW)
    assert spool.fill_zero_hours([KEY], H0 + HOUR + 1).made == ((*KEY, H0),)
    assert spool.record([row("a")]) == (0, 1)


# --- AgentCore Runtime's buckets of one flush interval ---------------------------------


def test_agentcore_buckets_are_one_interval_long_and_go_out_when_it_closed(store: Store) -> None:
    spool = open_spool(store(), span=60)
    start = placement.hour_of(NOW, 60)
    events = [
        EventRow(f"e{i}", "prod-a", "requests", start + 60 * (i // 2), "", "1", True, bytes([i]) * 16, "")
        for i in range(6)
    ]
    spool.record(events)
    spool.assign(start + 200)
    records = sorted(spool.list_records(), key=lambda r: r.hour)
    assert [(r.hour - start, r.quantity) for r in records] == [(0, "2"), (60, "2"), (120, "2")]
    assert len({r.client_token for r in records}) == 3
    assert [r.hour - start for r in spool.due(start + 179, grace=0)] == [0, 60]  # 120-180 is still open


def test_a_spool_keeps_to_hourly_or_agentcore_records(store: Store) -> None:
    open_spool(store()).close()
    with pytest.raises(SpoolError) as caught:
        open_spool(store(), span=60)
    assert "\n" not in str(caught.value) and "hourly records" in str(caught.value)
    open_spool(store("agent"), span=60).close()
    open_spool(store("agent"), span=30).close()  # another interval: fine
    with pytest.raises(SpoolError) as caught:
        open_spool(store("agent"))
    assert "AgentCore Runtime records" in str(caught.value)
