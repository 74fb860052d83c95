"""Events a second through RecordUsage, spool on disk, batches of 100 and 1000.

A real gateway (UsageRecorderService only, sender idle) on loopback, a spool in a
temporary directory, several caller threads each sending batches of unique
events. Prints one line per batch size. Run: ``make bench-record`` or
``.venv/bin/python benchmarks/record_usage.py [--seconds 5] [--callers 4]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import tempfile
import time
from pathlib import Path

import grpc

from gateway import logs
from gateway.config import Settings
from gateway.recorder import open_recording
from gateway.server import Gateway
from marketplace.metering.v1 import metering_pb2 as pb

# Callers are spawned, not forked: forking a process with a running gRPC server is unsafe.
mp = multiprocessing.get_context("spawn")
METHOD = "/marketplace.metering.v1.UsageRecorderService/RecordUsage"


def batches(caller: int, size: int, count: int) -> list[bytes]:
    """Serialized requests with unique event ids, built before the clock starts."""
    now = int(time.time())
    out = []
    for n in range(count):
        req = pb.RecordUsageRequest()
        for i in range(size):
            ev = req.events.add(event_id=f"s{size}-c{caller}-{n}-{i}", product_code="prod-bench",
                                usage_dimension="requests", usage_quantity=1 + i % 7)
            ev.timestamp.FromSeconds(now)
            if i % 4 == 0:
                ev.tags.add(key="tenant", value=f"t{i % 16}")
        out.append(req.SerializeToString())
    return out


def caller(target: str, payloads: list[bytes], start_at: float, seconds: float, results: "multiprocessing.Queue[int]") -> None:
    """One caller process (its own GIL, so the figure is the gateway's)."""
    sent = 0
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=pb.RecordUsageResponse.FromString)
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
    count = int(60_000 * seconds / size / callers) + 2  # more than the gateway can take in time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--callers", type=int, default=2, help="caller processes")
    args = parser.parse_args()
    logs.configure("warning")
    with tempfile.TemporaryDirectory() as tmp:
        # flush_interval large: this measures recording, not sending
        conf = dataclasses.replace(Settings(), listen="127.0.0.1:0", spool=str(Path(tmp) / "spool.db"),
                                   flush_interval=3600.0, max_workers=8).check()
        recording = open_recording(conf, client=None)
        gateway = Gateway(conf, [recording.servicer])
        target = f"127.0.0.1:{gateway.start()}"
        try:
            for size in (100, 1000):
                rate, total = run(target, size, args.seconds, args.callers)
                note = " (callers ran out of batches: raise the count)" if total < 0 else ""
                print(f"RecordUsage, batches of {size:>4}, {args.callers} caller processes, spool on disk: "
                      f"{rate:>9,.0f} events/s ({abs(total):,} events in {args.seconds:g}s){note}")
        finally:
            gateway.stop(1)
            recording.close(flush=False, budget=1)


if __name__ == "__main__":
    main()
