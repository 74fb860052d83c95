"""RecordUsage through a real gateway, spool on disk: throughput, and latency while a backlog is placed.

Throughput: a real gateway (UsageRecorderService only, its sender never started) on
loopback, a spool in a temporary directory, several caller processes each sending
batches of unique events; events a second for batches of 100 and 1000.

Placement: a fresh spool is preloaded with ``--events`` unassigned events (straight
through ``Spool.record``, 1000 a transaction, spread over the last four hours, three
products, five dimensions and 161 tag sets), then ``Spool.assign`` (what
the sender does first on every pass) runs in a thread of the gateway process while
one caller process sends 100-event RecordUsage batches back to back and times each
call. Its baseline is the same caller on the same spool, in the same run, with no
placement running (measured right after placement ended, so the spool holds the same
events). The figure that matters is the ratio p99 during placement / p99 baseline;
the target from the issue is an absolute p99 under 50 ms during a 300,000-event
placement.

Spools (``--only spools``, run only when named): SQLite (the baseline) against
PostgreSQL with one and two gateway processes, in one run. Each gateway is a real
``python -m gateway serve --spool … --processes N`` (sender running, access log to a
file, AWS at a local backend in its own process) on a fresh spool; PostgreSQL 16 runs
on this machine (tests/support/postgres.py, from the pgserver wheel). ``--spool-callers``
processes of ``--threads`` connections each send batches of 100 and of 1000 back to
back (unique event ids, timestamps now); after ``--warmup`` seconds, the events of
calls ending in the next ``--seconds`` count. ``--rounds`` rounds run the three
set-ups in a rotated order; the table has the median events/s, its ratio to SQLite's
at the same batch size, and the CPU cores each part used (gateway, PostgreSQL,
callers; "other": the rest of the machine's busy time, other programs included),
so a figure can be read against the load it was measured under.

Prints a table and, last, one JSON line. Run: ``make bench`` or
``.venv/bin/python benchmarks/record_usage.py [--seconds 5] [--callers 2] [--events 300000]``,
``.venv/bin/python benchmarks/record_usage.py --only spools [--rounds 3] [--seconds 5]``
(``--quick``: a smoke run of a few seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import multiprocessing.synchronize
import os
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from gateway.assembly.app import recording_servicer
from gateway.config import Settings
from gateway.observability import logs
from gateway.recording.lifecycle import Recording, open_recording
from gateway.recording.servicer import event_row
from gateway.recording.spool.sqlite import SqliteSpool as Spool
from gateway.rpc.server import Gateway
from marketplace.metering.v1 import metering_pb2 as pb

# Callers are spawned, not forked: forking a process with a running gRPC server is unsafe.
mp = multiprocessing.get_context("spawn")
METHOD = "/marketplace.metering.v1.UsageRecorderService/RecordUsage"
LATENCY_BATCH = 100  # events per RecordUsage call while placement runs
PRELOAD_BATCH = 1000  # events per Spool.record transaction when preloading
PRELOAD_HOURS = 4  # preloaded events spread over the last hours: all inside AWS's window, none carried
PRODUCTS = {
    "prod-analytics": ("requests", "gb-scanned"),
    "prod-storage": ("gb-hours",),
    "prod-api": ("calls", "premium-calls"),
}
TENANTS = 40
REGIONS = ("eu-west-1", "us-east-1", "ap-south-1")
P99_TARGET_MS = 50.0  # RecordUsage p99 during a 300,000-event placement (the target)
WARMUP_SECONDS = 0.5
RESULT_TIMEOUT = 120.0  # seconds to wait for a caller's figures after telling it to stop

Sample = tuple[float, float]  # (time.monotonic() when the call began, seconds it took)


# --- throughput ---------------------------------------------------------------------


def add_event(req: pb.RecordUsageRequest, event_id: str, i: int, now: int) -> None:
    """The benchmark's event ``i``: a few quantities, a quarter of them tagged."""
    ev = req.events.add(
        event_id=event_id, product_code="prod-bench", usage_dimension="requests", usage_quantity=1 + i % 7
    )
    ev.timestamp.FromSeconds(now)
    if i % 4 == 0:
        ev.tags.add(key="tenant", value=f"t{i % 16}")


