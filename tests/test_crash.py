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

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from recording import event, sums_of_events, wait_for

from gateway.recording import placement
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
HOUR = 3600
CALLERS = 4
BATCH = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


@pytest.fixture
def local_aws_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "local-aws", "--port", str(port)],
                            stdout=open(tmp_path / "local-aws.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _reachable(url + "/_local/records"), what="local-aws to listen")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _reachable(url: str) -> bool:
    try:
        http_json(url)
        return True
    except OSError:
        return False


class GatewayProcess:
    """``python -m gateway serve`` on a spool; its JSON log says where it listens."""

    def __init__(self, tmp_path: Path, aws_url: str, life: int) -> None:
        self.log = tmp_path / f"gateway-{life}.log"
        env = {**os.environ, "AWS_ENDPOINT_URL_MARKETPLACE_METERING": aws_url, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": "AKIDCRASHTEST", "AWS_SECRET_ACCESS_KEY": "crash-test-secret"}
        args = ["serve", "--listen", "127.0.0.1:0", "--spool", str(tmp_path / "spool.db"), "--flush-interval", "200ms",
                "--flush-grace", "0s", "--aws-max-rps", "100", "--flush-on-shutdown", "--grace", "5s"]
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", *args], env=env,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.target = wait_for(self._listening, timeout=30, what="the gateway to serve")

    def _listening(self) -> str | None:
        assert self.proc.poll() is None, self.log.read_text()
        for line in self.log.read_text().splitlines():
            if '"serving"' in line:
                return str(json.loads(line)["listen"])
        return None

    def lines(self, name: str) -> list[dict]:
        return [json.loads(x) for x in self.log.read_text().splitlines() if f'"{name}"' in x]


def make_batch(rng: random.Random, caller: int, n: int) -> list[pb.UsageEvent]:
    now = time.time()
    current = placement.hour_of(now)
    out = []
    for i in range(BATCH):
        hours_back = rng.choice((0, 0, 1, 2, 3))
        when = now if hours_back == 0 else current - hours_back * HOUR + rng.uniform(0, HOUR - 1)
        quantity: int | str = rng.randint(0, 1000) if rng.random() < 0.7 else f"{rng.randint(0, 99)}.{rng.randint(0, 999999):06d}"
        tags = {"tenant": f"t{rng.randint(0, 2)}"} if rng.random() < 0.5 else {}
        out.append(event(f"c{caller}-b{n}-e{i}", when, quantity, product=f"prod-{rng.randint(0, 1)}",
                         dimension=rng.choice(("requests", "gb")), **tags))
    return out


def send(target: str, batch: list[pb.UsageEvent]) -> pb.RecordUsageResponse | None:
    with grpc.insecure_channel(target) as channel:
        try:
            return pb_grpc.UsageRecorderServiceStub(channel).RecordUsage(pb.RecordUsageRequest(events=batch), timeout=5)
        except grpc.RpcError:
            return None


def test_sigkill_and_restart_meter_every_acknowledged_event_once(tmp_path: Path, local_aws_url: str) -> None:
    rng = random.Random()
    batches: list[list[pb.UsageEvent]] = []
    acked: list[bool] = []
    lock = threading.Lock()
    stop = threading.Event()
    first = GatewayProcess(tmp_path, local_aws_url, 1)

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
    wait_for(lambda: len(first.lines("record_sent")) >= 2 and sum(acked) >= 20, timeout=30, what="recording and sending")
    time.sleep(rng.uniform(0, 0.3))
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    stop.set()
    for t in threads:
        t.join()

    second = GatewayProcess(tmp_path, local_aws_url, 2)
    resent = [b for b, ok in zip(batches, acked) if not ok] + rng.sample([b for b, ok in zip(batches, acked) if ok], 5)
    duplicates = 0
    for batch in resent:
        reply = send(second.target, batch)
        assert reply is not None and reply.accepted + reply.duplicates == len(batch)
        duplicates += reply.duplicates
    assert duplicates >= 5 * BATCH  # the acknowledged ones, at least, were known
    more = [make_batch(rng, 99, n) for n in range(3)]
    for batch in more:
        assert send(second.target, batch) == pb.RecordUsageResponse(accepted=BATCH)
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(30) == 0, second.log.read_text()[-3000:]

    records = http_json(local_aws_url + "/_local/records")
    assert isinstance(records, list)
    metered: dict[tuple[str, str], Decimal] = {}
    for r in records:
        key = (r["ProductCode"], r["UsageDimension"])
        metered[key] = metered.get(key, Decimal(0)) + Decimal(r["Quantity"])
    unique = {ev.event_id: ev for batch in batches + more for ev in batch}
    assert metered == sums_of_events(unique.values())
    hours = [(r["ProductCode"], r["UsageDimension"], r["Hour"]) for r in records]
    assert len(hours) == len(set(hours))
    assert not second.lines("record_failed")
    print(f"batches {len(batches)}, without OK before the kill {acked.count(False)}, duplicates on resend "
          f"{duplicates}, carries {len(first.lines('usage_carried') + second.lines('usage_carried'))}, records {len(records)}")
