"""kill -9 while callers record: nothing acknowledged is lost, nothing is metered twice.

LocalAws runs as its own process (it outlives the gateway, like AWS), the gateway
as another, on a spool in tmp_path. Callers record batches from several threads;
the gateway is killed with SIGKILL mid-way, restarted on the same spool, every
batch without an OK answer is sent again (and some with one, to hit duplicates),
and SIGTERM with --flush-on-shutdown meters the open hour. Then LocalAws must
hold exactly the sum of the unique events, per product and dimension, with no
product, dimension and hour twice.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support.processes import last_batches_then_sigterm, local_aws_records, spooled_gateway, sums_of_local_records
from support.recording import CRASH_BATCH, make_batch, send, sums_of_events, wait_for

pytestmark = pytest.mark.slow
HOUR = 3600
CALLERS = 4


def test_sigkill_and_restart_meter_every_acknowledged_event_once(
    tmp_path: Path, local_aws_url: str, rng: random.Random
) -> None:
    batches: list[list[pb.UsageEvent]] = []
    acked: list[bool] = []
    lock = threading.Lock()
    stop = threading.Event()
    first = spooled_gateway(tmp_path, "gateway-1", local_aws_url, tmp_path / "spool.db")

    def caller(c: int) -> None:
        crng = random.Random(rng.random())
        n = 0
        with grpc.insecure_channel(first.target) as channel:
            stub = pb_grpc.UsageRecorderServiceStub(channel)
            while not stop.is_set():
                batch = make_batch(crng, c, n)
                n += 1
                try:
                    reply = stub.RecordUsage(pb.RecordUsageRequest(events=batch), timeout=5)
                    ok = reply.accepted == len(batch)
                except grpc.RpcError:
                    ok = False
                with lock:
                    batches.append(batch)
                    acked.append(ok)

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(CALLERS)]
    for t in threads:
        t.start()
    wait_for(
        lambda: len(first.lines("record_sent")) >= 2 and sum(acked) >= 20, timeout=30, what="recording and sending"
    )
    time.sleep(rng.uniform(0, 0.3))
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    stop.set()
    for t in threads:
        t.join()

    second = spooled_gateway(tmp_path, "gateway-2", local_aws_url, tmp_path / "spool.db")
    resent = [b for b, ok in zip(batches, acked, strict=True) if not ok] + rng.sample(
        [b for b, ok in zip(batches, acked, strict=True) if ok], 5
    )
    duplicates = 0
    for batch in resent:
        reply = send(second.target, batch)
        assert reply is not None and reply.accepted + reply.duplicates == len(batch)
        duplicates += reply.duplicates
    assert duplicates >= 5 * CRASH_BATCH  # the acknowledged ones, at least, were known
    more = last_batches_then_sigterm(second, rng)

    records = local_aws_records(local_aws_url)
    metered = sums_of_local_records(records)
    unique = {ev.event_id: ev for batch in batches + more for ev in batch}
    assert metered == sums_of_events(unique.values())
    hours = [(r["ProductCode"], r["UsageDimension"], r["Hour"]) for r in records]
    assert len(hours) == len(set(hours))
    assert not second.lines("record_failed")
    print(
        f"batches {len(batches)}, without OK before the kill {acked.count(False)}, duplicates on resend "
        f"{duplicates}, carries {len(first.lines('usage_carried') + second.lines('usage_carried'))}, records "
        f"{len(records)}"
    )
