"""The spool stops growing: a steady load over simulated days, real Spool and Sender on a fake clock.

Pruning (``Sender.prune``, every 10 minutes of the sender's clock) must keep the
spool file bounded under a steady load: events go ``--event-retention`` after their
record was sent, records ``--record-retention`` after they closed, and SQLite reuses
the freed pages. This drives the real :class:`Spool` on a file and the real
:class:`Sender` on a simulated clock against AWS's rules in process (no network):
each simulated hour it records ``--events-per-hour`` unique events (through
``Spool.record``, 100 a transaction, three products, five dimensions, tag sets per
tenant and region), in steps of 10 minutes, each followed by ``sender.tick()``
(placement, sending the closed hours, pruning).

The retention windows are shortened so that they fill within the run: by default
2 days for events and 5 days for records (the gateway's defaults are 7 days and 400
days; a longer window only moves the plateau later and higher). Every simulated day
it prints the file size on disk (main file + WAL), the bytes of pages in use
(``Spool.size``) and the rows; the figure that matters is the ratio size at the last
day / size at the first day after both windows are full (about 1.0 when the spool
stops growing), and the plateau itself. As the baseline, in the same run, the same
load runs again with nothing pruned (release 0.1.0's spool): the ratio of the two
files at the last day says what pruning saves (``--no-baseline`` skips it).

Prints a table and, last, one JSON line. Run: ``make bench`` or
``.venv/bin/python benchmarks/spool_days.py [--days 14] [--events-per-hour 2000]``
(``--quick``: a smoke run of a few seconds). Exits non-zero if a record failed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from gateway.aws.backend import Backend, Outcome
from gateway.domain import errors
from gateway.observability import logs
from gateway.recording import placement
from gateway.recording.placement import HOUR, EventRow
from gateway.recording.sender import Sender
from gateway.recording.spool import FAILED, PENDING, SENT
from gateway.recording.spool.sqlite import SqliteSpool as Spool

DAY = 86400
STEP = 600  # seconds of simulated time between two sender passes (the sender prunes every 10 minutes)
BATCH = 100  # events per Spool.record transaction, a typical RecordUsage batch
GRACE = 300.0  # --flush-grace's default: a record goes out 5 minutes after its hour closed
START = placement.hour_of(1_750_000_000)  # a fixed simulated start, at an hour's start
PRODUCTS = {
    "prod-analytics": ("requests", "gb-scanned"),
    "prod-storage": ("gb-hours",),
    "prod-api": ("calls", "premium-calls"),
}
TENANTS = 20
REGIONS = ("eu-west-1", "us-east-1", "ap-south-1")


class Clock:
    """Simulated epoch seconds; moves only by ``advance``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class InProcessAws:
    """``Backend.meter_usage`` by the AWS rules the sender meets on a good day: one
    record per product, dimension and hour (DuplicateRequest otherwise), and a
    repeated ClientToken answered with the record it made. Copied in small from the
    tests' FakeAws, as benchmarks do not import tests."""

    def __init__(self) -> None:
        self.by_token: dict[str, str] = {}
        self.hours: set[tuple[str, str, datetime]] = set()

    def meter_usage(self, params: dict[str, Any], *, deadline: float | None = None) -> Outcome:
        token = str(params.get("ClientToken", ""))
        if token in self.by_token:
            return Outcome(self.by_token[token], False, 1, "req-local", token)
        key = (params["ProductCode"], params["UsageDimension"], params["Timestamp"])
        if key in self.hours:
            raise errors.from_aws("DuplicateRequestException", "the hour holds a record", "req-local", http_status=400)
        self.hours.add(key)
        record_id = self.by_token[token] = f"rec-{len(self.by_token)}"
        return Outcome(record_id, False, 1, "req-local", token)


def event(event_id: str, when: float, rng: random.Random) -> EventRow:
    """One event as RecordUsage stores it (``recorder.event_row`` without the proto)."""
    product = rng.choice(list(PRODUCTS))
    dimension = rng.choice(PRODUCTS[product])
    roll = rng.random()
    tags = []
    if roll < 0.7:
        tags.append(("tenant", f"t{rng.randrange(TENANTS)}"))
    if roll < 0.2:
        tags.append(("region", rng.choice(REGIONS)))
    whole = rng.random() >= 0.1
    quantity = str(rng.randrange(1, 50)) if whole else f"{rng.randrange(1, 10_000) / 100:.2f}"
    seconds, nanos = int(when), int(when % 1 * 1e9)
    key = placement.tags_key(tags)
    digest = placement.event_digest(product, dimension, seconds, nanos, quantity, key)
    return EventRow(
        event_id,
        product,
        dimension,
        placement.hour_of(seconds),
        key,
        quantity,
        whole,
        digest,
        placement.event_time(seconds, nanos),
    )


@dataclass
class Day:
    day: int
    file_bytes: int  # main file + WAL, on disk
    wal_bytes: int
    in_use_bytes: int  # Spool.size(): pages in use
    events: int
    records: int
    pending: int
    sent: int
    failed: int


def measure(spool: Spool, path: Path, day: int) -> Day:
    """The spool's size and rows, read through a second, read-only connection."""
    wal = Path(f"{path}-wal")
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        (events,) = db.execute("SELECT COUNT(*) FROM events").fetchone()
        states = dict(db.execute("SELECT state, COUNT(*) FROM records GROUP BY state").fetchall())
    db.close()
    return Day(
        day,
        path.stat().st_size + wal_bytes,
        wal_bytes,
        spool.size(),
        events,
        sum(states.values()),
        states.get(PENDING, 0),
        states.get(SENT, 0),
        states.get(FAILED, 0),
    )


