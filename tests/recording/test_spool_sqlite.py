"""What only the SQLite spool has: release 0.1.0's files migrated, ``PRAGMA
user_version``, and a full disk (at INSERT and at COMMIT). Its shared rules are
tested in test_spool.py, on both databases."""

from __future__ import annotations

import os
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
from gateway.recording.spool import (
    FAILED,
    PENDING,
    SENT,
    WHOLE_WIRE,
    EventIdConflict,
    SpoolError,
    SpoolUnavailable,
    open_spool,
)
from gateway.recording.spool.sqlite import SCHEMA_VERSION
from gateway.recording.spool.sqlite import SqliteSpool as Spool
from support import unchecked

HOUR = placement.HOUR
DATA = Path(__file__).resolve().parents[1] / "data"


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
    request = placement.build_request(
        in_flight.product_code,
        in_flight.usage_dimension,
        in_flight.hour,
        in_flight.content,
        in_flight.client_token,
        decimal=in_flight.decimal,
    )
    assert request.WhichOneof("quantity") == "usage_quantity" and request.usage_quantity == 3
    fresh = next(r for r in spool.list_records(state=PENDING) if r.attempts == 0)
    assert fresh.decimal  # never sent: goes out with decimals
    # Tokens: a request that went out keeps its token; one never sent gets the spool's salt.
    assert in_flight.client_token == "33e374e0-8a6c-5170-88b2-4ed87cddd6c7"
    assert sent.client_token == "20d86574-276f-5f99-8944-1597393d5012"
    assert (
        fresh.client_token
        == placement.client_token(fresh.product_code, fresh.usage_dimension, fresh.hour, fresh.content, spool.spool_id)
        != "7f5b6ec1-caa6-5d08-9f57-ca680007e604"
    )
    # Old events have no digest: their repeats are duplicates, as they were; new events are checked.
    v1_hour = placement.hour_of(written) - 3 * HOUR
    assert spool.record([EventRow("v1-a", "prod-a", "requests", v1_hour, "", "5", True, b"x" * 16, "")]) == (0, 1)
    assert spool.record([EventRow("v2-a", "prod-a", "requests", v1_hour, "", "5", True, b"y" * 16, "")]) == (1, 0)
    with pytest.raises(EventIdConflict):
        spool.record([EventRow("v2-a", "prod-a", "requests", v1_hour, "", "6", True, b"z" * 16, "")])
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
    stored = sqlite3.connect(tmp_path / "spool.db").execute("SELECT event_id FROM events").fetchall()
    assert stored == [("first",)]  # nothing of the batch
    spool._db.execute("PRAGMA max_page_count = 1073741823")  # space again
    assert spool.probe() and spool.writable and changes == [False, True]
    assert spool.record(big) == (500, 0)


