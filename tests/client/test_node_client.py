"""The Node.js caller (clients/node) against a live gateway: @grpc/grpc-js on the proto as-is."""

from __future__ import annotations

import json
import os
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


# -- SaaS: saas.js ---------------------------------------------------------------------------

ACCOUNT = "111122223333"
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef0"


def saas(target: str, **env: str) -> list[dict[str, Any]]:
    """saas.js's JSON lines against ``target``, with ``env`` for the customer."""
    run = subprocess.run(
        [str(NODE), "saas.js", target],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_node_meters_saas_usage(node_modules: None, gateway_target: str, local_aws: LocalAws) -> None:
    local_aws.subscribe(customer_aws_account_id=ACCOUNT, license_arn=LICENSE, product_code="prod-abc123")
    metered, too_old = saas(gateway_target, CUSTOMER_AWS_ACCOUNT_ID=ACCOUNT, LICENSE_ARN=LICENSE)

    kept = {r.dimension: r for r in local_aws.saas_records()}
    assert metered == {
        "call": "batch",
        "ok": True,
        "round": 1,
        "unprocessed": 0,
        "results": [
            {
                "dimension": d,
                "quantity": q,
                "status": "STATUS_SUCCESS",
                "metering_record_id": kept[d].metering_record_id,
            }
            for d, q in [("requests", "12.5"), ("storage-gb", "3")]
        ],
    }
    requests = kept["requests"]
    assert (requests.customer_aws_account_id, requests.license_arn, requests.quantity) == (
        ACCOUNT,
        LICENSE,
        Decimal("12.5"),
    )
    assert {tuple(sorted(tags)): q for tags, q in requests.allocations} == {
        (("team", "search"),): Decimal(10),
        (): Decimal("2.5"),
    }
    assert (too_old["ok"], too_old["code"], too_old["reason"], too_old["domain"]) == (
        False,
        "OUT_OF_RANGE",
        "TIMESTAMP_OUT_OF_BOUNDS",
        "metering-gateway",
    )
    assert [v["field"] for v in too_old["fieldViolations"]] == ["usage_records[0].timestamp"]
    assert local_aws.calls == 1  # the refused record never reached AWS


def test_node_resolves_a_registration_token_then_meters(
    node_modules: None, gateway_target: str, local_aws: LocalAws
) -> None:
    token = local_aws.issue_token(product_code="prod-abc123", customer_aws_account_id=ACCOUNT, license_arn=LICENSE)
    resolved, metered, _ = saas(gateway_target, REGISTRATION_TOKEN=token)
    assert resolved == {
        "call": "resolve",
        "ok": True,
        "customer_identifier": "",
        "product_code": "prod-abc123",
        "customer_aws_account_id": ACCOUNT,
        "license_arn": LICENSE,
    }
    assert [r["status"] for r in metered["results"]] == ["STATUS_SUCCESS"] * 2
    assert {(u["CustomerAWSAccountId"], u["Dimension"]) for u in local_aws.saas_usage()} == {
        (ACCOUNT, "requests"),
        (ACCOUNT, "storage-gb"),
    }


def test_node_meters_a_legacy_customer(node_modules: None, gateway_target: str, local_aws: LocalAws) -> None:
    local_aws.subscribe_legacy(customer_identifier="cust-legacy-1", product_code="prod-abc123")
    metered, _ = saas(gateway_target, CUSTOMER_IDENTIFIER="cust-legacy-1", PRODUCT_CODE="prod-abc123")
    assert [r["status"] for r in metered["results"]] == ["STATUS_SUCCESS"] * 2
    assert {u["CustomerIdentifier"] for u in local_aws.saas_usage()} == {"cust-legacy-1"}


def test_node_resends_unprocessed_records_as_they_were(
    node_modules: None, local_aws: LocalAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway that hands the last record back unprocessed once: saas.js sends it again,
    the identical record (the same timestamp, quantity and customer)."""
    seen: list[pb.BatchMeterUsageRequest] = []

    def batch_meter_usage(
        self: MeteringServicer, req: pb.BatchMeterUsageRequest, context: grpc.ServicerContext
    ) -> pb.BatchMeterUsageResponse:
        seen.append(req)
        held = 1 if len(seen) == 1 else 0
        done = req.usage_records[: len(req.usage_records) - held]
        return pb.BatchMeterUsageResponse(
            results=[
                pb.UsageRecordResult(usage_record=r, metering_record_id=f"id-{r.dimension}", status=1) for r in done
            ],
            unprocessed_records=req.usage_records[len(done) :],
        )

    monkeypatch.setattr(MeteringServicer, "BatchMeterUsage", batch_meter_usage)
    with running_gateway(local_aws.endpoint_url) as target:
        first, second, _ = saas(target, CUSTOMER_AWS_ACCOUNT_ID=ACCOUNT, LICENSE_ARN=LICENSE)
    assert (first["round"], first["unprocessed"], [r["dimension"] for r in first["results"]]) == (1, 1, ["requests"])
    assert (second["round"], second["unprocessed"], [r["dimension"] for r in second["results"]]) == (
        2,
        0,
        ["storage-gb"],
    )
    assert list(seen[1].usage_records) == [seen[0].usage_records[1]]  # identical, field for field
    assert seen[1].product_code == ""
