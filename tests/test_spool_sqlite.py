"""What only the SQLite spool has: release 0.1.0's files migrated, ``PRAGMA
user_version``, and a full disk (at INSERT and at COMMIT). Its shared rules are
tested in test_spool.py, on both databases."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_spool import row

from gateway.recording import placement
from gateway.recording.placement import EventRow
from gateway.recording.spool import FAILED, PENDING, SENT, WHOLE_WIRE, EventIdConflict, SpoolUnavailable, open_spool
from gateway.recording.sqlite import SCHEMA_VERSION
from gateway.recording.sqlite import SqliteSpool as Spool

HOUR = placement.HOUR
DATA = Path(__file__).parent / "data"


# -- durability --------------------------------------------------------------------


def test_every_commit_is_synced_to_disk_not_only_written(tmp_path: Path) -> None:
    """A committed RecordUsage survives a power cut, not only a crash: WAL with
    ``synchronous=FULL`` syncs the log at every commit. ``kill -9`` cannot tell FULL
    from NORMAL or OFF (the page cache outlives the process), so the crash tests
    cannot guard this; the settings are read back from the spool's own connection,
    as opened by ``open_spool`` (what ``serve --spool FILE`` does)."""
    spool = open_spool(str(tmp_path / "spool.db"))
    assert isinstance(spool, Spool)
    db = spool._db
    assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    spool.close()


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
    request = placement.build_request(in_flight.product_code, in_flight.usage_dimension, in_flight.hour,
                                       in_flight.content, in_flight.client_token, decimal=in_flight.decimal)
    assert request.WhichOneof("quantity") == "usage_quantity" and request.usage_quantity == 3
    fresh = next(r for r in spool.list_records(state=PENDING) if r.attempts == 0)
    assert fresh.decimal  # never sent: goes out with decimals
    # Tokens: a request that went out keeps its token; one never sent gets the spool's salt.
    assert in_flight.client_token == "33e374e0-8a6c-5170-88b2-4ed87cddd6c7"
    assert sent.client_token == "20d86574-276f-5f99-8944-1597393d5012"
    assert fresh.client_token == placement.client_token(fresh.product_code, fresh.usage_dimension, fresh.hour,
                                                         fresh.content, spool.spool_id) != "7f5b6ec1-caa6-5d08-9f57-ca680007e604"
    # Old events have no digest: their repeats are duplicates, as they were; new events are checked.
    v1_hour = placement.hour_of(written) - 3 * HOUR
    assert spool.record([EventRow("v1-a", "prod-a", "requests", v1_hour, "", "5", True, b"x" * 16)]) == (0, 1)
    assert spool.record([EventRow("v2-a", "prod-a", "requests", v1_hour, "", "5", True, b"y" * 16)]) == (1, 0)
    with pytest.raises(EventIdConflict):
        spool.record([EventRow("v2-a", "prod-a", "requests", v1_hour, "", "6", True, b"z" * 16)])
    spool.close()
    Spool(str(path)).close()  # opening again migrates nothing


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


def test_a_commit_that_fails_on_a_full_disk_stores_nothing_and_recovers(tmp_path: Path) -> None:
    """The usual full disk in WAL mode fails at COMMIT, not at INSERT (the file size
    limit stands in for the disk, in a process of its own)."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        sys.path[:0] = {[str(Path(__file__).parent)]!r}
        from test_spool import row
        from gateway.recording.spool import SpoolUnavailable
        from gateway.recording.sqlite import SqliteSpool as Spool
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