def batches(caller: int, size: int, count: int) -> list[bytes]:
    """Serialized requests with unique event ids, built before the clock starts."""
    now = int(time.time())
    out = []
    for n in range(count):
        req = pb.RecordUsageRequest()
        for i in range(size):
            add_event(req, f"s{size}-c{caller}-{n}-{i}", i, now)
        out.append(req.SerializeToString())
    return out


def caller(
    target: str, payloads: list[bytes], start_at: float, seconds: float, results: multiprocessing.Queue[int]
) -> None:
    """One caller process (its own GIL, so the figure is the gateway's)."""
    sent = 0
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            METHOD, request_serializer=None, response_deserializer=pb.RecordUsageResponse.FromString
        )
        time.sleep(max(0.0, start_at - time.time()))
        end = start_at + seconds
        size = len(pb.RecordUsageRequest.FromString(payloads[0]).events)
        for payload in payloads:
            if time.time() >= end:
                break
            reply = call(payload, timeout=30)
            assert reply.accepted == size, reply
            sent += size
    results.put(sent)


def run(target: str, size: int, seconds: float, callers: int) -> tuple[float, int]:
    count = int(100_000 * seconds / size / callers) + 2  # more than the gateway can take in time
    payloads = [batches(c, size, count) for c in range(callers)]
    results: multiprocessing.Queue[int] = mp.Queue()
    start_at = time.time() + 1.0
    procs = [mp.Process(target=caller, args=(target, p, start_at, seconds, results)) for p in payloads]
    for proc in procs:
        proc.start()
    total = sum(results.get() for _ in procs)
    for proc in procs:
        proc.join()
    exhausted = total >= count * size * callers
    return total / seconds, total if not exhausted else -total


# --- the gateway ------------------------------------------------------------------


@contextmanager
def recorder(spool_path: Path, place: bool = False) -> Iterator[tuple[str, Recording]]:
    """A real gateway with UsageRecorderService on loopback, its sender never started:
    these figures are the recording path's, and placement is run by hand, or (``place``)
    by the prompt placer a served gateway runs, woken by every accepted batch."""
    # flush_interval at its bound (15m): the sender is not started anyway
    conf = dataclasses.replace(
        Settings(), listen="127.0.0.1:0", spool=str(spool_path), flush_interval=900.0, max_workers=8
    ).check()
    recording = open_recording(conf, client=None, start=False, place=place)
    gateway = Gateway(conf, [recording_servicer(recording)])
    try:
        yield f"127.0.0.1:{gateway.start()}", recording
    finally:
        gateway.stop(1)
        recording.close(flush=False, budget=1)


def throughput(workdir: Path, seconds: float, callers: int) -> dict[str, Any]:
    """Events a second without placement (the baseline), then with the prompt placer
    placing what is accepted within a second, as a served gateway does; same run."""
    out: dict[str, Any] = {}
    for place in (False, True):
        label = "placer on " if place else "no placing"
        with recorder(workdir / f"throughput-{place}.db", place=place) as (target, recording):
            for size in (100, 1000):
                rate, total = run(target, size, seconds, callers)
                note = " (callers ran out of batches: raise the count)" if total < 0 else ""
                key = f"batch_{size}" + ("_placer" if place else "")
                ratio = f"  ratio to no placing {rate / out[f'batch_{size}']['events_per_s']:.2f}" if place else ""
                print(
                    f"RecordUsage, batches of {size:>4}, {callers} caller processes, spool on disk, {label}: "
                    f"{rate:>9,.0f} events/s ({abs(total):,} events in {seconds:g}s){ratio}{note}"
                )
                out[key] = {"events_per_s": round(rate, 1), "events": abs(total), "exhausted": total < 0}
            if place:
                out["unplaced_after_placer"] = recording.spool.stats().unassigned_events
    return out


# --- latency while placement runs ----------------------------------------------------


