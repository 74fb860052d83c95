"""The assembly (gateway/assembly/app.py, `serve`): what a newcomer's first `serve` does, as a real process."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import boto3
import grpc
import pytest
from botocore.config import Config
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.rpc.server import METERING_SERVICE, RECORDER_SERVICE
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import details
from support.pki import Authority
from support.processes import SERVE, gateway_process, tool_env


def test_record_usage_without_a_spool_says_how_to_turn_it_on() -> None:
    with gateway_process() as gw, grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.UsageRecorderServiceStub(channel)
        event = pb.UsageEvent(event_id="e1", product_code="prod-abc123", usage_dimension="requests", usage_quantity=1)
        for call, request in (
            (stub.RecordUsage, pb.RecordUsageRequest(events=[event])),
            (stub.ListMeteringRecords, pb.ListMeteringRecordsRequest()),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, timeout=10)
            got = details(caught.value)
            assert (got.code, got.info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RECORDING_NOT_ENABLED")
            assert "--spool" in got.message and "METERING_GATEWAY_SPOOL" in got.message
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=METERING_SERVICE), timeout=5).status == 1
        with pytest.raises(grpc.RpcError) as caught:  # not SERVING: it serves no usage
            health.Check(health_pb2.HealthCheckRequest(service=RECORDER_SERVICE), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # The refused call is in the access log like any other.
        logged = gw.wait_for(lambda e: e.get("event") == "rpc" and str(e.get("method", "")).endswith("/RecordUsage"))
        assert (logged["code"], logged["reason"]) == ("FAILED_PRECONDITION", "RECORDING_NOT_ENABLED")


def test_products_guard_the_gateway_and_seed_the_local_backend() -> None:
    with (
        gateway_process("--products", "prod-abc123=requests,storage-gb") as gw,
        grpc.insecure_channel(gw.target) as channel,
    ):
        stub = pb_grpc.MeteringServiceStub(channel)

        def meter(product: str, dimension: str) -> pb.MeterUsageResponse:
            request = pb.MeterUsageRequest(
                product_code=product, usage_dimension=dimension, usage_quantity_as_decimal="1"
            )
            request.timestamp.GetCurrentTime()
            return stub.MeterUsage(request, timeout=10)

        assert meter("prod-abc123", "storage-gb").metering_record_id
        for product, dimension, field in (
            ("prod-abc124", "requests", "product_code"),
            ("prod-abc123", "reqests", "usage_dimension"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                meter(product, dimension)
            got = details(caught.value)
            assert (got.code, got.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field])
        # The local backend behind it knows the same list, as AWS knows the seller's listing.
        aws = boto3.client(
            "meteringmarketplace",
            endpoint_url=gw.serving["backend"],
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
            config=Config(retries={"max_attempts": 1}),
        )
        with pytest.raises(aws.exceptions.InvalidProductCodeException):
            aws.meter_usage(
                ProductCode="prod-abc124", Timestamp=datetime.now(UTC), UsageDimension="requests", UsageQuantity=1
            )  # a real process on the wall clock, as AWS is


def serve_fails(*args: str, env: dict[str, str] | None = None) -> str:
    """Start-up's one line on stderr, and exit status 2."""
    result = subprocess.run(
        [*SERVE, "--local", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=tool_env(**(env or {})),
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


def test_a_misspelt_variable_stops_start_up() -> None:
    line = serve_fails(env={"METERING_GATEWAY_SPOLL": "/tmp/spool.db"})
    assert line == (
        "metering-gateway: error: METERING_GATEWAY_SPOLL is set, but no setting has that name: "
        "did you mean METERING_GATEWAY_SPOOL?"
    )


def test_a_bad_certificate_file_is_named_not_blamed_on_the_port(tmp_path: Path) -> None:
    text = tmp_path / "hostname"
    text.write_text("gateway-7f9c\n")
    line = serve_fails("--tls-cert", str(text), "--tls-key", str(text))
    assert f"tls-cert: '{text}' holds no PEM certificate" in line and "listen" not in line
    ca = Authority(tmp_path, "app")
    server, other = ca.issue("server", server=True), ca.issue("other", server=True)
    line = serve_fails("--tls-cert", str(server.cert), "--tls-key", str(other.key))
    assert f"tls-key: '{other.key}' is not the private key of the certificate in '{server.cert}'" in line
