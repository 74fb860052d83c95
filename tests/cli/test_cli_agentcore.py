"""``--agentcore`` as an operator meets it: a gateway process with the embedded local
backend in Amazon Bedrock AgentCore Runtime mode, and ``local-aws --agentcore``."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import ROOT, allocation, details, request
from support.processes import GatewayProcess, free_port, http_json
from support.recording import wait_for


def serve(*args: str) -> GatewayProcess:
    command = [sys.executable, "-m", "gateway", "serve", "--listen", "127.0.0.1:0", "--local", "--agentcore", *args]
    return GatewayProcess(command, dict(os.environ))


def refused(stub: pb_grpc.MeteringServiceStub, req: pb.MeterUsageRequest) -> tuple[grpc.StatusCode, list[str]]:
    with pytest.raises(grpc.RpcError) as caught:
        stub.MeterUsage(req, timeout=10)
    got = details(caught.value)
    return got.code, got.fields


def test_serve_local_agentcore_applies_agentcore_rules_end_to_end() -> None:
    when = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)  # one stamp: one hour, whenever it runs
    with serve() as gw:
        backend = gw.serving["backend"]
        assert http_json(f"{backend}/_local/mode") == {"agentcore": True}  # the embedded backend plays AgentCore
        stub = pb_grpc.MeteringServiceStub(grpc.insecure_channel(gw.target))
        assert refused(stub, request(when=when)) == (grpc.StatusCode.INVALID_ARGUMENT, ["client_token"])
        tagged = request(
            when=when,
            client_token=str(uuid.uuid4()),
            usage_quantity=3,
            usage_allocations=[allocation(2, team="a"), allocation(1)],
        )
        assert refused(stub, tagged) == (grpc.StatusCode.INVALID_ARGUMENT, ["usage_allocations"])
        ids = {
            stub.MeterUsage(
                request(when=when, usage_quantity=q, client_token=str(uuid.uuid4())), timeout=10
            ).metering_record_id
            for q in (2, 5)
        }
        assert len(ids) == 2  # two records in one hour, with different quantities: both OK
        [usage] = http_json(f"{backend}/_local/usage")
        assert (usage["UsageDimension"], usage["Quantity"]) == ("requests", "7")
    assert gw.proc.returncode == 0


def test_recorded_usage_with_tags_is_refused_in_agentcore_mode(tmp_path: Path) -> None:
    event = pb.UsageEvent(event_id="e-1", product_code="prod-abc123", usage_dimension="requests", usage_quantity=1)
    with serve("--spool", str(tmp_path / "spool.db")) as gw:
        stub = pb_grpc.UsageRecorderServiceStub(grpc.insecure_channel(gw.target))
        tagged = pb.UsageEvent()
        tagged.CopyFrom(event)
        tagged.event_id = "e-2"
        tagged.tags.add(key="team", value="a")
        with pytest.raises(grpc.RpcError) as caught:
            stub.RecordUsage(pb.RecordUsageRequest(events=[event, tagged]), timeout=10)
        got = details(caught.value)
        assert (got.code, got.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["events[1].tags"])
        assert stub.RecordUsage(pb.RecordUsageRequest(events=[event]), timeout=10).accepted == 1


def test_local_aws_agentcore_runs_the_backend_with_agentcores_rules(tmp_path: Path) -> None:
    port = free_port()
    with open(tmp_path / "local-aws.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "local-aws", "--port", str(port), "--agentcore"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _mode(url) is not None, what="local-aws to listen")
        assert _mode(url) == {"agentcore": True}
    finally:
        proc.terminate()
        proc.wait(10)


def _mode(url: str) -> object:
    try:
        return http_json(url + "/_local/mode")
    except OSError:
        return None
