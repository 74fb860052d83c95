"""SaaS recorded usage: RecordUsage events/s for SaaS events against container events, and AWS calls per 1,000 records.

Throughput: a real gateway (UsageRecorderService only, its sender never started, as
record_usage.py's throughput runs it) on loopback, an SQLite spool on disk, ``--callers``
caller processes sending batches of 100 and of 1000 back to back. Two kinds of events,
measured alternately (container, SaaS, container, SaaS, … one round each pair, a fresh
spool each measurement) so that whatever else the machine does hits both alike:

- container: record_usage.py's events (product and dimension, a quarter tagged);
- SaaS: the same quantities, dimension and tags, but each naming a customer by
  ``customer_aws_account_id`` (one of ``--customers``, 100000000000 + i) and
  ``license_arn`` (one of two licenses), with no product code (license only).

After ``--warmup`` seconds the events of calls ending in the next ``--seconds`` count;
the table has each kind's median over ``--rounds`` rounds and the ratio SaaS / container
(of the medians) for each batch size.

Calls: against a local AWS backend in this process on a simulated clock (as
tests/process/test_fault_matrix.py runs it), ``--calls-customers`` customers subscribed
over two licenses (of two products), each with usage of two dimensions in one hour (two
events per customer and dimension, recorded through RecordUsage); then the clock passes
the hour and its flush grace and the sender's passes (``sender.tick()``) run until no
record is PENDING. Figures: BatchMeterUsage calls, records AWS kept, calls per 1,000
records (target: at most 40, i.e. every call full), with no faults and again with the
first five calls answering half their records as ``UnprocessedRecords``. Both runs
check exactly once: what AWS bills per customer, dimension and hour equals what was
recorded, no record is FAILED; otherwise the run fails loudly (exit status 1).

Prints a table and, last, one JSON line. Run: ``make bench`` or
``.venv/bin/python benchmarks/saas.py [--rounds 5] [--seconds 4] [--callers 2]``
(``--quick``: a smoke run of a few seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc

from gateway.domain.clock import HOUR
from gateway.domain.validation import BATCH_RECORDS_MAX
from gateway.local_aws import UNPROCESSED, LocalAws
from gateway.observability import logs
from gateway.recording import placement
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from record_usage import ID_SLOT, METHOD, RESULT_TIMEOUT, TESTS, Load, add_event, id_template, mp, recorder

KINDS = ("container", "saas")  # measured in this order, round after round: ABAB…
BATCHES = (100, 1000)
FIRST_ACCOUNT = 100_000_000_000
LICENSES = (
    "arn:aws:license-manager::123456789012:license:l-0a1b2c3d4e5f60718293a4b5c6d7e8f9",
    "arn:aws:license-manager::123456789012:license:l-9f8e7d6c5b4a39281706f5e4d3c2b1a0",
)
PRODUCTS = ("prod-saas-a", "prod-saas-b")  # the licenses' products, as AWS knows them (one each)
DIMENSIONS = ("requests", "gb-scanned")
EVENTS_PER_RECORD = 2  # events per customer, dimension and hour in the calls measurement
RECORD_BATCH = 1000  # events per RecordUsage call in the calls measurement
CALLS_TARGET = 40.0  # BatchMeterUsage calls per 1,000 records with no faults: 25 records in every call
FAULT_CALLS = 5  # calls answered with half their records unprocessed
STEP = 60.0  # simulated seconds between the sender's passes
MAX_PASSES = 200
START_LEAD = 0.5  # seconds from a command to the callers' start: time to build the batches


def license_of(customer: int) -> str:
    return LICENSES[customer % len(LICENSES)]


def account_of(customer: int) -> str:
    return str(FIRST_ACCOUNT + customer)


# --- throughput ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One measurement for one caller process: ``load`` with events of ``kind``."""

    kind: str
    load: Load
    customers: int
    callers: int


def saas_templates(size: int, customers: int) -> list[bytes]:
    """Serialized batches of record_usage.py's events (quantities, tags) as SaaS events,
    ids ``<ID_SLOT>-<i>`` as id_template() makes them; together they name every customer once."""
    now = int(time.time())
    out = []
    for first in range(0, customers, size):
        req = pb.RecordUsageRequest()
        for i in range(size):
            add_event(req, f"{ID_SLOT.decode()}-{i:04d}", i, now)
            ev = req.events[i]
            customer = (first + i) % customers
            ev.product_code = ""
            ev.customer_aws_account_id = account_of(customer)
            ev.license_arn = license_of(customer)
        out.append(req.SerializeToString())
    return out


