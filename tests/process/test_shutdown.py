"""SIGTERM: health goes NOT_SERVING, new calls are refused, the call in flight finishes (or is cut at the
grace), and the process exits 0 within a 10-second stop, whatever AWS does."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from concurrent import futures
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.local_aws import SLOW
from marketplace.metering.v1 import metering_pb2 as pb
from metering_client import MeteringClient, MeteringError, MeterResult
from support.processes import GatewayProcess, gateway_process, local_aws_records, spooled_gateway
from support.recording import event, event_value, send, wait_for

pytestmark = pytest.mark.slow


def local_aws_url(gw: GatewayProcess) -> str:
    return str(gw.wait_for(lambda e: e.get("event") == "local_aws_started")["endpoint"])


def control(url: str, method: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=10) as reply:
        return json.loads(reply.read())


# The gateway runs as a process, on the wall clock; the calls here take the client's default timestamp, its
# wall-clock now, which is never ahead of the server's. Each call has its own dimension ("slow", "late-N"), so
# nothing assumes two calls share an hour: safe at any minute.


def slow_call_in_flight(
    gw: GatewayProcess, delay: float, pool: futures.Executor, client: MeteringClient
) -> futures.Future[MeterResult]:
    """Start a MeterUsage call that AWS answers ``delay`` seconds late; return once AWS has it."""
    url = local_aws_url(gw) + "/_local/faults"
    control(url, "POST", {"error": SLOW, "delay": delay})
    call = pool.submit(client.meter_usage, product_code="prod-abc123", usage_dimension="slow", quantity=1, timeout=120)
    while control(url, "GET"):  # the fault is taken when the call reaches the local AWS
        assert not call.done(), call.exception()
        time.sleep(0.02)
    return call


def refused_call(target: str) -> str:
    """Call until the server refuses; the dimension of the refused call.

    NOT_SERVING comes first and the refusal right after it, so a call may still
    get in between; the first refusal must come while the slow call is in flight.
    """
    with MeteringClient(target, retry=None, default_timeout=5) as late:
        for n in range(1000):
            try:
                late.meter_usage(product_code="prod-abc123", usage_dimension=f"late-{n}", quantity=1)
            except MeteringError as exc:
                # UNAVAILABLE on a fresh connection, or CANCELLED when the call
                # raced the server's shutdown on an accepted one.
                assert exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                return f"late-{n}"
    raise AssertionError("new calls were never refused")


def test_sigterm_drains_the_call_in_flight_and_exits_0() -> None:
    with (
        gateway_process("--grace", "20s", "--aws-read-timeout", "60s") as gw,
        futures.ThreadPoolExecutor(2) as pool,
        MeteringClient(gw.target, retry=None) as client,
        grpc.insecure_channel(gw.target) as watch_channel,
    ):
        watch = health_pb2_grpc.HealthStub(watch_channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        call = slow_call_in_flight(gw, 3.0, pool, client)

        gw.proc.send_signal(15)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # a stream in flight too: left open, it would hold the drain to the full grace
        gw.wait_for(lambda e: e.get("event") == "shutdown_requested")
        refused = refused_call(gw.target)
        assert not call.done(), "the slow call is still in flight while new ones are refused"

        result = call.result(timeout=30)
        assert result.metering_record_id
        assert gw.proc.wait(timeout=30) == 0
    assert gw.wait_for(lambda e: e.get("event") == "stopped")
    [rpc] = [e for e in gw.lines() if e.get("event") == "rpc" and e.get("usage_dimension") == "slow"]
    assert rpc["code"] == "OK"
    assert not [e for e in gw.lines() if e.get("usage_dimension") == refused], (
        "the refused call never reached the servicer"
    )


def test_a_call_longer_than_the_grace_does_not_hold_the_exit() -> None:
    with (
        gateway_process("--grace", "1s", "--aws-read-timeout", "60s") as gw,
        futures.ThreadPoolExecutor(2) as pool,
        MeteringClient(gw.target, retry=None) as client,
    ):
        call = slow_call_in_flight(gw, 40.0, pool, client)
        started = time.monotonic()
        gw.proc.send_signal(15)
        assert gw.proc.wait(timeout=30) == 0
        took = time.monotonic() - started
        with pytest.raises(MeteringError) as cut:
            call.result(timeout=30)
    assert cut.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert took < 20, f"exit took {took:.1f}s; the grace is 1s and the call would take 40s"


# -- a SIGTERM fits a 10-second stop (docker stop, podman stop), whatever AWS does -------------------------

STOP_TIMEOUT = 10.0  # docker/podman stop's default: SIGKILL this long after SIGTERM
# Only what puts a record in the sender's hands at once; every shutdown setting stays at its default.
SENDING = ("--listen", "127.0.0.1:0", "--flush-interval", "200ms", "--flush-grace", "0s")


def stop_with_calls_in_flight(tmp_path: Path, aws_url: str, spool: str | Path, *flags: str) -> None:
    """SIGTERM while the sender's call and a caller's MeterUsage call wait on a slow AWS.

    The sender's call is recorded by AWS at once and answered a minute late (the
    answer lost on the way back): the record must come back after a restart, resent
    with the same ClientToken, which AWS answers with the record it holds.
    """
    faults = aws_url + "/_local/faults"
    control(faults, "POST", {"error": SLOW, "delay": 60.0, "record": True, "operation": "MeterUsage"})
    first = spooled_gateway(tmp_path, "gateway-1", aws_url, spool, *flags, args=SENDING)
    last_hour = time.time() - 3600  # a closed hour: due at once with --flush-grace 0s
    events = [event(f"stop-{i}", last_hour, i + 1, product="prod-abc123", dimension="stop") for i in range(5)]
    assert send(first.target, events) == pb.RecordUsageResponse(accepted=5)
    [in_flight] = wait_for(lambda: local_aws_records(aws_url), what="the sender's call to reach AWS")
    control(faults, "POST", {"error": SLOW, "delay": 60.0, "count": 10, "operation": "MeterUsage"})
    with futures.ThreadPoolExecutor(1) as pool, MeteringClient(first.target, retry=None) as client:
        call = pool.submit(
            client.meter_usage, product_code="prod-abc123", usage_dimension="slow", quantity=1, timeout=120
        )
        wait_for(lambda: control(faults, "GET")[0]["remaining"] < 10, what="the caller's call to reach AWS")
        assert not call.done()
        started = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        code = first.wait(timeout=30)
        took = time.monotonic() - started
        # The caller heard a definite status before the process was gone, not a hang to its own deadline.
        with pytest.raises(MeteringError) as cut:
            call.result(timeout=1)
    print(f"{' '.join(flags) or 'defaults'}: exit {code} {took:.2f}s after SIGTERM, caller got {cut.value.code.name}")
    assert code == 0, first.tail()
    assert took < STOP_TIMEOUT - 0.5, f"exit took {took:.1f}s after SIGTERM; docker stop kills at {STOP_TIMEOUT:g}s"
    assert cut.value.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), cut.value

    control(faults, "DELETE")
    with spooled_gateway(tmp_path, "gateway-2", aws_url, spool, args=SENDING) as second:
        sent = second.wait_for(lambda e: e.get("event") == "record_sent" and e.get("usage_dimension") == "stop")
        assert second.terminate() == 0
    assert (sent["client_token"], sent["metering_record_id"]) == (
        in_flight["ClientToken"],
        in_flight["MeteringRecordId"],
    )
    assert sent["attempt"] >= 2, "resent, not made anew"
    [record] = [r for r in local_aws_records(aws_url) if r["UsageDimension"] == "stop"]
    assert Decimal(record["Quantity"]) == sum(event_value(ev) for ev in events)  # every acknowledged event, once


def test_defaults_end_within_a_10s_stop_with_calls_in_flight(tmp_path: Path, local_aws_url: str) -> None:
    stop_with_calls_in_flight(tmp_path, local_aws_url, tmp_path / "spool.db")


def test_an_aws_slower_than_every_timeout_does_not_hold_the_exit(tmp_path: Path, local_aws_url: str) -> None:
    """Read timeouts past the grace: the calls in flight are given up on, not waited for."""
    stop_with_calls_in_flight(tmp_path, local_aws_url, tmp_path / "spool.db", "--aws-read-timeout", "60s")


def test_two_processes_end_within_a_10s_stop(tmp_path: Path, local_aws_url: str, postgres_dsn: str) -> None:
    stop_with_calls_in_flight(tmp_path, local_aws_url, postgres_dsn, "--processes", "2", "--aws-read-timeout", "60s")


def test_a_signal_in_the_middle_of_a_log_line_still_stops_the_process() -> None:
    """A SIGTERM handler runs in the main thread between two bytecodes, maybe while it
    writes a log line and holds the log's lock (right after start-up, the local
    backend's warning follows the serving line). The handler only sets the event; had it
    logged, it would wait for that lock for ever and the pod would hang until killed."""
    import subprocess
    import sys

    script = """
import os, signal, sys, structlog
from gateway.assembly import app
from gateway.observability import logs
logs.configure()
stop = app.stop_on_signals()
lock = structlog.WriteLogger(sys.stdout)._lock  # the one lock of every log line to stdout
with lock:  # as if SIGTERM came while the main thread was writing a line
    os.kill(os.getpid(), signal.SIGTERM)
stop.wait(5)
stop.announce()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(x) for x in done.stdout.splitlines()]
    assert (line["event"], line["signal"]) == ("shutdown_requested", "SIGTERM")
