"""The Node.js caller (clients/node) against a live gateway: @grpc/grpc-js on the proto as-is."""

from __future__ import annotations

import json
import shutil
import subprocess
from decimal import Decimal

import pytest
from helpers_clients import ROOT

from gateway.local_aws import LocalAws

NODE_DIR = ROOT / "clients" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm are needed for the Node.js caller test"),
]


@pytest.fixture(scope="module")
def node_modules() -> None:
    """``npm ci`` once; kept in clients/node/node_modules until the lock file changes."""
    marker = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime:
        return
    done = subprocess.run([str(NPM), "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_node_meters_and_decodes_field_violations(node_modules: None, gateway_target: str, local_aws: LocalAws) -> None:
    run = subprocess.run([str(NODE), "meter.js", gateway_target], cwd=NODE_DIR, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    valid, invalid = (json.loads(line) for line in run.stdout.splitlines())

    [record] = local_aws.records()
    assert valid == {"call": "valid", "ok": True, "metering_record_id": record.metering_record_id, "dry_run": False}
    assert record.quantity == 3 and record.client_token  # the script's own UUID
    assert {tuple(sorted(tags)): q for tags, q in record.allocations} == {(("team", "search"),): Decimal(2), (): Decimal(1)}

    assert (invalid["ok"], invalid["code"], invalid["reason"], invalid["domain"]) == (
        False, "INVALID_ARGUMENT", "INVALID_REQUEST", "metering-gateway")
    assert [v["field"] for v in invalid["fieldViolations"]] == [
        "product_code", "usage_allocations[0].tags[0].key", "usage_allocations"]
    assert all(v["description"] for v in invalid["fieldViolations"])
    assert local_aws.calls == 1  # the refused request never reached AWS