def drive(index: int, job: Job) -> tuple[int, int, list[str]]:
    """One caller process's part of a measurement → (events counted, failures, examples).

    Each call is one of the kind's templates with its ids made unique in the bytes
    (record_usage.id_template's trick), so building a batch costs the caller microseconds
    and both kinds cost the caller alike."""
    load = job.load
    templates = saas_templates(load.size, job.customers) if job.kind == "saas" else [id_template(load.size)]
    assert all(t.count(ID_SLOT) == load.size for t in templates)
    assert load.tag < 16**3 and index < 16**2
    counted = 0
    failures: list[str] = []
    n = index * len(templates) // job.callers  # callers start at different customers
    with grpc.insecure_channel(load.target) as channel:
        call = channel.unary_unary(
            METHOD, request_serializer=None, response_deserializer=pb.RecordUsageResponse.FromString
        )
        time.sleep(max(0.0, load.start_at - time.time()))
        while time.time() < load.measure_to:
            payload = templates[n % len(templates)].replace(ID_SLOT, f"{load.tag:03x}{index:02x}{n:011x}".encode())
            n += 1
            try:
                reply = call(payload, timeout=30)
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}"[:300])
                time.sleep(0.01)
                continue
            done = time.time()
            if reply.accepted != load.size:
                failures.append(f"accepted {reply.accepted} of {load.size} ({reply.duplicates} duplicates)")
            elif load.measure_from <= done < load.measure_to:
                counted += reply.accepted
    return counted, len(failures), failures[:3]


def saas_caller(
    index: int,
    commands: multiprocessing.Queue[Job | None],
    results: multiprocessing.Queue[tuple[int, tuple[int, int, list[str]]]],
    ready: multiprocessing.Queue[int],
) -> None:
    """A caller process for the whole run (its own GIL): one Job per command until None."""
    ready.put(index)  # imported and waiting: the first measurement does not time a start-up
    while (job := commands.get()) is not None:
        try:
            results.put((index, drive(index, job)))
        except Exception as exc:  # noqa: BLE001 - the parent must always get an answer
            results.put((index, (0, 1, [f"caller {index}: {type(exc).__name__}: {exc}"[:300]])))


