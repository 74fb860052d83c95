"""What each health status follows, as probes and callers see it.

The overall status ``""`` (liveness) and MeteringService's (readiness, the Helm chart's probes)
follow only the process: neither the spool nor AWS. The recorder's follows the spool's
writability, and callers that balance over the replicas themselves (round_robin with
client-side health checking, docs/deploy.md) skip a replica whose recorder is down.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.local_aws import LocalAws
from gateway.recording.spool.sqlite import SqliteSpool
from gateway.rpc.server import METERING_SERVICE, RECORDER_SERVICE
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import Clock, details, request
from support.postgres import PostgresServer
from support.processes import BIN, gateway_process, http_json, spooled_gateway, tool_env
from support.recording import event, running_recorder, wait_for

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
ALL = ("", METERING_SERVICE, RECORDER_SERVICE)


def status(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def statuses(channel: grpc.Channel) -> dict[str, int]:
    return {s: status(channel, s) for s in ALL}


def health_command(target: str, service: str) -> int:
    """``metering-gateway health`` (the image's HEALTHCHECK) for one service: its exit code."""
    return subprocess.run(
        [str(BIN / "metering-gateway"), "health", "--target", target, "--service", service],
        env=tool_env(),
        capture_output=True,
        timeout=30,
    ).returncode


def test_only_the_recorder_follows_the_database_and_nothing_follows_aws(
    tmp_path: Path, local_aws_url: str, private_postgres: PostgresServer
) -> None:
    dsn = private_postgres.create_database("spool")
    with (
        spooled_gateway(tmp_path, "gateway", local_aws_url, dsn) as gateway,
        grpc.insecure_channel(gateway.target) as channel,
    ):
        metering = pb_grpc.MeteringServiceStub(channel)
        recorder = pb_grpc.UsageRecorderServiceStub(channel)
        assert statuses(channel) == dict.fromkeys(ALL, SERVING)

        # AWS fails every call (unreachable, then failing): MeterUsage says so, no status moves.
        http_json(local_aws_url + "/_local/faults", "POST", {"error": "drop", "count": 1000, "operation": "MeterUsage"})
        with pytest.raises(grpc.RpcError) as err:
            metering.MeterUsage(request(when=datetime.now(UTC)), timeout=30)
        assert details(err.value).info.reason == "AWS_UNREACHABLE"
        recorder.RecordUsage(pb.RecordUsageRequest(events=[event("during-aws-outage", time.time() - 3600)]), timeout=10)
        time.sleep(1.5)  # the sender's passes (every 200ms here) meet the failing AWS too
        assert statuses(channel) == dict.fromkeys(ALL, SERVING)
        http_json(local_aws_url + "/_local/faults", "DELETE")

        # The database goes away: the recorder turns NOT_SERVING, "" and MeteringService stay SERVING,
        # MeterUsage goes on.
        private_postgres.stop("fast")
        with pytest.raises(grpc.RpcError) as err:
            recorder.RecordUsage(pb.RecordUsageRequest(events=[event("during-db-outage", time.time())]), timeout=10)
        assert details(err.value).info.reason == "SPOOL_UNAVAILABLE"
        wait_for(lambda: statuses(channel)[RECORDER_SERVICE] == NOT_SERVING, what="the recorder NOT_SERVING")
        for _ in range(3):  # across the watcher's failing probes (one a second)
            assert statuses(channel) == {"": SERVING, METERING_SERVICE: SERVING, RECORDER_SERVICE: NOT_SERVING}
            time.sleep(0.7)
        assert metering.MeterUsage(request(when=datetime.now(UTC)), timeout=30).metering_record_id
        assert health_command(gateway.target, "") == 0
        assert health_command(gateway.target, METERING_SERVICE) == 0
        assert health_command(gateway.target, RECORDER_SERVICE) != 0

        private_postgres.start()
        wait_for(lambda: statuses(channel)[RECORDER_SERVICE] == SERVING, what="the recorder back")
        assert statuses(channel) == dict.fromkeys(ALL, SERVING)


# What docs/deploy.md tells callers of RecordUsage to set on a channel to every replica.
HEALTH_CHECKED = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": RECORDER_SERVICE}}
)


def test_round_robin_with_client_side_health_checks_skips_a_replica_whose_recorder_is_down(
    local_aws: LocalAws, tmp_path: Path
) -> None:
    clock = Clock(time.time(), running=True)
    with (
        running_recorder(local_aws.endpoint_url, str(tmp_path / "a.db"), clock=clock, start_sender=False) as (a, ra),
        running_recorder(local_aws.endpoint_url, str(tmp_path / "b.db"), clock=clock, start_sender=False) as (b, rb),
    ):
        # b's volume fills up: a call to it fails and its recorder turns NOT_SERVING (and stays so).
        assert isinstance(rb.spool, SqliteSpool)
        db = rb.spool._db
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count = {pages}")
        with grpc.insecure_channel(b) as direct, pytest.raises(grpc.RpcError):
            big = [event(f"fill-{i}", clock() - 60, tenant="x" * 200 + str(i)) for i in range(300)]
            pb_grpc.UsageRecorderServiceStub(direct).RecordUsage(pb.RecordUsageRequest(events=big), timeout=10)
        with grpc.insecure_channel(b) as direct:
            assert status(direct, RECORDER_SERVICE) == NOT_SERVING

        options = [("grpc.service_config", HEALTH_CHECKED), ("grpc.enable_retries", 0)]
        with grpc.insecure_channel(f"ipv4:{a},{b}", options=options) as channel:
            stub = pb_grpc.UsageRecorderServiceStub(channel)
            for i in range(20):  # round_robin alone would send every other call to b, and fail it
                stub.RecordUsage(
                    pb.RecordUsageRequest(events=[event(f"e{i}", clock())]), timeout=10, wait_for_ready=True
                )
            assert ra.spool.stats().unassigned_events == 20

            db.execute("PRAGMA max_page_count = 1073741823")  # room again: b's probe sees it, b serves again
            with grpc.insecure_channel(b) as direct:
                wait_for(lambda: status(direct, RECORDER_SERVICE) == SERVING, what="b's recorder back")

            def reaches_b() -> bool:
                n = int(time.monotonic() * 1000)
                stub.RecordUsage(pb.RecordUsageRequest(events=[event(f"later-{n}", clock())]), timeout=10)
                return rb.spool.stats().unassigned_events > 0

            wait_for(reaches_b, what="calls to b again")


def health_output(target: str, service: str) -> subprocess.CompletedProcess[str]:
    """``metering-gateway health --service SERVICE``, with what it printed."""
    return subprocess.run(
        [str(BIN / "metering-gateway"), "health", "--target", target, "--service", service],
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_an_unknown_service_is_named_along_with_those_the_gateway_has() -> None:
    with gateway_process() as gateway:
        done = health_output(gateway.target, "nope")
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"{gateway.target}: NOT_FOUND: no health status for service 'nope'; "), line
    assert f"'{METERING_SERVICE}'" in line and "'' (the whole server)" in line, line


def test_a_bare_not_found_from_another_server_still_says_what_was_not_found() -> None:
    """grpcio's own health servicer answers an unknown service with NOT_FOUND and no message."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        done = health_output(f"127.0.0.1:{port}", "nope")
    finally:
        server.stop(0)
    assert done.returncode == 1
    assert done.stderr == f"127.0.0.1:{port}: NOT_FOUND: no health status for service 'nope'\n"
