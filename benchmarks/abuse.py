"""Hostile callers against a real gateway process: what they cost it, and whether health holds.

The long version of tests/process/test_abuse.py, with figures. A gateway (``serve --local``
with an SQLite spool) runs in its own process from ``--source`` (default: this
checkout; give an older checkout to compare releases). Against it, in turn:

- **tag bomb**: a MeterUsage with one allocation of 262,144 empty tags (512 KiB),
  then a RecordUsage with as many on one event, then a BatchMeterUsage with as many
  on one allocation of its one record (whose customer is named validly): the status
  each got, the size of its trailers, and how long it took;
- **idle connections**: ``--connections`` (20,000) TCP connections that say the
  HTTP/2 preface and then nothing, from helper processes, held ``--hold`` seconds;
  how many the gateway still holds open at the end.

Throughout, a watcher asks health every 100 ms on a *new* connection each time
(what a kubelet probe or a new caller does) and the figures are its latencies and
failures, next to a baseline before any attack, and the gateway's peak RSS (VmHWM)
after each attack. Prints a table and one JSON line; exits non-zero only when the
gateway died.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from marketplace.metering.v1 import metering_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS


def tag_bombs(tags: int) -> dict[str, tuple[str, bytes]]:
    """MeterUsage, RecordUsage and BatchMeterUsage requests with ``tags`` empty tags on one
    element (two bytes each)."""
    return {
        "MeterUsage": (
            "/marketplace.metering.v1.MeteringService/MeterUsage",
            pb.MeterUsageRequest(
                product_code="prod",
                usage_allocations=[pb.UsageAllocation(allocated_usage_quantity=1, tags=[pb.Tag()] * tags)],
            ).SerializeToString(),
        ),
        "RecordUsage": (
            "/marketplace.metering.v1.UsageRecorderService/RecordUsage",
            pb.RecordUsageRequest(events=[pb.UsageEvent(event_id="e", tags=[pb.Tag()] * tags)]).SerializeToString(),
        ),
        "BatchMeterUsage": (
            "/marketplace.metering.v1.MeteringService/BatchMeterUsage",
            pb.BatchMeterUsageRequest(
                usage_records=[
                    pb.UsageRecord(
                        customer_aws_account_id="123456789012",
                        license_arn="arn:aws:license-manager::123456789012:license:l-0123456789abcdef",
                        dimension="d",
                        quantity_as_decimal="1",
                        usage_allocations=[
                            pb.UsageAllocation(allocated_usage_quantity_as_decimal="1", tags=[pb.Tag()] * tags)
                        ],
                    )
                ]
            ).SerializeToString(),
        ),
    }


class Gateway:
    def __init__(self, source: Path, directory: Path) -> None:
        env = {**os.environ, "PYTHONPATH": f"{source}{os.pathsep}{source / 'clients' / 'python' / 'src'}"}
        env = {k: v for k, v in env.items() if not k.startswith("METERING_GATEWAY_")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--local",
                "--listen",
                "127.0.0.1:0",
                "--spool",
                str(directory / "spool.db"),
            ],
            cwd=source,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if '"serving"' in line:
                self.target = json.loads(line)["listen"]
                break
        else:
            raise SystemExit(f"the gateway from {source} did not start")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def status(self, key: str) -> int:
        """A /proc/PID/status figure in bytes (VmHWM, VmRSS), or a count (FDSize is not: open fds)."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(f"{key}:"))

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Watcher:
    """Health checks every 100 ms: each on a new connection (a probe, a new caller), or all on
    one kept open (a caller with a pooled channel)."""

    def __init__(self, target: str, *, new_connections: bool) -> None:
        self.target = target
        self.new_connections = new_connections
        self.samples: list[tuple[float, float | None]] = []  # (when, seconds or None on failure)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _check(self, channel: grpc.Channel) -> bool:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    def _run(self) -> None:
        kept = None if self.new_connections else grpc.insecure_channel(self.target)
        while not self._stop.wait(0.1):
            started = time.monotonic()
            if kept is None:
                with grpc.insecure_channel(self.target) as channel:
                    ok = self._check(channel)
            else:
                ok = self._check(kept)
            self.samples.append((started, time.monotonic() - started if ok else None))
        if kept is not None:
            kept.close()

    def between(self, start: float, end: float) -> dict[str, Any]:
        window = [s for t, s in self.samples if start <= t <= end]
        answered = sorted(s for s in window if s is not None)
        return {
            "checks": len(window),
            "failed": len(window) - len(answered),
            "p50_ms": round(statistics.median(answered) * 1000, 1) if answered else None,
            "max_ms": round(answered[-1] * 1000, 1) if answered else None,
        }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def hold_connections(target: str, count: int, hold: float, opened: Any) -> None:
    """In a helper process: ``count`` idle HTTP/2 connections, held ``hold`` seconds; counts the
    ones still open at the end into ``opened``."""
    host, port = target.rsplit(":", 1)
    conns = []
    for _ in range(count):
        try:
            conn = socket.create_connection((host, int(port)), timeout=5)
            conn.sendall(PREFACE)
            conn.setblocking(False)
            conns.append(conn)
        except OSError:
            break
    time.sleep(hold)
    still = 0
    for conn in conns:
        try:
            while conn.recv(65536):  # what the server sent (SETTINGS, GOAWAY), then EOF if it closed
                pass
        except BlockingIOError:
            still += 1  # all read, and not closed
        except OSError:
            pass
        conn.close()
    with opened.get_lock():
        opened.value += still