def throughput(
    workdir: Path, rounds: int, seconds: float, warmup: float, callers: int, customers: int
) -> dict[str, Any]:
    """Events a second of each kind and batch size: container and SaaS alternately, a fresh
    spool on disk each measurement, ``rounds`` times; medians, and SaaS / container."""
    commands: list[multiprocessing.Queue[Job | None]] = [mp.Queue() for _ in range(callers)]
    results: multiprocessing.Queue[tuple[int, tuple[int, int, list[str]]]] = mp.Queue()
    ready: multiprocessing.Queue[int] = mp.Queue()
    procs = [
        mp.Process(target=saas_caller, args=(i, commands[i], results, ready), name=f"caller-{i}")
        for i in range(callers)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=RESULT_TIMEOUT)
    rates: dict[tuple[str, int], list[float]] = {(k, s): [] for k in KINDS for s in BATCHES}
    cpu_per_event: dict[tuple[str, int], list[float]] = {(k, s): [] for k in KINDS for s in BATCHES}
    failures: list[str] = []
    failed = 0
    tag = 0
    try:
        for r in range(rounds):
            for kind in KINDS:
                spool = workdir / f"throughput-{r}-{kind}.db"
                with recorder(spool) as (target, _):
                    for size in BATCHES if r % 2 == 0 else BATCHES[::-1]:
                        tag += 1
                        start_at = time.time() + START_LEAD
                        load = Load(target, size, tag, 1, start_at, start_at + warmup, start_at + warmup + seconds)
                        for q in commands:
                            q.put(Job(kind, load, customers, callers))
                        # the gateway is this process (its server threads): its CPU while the calls count
                        time.sleep(max(0.0, load.measure_from - time.time()))
                        cpu = time.process_time()
                        time.sleep(max(0.0, load.measure_to - time.time()))
                        cpu = time.process_time() - cpu
                        events = 0
                        for _ in procs:
                            try:
                                _, (e, f, examples) = results.get(timeout=RESULT_TIMEOUT + warmup + seconds)
                            except queue.Empty:
                                raise RuntimeError("a caller process sent no figures") from None
                            events, failed = events + e, failed + f
                            failures += examples
                        rates[(kind, size)].append(round(events / seconds, 1))
                        cpu_per_event[(kind, size)].append(round(cpu / events * 1e6, 2) if events else math.nan)
                        print(
                            f"  round {r + 1} {kind:<9} batches of {size:>4}: {events / seconds:>9,.0f} events/s, "
                            f"gateway {cpu / seconds:.2f} cores, {cpu_per_event[(kind, size)][-1]:.1f} us/event",
                            file=sys.stderr,
                        )
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{spool}{suffix}").unlink(missing_ok=True)
    finally:
        for q in commands:
            q.put(None)
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    out: dict[str, Any] = {}
    for size in BATCHES:
        container, saas = rates[("container", size)], rates[("saas", size)]
        c, s = statistics.median(container), statistics.median(saas)
        out[f"batch_{size}"] = {
            "container_events_per_s": round(c, 1),
            "saas_events_per_s": round(s, 1),
            "ratio": round(s / c, 3) if c else None,
            "container_rounds": container,
            "saas_rounds": saas,
            "round_ratios": [round(b / a, 3) if a else None for a, b in zip(container, saas, strict=True)],
            # CPU of the gateway's process per event counted (medians): where a difference would come from
            "container_gateway_cpu_us_per_event": round(statistics.median(cpu_per_event[("container", size)]), 2),
            "saas_gateway_cpu_us_per_event": round(statistics.median(cpu_per_event[("saas", size)]), 2),
        }
    out.update(failures=failed, failure_examples=failures[:5])
    return out


def throughput_table(t: dict[str, Any], rounds: int, seconds: float, warmup: float, callers: int) -> str:
    rows = [
        f"RecordUsage, spool on disk (SQLite), {callers} caller processes; median of {rounds} alternating "
        f"round(s) of {seconds:g} s after {warmup:g} s warm-up",
        f"{'batch':>5} {'container events/s':>19} {'SaaS events/s':>14} {'SaaS / container':>17}   "
        f"{'gateway CPU us/event: container':>31} {'SaaS':>5}   rounds' ratios",
    ]
    for size in BATCHES:
        e = t[f"batch_{size}"]
        ratio = f"x{e['ratio']:.2f}" if e["ratio"] is not None else "-"
        per_round = " ".join(f"x{v:.2f}" if v is not None else "-" for v in e["round_ratios"])
        rows.append(
            f"{size:>5} {e['container_events_per_s']:>19,.0f} {e['saas_events_per_s']:>14,.0f} {ratio:>17}   "
            f"{e['container_gateway_cpu_us_per_event']:>31.1f} {e['saas_gateway_cpu_us_per_event']:>5.1f}   {per_round}"
        )
    return "\n".join(rows)


# --- AWS calls per 1,000 records ----------------------------------------------------


def usage_events(customers: int, hour: int) -> list[pb.UsageEvent]:
    """EVENTS_PER_RECORD events per customer and dimension, inside ``hour``'s first two minutes."""
    out = []
    for c in range(customers):
        for d, dimension in enumerate(DIMENSIONS):
            for e in range(EVENTS_PER_RECORD):
                ev = pb.UsageEvent(
                    event_id=f"calls-{c}-{d}-{e}",
                    usage_dimension=dimension,
                    customer_aws_account_id=account_of(c),
                    license_arn=license_of(c),
                    usage_quantity=1 + (c + d + e) % 9,
                )
                ev.timestamp.FromSeconds(hour + (c * 7 + e) % 120)
                if c % 4 == 0:
                    ev.tags.add(key="tenant", value=f"t{c % 16}")
                out.append(ev)
    return out


