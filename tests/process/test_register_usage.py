"""Sidecar mode (--register-usage) as a real process against a real local AWS process over HTTP:
readiness waits for RegisterUsage, and a refusal ends the process with one line."""

from __future__ import annotations

import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.rpc.server import METERING_SERVICE, RECORDER_SERVICE
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import request
from support.processes import SERVE, GatewayProcess, http_json, tool_env
from support.recording import wait_for

PRODUCT = "prod-abc123"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
EXIT_REFUSED = 3


def sidecar(aws_url: str, tmp_path: Path, *extra: str, key: bool = True) -> GatewayProcess:
    """``serve --register-usage PRODUCT`` against the local AWS at ``aws_url``, backoff kept tiny."""
    flags = ["--register-usage", PRODUCT, "--register-usage-key-version", "1"]
    if key:
        published = http_json(aws_url + "/_local/register-usage")
        assert isinstance(published, dict)
        (tmp_path / "seller.pem").write_text(published["publicKey"])
        flags += ["--register-usage-public-key", str(tmp_path / "seller.pem")]
    env = tool_env(
        AWS_ENDPOINT_URL_MARKETPLACE_METERING=aws_url,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="AKIDSIDECARTEST",
        AWS_SECRET_ACCESS_KEY="sidecar-test-secret",
    )
    argv = [*SERVE, "--listen", "127.0.0.1:0", "--aws-backoff-base", "20ms", "--aws-backoff-max", "50ms"]
    return GatewayProcess([*argv, *flags, *extra], env, name="sidecar")


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


def switch(aws_url: str, **switches: bool) -> None:
    http_json(aws_url + "/_local/register-usage", "POST", switches)


def refusal_lines(gw: GatewayProcess) -> list[str]:
    return [line for line in gw.output().splitlines() if line.startswith("metering-gateway:")]


def test_a_subscribed_pod_turns_serving_once_registered(local_aws_url: str, tmp_path: Path) -> None:
    with sidecar(local_aws_url, tmp_path) as gw:
        assert gw.serving["status"] == "NOT_SERVING"
        registered = gw.wait_for(lambda e: e.get("event") == "registered")
        assert (registered["product_code"], registered["verified"], registered["attempts"]) == (PRODUCT, True, 1)
        assert health(gw.target) == health(gw.target, METERING_SERVICE) == SERVING
        published = http_json(local_aws_url + "/_local/register-usage")
        assert isinstance(published, dict)
        [seen] = published["registrations"]
        assert (seen["ProductCode"], seen["Nonce"]) == (PRODUCT, registered["nonce"])
        assert gw.terminate() == 0


@pytest.mark.parametrize(
    ("switches", "words"),
    [
        ({"subscribed": False}, f"the buyer is not subscribed to {PRODUCT} (CustomerNotEntitledException)"),
        ({"platformSupported": False}, "(PlatformNotSupportedException)"),
        ({"regionSupported": False}, "(InvalidRegionException)"),
        ({"wrongKey": True}, "signature does not verify against --register-usage-public-key"),
    ],
    ids=["not-subscribed", "platform-not-supported", "invalid-region", "bad-signature"],
)
def test_a_refused_registration_exits_with_one_line(
    local_aws_url: str, tmp_path: Path, switches: dict[str, bool], words: str
) -> None:
    switch(local_aws_url, **switches)
    with sidecar(local_aws_url, tmp_path) as gw:
        assert gw.wait(30) == EXIT_REFUSED
        [line] = refusal_lines(gw)
        assert line.startswith("metering-gateway: RegisterUsage refused: ") and words in line, gw.tail()
        assert line.endswith("a paid container must stop")
        assert not gw.lines("registered")


def test_throttled_it_stays_not_serving_then_serves(local_aws_url: str, tmp_path: Path) -> None:
    http_json(
        local_aws_url + "/_local/faults",
        "POST",
        {"error": "ThrottlingException", "count": 100000, "operation": "RegisterUsage"},
    )
    with sidecar(local_aws_url, tmp_path, "--spool", str(tmp_path / "spool.sqlite")) as gw:
        gw.wait_for(lambda e: e.get("event") == "register_usage_retry" and e.get("attempt", 0) >= 3)
        # Throttled: nothing is ready, the recorder included, though its spool can write.
        for service in ("", METERING_SERVICE, RECORDER_SERVICE):
            assert health(gw.target, service) == NOT_SERVING, service
        assert gw.alive and not gw.lines("registered")
        http_json(local_aws_url + "/_local/faults", "DELETE")  # AWS stops throttling
        registered = gw.wait_for(lambda e: e.get("event") == "registered")
        assert registered["attempts"] > 3
        wait_for(lambda: health(gw.target, RECORDER_SERVICE) == SERVING, what="the recorder to serve")
        assert health(gw.target) == health(gw.target, METERING_SERVICE) == SERVING
        assert gw.terminate() == 0


def test_without_a_public_key_it_registers_unverified_with_a_warning(local_aws_url: str, tmp_path: Path) -> None:
    with sidecar(local_aws_url, tmp_path, key=False) as gw:
        registered = gw.wait_for(lambda e: e.get("event") == "registered")
        assert registered["verified"] is False
        [warning] = gw.lines("register_usage_unverified")
        assert warning["level"] == "warning"
        assert health(gw.target, METERING_SERVICE) == SERVING


def test_a_sidecar_needs_one_process(tmp_path: Path) -> None:
    done = subprocess.run(
        [*SERVE, "--local", "--register-usage", PRODUCT, "--register-usage-key-version", "1", "--processes", "2"],
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert "--processes 1" in line and "register" in line


def test_sigterm_while_unregistered_drains_and_exits_zero_whatever_aws_then_says(
    local_aws_url: str, tmp_path: Path
) -> None:
    """SIGTERM during the retries ends them; a call in flight still finishes within --grace,
    and an answer AWS would give later (not subscribed) no longer ends the process with 3."""
    faults = local_aws_url + "/_local/faults"
    http_json(faults, "POST", {"error": "ThrottlingException", "count": 100000, "operation": "RegisterUsage"})
    http_json(faults, "POST", {"error": "slow", "count": 1, "delay": 2.0, "operation": "MeterUsage"})
    with sidecar(local_aws_url, tmp_path, "--grace", "8s", "--aws-backoff-max", "1s") as gw:
        gw.wait_for(lambda e: e.get("event") == "register_usage_retry")
        replies: list[Any] = []
        with grpc.insecure_channel(gw.target) as channel:
            call = pb_grpc.MeteringServiceStub(channel).MeterUsage.future(
                request(product_code=PRODUCT, when=datetime.now(UTC)), timeout=15
            )
            time.sleep(0.5)  # the call is with AWS, answered 2 s late
            gw.proc.send_signal(signal.SIGTERM)
            http_json(faults, "DELETE")
            switch(local_aws_url, subscribed=False)  # were it asked again, AWS would refuse
            replies.append(call.result())
        assert gw.wait(30) == 0
        assert replies[0].metering_record_id
        assert gw.lines("register_usage_abandoned") and not refusal_lines(gw)
