"""What only the PostgreSQL spool has: many replicas on one database, one sender
at a time, schema versions kept in the database, and a database that goes away
and comes back. Its shared rules are tested in test_spool.py, on both databases.

Each "replica" here is a PostgresSpool of its own (its own pool and connections),
as each gateway process has; they race from threads.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import psycopg
import pytest
from psycopg import errors
from test_spool import NOW, row

from gateway.recording import placement
from gateway.recording.placement import EventRow
from gateway.recording.spool import PENDING, SpoolError, SpoolUnavailable, open_spool
from gateway.recording.spool.postgres import SCHEMA_VERSION, PostgresSpool, redact
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import ROOT
from support.postgres import PostgresServer
from support.processes import SERVE, gateway_process, tool_env
from support.recording import event, event_totals, wait_for

HOUR = placement.HOUR


def run_all(*work: Callable[[], object]) -> list[BaseException]:
    """Run each callable in a thread of its own, at once; the exceptions they raised."""
    failures: list[BaseException] = []
    start = threading.Barrier(len(work))

    def run(job: Callable[[], object]) -> None:
        start.wait()
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not [t for t in threads if t.is_alive()], "a job never finished (a deadlock?)"
    return failures


def db_rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchall()


# -- schema --------------------------------------------------------------------------


def test_replicas_starting_together_create_one_schema(postgres_dsn: str) -> None:
    spools: list[PostgresSpool] = []
    assert run_all(*[lambda: spools.append(PostgresSpool(postgres_dsn)) for _ in range(4)]) == []
    assert len({s.spool_id for s in spools}) == 1  # one spool: one ClientToken salt for every replica
    assert db_rows(postgres_dsn, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    for spool in spools:
        spool.close()


def test_the_password_is_never_shown(postgres_server: PostgresServer) -> None:
    assert (
        redact("postgresql://gateway:s3cret@db.example:5433/metering?sslmode=require")
        == "postgresql://gateway@db.example:5433/metering"
    )
    unreachable = f"postgresql://gateway:s3cret@127.0.0.1:{postgres_server.port + 1}/metering?connect_timeout=2"
    with pytest.raises(SpoolError) as caught:
        open_spool(unreachable)
    message = str(caught.value)
    assert "s3cret" not in message and "\n" not in message
    assert message.startswith("cannot connect to postgresql://gateway@127.0.0.1:")


# -- replicas at once -----------------------------------------------------------------


def test_replicas_placing_at_once_put_every_event_in_exactly_one_record(postgres_dsn: str) -> None:
    """Four replicas record overlapping batches and place at once, while a fifth
    freezes records as a sender does: no event goes into two records or none, no
    hour gets two records, and no record grows after it was frozen."""
    replicas = [PostgresSpool(postgres_dsn) for _ in range(4)]
    sender = PostgresSpool(postgres_dsn)
    rng = random.Random(7)
    events = [
        row(
            f"e{i}",
            hour_back=rng.randint(1, 4),
            quantity=str(rng.randint(1, 9)),
            product=rng.choice(("prod-a", "prod-b", "prod-c")),
        )
        for i in range(6000)
    ]
    frozen: dict[int, str] = {}
    done = threading.Event()

    def replica(spool: PostgresSpool, seed: int) -> None:
        mine = random.Random(seed)
        for _ in range(30):
            batch = mine.sample(events, 200)  # overlapping batches, in any order
            spool.record(batch)
            spool.assign(NOW)

    pick = random.Random(rng.random())

    def freeze() -> None:
        while not done.is_set():
            for record in sender.due(NOW, grace=0):
                if record.id not in frozen and pick.random() < 0.3:
                    attempt = sender.begin_attempt(record.id)
                    if attempt is not None:
                        frozen[attempt.id] = attempt.quantity

    freezer = threading.Thread(target=freeze)
    freezer.start()
    try:
        assert run_all(*[lambda s=s, i=i: replica(s, i) for i, s in enumerate(replicas)]) == []
    finally:
        done.set()
        freezer.join()
    replicas[0].record(events)  # whatever no batch happened to carry
    replicas[0].assign(NOW)

    by_id = {e.event_id: e for e in events}
    assigned = db_rows(postgres_dsn, "SELECT event_id, record_id FROM events")
    assert len(assigned) == len(events) and all(record_id is not None for _, record_id in assigned)
    records = {r.id: r for r in replicas[0].list_records(limit=10_000)}
    sums: Counter[int] = Counter()
    for event_id, record_id in assigned:
        sums[int(str(record_id))] += int(by_id[str(event_id)].quantity)
    assert {i: Decimal(r.quantity) for i, r in records.items()} == {i: Decimal(q) for i, q in sums.items()}
    hours = [(r.product_code, r.usage_dimension, r.hour) for r in records.values()]
    assert len(hours) == len(set(hours))
    assert frozen and all(records[i].quantity == q for i, q in frozen.items())  # frozen means frozen
    for spool in (*replicas, sender):
        spool.close()


def test_overlapping_batches_in_opposite_orders_never_deadlock(postgres_dsn: str) -> None:
    a, b = PostgresSpool(postgres_dsn), PostgresSpool(postgres_dsn)
    results: list[tuple[int, int]] = []
    for n in range(20):
        batch = [row(f"r{n}-{i}") for i in range(300)]
        assert run_all(lambda: results.append(a.record(batch)), lambda: results.append(b.record(batch[::-1]))) == []  # noqa: B023 - called before the loop moves on
    assert all(accepted + duplicates == 300 for accepted, duplicates in results)
    assert sum(accepted for accepted, _ in results) == 20 * 300
    a.close()
    b.close()


# -- one sender ---------------------------------------------------------------------


def sender_lock_holders(dsn: str) -> list[int]:
    """The backends holding the sender lock (advisory lock (_LOCKS, 2))."""
    return [
        pid
        for (pid,) in db_rows(
            dsn,
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND "
            "classid = 28007 AND objid = 2 AND objsubid = 2 AND granted",
        )
    ]


def test_one_replica_leads_and_the_next_takes_over_when_it_is_gone(postgres_dsn: str) -> None:
    replicas = [PostgresSpool(postgres_dsn) for _ in range(3)]
    assert [s.leads() for s in replicas] == [True, False, False]
    assert [s.leads() for s in replicas] == [True, False, False]  # and keeps leading
    replicas[0].close()  # a pod stopped: its connection, and so the lock, is gone
    assert [s.leads() for s in replicas[1:]] == [True, False]
    # A leader whose connection is cut (a network partition, the database killing it)
    # knows at its next pass; a replica that asked first meanwhile leads.
    [holder] = sender_lock_holders(postgres_dsn)
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (holder,))
    wait_for(lambda: sender_lock_holders(postgres_dsn) == [], what="the leader's session gone")
    assert replicas[2].leads() is True
    assert replicas[1].leads() is False  # its connection is gone, and the lock is taken
    assert [s.leads() for s in replicas[1:]] == [False, True]
    for spool in replicas[1:]:
        spool.close()


def test_a_leader_cut_off_takes_the_lead_back_in_the_same_call(private_postgres: PostgresServer) -> None:
    """Nobody else wants the lead: the first pass after the cut (the flush at shutdown
    is one pass) leads again at once, on a new connection, instead of giving up."""
    dsn = private_postgres.create_database("spool")
    spool = PostgresSpool(dsn)
    assert spool.leads()
    [holder] = sender_lock_holders(dsn)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (holder,))
    wait_for(lambda: sender_lock_holders(dsn) == [], what="the leader's session gone")
    assert spool.leads() is True
    assert sender_lock_holders(dsn) not in ([], [holder])
    # The same after the whole database went away and came back (what a restart or failover does).
    private_postgres.stop("fast")
    private_postgres.start()
    assert spool.leads() is True
    spool.close()
    assert sender_lock_holders(dsn) == []  # closing gives the lead up at once


# -- the database goes away -------------------------------------------------------------


def test_a_database_outage_is_never_an_acknowledgement_and_recovers(private_postgres: PostgresServer) -> None:
    dsn = private_postgres.create_database("spool")
    spool = PostgresSpool(dsn)
    changes: list[bool] = []
    spool.on_writable(changes.append)
    assert spool.record([row("before")]) == (1, 0)
    for stop in (lambda: private_postgres.stop("fast"), private_postgres.kill):
        stop()
        with pytest.raises(SpoolUnavailable):
            spool.record([row("during")])
        assert not spool.writable and changes[-1] is False
        # From then on a call fails at once: it never asks the pool (and so never waits for it).
        asked = spool._pool.get_stats()["requests_num"]
        with pytest.raises(SpoolUnavailable):
            spool.record([row("during")])
        assert spool._pool.get_stats()["requests_num"] == asked
        assert not spool.probe()
        with pytest.raises(SpoolUnavailable):
            spool.list_records()
        private_postgres.start()
        assert spool.probe() and spool.writable and changes[-1] is True
        spool.assign(NOW)
    assert spool.record([row("during"), row("after")]) == (2, 0)
    assert event_totals(spool) == [("prod-a", "requests", "3")]
    spool.close()


def test_acknowledged_batches_survive_a_database_crash_under_load(private_postgres: PostgresServer) -> None:
    """Writers keep recording while the database is killed and restarted: every batch
    that returned is stored, every one that raised raised SpoolUnavailable, and
    recording resumes once a probe (the gateway's watcher) finds the database back."""
    dsn = private_postgres.create_database("spool")
    spools = [PostgresSpool(dsn) for _ in range(3)]
    acknowledged: list[EventRow] = []
    other_errors: list[BaseException] = []
    refused = 0
    stop = threading.Event()
    lock = threading.Lock()

    def writer(spool: PostgresSpool, w: int) -> None:
        nonlocal refused
        n = 0
        while not stop.is_set():
            batch = [row(f"w{w}-b{n}-e{i}") for i in range(50)]
            n += 1
            try:
                spool.record(batch)
            except SpoolUnavailable:
                with lock:
                    refused += 1
                time.sleep(0.05)
                continue
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                other_errors.append(exc)
                return
            with lock:
                acknowledged.extend(batch)

    def watcher() -> None:
        while not stop.wait(0.2):
            for spool in spools:
                if not spool.writable:
                    spool.probe()

    threads = [threading.Thread(target=writer, args=(s, i)) for i, s in enumerate(spools)]
    threads.append(threading.Thread(target=watcher))
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acknowledged) >= 500, what="writers recording")
        private_postgres.kill()
        # Until every replica has seen the outage (a call waits up to the pool's wait first).
        wait_for(lambda: refused > 0 and not any(s.writable for s in spools), timeout=60, what="the outage seen")
        with lock:
            before_restart = len(acknowledged)
        private_postgres.start()
        wait_for(
            lambda: len(acknowledged) > before_restart + 500, timeout=60, what="recording resumed after the restart"
        )
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not [t for t in threads if t.is_alive()]
    assert other_errors == [] and refused > 0
    stored = {event_id for (event_id,) in db_rows(dsn, "SELECT event_id FROM events")}
    assert {e.event_id for e in acknowledged} <= stored
    for spool in spools:
        spool.close()