def recorded_usage(events: Sequence[pb.UsageEvent]) -> dict[tuple[str, str, str, int], Decimal]:
    """What was recorded, as AWS should bill it: per license, account, dimension and hour."""
    out: dict[tuple[str, str, str, int], Decimal] = {}
    for ev in events:
        key = (ev.license_arn, ev.customer_aws_account_id, ev.usage_dimension, placement.hour_of(ev.timestamp.seconds))
        out[key] = out.get(key, Decimal(0)) + ev.usage_quantity
    return out


def billed_usage(aws: LocalAws) -> dict[tuple[str, str, str, int], Decimal]:
    out: dict[tuple[str, str, str, int], Decimal] = {}
    for row in aws.saas_usage():
        hour = int(datetime.fromisoformat(row["Hour"]).timestamp())
        key = (row["LicenseArn"], row["CustomerAWSAccountId"], row["Dimension"], hour)
        out[key] = out.get(key, Decimal(0)) + Decimal(row["Quantity"])
    return out


def calls_per_records(workdir: Path, customers: int, fault: bool) -> dict[str, Any]:
    """Record one hour of SaaS usage, then run the sender's passes until nothing is PENDING;
    AWS's calls and records, and whether AWS bills exactly what was recorded."""
    sys.path.insert(0, str(TESTS))
    from support import FIXED_NOW, Clock  # noqa: PLC0415 - the tests' helpers, only here
    from support.recording import running_recorder  # noqa: PLC0415 - the tests' helpers, only here

    clock = Clock(FIXED_NOW)
    hour = placement.hour_of(clock())
    events = usage_events(customers, hour)
    spool = workdir / f"calls-{'fault' if fault else 'clean'}.db"
    grace = 300.0
    with LocalAws(quiet=True, clock=clock) as aws:
        for c in range(customers):
            aws.subscribe(
                customer_aws_account_id=account_of(c),
                license_arn=license_of(c),
                product_code=PRODUCTS[c % len(PRODUCTS)],
            )
        with running_recorder(
            aws.endpoint_url, str(spool), clock=clock, start_sender=False, flush_grace=grace, aws_max_rps=1000.0
        ) as (target, recording):
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.UsageRecorderServiceStub(channel)
                for i in range(0, len(events), RECORD_BATCH):
                    batch = events[i : i + RECORD_BATCH]
                    reply = stub.RecordUsage(pb.RecordUsageRequest(events=batch), timeout=30)
                    assert reply.accepted == len(batch), reply
            clock.advance(hour + HOUR + grace + 1 - clock())  # the hour closed, its grace over
            if fault:
                aws.inject(UNPROCESSED, FAULT_CALLS, operation="BatchMeterUsage")
            calls_before = aws.calls
            began = time.perf_counter()
            passes = 0
            while passes < MAX_PASSES:
                passes += 1
                recording.sender.tick()
                stats = recording.spool.stats()
                if stats.pending == 0 and stats.unassigned_events == 0:
                    break
                clock.advance(STEP)  # past the backoff of what AWS left unprocessed
            send_s = time.perf_counter() - began
            calls = aws.calls - calls_before
        kept = aws.saas_records()
        recorded, billed = recorded_usage(events), billed_usage(aws)
        faults_left = len(aws.faults)
    per_license = Counter(r.license_arn for r in kept)
    fewest = sum(math.ceil(n / BATCH_RECORDS_MAX) for n in per_license.values())  # every call full
    problems = []
    if stats.pending or stats.unassigned_events:
        problems.append(f"{stats.pending} records still PENDING after {passes} passes")
    if stats.failed:
        problems.append(f"{stats.failed} records FAILED")
    if stats.sent != len(kept):
        problems.append(f"the spool has {stats.sent} records SENT, AWS kept {len(kept)}")
    if billed != recorded:
        missing = sum(1 for k in recorded if k not in billed)
        differ = sum(1 for k in recorded if k in billed and billed[k] != recorded[k])
        extra = sum(1 for k in billed if k not in recorded)
        problems.append(
            f"AWS bills {sum(billed.values())} for {len(billed)} customer hours, {sum(recorded.values())} was "
            f"recorded for {len(recorded)} ({missing} missing, {differ} differing, {extra} unrecorded)"
        )
    if fault and faults_left:
        problems.append(f"{faults_left} injected fault(s) never met a call")
    return {
        "customers": customers,
        "events": len(events),
        "records": len(kept),
        "calls": calls,
        "calls_per_1000": round(calls * 1000 / len(kept), 1) if kept else None,
        "fewest_calls": fewest,
        "passes": passes,
        "send_s": round(send_s, 3),
        "recorded_total": str(sum(recorded.values())),
        "billed_total": str(sum(billed.values())),
        "exactly_once": not problems,
        "problems": problems,
    }


