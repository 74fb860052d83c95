"""The spool on disk: durable across reopen, all-or-nothing batches, duplicates and
conflicts known, schema versions, a full disk, pruning."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway import aggregator
from gateway.aggregator import EventRow
from gateway.spool import (
    ASSIGN_CHUNK, FAILED, PENDING, SCHEMA_VERSION, SENT, WHOLE_WIRE, EventIdConflict, Spool, SpoolError,
    SpoolUnavailable,
)

NOW = 1_750_000_000.0
HOUR = aggregator.HOUR
DAY = 24 * HOUR
DATA = Path(__file__).parent / "data"


def row(event_id: str, hour_back: int = 1, quantity: str = "1", whole: bool = True, tags: str = "",
        product: str = "prod-a", second: int = 0) -> EventRow:
    hour = aggregator.hour_of(NOW) - hour_back * HOUR
    digest = aggregator.event_digest(product, "requests", hour + second, 0, quantity, tags)
    return EventRow(event_id, product, "requests", hour, tags, quantity, whole, digest)


def test_events_and_duplicates_survive_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.db")
    spool = Spool(path)
    assert spool.record([row("a"), row("b", quantity="2.5", whole=False)]) == (2, 0)
    spool.close()
    spool = Spool(path)
    assert spool.record([row("a"), row("c")]) == (1, 1)
    assert spool.event_totals() == [("prod-a", "requests", "4.5")]
    spool.close()


def test_a_failing_batch_stores_nothing(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"))
    broken = row("b")._replace(quantity=None)  # NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        spool.record([row("a"), broken])
    assert spool.event_totals() == []
    assert spool.record([row("a")]) == (1, 0)  # and the spool still works


def test_a_reused_event_id_with_another_payload_refuses_the_whole_batch(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"))
    assert spool.record([row("a", quantity="3"), row("b")]) == (2, 0)
    for changed in (row("a", quantity="4"), row("a", quantity="3", product="prod-b"), row("a", quantity="3", second=1),
                    row("a", quantity="3", tags='[["t","1"]]'), row("a", hour_back=2, quantity="3")):
        with pytest.raises(EventIdConflict) as caught:
            spool.record([row("new-1"), row("b"), changed])
        assert caught.value.indices == [2]
    # Identical repeats are duplicates; 3 and 3.0 are one quantity, as to AWS.
    assert spool.record([row("a", quantity="3.0", whole=False), row("b"), row("new-2")]) == (1, 2)
    with pytest.raises(EventIdConflict) as caught:  # within one batch too
        spool.record([row("c", quantity="1"), row("c", quantity="1"), row("c", quantity="2")])
    assert caught.value.indices == [2]
    assert spool.event_totals() == [("prod-a", "requests", "5")]  # a, b, new-2: nothing of the refused batches


def test_a_record_is_frozen_before_aws_hears_of_it(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.db")
    spool = Spool(path)
    spool.record([row("a", quantity="3")])
    spool.assign(NOW)
    (record,) = spool.due(NOW, grace=0)
    frozen = spool.begin_attempt(record.id)
    assert frozen is not None and frozen.attempts == 1 and frozen.client_token == record.client_token
    spool.close()  # a crash while the request is out
    spool = Spool(path)
    spool.record([row("late", quantity="4")])
    carries = spool.assign(NOW)
    (again,) = [r for r in spool.list_records() if r.id == record.id]
    assert again.quantity == "3" and again.client_token == record.client_token  # the resend is the same request
    assert again.outcome_unknown
    assert [(c.from_hour, c.to_hour, c.quantity) for c in carries] == [(record.hour, record.hour + HOUR, "4")]
    spool.mark_sent(again.id, "mr-1", NOW)
    assert {r.state for r in spool.list_records()} == {SENT, PENDING}


def test_carry_moves_usage_and_marks_the_hour(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"))
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


def test_placement_in_chunks_places_every_event_once(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"))
    count = ASSIGN_CHUNK * 3 + 7
    for start in range(0, count, 1000):
        spool.record([row(f"e{i}", hour_back=1 + i % 3, quantity="2") for i in range(start, min(count, start + 1000))])
    spool.assign(NOW)
    assert spool.stats().unassigned_events == 0
    records = spool.list_records()
    assert len(records) == 3 and sum(int(r.quantity) for r in records) == 2 * count


def test_a_placement_pass_ends_though_writers_keep_coming(tmp_path: Path) -> None:
    """Events recorded during a pass wait for the next one, so a pass always ends."""
    spool = Spool(str(tmp_path / "spool.db"))
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


def test_two_spools_never_share_a_client_token(tmp_path: Path) -> None:
    """Two pods metering the same usage for the same hour must not send one request
    twice under one token (AWS would answer the second with the first's record)."""
    tokens = []
    for name in ("pod-a.db", "pod-b.db", "pod-a.db"):
        spool = Spool(str(tmp_path / name))
        spool.record([row("same", quantity="1")])
        spool.assign(NOW)
        (record,) = spool.list_records()
        tokens.append((spool.spool_id, record.client_token))
        spool.close()
    (a_id, a_token), (b_id, b_token), (a_again_id, a_again_token) = tokens
    assert a_id != b_id and a_token != b_token
    assert (a_again_id, a_again_token) == (a_id, a_token)  # the same spool keeps its id: a resend is the same request


def test_stats_count_pending_records(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"))
    spool.record([row("a", 1), row("b", 3)])
    assert spool.stats().unassigned_events == 2
    spool.assign(NOW)
    stats = spool.stats()
    assert (stats.pending, stats.oldest_pending_hour, stats.unassigned_events) == (2, aggregator.hour_of(NOW) - 3 * HOUR, 0)


# -- schema versions ---------------------------------------------------------------


def test_a_spool_written_by_release_0_1_0_is_migrated_and_resumes(tmp_path: Path) -> None:
    """tests/data/spool-v1.db was written by release 0.1.0 (schema version 1): a
    sent, a failed, a pending and an in-flight record (a crash mid-call)."""
    path = tmp_path / "spool.db"
    shutil.copy(DATA / "spool-v1.db", path)
    written = 1_763_900_000.0
    spool = Spool(str(path), now=lambda: written + 60)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    records = {(r.product_code, r.usage_dimension, r.state): r for r in spool.list_records()}
    sent = records[("prod-a", "requests", SENT)]
    assert (sent.quantity, sent.metering_record_id, sent.closed_at) == ("12", "mr-v1-sent", written + 60)
    assert records[("prod-a", "gb", FAILED)].last_error.startswith("CUSTOMER_NOT_ENTITLED")
    in_flight = next(r for r in spool.list_records(state=PENDING) if r.attempts == 1)
    # Sent in the whole form before the upgrade: resent in that form, identical.
    assert in_flight.outcome_unknown and in_flight.wire == WHOLE_WIRE and not in_flight.decimal
    request = aggregator.build_request(in_flight.product_code, in_flight.usage_dimension, in_flight.hour,
                                       in_flight.content, in_flight.client_token, decimal=in_flight.decimal)
    assert request.WhichOneof("quantity") == "usage_quantity" and request.usage_quantity == 3
    fresh = next(r for r in spool.list_records(state=PENDING) if r.attempts == 0)
    assert fresh.decimal  # never sent: goes out with decimals
    # Tokens: a request that went out keeps its token; one never sent gets the spool's salt.
    assert in_flight.client_token == "33e374e0-8a6c-5170-88b2-4ed87cddd6c7"
    assert sent.client_token == "20d86574-276f-5f99-8944-1597393d5012"
    assert fresh.client_token == aggregator.client_token(fresh.product_code, fresh.usage_dimension, fresh.hour,
                                                         fresh.content, spool.spool_id) != "7f5b6ec1-caa6-5d08-9f57-ca680007e604"
    # Old events have no digest: their repeats are duplicates, as they were; new events are checked.
    v1_hour = aggregator.hour_of(written) - 3 * HOUR
    assert spool.record([EventRow("v1-a", "prod-a", "requests", v1_hour, "", "5", True, b"x" * 16)]) == (0, 1)
    assert spool.record([EventRow("v2-a", "prod-a", "requests", v1_hour, "", "5", True, b"y" * 16)]) == (1, 0)
    with pytest.raises(EventIdConflict):
        spool.record([EventRow("v2-a", "prod-a", "requests", v1_hour, "", "6", True, b"z" * 16)])
    spool.close()
    Spool(str(path)).close()  # opening again migrates nothing


def test_a_spool_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    Spool(str(path)).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(SpoolError) as caught:
        Spool(str(path))
    message = str(caught.value)
    assert "\n" not in message and f"schema version {SCHEMA_VERSION + 1}" in message and "newer" in message


def test_a_new_spool_is_the_migrated_one(tmp_path: Path) -> None:
    """Migrating release 0.1.0's file and creating a new one give the same schema."""
    shutil.copy(DATA / "spool-v1.db", tmp_path / "old.db")
    Spool(str(tmp_path / "old.db")).close()
    Spool(str(tmp_path / "new.db")).close()

    def schema(name: str) -> list[tuple[str, str]]:
        db = sqlite3.connect(tmp_path / name)
        return sorted(db.execute("SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall())

    assert schema("old.db") == schema("new.db")


# -- a full disk -----------------------------------------------------------------


def test_a_full_disk_is_never_an_acknowledgement_and_recovers(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"))
    changes: list[bool] = []
    spool.on_writable(changes.append)
    spool.record([row("first")])
    (pages,) = spool._db.execute("PRAGMA page_count").fetchone()
    spool._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from here on
    big = [row(f"e{i}", quantity=str(i), tags=f'[["tenant","{"x" * 200}{i}"]]') for i in range(500)]
    with pytest.raises(SpoolUnavailable) as caught:
        spool.record(big)
    assert "full" in str(caught.value) and "no transaction is active" not in str(caught.value)
    assert not spool.writable and changes == [False]
    assert not spool.probe()
    assert spool.event_totals() == [("prod-a", "requests", "1")]  # nothing of the batch
    spool._db.execute("PRAGMA max_page_count = 1073741823")  # space again
    assert spool.probe() and spool.writable and changes == [False, True]
    assert spool.record(big) == (500, 0)


# -- pruning -----------------------------------------------------------------------


def send_all(spool: Spool, now: float) -> None:
    spool.assign(now)
    for record in spool.due(now, grace=0):
        spool.begin_attempt(record.id)
        spool.mark_sent(record.id, f"mr-{record.id}", now)


def test_pruning_forgets_events_after_the_window_and_records_after_retention(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"))
    spool.record([row("a", 2), row("b", 3)])
    send_all(spool, NOW)
    spool.record([row("pending", 1)])
    spool.assign(NOW)
    assert spool.prune(NOW + 7 * DAY - 1, event_retention=7 * DAY, record_retention=30 * DAY).events == 0
    assert spool.record([row("a", 2)]) == (0, 1)  # still recognised inside the window
    pruned = spool.prune(NOW + 7 * DAY + 1, event_retention=7 * DAY, record_retention=30 * DAY)
    assert (pruned.events, pruned.records) == (2, 0)
    assert {r.state for r in spool.list_records()} == {SENT, PENDING}
    assert spool.stats().unassigned_events == 0 and spool.event_totals() == [("prod-a", "requests", "1")]
    pruned = spool.prune(NOW + 31 * DAY, event_retention=7 * DAY, record_retention=30 * DAY)
    assert pruned.records == 2
    (left,) = spool.list_records()
    assert left.state == PENDING  # pending usage is never pruned


def test_failed_records_keep_their_events_until_record_retention(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"))
    spool.record([row("a", 2)])
    spool.assign(NOW)
    (record,) = spool.list_records()
    spool.mark_failed(record.id, "CUSTOMER_NOT_ENTITLED: no", NOW)
    assert spool.prune(NOW + 10 * DAY, event_retention=DAY, record_retention=30 * DAY).events == 0
    assert spool.prune(NOW + 31 * DAY, event_retention=DAY, record_retention=30 * DAY).records == 1
    assert spool.list_records() == [] and spool.event_totals() == []


def test_taken_hours_older_than_any_placement_are_pruned(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"))
    spool.record([row("a", 2)])
    spool.assign(NOW)
    (record,) = spool.list_records()
    spool.carry(record.id, "DUPLICATE_REQUEST", NOW)
    assert spool.prune(NOW, event_retention=DAY, record_retention=DAY).taken == 0
    assert spool.prune(NOW + 2 * DAY, event_retention=DAY, record_retention=DAY).taken == 1


def test_a_commit_that_fails_on_a_full_disk_stores_nothing_and_recovers(tmp_path: Path) -> None:
    """The usual full disk in WAL mode fails at COMMIT, not at INSERT (the file size
    limit stands in for the disk, in a process of its own)."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        sys.path[:0] = {[str(Path(__file__).parent)]!r}
        from test_spool import row
        from gateway.spool import Spool, SpoolUnavailable
        spool = Spool({str(tmp_path / "spool.db")!r})
        spool.record([row("first")])
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))
        try:
            spool.record([row(f"e{{i}}") for i in range(1000)])
            print("ACCEPTED")
        except SpoolUnavailable as exc:
            print("UNAVAILABLE", exc)
        print("WRITABLE", spool.writable, spool.probe())
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        print("PROBE", spool.probe(), spool.writable)
        print("TOTALS", spool.event_totals())
        print("AGAIN", spool.record([row(f"e{{i}}") for i in range(1000)]))
        spool.close()
        print("REOPENED", Spool({str(tmp_path / "spool.db")!r}).event_totals())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    out = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert done.returncode == 0, done.stdout + done.stderr
    assert out["UNAVAILABLE"].startswith("SQLITE_") and "no transaction is active" not in out["UNAVAILABLE"], out
    assert out["WRITABLE"] == "False False" and out["PROBE"] == "True True"
    assert out["TOTALS"] == "[('prod-a', 'requests', '1')]"  # nothing of the refused batch
    assert out["AGAIN"] == "(1000, 0)" and out["REOPENED"] == "[('prod-a', 'requests', '1001')]"