def test_pending_records_wait_for_the_database(private_postgres: PostgresServer) -> None:
    dsn = private_postgres.create_database("spool")
    spool = PostgresSpool(dsn)
    spool.record([row("a", 2)])
    private_postgres.stop("immediate")
    with pytest.raises(SpoolUnavailable):
        spool.assign(NOW)
    assert spool.leads() is False  # no database, no lead: nobody sends what it cannot record
    private_postgres.start()
    assert spool.leads()
    assert spool.probe()  # the gateway's watcher probes every second while the spool cannot write
    spool.assign(NOW)
    assert [r.state for r in spool.list_records()] == [PENDING]
    spool.close()


def test_libpq_variables_and_a_password_file_work(
    private_postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--spool postgresql://`` with the rest from libpq's PG* variables, and the
    password from a password file, under real password authentication."""
    private_postgres.password_database("metering", "gateway", "s3cret-pw")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{private_postgres.port}:metering:gateway:s3cret-pw\n")
    passfile.chmod(0o600)
    for name, value in {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(private_postgres.port),
        "PGUSER": "gateway",
        "PGDATABASE": "metering",
        "PGPASSFILE": str(passfile),
    }.items():
        monkeypatch.setenv(name, value)
    spool = open_spool("postgresql://")
    assert spool.location == f"postgresql://gateway@127.0.0.1:{private_postgres.port}/metering"
    assert spool.record([row("a")]) == (1, 0)
    spool.close()
    passfile.write_text(f"127.0.0.1:{private_postgres.port}:metering:gateway:wrong\n")
    with pytest.raises(SpoolError) as caught:
        open_spool("postgresql://")
    assert "password authentication failed" in str(caught.value) and "wrong" not in str(caught.value)


# -- what the review found ------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (errors.DeadlockDetected, False),
        (errors.SerializationFailure, False),
        (errors.QueryCanceled, False),
        (errors.LockNotAvailable, False),
        (errors.AdminShutdown, True),
        (errors.CannotConnectNow, True),
        (errors.ReadOnlySqlTransaction, True),
        (errors.DiskFull, True),
        (psycopg.OperationalError, True),
    ],
)
def test_only_an_outage_stops_the_spool(postgres_dsn: str, error: type[Exception], outage: bool) -> None:
    """A deadlock or a timeout fails one call; an outage (the database gone, shutting
    down, read-only after a failover, out of disk) stops calls until a probe."""
    spool = PostgresSpool(postgres_dsn)
    assert spool._is_outage(error("test")) is outage
    spool.close()


def test_a_busy_pool_is_not_an_outage(postgres_dsn: str) -> None:
    spool = PostgresSpool(postgres_dsn, pool_size=2)
    held = [spool._pool.getconn() for _ in range(2)]  # every connection busy
    with pytest.raises(SpoolUnavailable):
        spool.record([row("a")])
    assert spool.writable  # the database is fine: nothing stops, health stays SERVING
    for conn in held:
        spool._pool.putconn(conn)
    assert spool.record([row("a")]) == (1, 0)
    spool.close()


def test_replicas_placing_while_the_leader_carries_never_deadlock(postgres_dsn: str) -> None:
    """Placement claims events after locking their keys; carry locks the key, then
    the record's events: no circle, so no deadlock, and nothing stops."""
    replicas = [PostgresSpool(postgres_dsn) for _ in range(4)]
    leader = PostgresSpool(postgres_dsn)
    stop = threading.Event()
    carried = 0

    def place(spool: PostgresSpool, k: int) -> None:
        rng, n = random.Random(k), 0
        while not stop.is_set():
            spool.record(
                [
                    row(f"{k}-{n}-{i}", hour_back=2, product=rng.choice(("prod-a", "prod-b")))
                    for i in range(rng.randint(1, 1500))
                ]
            )
            spool.assign(NOW)
            n += 1

    def carry() -> None:
        nonlocal carried
        while not stop.is_set():
            for record in leader.list_records(state=PENDING, limit=50):
                leader.carry(record.id, "DUPLICATE_REQUEST", NOW)
                carried += 1

    def stop_soon() -> None:
        time.sleep(6)
        stop.set()

    failures = run_all(*[lambda s=s, k=k: place(s, k) for k, s in enumerate(replicas)], carry, stop_soon)
    assert failures == [] and carried > 10
    assert all(s.writable for s in (*replicas, leader))
    for spool in (*replicas, leader):
        spool.close()


def test_sessions_keep_commits_durable_and_notice_a_vanished_peer(postgres_dsn: str) -> None:
    """Whatever the database's defaults: commits wait for the log, and the server side
    of every connection (the leader's too) drops a dead peer in about 25 s."""
    spool = PostgresSpool(postgres_dsn)
    assert spool.leads()
    for conn in (spool._leader, spool._pool.getconn()):
        assert conn is not None
        shown = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("synchronous_commit", "tcp_keepalives_idle", "tcp_user_timeout")  # type: ignore[index]
        }
        assert shown == {"synchronous_commit": "on", "tcp_keepalives_idle": "10", "tcp_user_timeout": "25000"}
    spool.close()