def usage_event(event_id: str, when: float, rng: random.Random) -> pb.UsageEvent:
    """One event as real usage looks: a few products and dimensions, most tagged per tenant."""
    product = rng.choice(list(PRODUCTS))
    ev = pb.UsageEvent(event_id=event_id, product_code=product, usage_dimension=rng.choice(PRODUCTS[product]))
    ev.timestamp.FromNanoseconds(int(when * 1e9))
    roll = rng.random()
    if roll < 0.7:
        ev.tags.add(key="tenant", value=f"t{rng.randrange(TENANTS)}")
    if roll < 0.2:
        ev.tags.add(key="region", value=rng.choice(REGIONS))
    if rng.random() < 0.1:
        ev.usage_quantity_as_decimal = f"{rng.randrange(1, 10_000) / 100:.2f}"
    else:
        ev.usage_quantity = rng.randrange(1, 50)
    return ev


def preload(spool: Spool, events: int, now: float, seed: int = 7) -> float:
    """``events`` unassigned events over the last PRELOAD_HOURS, in time order; returns seconds taken."""
    rng = random.Random(seed)
    began = time.perf_counter()
    span = PRELOAD_HOURS * 3600.0
    for start in range(0, events, PRELOAD_BATCH):
        count = min(PRELOAD_BATCH, events - start)
        rows = [
            event_row(usage_event(f"pre-{i}", now - span + span * i / events, rng)) for i in range(start, start + count)
        ]
        accepted, _ = spool.record(rows)
        assert accepted == count, (accepted, count)
    return time.perf_counter() - began


def latency_request(prefix: str, rng: random.Random) -> bytes:
    now = time.time()
    req = pb.RecordUsageRequest(events=[usage_event(f"{prefix}-{i}", now, rng) for i in range(LATENCY_BATCH)])
    return req.SerializeToString()


def latency_caller(
    target: str,
    commands: multiprocessing.Queue[str | None],
    stop: multiprocessing.synchronize.Event,
    results: multiprocessing.Queue[tuple[str, list[Sample], list[str]]],
) -> None:
    """One caller process: per command, 100-event batches back to back until ``stop``.

    Each request is built before its clock starts; the latency is the call alone.
    Failures are reported, not raised: the parent must always get its figures.
    """
    rng = random.Random(os.getpid())
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            METHOD, request_serializer=None, response_deserializer=pb.RecordUsageResponse.FromString
        )
        while (phase := commands.get()) is not None:
            samples: list[Sample] = []
            failures: list[str] = []
            n = 0
            while not stop.is_set():
                payload = latency_request(f"{phase}-{os.getpid()}-{n}", rng)
                n += 1
                began = time.monotonic()
                try:
                    reply = call(payload, timeout=30)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}"[:300])
                    continue
                samples.append((began, time.monotonic() - began))
                if reply.accepted != LATENCY_BATCH:
                    failures.append(f"accepted {reply.accepted} of {LATENCY_BATCH}")
            results.put((phase, samples, failures))


class Placement(threading.Thread):
    """``Spool.assign`` in a thread of the gateway process, as the sender runs it."""

    def __init__(self, spool: Spool) -> None:
        super().__init__(name="placement", daemon=True)
        self.spool = spool
        self.started_at = self.ended_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            self.spool.assign(time.time())
        except BaseException as exc:  # noqa: BLE001 - reported by the parent
            self.error = exc
        finally:
            self.ended_at = time.monotonic()


def percentile(samples: Sequence[float], p: int) -> float:
    """The ``p``-th percentile (1-99), interpolated between samples."""
    if len(samples) < 2:
        return samples[0] if samples else math.nan
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1]


def figures(latencies: Sequence[float]) -> dict[str, Any]:
    def ms(value: float) -> float | None:
        return None if math.isnan(value) else round(value * 1000, 3)

    return {
        "calls": len(latencies),
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies, default=math.nan)),
    }


