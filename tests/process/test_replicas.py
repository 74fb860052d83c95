"""Two replicas on one PostgreSQL spool, kill -9 twice: every acknowledged event metered once.

LocalAws runs as its own process, PostgreSQL as the session's server (a fresh
database), and two gateways share that database as their spool. Callers record
batches from several threads, each batch to a replica picked at random; a batch
without an OK answer goes to the *other* replica. Mid-stream one replica is
killed with SIGKILL and a replacement starts on the same spool; acknowledged
batches sent again to another replica must come back as duplicates. Then the
leader (the one replica that sends) is killed *while sending*: AWS is made slow
and records the call before answering, so the attempt is in flight, and maybe
recorded, when the leader dies; the other replica must take the lead and resend
that record identically. SIGTERM with --flush-on-shutdown meters the open hour.
Then LocalAws must hold exactly the sum of the unique events, per product and
dimension, no product, dimension and hour twice, each the spool's own record
(its ClientToken and id), and the spool nothing FAILED, PENDING or unplaced. About
half the callers' events are SaaS usage (customers over two licenses, metered with
BatchMeterUsage): for them the same holds per customer, dimension and hour.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import grpc
import psycopg
import pytest

from gateway.recording import placement
from marketplace.metering.v1 import metering_pb2 as pb
from support.processes import (
    GatewayProcess,
    http_json,
    last_batches_then_sigterm,
    local_aws_records,
    spooled_gateway,
    sums_of_local_records,
)
from support.recording import (
    CRASH_BATCH,
    event,
    make_batch,
    record_usage,
    saas_subscriptions,
    send,
    sums_of_events,
    sums_of_saas_events,
    wait_for,
)

pytestmark = pytest.mark.slow
HOUR = 3600
CALLERS = 4
RESENT_ACKNOWLEDGED = 6
# How late AWS answers the MeterUsage call in flight at the second kill: long enough to
# kill the leader first on the busiest machine, and well under the replicas' read timeout
# (READ_TIMEOUT), so the attempt is still waiting when the leader dies.
SLOW_AWS = 30.0
READ_TIMEOUT = ("--aws-read-timeout", "60s")
# Log events that must never appear: a record given up, or a sender pass that broke.
NEVER = ("record_failed", "record_outcome_unknown", "record_handling_failed", "sender_tick_failed")


@dataclass
class Sent:
    batch: list[pb.UsageEvent]
    first_ok: bool  # the first replica tried answered OK
    by: str  # the replica whose answer was OK
    resends: int  # sends after the first
    known: int  # events the resend found stored already (the lost answer of a commit)


def leading(replica: GatewayProcess) -> bool:
    """The replica's log says it took the sender lock and has not lost it since."""
    return replica.alive and len(replica.lines("sender_leading")) > len(replica.lines("sender_lead_lost"))


def query(dsn: str, sql: str, *args: object) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def sender_locks(dsn: str) -> int:
    """Sessions holding the spool's sender lock (advisory lock (0x6D67, 2), see gateway/recording/spool/postgres.py)."""
    return int(
        query(
            dsn,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = %s AND objid = %s AND objsubid = 2",
            0x6D67,
            2,
        )[0][0]
    )


@pytest.fixture
def launched() -> Iterator[list[GatewayProcess]]:
    """Every replica the test starts; killed at the end if still running."""
    replicas: list[GatewayProcess] = []
    yield replicas
    for replica in replicas:
        replica.kill()