def test_an_unparsable_dsn_never_shows_its_password() -> None:
    with pytest.raises(SpoolError) as caught:
        PostgresSpool("postgresql://gw:s3cr%ZZet@db.example/metering")
    assert "s3cr" not in str(caught.value) and "percent-encoded" in str(caught.value)


# -- the password, as a real `serve` prints (or does not print) it -------------------------------


def test_serve_never_prints_the_spool_password(private_postgres: PostgresServer) -> None:
    """``serve --spool postgresql://gateway:PASSWORD@…`` against a database that asks for the
    password (scram): start-up with a wrong one, start-up, calls, an outage and its end, and
    the stop; not one line of its output shows the password, raw or percent-encoded."""
    password = f"pw-{uuid.uuid4().hex}/+"  # characters a DSN must percent-encode, too
    dsn = private_postgres.password_database("metering", "gateway", password)
    encoded = quote(password, safe="")
    url = dsn.replace("gateway@", f"gateway:{encoded}@")
    secrets = (password, encoded, password[3:19])

    wrong = url.replace(encoded, quote(password[::-1], safe=""))
    refused = subprocess.run(
        [*SERVE, "--local", "--listen", "127.0.0.1:0", "--spool", wrong],
        env=tool_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "password authentication failed" in refused.stderr, refused.stderr
    seen = [refused.stdout + refused.stderr]

    with (
        gateway_process("--spool", url, "--flush-interval", "200ms") as gw,
        grpc.insecure_channel(gw.target) as channel,
    ):
        stub = pb_grpc.UsageRecorderServiceStub(channel)
        ok = stub.RecordUsage(pb.RecordUsageRequest(events=[event("a", time.time(), 2)]), timeout=10)
        assert ok.accepted == 1
        private_postgres.stop("fast")
        with pytest.raises(grpc.RpcError):
            stub.RecordUsage(pb.RecordUsageRequest(events=[event("b", time.time(), 2)]), timeout=10)
        gw.wait_for(lambda e: e.get("event") == "spool_unavailable")
        private_postgres.start()
        gw.wait_for(lambda e: e.get("event") == "spool_writable_again")
        assert gw.terminate() == 0
        seen.append(gw.output())
    text = "\n".join(seen)
    assert "postgresql://gateway@127.0.0.1" in text  # where it connects is said, without the password
    for secret in secrets:
        assert secret not in text


def test_spool_create_no_refuses_a_database_without_a_spool(
    postgres_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A DSN pointing at the wrong (empty) database would start over silently: with
    --spool-create no it stops start-up instead; a new spool is always said loudly."""
    dsn = postgres_server.create_database(f"empty_{uuid.uuid4().hex[:8]}")
    with pytest.raises(SpoolError) as refused:
        open_spool(dsn, create="no")
    assert "holds no spool, and --spool-create is no" in str(refused.value)
    open_spool(dsn).close()
    assert "spool_created" in capsys.readouterr().out
    open_spool(dsn, create="no").close()  # once there, it opens as ever


def test_a_commit_that_waited_out_an_outage_does_not_reopen_the_gate(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction that asked for its connection before an outage closed the gate, and
    got one after, proves nothing about the database: only the watcher's probe reopens
    it (on a fresh pool, saying so in the log). The prompt placer made this race common:
    its pass waited on the pool through a restart and reopened the gate itself, so the
    stale pool stayed and ``spool_writable_again`` never came."""
    spool = PostgresSpool(postgres_dsn)
    connection = spool._pool.connection

    @contextmanager
    def outage_noticed_meanwhile(*args: Any, **kwargs: Any) -> Iterator[Any]:
        spool._close_gate(spool._generation, "terminating connection due to administrator command")
        with connection(*args, **kwargs) as conn:
            yield conn

    monkeypatch.setattr(spool._pool, "connection", outage_noticed_meanwhile)
    spool.record([row("waited")])  # commits: the event is stored
    assert not spool.writable
    monkeypatch.undo()
    assert spool.probe() and spool.writable
    assert event_totals(spool) == [("prod-a", "requests", "1")]
    spool.close()