def placement_latency(workdir: Path, events: int, baseline_seconds: float, max_seconds: float) -> dict[str, Any]:
    """Preload, then RecordUsage latency during placement and, as the baseline, without it."""
    with recorder(workdir / "placement.db") as (target, recording):
        spool = recording.spool
        preload_s = preload(spool, events, time.time())
        commands: multiprocessing.Queue[str | None] = mp.Queue()
        results: multiprocessing.Queue[tuple[str, list[Sample], list[str]]] = mp.Queue()
        stop = mp.Event()
        proc = mp.Process(target=latency_caller, args=(target, commands, stop, results))
        proc.start()

        def phase(
            name: str, until: Callable[[], bool], begin: Callable[[], None] | None = None
        ) -> tuple[list[Sample], list[str]]:
            stop.clear()
            commands.put(name)
            if begin is not None:
                begin()
            while not until():
                time.sleep(0.01)
            stop.set()
            try:
                got, samples, failures = results.get(timeout=RESULT_TIMEOUT)
            except queue.Empty:
                raise RuntimeError(
                    f"the caller process sent no figures for {name!r} (exit code {proc.exitcode})"
                ) from None
            assert got == name, (got, name)
            return samples, failures

        def after(seconds: float) -> Callable[[], bool]:
            end = time.monotonic() + seconds
            return lambda: time.monotonic() >= end

        placement = Placement(spool)
        deadline = math.inf

        def start_placement() -> None:
            nonlocal deadline
            time.sleep(0.1)  # the caller is calling when placement begins; calls are kept by overlap below
            deadline = time.monotonic() + max_seconds
            placement.start()

        try:
            phase("warmup", after(WARMUP_SECONDS))  # connection, caches, lazy imports: not measured
            backlog = spool.stats().unassigned_events
            during_samples, during_failures = phase(
                "placement", lambda: not placement.is_alive() or time.monotonic() >= deadline, start_placement
            )
            placement.join()
            if placement.error is not None:
                raise placement.error
            baseline_samples, baseline_failures = phase("baseline", after(baseline_seconds))
            commands.put(None)
            proc.join(30)
        finally:
            if proc.is_alive():
                proc.kill()
    during = [
        took for began, took in during_samples if began < placement.ended_at and began + took > placement.started_at
    ]
    # assign() stops when it finds nothing unassigned: what was committed before it ended, it placed
    recorded_meanwhile = sum(1 for began, took in during_samples if began + took < placement.ended_at) * LATENCY_BATCH
    summary: dict[str, Any] = {
        "preloaded_events": events,
        "preload_s": round(preload_s, 3),
        "placed_events": backlog + recorded_meanwhile,
        "placement_s": round(placement.ended_at - placement.started_at, 3),
        "placement_finished_while_calling": placement.ended_at <= deadline,
        "during": figures(during),
        "baseline": figures([took for _, took in baseline_samples]),
        "failures": len(during_failures) + len(baseline_failures),
        "failure_examples": (during_failures + baseline_failures)[:3],
    }
    p99_during, p99_base = summary["during"]["p99_ms"], summary["baseline"]["p99_ms"]
    summary["ratio_p99"] = round(p99_during / p99_base, 3) if p99_during and p99_base else None
    summary["target"] = "PASS" if p99_during is not None and p99_during < P99_TARGET_MS else "MISS"
    return summary


def placement_table(s: dict[str, Any]) -> str:
    def cell(value: float | None) -> str:
        return f"{value:9.1f}" if value is not None else f"{'-':>9}"

    rows = [
        f"placement of {s['placed_events']:,} events ({s['preloaded_events']:,} preloaded, the rest recorded "
        "by the caller): "
        f"{s['placement_s']:.1f} s{'' if s['placement_finished_while_calling'] else ' (the caller stopped first)'}",
        f"RecordUsage, {LATENCY_BATCH} events a call, 1 caller back to back: {'calls':>7} {'p50 ms':>9} "
        f"{'p99 ms':>9} {'max ms':>9}",
    ]
    for name, label in (("baseline", "no placement (baseline)"), ("during", "during placement")):
        f = s[name]
        rows.append(f"  {label:<56} {f['calls']:>7} {cell(f['p50_ms'])} {cell(f['p99_ms'])} {cell(f['max_ms'])}")
    ratio = f"x{s['ratio_p99']:.2f}" if s["ratio_p99"] is not None else "-"
    rows.append(
        f"p99 during placement / baseline: {ratio}; target p99 during placement < {P99_TARGET_MS:g} ms: "
        f"{cell(s['during']['p99_ms']).strip()} ms {s['target']}"
    )
    return "\n".join(rows)


# --- spools: SQLite against PostgreSQL, real server processes ----------------------

