"""The command line as an operator meets it: serve, health, logs, bad settings."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.local_aws import LocalAws
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import ROOT, request
from support.processes import BIN, GatewayProcess, free_port
from support.recording import wait_for

SECRET = "wJalrXUtnFEMI-K7MDENG-never-in-logs"


def wall_request(**fields: Any) -> pb.MeterUsageRequest:
    """request() stamped one minute ago by the wall clock, for a gateway run as a process.

    Its clock cannot be injected, so the stamp comes from the same wall clock: a
    minute back is never ahead of it and far inside AWS's six hours, and no test
    here meters one dimension twice or assumes an hour, so any minute is safe.
    """
    return request(when=datetime.now(UTC) - timedelta(minutes=1), **fields)


def gateway_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


@contextmanager
def serve(*args: str, env: dict[str, str] | None = None) -> Iterator[GatewayProcess]:
    """``serve --listen 127.0.0.1:0 ARGS`` in this environment plus ``env``; SIGTERM on leaving."""
    with GatewayProcess(gateway_cmd("serve", "--listen", "127.0.0.1:0", *args), {**os.environ, **(env or {})}) as gw:
        assert gw.serving["status"] == "SERVING"
        yield gw


def health(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_cmd("health", "--target", target, "--timeout", "2"), capture_output=True, text=True, timeout=30
    )


def test_serve_local_reports_serving_and_health_agrees() -> None:
    with serve("--local") as gw:
        result = health(gw.target)
        assert result.returncode == 0 and "SERVING" in result.stdout
        assert (
            pb_grpc.MeteringServiceStub(grpc.insecure_channel(gw.target))
            .MeterUsage(wall_request(), timeout=10)
            .metering_record_id
        )
    assert gw.proc.returncode == 0


def test_health_fails_without_a_server() -> None:
    result = health(f"127.0.0.1:{free_port()}")
    assert result.returncode != 0 and "UNAVAILABLE" in result.stderr


def installed_version() -> str:
    """What pip knows of the distribution pyproject.toml names."""
    return metadata.version(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"])


def test_version_prints_the_installed_version() -> None:
    for command in (gateway_cmd("--version"), [str(BIN / "metering-gateway"), "--version"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert (result.returncode, result.stdout, result.stderr) == (0, f"metering-gateway {installed_version()}\n", "")


def test_the_serving_line_says_which_version_serves() -> None:
    with serve("--local") as gw:
        assert gw.serving["version"] == installed_version()
        # Start-up's last log lines out before the SIGTERM on leaving: one that lands while the main
        # thread writes a log line hangs the process (app.py's signal handler logs under the same lock).
        assert health(gw.target).returncode == 0


def test_one_log_line_per_rpc_with_its_fields_and_no_secret() -> None:
    with LocalAws(quiet=True, clock=time.time) as backend:  # beside a gateway process: both on the wall clock
        env = {
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY123456",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_MARKETPLACE_METERING": backend.endpoint_url,
        }
        with serve(env=env) as gw:
            stub = pb_grpc.MeteringServiceStub(grpc.insecure_channel(gw.target))
            stub.MeterUsage(
                wall_request(usage_dimension="logged"), metadata=[("x-request-id", "req-from-caller")], timeout=10
            )
            line = gw.wait_for(lambda e: e.get("event") == "rpc")
    out = gw.output()  # its stdout and stderr
    assert line["method"] == "/marketplace.metering.v1.MeteringService/MeterUsage"
    assert line["code"] == "OK" and line["attempts"] == 1 and line["aws_request_id"]
    assert (line["product_code"], line["usage_dimension"], line["request_id"]) == (
        "prod-abc123",
        "logged",
        "req-from-caller",
    )
    assert isinstance(line["duration_ms"], float)
    assert SECRET not in out + json.dumps(line)
    assert "long-term keys" in out  # the startup warning about access keys


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--listen", "nonsense"], {}, "is not HOST:PORT"),
        (["--listen", "127.0.0.1:70000"], {}, "outside 0-65535"),
        (["--grace", "soon"], {}, "--grace: 'soon' is not a duration"),
        ([], {"METERING_GATEWAY_MAX_WORKERS": "many"}, "METERING_GATEWAY_MAX_WORKERS"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], {}, "no such file"),
        (
            [],
            {"AWS_REGION": "mars-north-1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
            "unknown AWS region 'mars-north-1'",
        ),
        (["--aws-max-rps", "nan"], {}, "--aws-max-rps: nan is not a finite number"),
        ([], {"METERING_GATEWAY_FLUSH_GRACE": "5h"}, "(--flush-grace): 5h is out of range (allowed: 0s..3h)"),
        (["--max-workers", "8", "--max-concurrent-rpcs", "4"], {}, "--max-concurrent-rpcs: 4 is below --max-workers 8"),
    ],
)
def test_bad_configuration_is_one_clear_line(args: list[str], env: dict[str, str], message: str) -> None:
    result = subprocess.run(
        gateway_cmd("serve", *args), capture_output=True, text=True, timeout=30, env={**os.environ, **env}
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metering-gateway: error:") and message in lines[0], result.stderr


def test_port_in_use_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(
            gateway_cmd("serve", "--local", "--listen", f"127.0.0.1:{port}"), capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 2 and "cannot listen on" in result.stderr and "Traceback" not in result.stderr


def test_flags_beat_environment() -> None:
    from gateway.cli import _parser
    from gateway.config import settings_from

    args = _parser().parse_args(["serve", "--grace", "2s", "--local"])
    settings = settings_from(args, env={"METERING_GATEWAY_GRACE": "1m", "METERING_GATEWAY_FLUSH_GRACE": "0s"})
    assert (settings.grace, settings.flush_grace, settings.local) == (2.0, 0.0, True)


def test_help_names_every_env_variable() -> None:
    from gateway.config import SETTINGS_FIELDS, env_name

    text = subprocess.run(gateway_cmd("serve", "--help"), capture_output=True, text=True, timeout=30).stdout
    flat = " ".join(text.split())
    for f in SETTINGS_FIELDS:
        assert env_name(f.name) in flat, f.name


def test_help_gives_the_ranges() -> None:
    text = subprocess.run(gateway_cmd("serve", "--help"), capture_output=True, text=True, timeout=30).stdout
    flat = " ".join(text.split())
    assert "default 5m; range 0s..3h]" in flat and "range 0.1..1000]" in flat
    assert "--max-concurrent-rpcs N" in flat and "--event-retention DURATION" in flat


def test_health_with_a_missing_ca_file_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        gateway_cmd("health", "--target", "127.0.0.1:1", "--tls-ca", str(tmp_path / "none.pem")),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "No such file" in result.stderr and "Traceback" not in result.stderr


def test_processes_share_one_port_and_drain_together() -> None:
    with serve("--local", "--processes", "2") as gw:
        serving = gw.serving
        assert serving["processes"] == 2 and len(serving["pids"]) == 2 and serving["version"] == installed_version()
        for n in range(24):  # each new connection is balanced by the kernel
            with grpc.insecure_channel(gw.target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                pb_grpc.MeteringServiceStub(ch).MeterUsage(wall_request(usage_dimension=f"mp-{n}"), timeout=10)
        gw.proc.send_signal(signal.SIGTERM)
        gw.wait(timeout=30)
    workers = {e.get("worker") for e in gw.lines("rpc") if e.get("event") == "rpc"}
    assert workers == {0, 1}, "both worker processes should have served calls"
    assert gw.proc.returncode == 0


def test_a_dead_worker_fails_the_whole() -> None:
    with serve("--local", "--processes", "2") as gw:
        os.kill(gw.serving["pids"][0], signal.SIGKILL)
        gw.wait(timeout=30)
    assert gw.proc.returncode == 1


def test_processes_and_an_sqlite_spool_are_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        gateway_cmd("serve", "--local", "--processes", "2", "--spool", str(tmp_path / "s.db")),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "needs a PostgreSQL spool" in result.stderr


STATE_SENT = pb.MeteringRecord.STATE_SENT


def test_processes_share_a_postgresql_spool_and_one_of_them_sends(postgres_dsn: str) -> None:
    """Both workers take RecordUsage on one database; an event id is known to both;
    exactly one worker leads the sending."""
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    with serve(
        "--local", "--processes", "2", "--spool", postgres_dsn, "--flush-interval", "200ms", "--flush-grace", "0s"
    ) as gw:
        replies = []
        for n in range(24):  # each new connection is balanced by the kernel
            event = pb.UsageEvent(
                event_id=f"e{n % 12}", product_code="prod-abc123", usage_dimension="requests", usage_quantity=n % 12 + 1
            )
            event.timestamp.FromDatetime(hour_ago)
            with grpc.insecure_channel(gw.target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                replies.append(
                    pb_grpc.UsageRecorderServiceStub(ch).RecordUsage(pb.RecordUsageRequest(events=[event]), timeout=10)
                )
        with grpc.insecure_channel(gw.target) as ch:

            def placed() -> list[pb.MeteringRecord]:
                """Every record once all 12 events are placed and the closed hour is sent. The sender
                may send that hour before the last calls arrive: their events are then carried into
                the open hour, which waits (PENDING) for its own end."""
                listing = pb_grpc.UsageRecorderServiceStub(ch).ListMeteringRecords(
                    pb.ListMeteringRecordsRequest(), timeout=10
                )
                records = list(listing.records)
                done = sum(Decimal(r.quantity) for r in records) == sum(range(1, 13))
                return records if done and STATE_SENT in {r.state for r in records} else []

            records = wait_for(placed, what="the events placed and the hour metered")
        gw.proc.send_signal(signal.SIGTERM)
        gw.wait(timeout=30)
    logged = gw.lines()
    assert {e.get("worker") for e in logged if e["event"] == "rpc" and "RecordUsage" in e["method"]} == {0, 1}
    assert [r.accepted for r in replies] == [1] * 12 + [0] * 12  # the second round: duplicates, whichever worker
    [sent] = [r for r in records if r.state == STATE_SENT]
    assert sent.attempts == 1 and all(r.state == pb.MeteringRecord.STATE_PENDING for r in records if r is not sent)
    assert len({e.get("worker") for e in logged if e["event"] == "sender_leading"}) == 1
    assert gw.proc.returncode == 0
