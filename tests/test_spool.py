"""The spool on disk: durable across reopen, all-or-nothing batches, duplicates known."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway import aggregator
from gateway.aggregator import EventRow
from gateway.spool import PENDING, SENT, Spool

NOW = 1_750_000_000.0
HOUR = aggregator.HOUR


def row(event_id: str, hour_back: int = 1, quantity: str = "1", whole: bool = True, tags: str = "") -> EventRow:
    return EventRow(event_id, "prod-a", "requests", aggregator.hour_of(NOW) - hour_back * HOUR, tags, quantity, whole)


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
    broken = EventRow("b", "prod-a", "requests", 0, "", None, True)  # type: ignore[arg-type]  # NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        spool.record([row("a"), broken])
    assert spool.event_totals() == []
    assert spool.record([row("a")]) == (1, 0)  # and the spool still works


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
    assert [(c.from_hour, c.to_hour, c.quantity) for c in carries] == [(record.hour, record.hour + HOUR, "4")]
    spool.mark_sent(again.id, "mr-1")
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


def test_stats_count_pending_records(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"))
    spool.record([row("a", 1), row("b", 3)])
    assert spool.stats().unassigned_events == 2
    spool.assign(NOW)
    stats = spool.stats()
    assert (stats.pending, stats.oldest_pending_hour, stats.unassigned_events) == (2, aggregator.hour_of(NOW) - 3 * HOUR, 0)