SPOOL_BATCHES = (100, 1000)
ID_SLOT = b"@" * 16  # in a template batch's bytes, replaced per call by a unique 16-character prefix
PG_TARGET = 30_000.0  # events/s on PostgreSQL with batches of 1000 (the target)
TESTS = Path(__file__).resolve().parents[1] / "tests"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROLES = ("gateway", "postgres", "callers", "bench")  # whose CPU is counted; "other" is the rest of the machine


@dataclasses.dataclass(frozen=True)
class SpoolSetup:
    database: str  # "sqlite" or "postgresql"
    processes: int  # serve --processes

    @property
    def key(self) -> str:
        return f"{self.database}_p{self.processes}"

    @property
    def label(self) -> str:
        return f"{self.database}, {self.processes} process{'es' if self.processes > 1 else ''}"


SPOOL_SETUPS = (SpoolSetup("sqlite", 1), SpoolSetup("postgresql", 1), SpoolSetup("postgresql", 2))
BASELINE = SPOOL_SETUPS[0]


@dataclasses.dataclass(frozen=True)
class Load:
    """What one caller process does for one measurement: ``threads`` threads, one connection
    each, call back to back from ``start_at``; calls that end in [measure_from, measure_to) count."""

    target: str
    size: int
    tag: int  # unique per measurement: with the caller and thread, it makes every event id unique
    threads: int
    start_at: float
    measure_from: float
    measure_to: float


def id_template(size: int) -> bytes:
    """One serialized batch made as batches() makes them, each event id ``<ID_SLOT>-<i>``.

    A call's ids are made unique by replacing ID_SLOT in the bytes (same length, so
    the encoding stays valid): microseconds a call, where rebuilding the batch would
    cost the caller more CPU than the gateway spends on it.
    """
    now = int(time.time())
    req = pb.RecordUsageRequest()
    for i in range(size):
        add_event(req, f"{ID_SLOT.decode()}-{i:04d}", i, now)
    return req.SerializeToString()