def test_replicas_killed_mid_stream_and_mid_send_meter_every_acknowledged_event_once(
    tmp_path: Path, local_aws_url: str, postgres_dsn: str, launched: list[GatewayProcess], rng: random.Random
) -> None:
    started = time.monotonic()
    for subscription in saas_subscriptions():
        http_json(local_aws_url + "/_local/subscriptions", "POST", subscription)

    def start(name: str) -> GatewayProcess:
        replica = spooled_gateway(tmp_path, name, local_aws_url, postgres_dsn, *READ_TIMEOUT)
        launched.append(replica)
        return replica

    with ThreadPoolExecutor(2) as pool:  # both at once: one creates the schema, the other finds it
        live = list(pool.map(start, ("replica-a", "replica-b")))
    sent: list[Sent] = []
    problems: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def pick(crng: random.Random, other_than: str | None = None) -> GatewayProcess | None:
        with lock:
            choices = [r for r in live if r.name != other_than]
        return crng.choice(choices) if choices else None

    def caller(c: int) -> None:
        crng = random.Random(rng.random())
        channels: dict[str, grpc.Channel] = {}

        def to(replica: GatewayProcess, batch: list[pb.UsageEvent]) -> pb.RecordUsageResponse | None:
            if replica.name not in channels:
                channels[replica.name] = grpc.insecure_channel(replica.target)
            return record_usage(channels[replica.name], batch)

        n = 0
        try:
            while not stop.is_set():
                batch = make_batch(crng, c, n, saas=True)
                n += 1
                replica = pick(crng) or live[0]
                reply = to(replica, batch)
                first_ok = reply is not None and reply.accepted == len(batch)
                if reply is not None and not first_ok:
                    with lock:
                        problems.append(f"{replica.name} answered a new batch {reply}")
                resends = 0
                while reply is None:  # no OK answer: to the other replica (or, while there is none, any)
                    if resends == 50:
                        with lock:
                            problems.append(f"batch c{c}-b{n - 1} got no OK answer in 50 sends")
                        return
                    replica = pick(crng, other_than=replica.name) or replica
                    resends += 1
                    reply = to(replica, batch)
                    if reply is None:
                        time.sleep(0.05)
                    elif reply.accepted + reply.duplicates != len(batch) or reply.duplicates not in (0, len(batch)):
                        with lock:  # one batch, one transaction: all of it stored before, or none
                            problems.append(f"resend to {replica.name} answered {reply}")
                with lock:
                    sent.append(Sent(batch, first_ok, replica.name, resends, 0 if first_ok else reply.duplicates))
        except Exception as exc:  # noqa: BLE001 - said by the test, not lost in a thread
            with lock:
                problems.append(f"caller {c}: {exc!r}")
        finally:
            for channel in channels.values():
                channel.close()

    def answered_by(name: str) -> int:
        with lock:
            return sum(1 for s in sent if s.by == name)

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(CALLERS)]
    for t in threads:
        t.start()
    try:
        # -- 1. kill -9 one replica while the callers write to both -------------------------------
        wait_for(
            lambda: sum(len(r.lines("record_sent")) for r in live) >= 2 and all(answered_by(r.name) >= 5 for r in live),
            timeout=30,
            what="recording on both replicas and sending",
        )
        time.sleep(rng.uniform(0, 0.3))
        victim = rng.choice(live)
        victim_led = leading(victim)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        with lock:
            live.remove(victim)
            before = len(sent)
        wait_for(lambda: len(sent) >= before + 10, timeout=20, what="the survivor to take the callers' batches")
        replacement = start("replica-c")
        with lock:
            live.append(replacement)
        wait_for(lambda: answered_by(replacement.name) >= 5, timeout=20, what="the replacement to take batches")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not problems, problems
    without_ok = sum(1 for s in sent if not s.first_ok)
    resends = sum(s.resends for s in sent)
    known = sum(1 for s in sent if s.known)

    # -- 2. acknowledged batches again, each to another replica than the one that took it --------
    duplicates = 0
    for s in rng.sample([s for s in sent if s.first_ok], RESENT_ACKNOWLEDGED):
        other = rng.choice([r for r in live if r.name != s.by])
        reply = send(other.target, s.batch)
        assert reply == pb.RecordUsageResponse(duplicates=CRASH_BATCH), (
            f"{s.by}'s batch resent to {other.name}: {reply}"
        )
        duplicates += reply.duplicates

    # -- 3. kill -9 the leader while its MeterUsage call is in flight -----------------------------
    def settled() -> bool:
        """Every event placed, every closed hour sent, nothing in flight: the next call is the
        one we slow down. (The callers leave a backlog to place: SaaS usage is a record per
        customer, dimension and hour, so placing it costs far more than container usage.)"""
        return query(postgres_dsn, "SELECT count(*) FROM events WHERE record_id IS NULL") == [(0,)] and query(
            postgres_dsn,
            "SELECT count(*) FROM records WHERE state = 'PENDING' AND (hour < %s OR in_flight = 1)",
            placement.hour_of(time.time()),
        ) == [(0,)]

    backlog = time.monotonic()
    wait_for(settled, timeout=120, what="every event placed and every closed hour sent")
    backlog = time.monotonic() - backlog
    wait_for(lambda: sum(map(leading, live)) == 1, timeout=10, what="one leader among the live replicas")
    assert sender_locks(postgres_dsn) == 1
    (leader,) = [r for r in live if leading(r)]
    (follower,) = [r for r in live if r is not leader]
    # AWS applies the next MeterUsage call, then answers SLOW_AWS seconds late.
    http_json(
        local_aws_url + "/_local/faults",
        "POST",
        {"error": "slow", "delay": SLOW_AWS, "record": True, "operation": "MeterUsage", "count": 1},
    )
    faulted = time.monotonic()
    # A key of its own, in the hour before this one: a new record, due at once (its hour is closed).
    last_hour = placement.hour_of(time.time()) - HOUR
    late = [
        event(f"late-e{i}", last_hour + rng.uniform(0, HOUR - 1), rng.randint(1, 1000), product="prod-late")
        for i in range(CRASH_BATCH)
    ]
    assert send(follower.target, late) == pb.RecordUsageResponse(accepted=CRASH_BATCH)

    def in_flight() -> tuple[int, str, int] | None:
        """The record whose attempt AWS has taken (and recorded) but not yet answered: a
        MeterUsage one (SaaS records go out 25 a call, and an hour that closes meanwhile
        sends many: they are not the call the fault slows)."""
        rows = query(
            postgres_dsn,
            "SELECT id, client_token, attempts FROM records WHERE state = 'PENDING' AND in_flight = 1 "
            "AND customer = ''",
        )
        if len(rows) != 1 or http_json(local_aws_url + "/_local/faults"):  # the fault not yet taken
            return None
        held = http_json(local_aws_url + "/_local/records")
        assert isinstance(held, list)
        return rows[0] if any(r["ClientToken"] == rows[0][1] for r in held) else None

    record_id, token, attempts = wait_for(in_flight, timeout=10, what="the leader's MeterUsage call to be in flight")
    leader.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    leader.proc.wait(10)
    # AWS took the call after `faulted` and answers SLOW_AWS after taking it: the answer was still to come.
    assert killed - faulted < SLOW_AWS, f"killed {killed - faulted:.2f} s after the fault: the answer may have come"
    live.remove(leader)
    http_json(local_aws_url + "/_local/faults", "DELETE")
    heard = [x["event"] for x in leader.lines(token) if x["event"] in ("record_sent", "record_retry", "record_refused")]
    assert not heard, f"{leader.name} heard AWS's answer before the kill: {heard}"
    wait_for(lambda: leading(follower), timeout=10, what=f"{follower.name} to take the lead")
    assert sender_locks(postgres_dsn) == 1
    took_lead = time.monotonic() - killed
    resent = wait_for(
        lambda: [x for x in follower.lines("record_sent") if x["client_token"] == token],
        timeout=10,
        what="the new leader to resend the record in flight",
    )
    assert resent[0]["attempt"] == attempts + 1, resent
    assert query(postgres_dsn, "SELECT state, client_token, uncertain FROM records WHERE id = %s", record_id) == [
        ("SENT", token, 0)
    ]
    resend_after = time.monotonic() - killed

    # -- 4. more usage, then SIGTERM: the leader meters the open hour too -------------------------
    more = last_batches_then_sigterm(follower, rng)

    # -- what AWS holds, and what the spool says ----------------------------------------------------
    records = local_aws_records(local_aws_url)
    metered = sums_of_local_records(records)
    unique = {ev.event_id: ev for batch in [s.batch for s in sent] + [late] + more for ev in batch}
    assert len(unique) == CRASH_BATCH * (len(sent) + 1 + len(more))
    container = [ev for ev in unique.values() if not ev.customer_aws_account_id]
    assert metered == sums_of_events(container)
    hours = [(r["ProductCode"], r["UsageDimension"], r["Hour"]) for r in records]
    assert len(hours) == len(set(hours))
    saas_records = http_json(local_aws_url + "/_local/saas-records")
    assert isinstance(saas_records, list) and saas_records
    billed: dict[tuple[str, str, str], Decimal] = {}
    for r in saas_records:
        key = (r["CustomerAWSAccountId"], r["LicenseArn"], r["Dimension"])
        billed[key] = billed.get(key, Decimal(0)) + Decimal(r["Quantity"])
    assert billed == sums_of_saas_events(unique.values())
    saas_hours = [(r["CustomerAWSAccountId"], r["LicenseArn"], r["Dimension"], r["Hour"]) for r in saas_records]
    assert len(saas_hours) == len(set(saas_hours)), "a customer's hour was billed twice"
    never = {(r.name, name): len(r.lines(name)) for r in launched for name in NEVER}
    assert not any(never.values()), never
    # Not asserted (a killed replica may leave a reason), but said: every error or traceback a replica logged.
    errors = Counter(
        f"{r.name}:{x['event']}"
        for r in launched
        for x in r.lines("level")
        if x.get("level") in ("error", "critical") or "exception" in x
    )
    states = dict(query(postgres_dsn, "SELECT state, count(*) FROM records GROUP BY state"))
    assert set(states) == {"SENT"}, states
    assert query(postgres_dsn, "SELECT count(*) FROM events WHERE record_id IS NULL") == [(0,)]
    # Each hour AWS holds is the spool's own record: the ClientToken it froze, the id AWS answered.
    ours = {
        (t, m)
        for t, m in query(postgres_dsn, "SELECT client_token, metering_record_id FROM records WHERE customer = ''")
    }
    assert ours == {(r["ClientToken"], r["MeteringRecordId"]) for r in records}
    ours_saas = {m for (m,) in query(postgres_dsn, "SELECT metering_record_id FROM records WHERE customer <> ''")}
    assert ours_saas == {r["MeteringRecordId"] for r in saas_records}
    led = [name for _, name in sorted((x["timestamp"], r.name) for r in launched for x in r.lines("sender_leading"))]
    print(
        f"batches {len(sent)} (+{1 + len(more)}), without OK at first {without_ok}, resends {resends}, "
        f"resent batches found stored {known}, cross-replica duplicates {duplicates}; killed mid-stream {victim.name} "
        f"({'leader' if victim_led else 'follower'}), mid-send {leader.name} (attempt {attempts} in flight, "
        f"{killed - faulted:.2f} s after the slow fault); led {'>'.join(led)}, lead taken {took_lead:.2f} s and "
        f"resent {resend_after:.2f} s after the kill; backlog placed and sent in {backlog:.1f} s; "
        f"records {len(records)} (+{len(saas_records)} SaaS); "
        f"errors logged {dict(errors) or 0}; "
        f"{time.monotonic() - started:.1f} s"
    )