def calls(workdir: Path, customers: int) -> dict[str, Any]:
    clean = calls_per_records(workdir, customers, fault=False)
    clean["target"] = (
        "PASS" if clean["calls_per_1000"] is not None and clean["calls_per_1000"] <= CALLS_TARGET else "MISS"
    )
    return {"no_fault": clean, "unprocessed_fault": calls_per_records(workdir, customers, fault=True)}


def calls_table(c: dict[str, Any]) -> str:
    rows = [
        f"SaaS records to AWS (BatchMeterUsage), {c['no_fault']['customers']:,} customers over {len(LICENSES)} "
        f"licenses and {len(DIMENSIONS)} dimensions, one hour:",
        f"  {'':<56} {'records':>8} {'calls':>6} {'calls/1,000':>11} {'fewest':>6} {'exactly once':>12}",
    ]
    labels = (
        ("no_fault", "no faults"),
        ("unprocessed_fault", f"first {FAULT_CALLS} calls leave half their records unprocessed"),
    )
    for key, label in labels:
        e = c[key]
        per = f"{e['calls_per_1000']:.1f}" if e["calls_per_1000"] is not None else "-"
        rows.append(
            f"  {label:<56} {e['records']:>8,} {e['calls']:>6,} {per:>11} {e['fewest_calls']:>6,} "
            f"{'yes' if e['exactly_once'] else 'NO':>12}"
        )
    rows.append(
        f"target calls per 1,000 records with no faults <= {CALLS_TARGET:g}: "
        f"{c['no_fault']['calls_per_1000']} {c['no_fault']['target']}"
    )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="throughput: rounds of both kinds [default 5]")
    parser.add_argument("--seconds", type=float, default=4.0, help="throughput: length of each run [default 4]")
    parser.add_argument("--warmup", type=float, default=0.5, help="throughput: unmeasured seconds first [default 0.5]")
    parser.add_argument("--callers", type=int, default=2, help="throughput: caller processes [default 2]")
    parser.add_argument(
        "--customers", type=int, default=10_000, help="throughput: customers the SaaS events name [default 10000]"
    )
    parser.add_argument(
        "--calls-customers",
        type=int,
        default=1000,
        help="calls: customers with usage (two dimensions each; a multiple of 25 fills every call) [default 1000]",
    )
    parser.add_argument("--only", choices=("throughput", "calls"), help="run one measurement")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: throughput 2 rounds of 0.5 s after 0.2 s; calls for 250 customers",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.warmup, args.calls_customers = 2, 0.5, 0.2, 250
    logs.configure("warning")
    print(f"saas: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, grpcio {grpc.__version__}", file=sys.stderr)
    result: dict[str, Any] = {"benchmark": "saas"}
    with tempfile.TemporaryDirectory(prefix="saas-bench-") as tmp:
        if args.only in (None, "throughput"):
            result["throughput"] = throughput(
                Path(tmp), args.rounds, args.seconds, args.warmup, args.callers, args.customers
            )
            print(throughput_table(result["throughput"], args.rounds, args.seconds, args.warmup, args.callers))
        if args.only in (None, "calls"):
            result["calls"] = calls(Path(tmp), args.calls_customers)
            print(calls_table(result["calls"]))
    result["config"] = {
        "rounds": args.rounds,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "callers": args.callers,
        "customers": args.customers,
        "licenses": len(LICENSES),
        "calls_customers": args.calls_customers,
        "dimensions": len(DIMENSIONS),
        "fault_calls": FAULT_CALLS,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result))
    failed = 0
    for failure in result.get("throughput", {}).get("failure_examples", []):
        print(f"FAILED: {failure}", file=sys.stderr)
    failed += result.get("throughput", {}).get("failures", 0)
    for key, entry in result.get("calls", {}).items():
        for problem in entry["problems"]:
            print(f"FAILED: exactly once ({key}): {problem}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