def drive(index: int, load: Load) -> tuple[int, int, int, list[str]]:
    """One caller process's part of a measurement → (events counted, calls counted, failures, examples)."""
    template = id_template(load.size)
    assert template.count(ID_SLOT) == load.size and load.tag < 16**3 and index < 16**2 and load.threads < 16**2
    counted = [0] * load.threads
    calls = [0] * load.threads
    failures: list[str] = []
    # One connection per thread (a local subchannel pool each): with --processes N the kernel
    # spreads connections, not calls, over the processes, so callers hold several.
    channels = [
        grpc.insecure_channel(load.target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(load.threads)
    ]

    def work(thread: int) -> None:
        call = channels[thread].unary_unary(
            METHOD, request_serializer=None, response_deserializer=pb.RecordUsageResponse.FromString
        )
        n = 0
        time.sleep(max(0.0, load.start_at - time.time()))
        while time.time() < load.measure_to:
            payload = template.replace(ID_SLOT, f"{load.tag:03x}{index:02x}{thread:02x}{n:09x}".encode())
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
                counted[thread] += reply.accepted
                calls[thread] += 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(load.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for channel in channels:
        channel.close()
    return sum(counted), sum(calls), len(failures), failures[:3]


def spool_caller(
    index: int,
    commands: multiprocessing.Queue[Load | None],
    results: multiprocessing.Queue[tuple[int, tuple[int, int, int, list[str]]]],
) -> None:
    """A caller process for the whole run (its own GIL): one Load per command until None."""
    while (load := commands.get()) is not None:
        try:
            results.put((index, drive(index, load)))
        except Exception as exc:  # noqa: BLE001 - the parent must always get an answer
            results.put((index, (0, 0, 1, [f"caller {index}: {type(exc).__name__}: {exc}"[:300]])))


def _processes() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, CPU ticks used: user + system) of every process now."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _machine() -> dict[str, int]:
    """The machine's CPU ticks so far: busy (user, nice, system, irq, softirq), idle (with iowait), steal."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "steal": steal}


@dataclasses.dataclass
class CpuSnapshot:
    at: float
    machine: dict[str, int]
    ticks: dict[int, tuple[str, int]]  # pid → (role, ticks) of this run's processes
    others: dict[int, int]  # pid → ticks of every other process


def cpu_snapshot(callers: set[int], postmaster: int) -> CpuSnapshot:
    """Every process of this run by role: this process's children and their descendants are
    the callers, PostgreSQL (the postmaster and its backends), the gateway (``serve`` and its
    workers) and the rest of the benchmark (this process, the local AWS backend)."""
    at, machine, table = time.time(), _machine(), _processes()
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ticks: dict[int, tuple[str, int]] = {me: ("bench", table[me][1])}
    for top in children.get(me, []):
        if top in callers:
            role = "callers"
        elif top == postmaster:
            role = "postgres"
        elif b"\0serve\0" in _cmdline(top):
            role = "gateway"
        else:
            role = "bench"
        stack = [top]
        while stack:
            pid = stack.pop()
            ticks[pid] = (role, table[pid][1])
            stack += children.get(pid, [])
    return CpuSnapshot(at, machine, ticks, {pid: t for pid, (_, t) in table.items() if pid not in ticks})


def cpu_used(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, Any]:
    """Cores used between two snapshots, by role; "other": every other process of the machine."""
    span = (after.at - before.at) * CLOCK_TICKS
    used = dict.fromkeys(ROLES, 0.0)
    for pid, (role, ticks) in after.ticks.items():
        used[role] += ticks - before.ticks.get(pid, (role, 0))[1]
    machine = {k: after.machine[k] - before.machine[k] for k in after.machine}
    out: dict[str, Any] = {role: round(ticks / span, 3) for role, ticks in used.items()}
    out["other"] = round(max(0.0, machine["busy"] - sum(used.values())) / span, 3)
    out["idle"] = round(machine["idle"] / span, 3)
    out["steal"] = round(machine["steal"] / span, 3)
    # who the other load was (other engineers' tests, say): the busiest other programs by name
    busiest: dict[str, float] = {}
    for pid, ticks in after.others.items():
        if ticks > before.others.get(pid, 0):
            name = _comm(pid)
            busiest[name] = busiest.get(name, 0.0) + (ticks - before.others.get(pid, 0)) / span
    out["other_top"] = {k: round(v, 2) for k, v in sorted(busiest.items(), key=lambda kv: -kv[1])[:3]}
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def spools(workdir: Path, rounds: int, seconds: float, warmup: float, callers: int, threads: int) -> dict[str, Any]:
    """SQLite (the baseline) against PostgreSQL with 1 and 2 gateway processes, in one run.

    Each gateway is ``python -m gateway serve`` as in production (sender running, logs to
    a file, AWS at a local backend in its own process) on a fresh spool; each round runs
    the three set-ups (in a rotated order) with both batch sizes, so set-ups that are
    compared share the machine's conditions.
    """
    sys.path.insert(0, str(TESTS))
    import psycopg  # noqa: PLC0415 - only this mode needs them

    from passthrough import CREDS, REGION, child, wait_serving  # noqa: PLC0415 - only this mode needs them
    from support.postgres import PostgresServer  # noqa: PLC0415 - only this mode needs them

    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    tags = iter(range(1, 16**3))
    commands = [mp.Queue() for _ in range(callers)]
    results: multiprocessing.Queue[tuple[int, tuple[int, int, int, list[str]]]] = mp.Queue()
    procs = [
        mp.Process(target=spool_caller, args=(i, commands[i], results), name=f"caller-{i}") for i in range(callers)
    ]
    began = time.monotonic()
    with PostgresServer.temporary() as pg, child(["local-aws", "--port", "0"], "local_aws_started", workdir) as aws:
        postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            CREDS,
            AWS_REGION=REGION,
            AWS_DEFAULT_REGION=REGION,
            AWS_ENDPOINT_URL_MARKETPLACE_METERING=str(aws["endpoint"]),
        )
        for proc in procs:
            proc.start()
        caller_pids = {p.pid for p in procs if p.pid is not None}
        try:
            for r in range(rounds):
                # rotate the order, so no set-up always runs first (or right after another)
                for setup in SPOOL_SETUPS[r % 3 :] + SPOOL_SETUPS[: r % 3]:
                    name = f"spool_{r}_{setup.key}"
                    spool = pg.create_database(name) if setup.database == "postgresql" else str(workdir / f"{name}.db")
                    serve = ["serve", "--listen", "127.0.0.1:0", "--spool", spool, "--processes", str(setup.processes)]
                    with child(serve, "serving", workdir, env) as serving:
                        target = str(serving["listen"])
                        wait_serving(target)
                        for size in SPOOL_BATCHES if r % 2 == 0 else SPOOL_BATCHES[::-1]:
                            start_at = time.time() + 0.2
                            load = Load(
                                target,
                                size,
                                next(tags),
                                threads,
                                start_at,
                                start_at + warmup,
                                start_at + warmup + seconds,
                            )
                            for q in commands:
                                q.put(load)
                            time.sleep(max(0.0, load.measure_from - time.time()))
                            before = cpu_snapshot(caller_pids, postmaster)
                            time.sleep(max(0.0, load.measure_to - time.time()))
                            cpu = cpu_used(before, cpu_snapshot(caller_pids, postmaster))
                            events = calls = failed = 0
                            for _ in procs:
                                try:
                                    _, (e, c, f, examples) = results.get(timeout=RESULT_TIMEOUT)
                                except queue.Empty:
                                    raise RuntimeError("a caller process sent no figures") from None
                                events, calls, failed = events + e, calls + c, failed + f
                                failures += examples
                            run = {
                                "setup": setup.key,
                                "batch": size,
                                "round": r + 1,
                                "events_per_s": round(events / seconds, 1),
                                "calls": calls,
                                "failures": failed,
                                "cpu": cpu,
                            }
                            runs.append(run)
                            print(
                                f"  round {r + 1} {setup.label:<25} batches of {size:>4}: "
                                f"{run['events_per_s']:>9,.0f} events/s"
                                f"  cores: gateway {cpu['gateway']:.2f} postgres {cpu['postgres']:.2f} callers "
                                f"{cpu['callers']:.2f}"
                                f" other {cpu['other']:.2f} idle "
                                f"{cpu['idle']:.2f}{f'  {failed} FAILED' if failed else ''}",
                                file=sys.stderr,
                            )
                    if setup.database == "postgresql":
                        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
                            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
                    else:
                        for suffix in ("", "-wal", "-shm"):
                            Path(spool + suffix).unlink(missing_ok=True)
        finally:
            for q in commands:
                q.put(None)
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
    summary = spool_summary(runs)
    summary.update(
        failures=sum(r["failures"] for r in runs),
        failure_examples=failures[:5],
        elapsed_s=round(time.monotonic() - began, 1),
        runs=runs,
    )
    return summary


def spool_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds per set-up and batch size, and their ratio to SQLite's same batch size."""
    out: dict[str, Any] = {}
    for size in SPOOL_BATCHES:
        for setup in SPOOL_SETUPS:
            mine = [r for r in runs if r["setup"] == setup.key and r["batch"] == size]
            out[f"{setup.key}_b{size}"] = {
                "events_per_s": round(statistics.median(r["events_per_s"] for r in mine), 1),
                "rounds": [r["events_per_s"] for r in mine],
                "cpu": {
                    k: round(statistics.median(r["cpu"][k] for r in mine), 3)
                    for k in (*ROLES, "other", "idle", "steal")
                },
            }
        base = out[f"{BASELINE.key}_b{size}"]["events_per_s"]
        for setup in SPOOL_SETUPS:
            entry = out[f"{setup.key}_b{size}"]
            entry["ratio_to_sqlite"] = round(entry["events_per_s"] / base, 3) if base else None
    out["target"] = {
        f"postgresql_p{n}_b1000": "PASS" if out[f"postgresql_p{n}_b1000"]["events_per_s"] >= PG_TARGET else "MISS"
        for n in (1, 2)
    }
    return out


def spool_table(s: dict[str, Any], rounds: int, seconds: float, warmup: float, callers: int, threads: int) -> str:
    rows = [
        f"RecordUsage by spool: gateway as `serve` processes, sender running; {callers} caller processes x {threads} "
        f"connections; median of {rounds} round(s) of {seconds:g} s after {warmup:g} s warm-up",
        f"{'spool, gateway processes':<26} {'batch':>5} {'events/s':>9} {'vs SQLite':>9}   "
        f"cores used: {'gateway':>7} {'postgres':>8} {'callers':>7} {'other':>6} {'idle':>5}",
    ]
    for size in SPOOL_BATCHES:
        for setup in SPOOL_SETUPS:
            e = s[f"{setup.key}_b{size}"]
            c = e["cpu"]
            ratio = f"x{e['ratio_to_sqlite']:.2f}" if e["ratio_to_sqlite"] is not None else "-"
            rows.append(
                f"{setup.label:<26} {size:>5} {e['events_per_s']:>9,.0f} {ratio:>9}   "
                f"{'':12}{c['gateway']:>7.2f} {c['postgres']:>8.2f} {c['callers']:>7.2f} {c['other']:>6.2f} "
                f"{c['idle']:>5.2f}"
            )
    verdicts = "; ".join(
        f"{n} process{'es' if n > 1 else ''} {s[f'postgresql_p{n}_b1000']['events_per_s']:,.0f} "
        f"{s['target'][f'postgresql_p{n}_b1000']}"
        for n in (1, 2)
    )
    rows.append(f"target PostgreSQL, batches of 1000 >= {PG_TARGET:,.0f} events/s: {verdicts}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run [default 5]")
    parser.add_argument("--callers", type=int, default=2, help="caller processes for throughput [default 2]")
    parser.add_argument(
        "--events", type=int, default=300_000, help="events preloaded before placement [default 300000]"
    )
    parser.add_argument(
        "--baseline-seconds", type=float, default=5.0, help="length of the no-placement baseline [default 5]"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="stop calling after this long even if placement goes on [default 120]",
    )
    parser.add_argument(
        "--only",
        choices=("throughput", "placement", "spools"),
        help="run one measurement; spools (SQLite against PostgreSQL) runs only when named",
    )
    parser.add_argument("--rounds", type=int, default=3, help="spools: rounds over the three set-ups [default 3]")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="spools: unmeasured seconds before each run [default 2]"
    )
    parser.add_argument("--spool-callers", type=int, default=4, help="spools: caller processes [default 4]")
    parser.add_argument(
        "--threads", type=int, default=4, help="spools: threads (connections) per caller process [default 4]"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 s throughput runs, 20,000 events, 1 s baseline; "
        "spools: 1 round of 0.5 s after 0.3 s, 2 callers x 2 threads",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.events, args.baseline_seconds = 1.0, 20_000, 1.0
        if args.only == "spools":
            args.seconds, args.rounds, args.warmup, args.spool_callers, args.threads = 0.5, 1, 0.3, 2, 2
    logs.configure("warning")
    print(
        f"record_usage: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, grpcio {grpc.__version__}",
        file=sys.stderr,
    )
    result: dict[str, Any] = {"benchmark": "record_usage"}
    with tempfile.TemporaryDirectory(prefix="record-usage-") as tmp:
        if args.only in (None, "throughput"):
            result["throughput"] = throughput(Path(tmp), args.seconds, args.callers)
        if args.only in (None, "placement"):
            result["placement"] = placement_latency(Path(tmp), args.events, args.baseline_seconds, args.max_seconds)
            print(placement_table(result["placement"]))
        if args.only == "spools":
            result["spools"] = spools(
                Path(tmp), args.rounds, args.seconds, args.warmup, args.spool_callers, args.threads
            )
            print(
                spool_table(result["spools"], args.rounds, args.seconds, args.warmup, args.spool_callers, args.threads)
            )
    result["config"] = {
        "seconds": args.seconds,
        "callers": args.callers,
        "events": args.events,
        "baseline_seconds": args.baseline_seconds,
        "cpus": os.cpu_count(),
    }
    if args.only == "spools":
        result["config"].update(
            rounds=args.rounds,
            warmup=args.warmup,
            spool_callers=args.spool_callers,
            threads=args.threads,
            load_average=os.getloadavg(),
        )
    print(json.dumps(result))
    failures = 0
    for name in ("placement", "spools"):
        failures += result.get(name, {}).get("failures", 0)
        for failure in result.get(name, {}).get("failure_examples", []):
            print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