def test_a_commit_that_fails_on_a_full_disk_stores_nothing_and_recovers(tmp_path: Path) -> None:
    """The usual full disk in WAL mode fails at COMMIT, not at INSERT (the file size
    limit stands in for the disk, in a process of its own)."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        sys.path[:0] = {[str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]!r}
        from test_spool import row
        from support.recording import event_totals
        from gateway.recording.spool import SpoolUnavailable
        from gateway.recording.spool.sqlite import SqliteSpool as Spool
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
        print("TOTALS", event_totals(spool))
        print("AGAIN", spool.record([row(f"e{{i}}") for i in range(1000)]))
        spool.close()
        print("REOPENED", event_totals(Spool({str(tmp_path / "spool.db")!r})))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    out = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert done.returncode == 0, done.stdout + done.stderr
    assert out["UNAVAILABLE"].startswith("SQLITE_") and "no transaction is active" not in out["UNAVAILABLE"], out
    assert out["WRITABLE"] == "False False" and out["PROBE"] == "True True"
    assert out["TOTALS"] == "[('prod-a', 'requests', '1')]"  # nothing of the refused batch
    assert out["AGAIN"] == "(1000, 0)" and out["REOPENED"] == "[('prod-a', 'requests', '1001')]"


# -- a spool that vanishes or breaks under a running gateway ----------------------------------------


def remove_spool(path: Path) -> None:
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        name.unlink(missing_ok=True)


def test_a_deleted_spool_file_refuses_writes_and_says_where_its_data_still_is(tmp_path: Path) -> None:
    """The .sqlite, -wal and -shm files deleted under a running gateway: nothing is
    acknowledged into a file nobody will find again, and the error says how to save
    what was (the file is still open, at /proc/PID/fd/N)."""
    path = tmp_path / "spool.db"
    spool = Spool(str(path))
    assert spool.record([row("before")]) == (1, 0)
    remove_spool(path)
    with pytest.raises(SpoolUnavailable) as refused:
        spool.record([row("after")])
    assert str(path) in str(refused.value) and "/proc/" in str(refused.value)
    assert not spool.writable and not spool.probe() and not spool.verify()
    assert not path.exists(), "no new, empty file was made in its place"


def test_a_replaced_spool_file_is_noticed_without_a_write(tmp_path: Path) -> None:
    path, other = tmp_path / "spool.db", tmp_path / "other.db"
    spool = Spool(str(path))
    Spool(str(other)).close()
    changes: list[bool] = []
    spool.on_writable(changes.append)
    assert spool.verify()
    os.replace(other, path)
    assert not spool.verify() and changes == [False]  # the health watcher asks every second
    with pytest.raises(SpoolUnavailable):
        spool.record([row("after")])


class BrokenReads:
    """The spool's connection, with every read failing as SQLite does on a corrupt file."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args: object) -> object:
        if sql.lstrip().upper().startswith("SELECT"):
            raise sqlite3.DatabaseError("database disk image is malformed")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def test_a_corrupt_spool_read_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"))
    spool.record([row("a")])
    spool._db = BrokenReads(spool._db)  # type: ignore[assignment]
    with pytest.raises(SpoolUnavailable, match="malformed"):
        spool.list_records()
    with pytest.raises(SpoolUnavailable, match="malformed"):
        spool.stats()


# -- a new spool is never made silently ------------------------------------------------------------


def test_a_new_spool_is_said_loudly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Spool(str(tmp_path / "new.db")).close()
    assert "spool_created" in capsys.readouterr().out
    Spool(str(tmp_path / "new.db")).close()
    assert "spool_created" not in capsys.readouterr().out


def test_spool_create_no_refuses_to_start_over(tmp_path: Path) -> None:
    with pytest.raises(SpoolError) as refused:
        open_spool(str(tmp_path / "missing.db"), create="no")
    assert "does not exist, and --spool-create is no" in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "missing.db").exists()
    Spool(str(tmp_path / "there.db")).close()
    open_spool(str(tmp_path / "there.db"), create="no").close()  # an existing spool opens as ever


def test_spool_create_if_mounted_makes_a_spool_only_on_a_mounted_volume(tmp_path: Path) -> None:
    """A pod whose volume did not mount finds an empty directory of the image's, not a mount point."""
    assert not os.path.ismount(tmp_path)
    with pytest.raises(SpoolError) as refused:
        open_spool(str(tmp_path / "spool.db"), create="if-mounted")
    assert "is not a mount point" in str(refused.value) and not (tmp_path / "spool.db").exists()
    mounted = next((p for p in ("/dev/shm", "/tmp", "/run") if os.path.ismount(p) and os.access(p, os.W_OK)), None)
    if mounted is None:
        unchecked("no writable mount point (/dev/shm, /tmp, /run): a spool made on a mounted volume is unchecked")
    spool_path = Path(mounted) / f"spool-{os.getpid()}-{id(tmp_path)}.db"
    try:
        open_spool(str(spool_path), create="if-mounted").close()
        assert spool_path.exists()
    finally:
        remove_spool(spool_path)
