"""The Node.js caller (clients/node) against a live gateway: @grpc/grpc-js on the proto as-is."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import grpc
import pytest

from gateway.domain import errors
from gateway.local_aws import LocalAws
from gateway.metering.service import MeteringServicer
from marketplace.metering.v1 import metering_pb2 as pb
from support import ROOT, Clock, running_gateway, unchecked, using_clock

NODE_DIR = ROOT / "clients" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def node() -> None:
    if NODE is None or NPM is None:
        unchecked("node and npm are not installed: the Node.js caller (clients/node) is unchecked")


@pytest.fixture(scope="module")
def node_modules() -> None:
    """``npm ci`` once; kept in clients/node/node_modules until the lock file changes."""
    marker = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime:
        return
    done = subprocess.run(
        [str(NPM), "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def clock() -> Iterator[Clock]:
    """The gateway's and local AWS's clock (running_gateway's default too): fixed, at the real time the test starts.

    meter.js and count.js stamp their calls with node's own wall clock (``new
    Date()``), which no test can set. That stamp is a moment after this instant,
    well inside the 5-minute skew, and each script run makes at most one record,
    so nothing assumes two calls share an hour: safe at any minute.
    """
    with using_clock(Clock(time.time())) as fixed:
        yield fixed


def test_node_meters_and_decodes_field_violations(node_modules: None, gateway_target: str, local_aws: LocalAws) -> None:
    run = subprocess.run(
        [str(NODE), "meter.js", gateway_target], cwd=NODE_DIR, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    valid, invalid = (json.loads(line) for line in run.stdout.splitlines())

    [record] = local_aws.records()
    assert valid == {"call": "valid", "ok": True, "metering_record_id": record.metering_record_id, "dry_run": False}
    assert record.quantity == Decimal("3.5") and record.client_token  # the script's own UUID
    assert {tuple(sorted(tags)): q for tags, q in record.allocations} == {
        (("team", "search"),): Decimal("2.25"),
        (): Decimal("1.25"),
    }

    assert (invalid["ok"], invalid["code"], invalid["reason"], invalid["domain"]) == (
        False,
        "INVALID_ARGUMENT",
        "INVALID_REQUEST",
        "metering-gateway",
    )
    assert [v["field"] for v in invalid["fieldViolations"]] == [
        "product_code",
        "usage_allocations[0].tags[0].key",
        "usage_allocations",
    ]
    assert all(v["description"] for v in invalid["fieldViolations"])
    assert local_aws.calls == 1  # the refused request never reached AWS


def count(target: str) -> dict[str, Any]:
    """One MeterUsage through meter.js's client (its retry policy) via count.js."""
    run = subprocess.run([str(NODE), "count.js", target], cwd=NODE_DIR, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    out: dict[str, Any] = json.loads(run.stdout)
    return out


@pytest.mark.parametrize("aws_max_attempts", [4, 2])
def test_node_retries_never_multiply_the_gateways_aws_attempts(
    node_modules: None, local_aws: LocalAws, aws_max_attempts: int
) -> None:
    # grpc-js honours the gateway's grpc-retry-pushback-ms: -1 once AWS was called.
    local_aws.inject("ThrottlingException", count=100)
    with running_gateway(local_aws.endpoint_url, aws_max_attempts=aws_max_attempts) as target:
        out = count(target)
    assert out == {"ok": False, "code": "RESOURCE_EXHAUSTED", "reason": "THROTTLING", "pushback": "-1"}
    assert local_aws.calls == aws_max_attempts  # 4 × aws_max_attempts without the pushback


def test_node_retries_a_refusal_made_without_aws(
    node_modules: None, local_aws: LocalAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def refuse(
        self: MeteringServicer, req: pb.MeterUsageRequest, context: grpc.ServicerContext
    ) -> pb.MeterUsageResponse:
        seen.append(req.client_token)
        raise errors.GatewayError("SPOOL_UNAVAILABLE", "the spool is full", retry_delay=0.02)

    monkeypatch.setattr(MeteringServicer, "MeterUsage", refuse)
    with running_gateway(local_aws.endpoint_url) as target:
        out = count(target)
    assert out == {"ok": False, "code": "UNAVAILABLE", "reason": "SPOOL_UNAVAILABLE", "pushback": "20"}
    assert len(seen) == 4 and len(set(seen)) == 1  # meter.js's maxAttempts, one ClientToken
    assert local_aws.calls == 0