def simulate(
    path: Path, days: int, per_hour: int, event_retention: float, record_retention: float, seed: int = 11
) -> list[Day]:
    clock = Clock(float(START))
    spool = Spool(str(path), now=clock)
    sender = Sender(
        spool,
        cast(Backend, InProcessAws()),
        interval=STEP,
        grace=GRACE,
        max_rps=1e9,
        now=clock,
        sleep=lambda _: None,
        event_retention=event_retention,
        record_retention=record_retention,
    )
    rng = random.Random(seed)
    steps = HOUR // STEP
    serial = 0
    out: list[Day] = []
    try:
        for day in range(1, days + 1):
            for _ in range(24 * steps):
                clock.advance(STEP)
                # this step's share of the hour's events, timestamped in the 10 minutes just past
                count = per_hour // steps + (1 if rng.randrange(steps) < per_hour % steps else 0)
                rows = [event(f"ev-{serial + i}", clock.now - STEP + rng.random() * STEP, rng) for i in range(count)]
                serial += count
                for start in range(0, len(rows), BATCH):
                    spool.record(rows[start : start + BATCH])
                sender.tick()
            out.append(measure(spool, path, day))
            print(row(out[-1]), flush=True)
    finally:
        spool.close()
    return out


def row(d: Day) -> str:
    return (
        f"{d.day:>4} {d.file_bytes / 1e6:>10.2f} {d.wal_bytes / 1e6:>7.2f} {d.in_use_bytes / 1e6:>10.2f} "
        f"{d.events:>9,} {d.records:>8,} {d.pending:>7,} {d.failed:>6,}"
    )


HEADER = (
    f"{'day':>4} {'file MB':>10} {'WAL MB':>7} {'in use MB':>10} "
    f"{'events':>9} {'records':>8} {'pending':>7} {'failed':>6}"
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=14, help="simulated days [default 14]")
    parser.add_argument(
        "--events-per-hour", type=int, default=2000, help="events recorded each simulated hour [default 2000]"
    )
    parser.add_argument(
        "--event-retention", type=float, default=2.0, help="days; the gateway's default is 7 [default 2]"
    )
    parser.add_argument(
        "--record-retention", type=float, default=5.0, help="days; the gateway's default is 400 [default 5]"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline run with nothing pruned")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 4 days, 100 events an hour, retention 1 and 2 days"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.days, args.events_per_hour, args.event_retention, args.record_retention = 4, 100, 1.0, 2.0
    if not 0 < args.event_retention <= args.record_retention:
        parser.error("need 0 < --event-retention <= --record-retention")
    # the first day whose end lies a full day past the record window: every window is full
    full = math.ceil(args.record_retention) + 1
    if args.days < full:
        parser.error(f"--days must be at least {full} for the windows to fill")
    logs.configure("warning")
    print(
        f"spool_days: {args.days} simulated days, {args.events_per_hour:,} events an hour, retention "
        f"{args.event_retention:g} d (events) and {args.record_retention:g} d (records); gateway defaults 7 d "
        "and 400 d; "
        f"SQLite {sqlite3.sqlite_version}",
        file=sys.stderr,
    )
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spool-days-") as tmp:
        print(HEADER, flush=True)
        days = simulate(
            Path(tmp) / "spool.db",
            args.days,
            args.events_per_hour,
            args.event_retention * DAY,
            args.record_retention * DAY,
        )
        unpruned: list[Day] = []
        if not args.no_baseline:
            print("baseline: the same load, nothing pruned (release 0.1.0)", flush=True)
            never = 1e12  # a retention longer than any run: prune() finds nothing
            unpruned = simulate(Path(tmp) / "unpruned.db", args.days, args.events_per_hour, never, never)
    first, last = days[full - 1], days[-1]
    peak = max(d.file_bytes for d in days[full - 1 :])
    summary: dict[str, Any] = {
        "benchmark": "spool_days",
        "plateau_from_day": full,
        "ratio_file": round(last.file_bytes / first.file_bytes, 3),
        "ratio_in_use": round(last.in_use_bytes / first.in_use_bytes, 3),
        "plateau_file_bytes": last.file_bytes,
        "plateau_in_use_bytes": last.in_use_bytes,
        "peak_file_bytes_after_full": peak,
        "failed_records": last.failed,
        "baseline_file_bytes": unpruned[-1].file_bytes if unpruned else None,
        "ratio_to_baseline": round(last.file_bytes / unpruned[-1].file_bytes, 3) if unpruned else None,
        "days": [asdict(d) for d in days],
        "elapsed_s": round(time.perf_counter() - began, 1),
        "config": {
            "days": args.days,
            "events_per_hour": args.events_per_hour,
            "event_retention_days": args.event_retention,
            "record_retention_days": args.record_retention,
            "step_s": STEP,
            "batch": BATCH,
        },
    }
    print(
        f"windows full from day {full}: file day {last.day} / day {first.day} = x{summary['ratio_file']:.3f} "
        f"(pages in use x{summary['ratio_in_use']:.3f}); plateau {last.file_bytes / 1e6:.2f} MB on disk, "
        f"{last.in_use_bytes / 1e6:.2f} MB in use; peak after day {full}: {peak / 1e6:.2f} MB"
    )
    if unpruned:
        print(
            f"baseline, nothing pruned: {unpruned[-1].file_bytes / 1e6:.2f} MB at day {last.day}, growing "
            f"{(unpruned[-1].file_bytes - unpruned[full - 1].file_bytes) / 1e6 / (last.day - full):.2f} MB a day; "
            f"pruned / unpruned at day {last.day} = x{summary['ratio_to_baseline']:.3f}"
        )
    print(json.dumps(summary))
    return 1 if last.failed else 0


if __name__ == "__main__":
    sys.exit(main())
