"""``metering-gateway meter`` as a person types it, against a real gateway process (--local)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from support.processes import BIN, GatewayProcess, free_port, gateway_process, tool_env

PRODUCT = "prod-abc123"
SUCCESS = re.compile(r"metering_record_id=(\S+) client_token=(\S+) timestamp=(\S+)")


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    with gateway_process() as gw:
        yield gw


def meter(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``metering-gateway meter --target TARGET ARGS``, the installed command."""
    return subprocess.run(
        [str(BIN / "metering-gateway"), "meter", "--target", target, *args],
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_record_is_metered_now_and_its_token_and_timestamp_resend_it_once(gateway: GatewayProcess) -> None:
    done = meter(gateway.target, "--product", PRODUCT, "--dimension", "cli-now", "--quantity", "2.5")
    assert done.returncode == 0, done.stderr
    found = SUCCESS.fullmatch(done.stdout.strip())
    assert found, done.stdout
    _, token, stamp = found.groups()
    sent = datetime.fromisoformat(stamp)
    assert abs(datetime.now(UTC) - sent) < timedelta(minutes=1)  # now, for a person typing
    again = meter(
        gateway.target,
        "--product",
        PRODUCT,
        "--dimension",
        "cli-now",
        "--quantity",
        "2.5",
        "--client-token",
        token,
        "--timestamp",
        stamp,
    )
    assert again.returncode == 0 and again.stdout == done.stdout, again.stderr  # the same record, not a second one


def test_each_call_gets_its_own_token(gateway: GatewayProcess) -> None:
    tokens = set()
    for dimension in ("cli-a", "cli-b"):
        done = meter(gateway.target, "--product", PRODUCT, "--dimension", dimension, "--quantity", "1")
        found = SUCCESS.fullmatch(done.stdout.strip())
        assert found, done.stderr
        tokens.add(found[2])
    assert len(tokens) == 2


def test_a_dry_run_says_aws_would_accept_it(gateway: GatewayProcess) -> None:
    done = meter(
        gateway.target,
        "--product",
        PRODUCT,
        "--dimension",
        "cli-dry",
        "--quantity",
        "1",
        "--dry-run",
        "--client-token",
        "dry-token-1",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "dry_run: AWS would accept this record (client_token=dry-token-1)\n"


def test_a_quantity_is_sent_exactly_as_typed_and_a_bad_one_names_its_field(gateway: GatewayProcess) -> None:
    done = meter(
        gateway.target,
        "--product",
        PRODUCT,
        "--dimension",
        "cli-bad",
        "--quantity",
        "-1",
        "--client-token",
        "bad-token-1",
        "--timestamp",
        "2026-11-03T14:00:00Z",
    )
    assert done.returncode == 1 and done.stdout == ""
    first, *violations, hint = done.stderr.strip().splitlines()
    assert first.startswith(f"{gateway.target}: INVALID_ARGUMENT: ") and first.endswith("[INVALID_REQUEST]"), first
    assert sorted(v.split(":")[0].strip() for v in violations) == ["timestamp", "usage_quantity_as_decimal"], violations
    assert all(v.startswith("  ") and v.split(":", 1)[1].strip() for v in violations), violations  # each says why
    assert hint.startswith("client_token=bad-token-1 timestamp=2026-11-03T14:00:00Z ")
    assert "--client-token bad-token-1 --timestamp 2026-11-03T14:00:00Z" in hint


def test_tags_allocate_the_whole_quantity_and_a_bad_one_is_named(gateway: GatewayProcess) -> None:
    tagged = (
        gateway.target,
        "--product",
        PRODUCT,
        "--dimension",
        "cli-tags",
        "--quantity",
        "3",
        "--tag",
        "tenant=acme",
    )
    done = meter(*tagged, "--tag", "region=eu")
    assert done.returncode == 0 and SUCCESS.fullmatch(done.stdout.strip()), done.stderr
    bad = meter(*tagged, "--tag", "=eu")
    assert bad.returncode == 1 and "\n  usage_allocations[0].tags[1].key: " in bad.stderr, bad.stderr


def test_a_timestamp_without_an_offset_is_refused_before_anything_is_sent() -> None:
    done = meter(
        f"127.0.0.1:{free_port()}",
        "--product",
        PRODUCT,
        "--dimension",
        "d",
        "--quantity",
        "1",
        "--timestamp",
        "2026-11-03T14:00:00",
    )
    assert done.returncode == 2 and "--timestamp: '2026-11-03T14:00:00' has no UTC offset" in done.stderr


def test_no_gateway_is_unavailable_and_says_how_to_resend() -> None:
    done = meter(
        f"127.0.0.1:{free_port()}", "--product", PRODUCT, "--dimension", "d", "--quantity", "1", "--timeout", "2"
    )
    assert done.returncode == 1 and ": UNAVAILABLE: " in done.stderr
    assert re.search(r"resend with --client-token \S+ --timestamp \S+Z\)$", done.stderr.strip()), done.stderr