def idle_connections(target: str, connections: int, hold: float) -> int:
    per_process = 5000
    # Spawned, not forked: a child forked while this process's gRPC threads run (the watchers)
    # can abort in gRPC's poller (two of five full runs), and its connections are never made.
    spawn = multiprocessing.get_context("spawn")
    opened = spawn.Value("i", 0)
    helpers = [
        spawn.Process(target=hold_connections, args=(target, min(per_process, connections - i), hold, opened))
        for i in range(0, connections, per_process)
    ]
    for helper in helpers:
        helper.start()
    for helper in helpers:
        helper.join(hold + 120)
    failed = [helper.exitcode for helper in helpers if helper.exitcode != 0]
    if failed:
        print(f"warning: helper processes failed (exit codes {failed}): fewer connections were made", file=sys.stderr)
    return int(opened.value)


@contextmanager
def window(
    watchers: dict[str, Watcher], results: dict[str, Any], name: str, gateway: Gateway
) -> Iterator[dict[str, Any]]:
    started = time.monotonic()
    entry: dict[str, Any] = {}
    yield entry
    time.sleep(0.5)
    for kind, watcher in watchers.items():
        entry[f"health_{kind}"] = watcher.between(started, time.monotonic())
    entry["peak_rss_mib"] = round(gateway.status("VmHWM") / 2**20, 1)
    results[name] = entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=ROOT, help="the checkout whose gateway runs (default: this one)")
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds the idle connections are held")
    parser.add_argument("--quick", action="store_true", help="500 connections held 2 s (the smoke test's run)")
    parser.add_argument(
        "--only",
        choices=("tag-bomb", "connections"),
        help="one attack alone (its peak RSS then is its own, not the larger of both)",
    )
    ns = parser.parse_args()
    if ns.quick:
        ns.connections, ns.hold = 500, 2.0
    results: dict[str, Any] = {"benchmark": "abuse", "source": str(ns.source), "connections": ns.connections}
    with tempfile.TemporaryDirectory() as tmp:
        gateway = Gateway(ns.source, Path(tmp))
        watchers = {
            "new": Watcher(gateway.target, new_connections=True),
            "kept": Watcher(gateway.target, new_connections=False),
        }
        try:
            with window(watchers, results, "baseline", gateway) as entry:
                time.sleep(2)
                entry["rss_mib"] = round(gateway.status("VmRSS") / 2**20, 1)
            with grpc.insecure_channel(gateway.target) as channel:
                for name, (method, payload) in tag_bombs(262_144).items() if ns.only != "connections" else ():
                    with window(watchers, results, f"tag bomb {name}", gateway) as entry:
                        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
                        started = time.monotonic()
                        try:
                            call(payload, timeout=60)
                            entry["answer"] = "OK"
                        except grpc.RpcError as exc:
                            entry["answer"] = exc.code().name
                            entry["trailer_bytes"] = sum(
                                len(m.key) + len(m.value) for m in exc.trailing_metadata() or ()
                            )
                        entry["seconds"] = round(time.monotonic() - started, 3)
                        entry["request_bytes"] = len(payload)
            if ns.only != "tag-bomb":
                with window(watchers, results, "idle connections", gateway) as entry:
                    entry["still_open"] = idle_connections(gateway.target, ns.connections, ns.hold)
                    entry["gateway_fds_after"] = gateway.open_fds()
            results["alive"] = gateway.proc.poll() is None
        finally:
            for watcher in watchers.values():
                watcher.stop()
            gateway.stop()
    print(f"gateway from {ns.source}; health every 100 ms on a new connection each time | on one kept open")
    print(
        f"{'phase':<24} {'answer':<18} {'peak RSS':>9} | {'p50':>6} {'max':>8} {'failed':>7} | {'p50':>6} "
        f"{'max':>8} {'failed':>7}"
    )
    for name in (
        "baseline",
        "tag bomb MeterUsage",
        "tag bomb RecordUsage",
        "tag bomb BatchMeterUsage",
        "idle connections",
    ):
        if name not in results:
            continue
        entry = results[name]
        answer = entry.get("answer", f"{entry['still_open']} held open" if "still_open" in entry else "")
        cells = []
        for kind in ("new", "kept"):
            h = entry[f"health_{kind}"]
            cells.append(f"{h['p50_ms'] or '-':>6} {h['max_ms'] or '-':>8} {h['failed']:>3}/{h['checks']:<3}")
        print(f"{name:<24} {answer:<18} {entry['peak_rss_mib']:>5} MiB | {cells[0]} | {cells[1]}")
    print(json.dumps(results))
    return 0 if results["alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
