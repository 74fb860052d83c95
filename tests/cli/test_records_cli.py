"""``metering-gateway records list|retry|export`` as an operator runs them: the real
console script against a live gateway process (``--local``, an SQLite spool, a sender
every 200 ms, one AWS attempt per try), checked against what the local AWS recorded."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from gateway import cli
from gateway.cli import admin, records_output
from gateway.cli.records_output import COLUMNS
from gateway.local_aws import LocalAws
from gateway.recording import placement
from marketplace.metering.v1 import metering_pb2 as pb
from support import Clock
from support.pki import Authority
from support.processes import BIN, GatewayProcess, free_port, gateway_process, http_json, local_aws_records, tool_env
from support.recording import event, running_recorder, send, wait_for

HOUR = 3600
CLI = str(BIN / "metering-gateway")


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, env=tool_env(), capture_output=True, timeout=60)
    return subprocess.CompletedProcess(argv, done.returncode, done.stdout.decode(), done.stderr.decode())


class Gateway:
    """A gateway process with its embedded local AWS, whose faults and records the test reaches."""

    def __init__(self, process: GatewayProcess, aws_url: str) -> None:
        self.process = process
        self.target = process.target
        self.aws_url = aws_url
        self.hours: dict[int, int] = {}  # what the test metered: hours ago -> the hour (epoch seconds)

    def fail_next(self, error: str, count: int = 1, status: int | None = None) -> None:
        fault: dict[str, Any] = {"error": error, "count": count, "operation": "MeterUsage"}
        if status is not None:
            fault["status"] = status
        http_json(self.aws_url + "/_local/faults", "POST", fault)

    def aws(self) -> list[dict[str, Any]]:
        return local_aws_records(self.aws_url)

    def records(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``metering-gateway records ARGS --target THIS``, its output as written (CSV's CRLF kept)."""
        return run([CLI, "records", *args, "--target", self.target])

    def listed(self, *args: str) -> list[dict[str, Any]]:
        done = self.records("list", "--output", "json", *args)
        assert done.returncode == 0, done.stderr
        found = json.loads(done.stdout)
        assert isinstance(found, list)
        return found


def start(directory: Path, *flags: str) -> Iterator[Gateway]:
    port = free_port()
    with gateway_process(
        "--spool",
        str(directory / "spool.db"),
        "--local-port",
        str(port),
        "--flush-interval",
        "200ms",
        "--flush-grace",
        "0s",
        "--aws-max-attempts",
        "1",
        *flags,
    ) as gw:
        yield Gateway(gw, f"http://127.0.0.1:{port}")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    yield from start(tmp_path)


def ago(hours: float) -> float:
    """A moment ``hours`` hours ago by the wall clock (the gateway process's clock)."""
    return time.time() - hours * HOUR


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Three hours metered: prod-a one and three hours ago (with tags), prod-b two hours ago."""
    for gateway in start(tmp_path_factory.mktemp("metered")):
        # The hours are fixed once, from one reading of the clock, and each event sits in the
        # middle of its hour: the tests compare with these, never with the clock at their own time.
        now = placement.hour_of(time.time())
        gateway.hours = {n: now - n * HOUR for n in (1, 2, 3)}
        mid = {n: hour + HOUR // 2 for n, hour in gateway.hours.items()}
        batch = [
            event("a1", mid[1], "2.5", product="prod-a", team="search, ads"),
            event("a2", mid[1], "1.5"),
            event("b", mid[2], 3, product="prod-b"),
            event("a3", mid[3], "0.125"),
        ]
        assert send(gateway.target, batch) is not None
        wait_for(lambda: [r["state"] for r in gateway.listed()] == ["SENT"] * 3, what="three hours sent")  # noqa: B023 - called before the loop moves on
        yield gateway


def iso(hour: int) -> str:
    return datetime.fromtimestamp(hour, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_list_as_json_matches_what_aws_recorded(metered: Gateway) -> None:
    listed = metered.listed()
    assert [r["product_code"] for r in listed] == ["prod-a", "prod-b", "prod-a"]  # newest hour first
    assert [r["hour"] for r in listed] == [iso(metered.hours[n]) for n in (1, 2, 3)]
    aws = {r["MeteringRecordId"]: r for r in metered.aws()}
    for record in listed:
        held = aws[record["metering_record_id"]]
        assert (held["ClientToken"], Decimal(held["Quantity"])) == (record["client_token"], Decimal(record["quantity"]))
        assert record["record_id"].isdigit() and record["attempts"] == 1 and record["outcome_unknown"] is False
    assert listed[0]["quantity"] == "4" and sorted(listed[0]["allocations"], key=lambda a: a["quantity"]) == [
        {"quantity": "1.5", "tags": {}},
        {"quantity": "2.5", "tags": {"team": "search, ads"}},
    ]


def test_list_as_csv_and_as_a_table_say_the_same(metered: Gateway) -> None:
    listed = metered.listed()
    done = metered.records("list", "--output", "csv")
    assert done.returncode == 0 and done.stdout.startswith(",".join(COLUMNS) + "\r\n")
    rows = list(csv.DictReader(io.StringIO(done.stdout, newline="")))
    assert [r["record_id"] for r in rows] == [r["record_id"] for r in listed]
    tagged = rows[0]
    assert json.loads(tagged["allocations"]) == listed[0]["allocations"]  # a cell with commas and quotes, intact
    assert (tagged["outcome_unknown"], tagged["attempts"], tagged["quantity"], tagged["state"]) == (
        "false",
        "1",
        "4",
        "SENT",
    )

    table = metered.records("list").stdout.splitlines()
    header, lines = table[0], table[1:]
    headings = [
        "ID",
        "HOUR (UTC)",
        "PRODUCT",
        "CUSTOMER",
        "DIMENSION",
        "QUANTITY",
        "STATE",
        "ATTEMPTS",
        "CARRIED FROM",
        "DETAIL",
    ]
    starts = [header.index(h) for h in headings]
    assert starts == sorted(starts) and len(lines) == 3
    for line, record in zip(lines, listed, strict=True):  # every cell sits under its heading
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        assert cells == [
            record["record_id"],
            record["hour"],
            record["product_code"],
            "",  # container usage: no customer
            "requests",
            record["quantity"],
            "SENT",
            "1",
            "",
            record["metering_record_id"],
        ]


def test_list_filters(metered: Gateway) -> None:
    everything = metered.listed()
    assert metered.listed("--state", "failed") == [] and len(metered.listed("--state", "SENT")) == 3
    assert [r["product_code"] for r in metered.listed("--product", "prod-b")] == ["prod-b"]
    middle = everything[1]["hour"]
    assert [r["hour"] for r in metered.listed("--since", middle)] == [r["hour"] for r in everything[:2]]
    assert len(metered.listed("--since", "7h")) == 3 and metered.listed("--since", "0s") == []
    assert metered.listed("--limit", "2") == everything[:2]
    for bad in (
        ["--state", "lost"],
        ["--since", "last tuesday"],
        ["--since", "2026-11-03T14:00:00"],
        ["--output", "xml"],
        ["--limit", "-1"],
    ):
        done = metered.records("list", *bad)
        assert done.returncode == 2 and "usage: metering-gateway records list" in done.stderr, bad


def test_export_of_a_month_reconciles_with_aws(metered: Gateway) -> None:
    listed = metered.listed()
    month = listed[0]["hour"][:7]  # the newest hour's UTC month
    done = metered.records("export", "--month", month)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout, newline="")))
    assert tuple(rows[0]) == COLUMNS
    expected = [r for r in reversed(listed) if r["hour"].startswith(month)]  # oldest first
    assert [(r["hour"], r["record_id"]) for r in rows] == [(r["hour"], r["record_id"]) for r in expected]
    in_month = [a for a in metered.aws() if a["Hour"].startswith(month)]
    assert sum(Decimal(r["quantity"]) for r in rows) == sum(Decimal(a["Quantity"]) for a in in_month) > 0
    assert {(r["metering_record_id"], r["client_token"]) for r in rows} == {
        (a["MeteringRecordId"], a["ClientToken"]) for a in in_month
    }
    as_json = json.loads(metered.records("export", "--month", month, "--output", "json").stdout)
    assert [r["record_id"] for r in as_json] == [r["record_id"] for r in rows]
    empty = metered.records("export", "--month", "2020-01")
    assert empty.returncode == 0 and empty.stdout == ",".join(COLUMNS) + "\r\n"
    for bad in ("2026-13", "2026-1", "november"):
        assert metered.records("export", "--month", bad).returncode == 2


def state_of(gateway: Gateway, product: str) -> dict[str, Any] | None:
    found = gateway.listed("--product", product)
    return found[0] if found else None


def test_a_failed_record_is_retried_once_its_cause_is_fixed(gateway: Gateway) -> None:
    gateway.fail_next("CustomerNotEntitledException")  # the buyer's subscription lapsed
    assert send(gateway.target, [event("ne", ago(1), 5, product="prod-ne")]) is not None
    failed = wait_for(lambda: (r := state_of(gateway, "prod-ne")) and r["state"] == "FAILED" and r, what="FAILED")
    assert failed["last_error"].startswith("CUSTOMER_NOT_ENTITLED") and gateway.aws() == []
    done = gateway.records("retry", failed["record_id"])  # entitled again: the operator retries it
    assert done.returncode == 0, done.stderr
    assert f"record {failed['record_id']} is PENDING again" in done.stdout and failed["client_token"] in done.stdout
    sent = wait_for(lambda: (r := state_of(gateway, "prod-ne")) and r["state"] == "SENT" and r, what="SENT")
    assert (sent["record_id"], sent["client_token"], sent["attempts"]) == (
        failed["record_id"],
        failed["client_token"],
        2,
    )
    (held,) = gateway.aws()
    assert (held["ClientToken"], held["MeteringRecordId"], held["Quantity"]) == (
        failed["client_token"],
        sent["metering_record_id"],
        "5",
    )
    (logged,) = gateway.process.lines("record_retried_by_operator")
    assert (str(logged["record_id"]), logged["reconciled"], logged["client_token"]) == (
        failed["record_id"],
        False,
        failed["client_token"],
    )

    again = gateway.records("retry", failed["record_id"])  # SENT: billed, never again
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.startswith(f"{gateway.target}: FAILED_PRECONDITION: record {failed['record_id']} is SENT")
    assert again.stderr.rstrip().endswith("[RECORD_NOT_FAILED]") and len(gateway.aws()) == 1
    missing = gateway.records("retry", "987654")
    assert missing.returncode == 1 and missing.stderr.startswith(f"{gateway.target}: NOT_FOUND: ")
    assert "[RECORD_NOT_FOUND]" in missing.stderr
    bad = gateway.records("retry", "prod-ne")
    assert bad.returncode == 2 and "argument ID" in bad.stderr


def test_an_unknown_outcome_is_retried_only_when_reconciled(gateway: Gateway) -> None:
    gateway.fail_next("InternalServiceErrorException")  # AWS may have recorded it: unknown
    gateway.fail_next("CustomerNotEntitledException")  # and the identical resend is refused
    assert send(gateway.target, [event("un", ago(1), 7, product="prod-un")]) is not None
    failed = wait_for(lambda: (r := state_of(gateway, "prod-un")) and r["state"] == "FAILED" and r, what="FAILED")
    assert failed["outcome_unknown"] is True and failed["last_error"].startswith("outcome unknown")

    refused = gateway.records("retry", failed["record_id"])
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr and "[OUTCOME_UNKNOWN]" in refused.stderr
    for what in (failed["hour"].replace("Z", "+00:00"), "quantity 7", failed["client_token"], "--reconciled"):
        assert what in refused.stderr, what
    time.sleep(0.5)  # a few sender passes: refused means nothing changed
    assert state_of(gateway, "prod-un") == failed

    # The seller's AWS usage report holds no record for that hour and token: the operator says so.
    done = gateway.records("retry", failed["record_id"], "--reconciled")
    assert done.returncode == 0, done.stderr
    sent = wait_for(lambda: (r := state_of(gateway, "prod-un")) and r["state"] == "SENT" and r, what="SENT")
    assert sent["client_token"] == failed["client_token"] and sent["outcome_unknown"] is False
    assert [(a["ClientToken"], a["Quantity"]) for a in gateway.aws()] == [(failed["client_token"], "7")]
    (logged,) = gateway.process.lines("record_retried_by_operator")
    assert logged["reconciled"] is True and logged["previous_error"] == failed["last_error"]


def test_list_and_export_page_through_every_record(
    local_aws: LocalAws,
    clock: Clock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In process, two records a page: every page is read, and export turns the order round."""
    monkeypatch.setattr(admin, "PAGE_SIZE", 2)
    with running_recorder(local_aws.endpoint_url, str(tmp_path / "s.db"), clock=clock, start_sender=False) as (
        target,
        recording,
    ):
        assert send(target, [event(f"p{h}", clock() - h * HOUR, h) for h in range(1, 6)]) is not None
        recording.sender.tick()

        def run_main(*args: str) -> list[dict[str, Any]]:
            assert cli.main(["records", *args, "--target", target, "--output", "json"]) == 0
            out = capsys.readouterr().out  # the command's JSON, between the server's log lines
            found = json.loads("\n".join(line for line in out.splitlines() if line[:1] in ("[", "{", "]")))
            assert isinstance(found, list)
            return found

        hours = [iso(placement.hour_of(clock() - h * HOUR)) for h in range(1, 6)]
        assert [r["hour"] for r in run_main("list")] == hours
        assert [r["hour"] for r in run_main("list", "--limit", "3")] == hours[:3]
        assert [r["quantity"] for r in run_main("export", "--month", hours[0][:7])] == ["5", "4", "3", "2", "1"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["list", "--since", "100000000d"], "'100000000d' reaches back before the year 1"),
        (["list", "--since", "1000000000d"], "reaches back before the year 1"),
        (["list", "--since", "99999999999999999999d"], "reaches back before the year 1"),
        (["list", "--since", "0001-01-01T00:00:00+01:00"], "is out of range (years 1 to 9999, in UTC)"),
        (["list", "--since", "9999-12-31T23:59:59-01:00"], "is out of range"),
        (["export", "--month", "9999-12"], "'9999-12' is out of range (0001-01 to 9999-11)"),
    ],
)
def test_out_of_range_times_are_usage_errors(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["records", *args, "--target", "127.0.0.1:1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "usage: metering-gateway records" in err and expected in err and "Traceback" not in err, err


def fake_reads(monkeypatch: pytest.MonkeyPatch, *reads: list[tuple[int, str]]) -> list[str]:
    """``records export`` sees ``reads`` in turn, one per full read of the month (records as
    (hour, quantity)); returns the page token each read began with."""
    queue = list(reads)
    began: list[str] = []

    def every_record(channel: Any, request: Any, timeout: float, limit: int = 0) -> list[Any]:
        began.append(request.page_token)
        request.page_token = "spent"  # as the real one leaves it
        rows = queue.pop(0)
        return [
            pb.MeteringRecord(record_id=str(i), hour=Timestamp(seconds=hour), quantity=quantity)
            for i, (hour, quantity) in enumerate(rows)
        ]

    monkeypatch.setattr(admin, "every_record", every_record)
    return began


NOV = int(datetime(2020, 11, 3, tzinfo=UTC).timestamp())
# Newest first, as listed. A carry between two reads moves usage from the older record to the newer.
BEFORE, CARRIED = [(NOV + HOUR, "1"), (NOV, "2")], [(NOV + HOUR, "3"), (NOV, "0")]


def export(capsys: pytest.CaptureFixture[str], month: str = "2020-11") -> tuple[int, str, str]:
    code = cli.main(["records", "export", "--month", month, "--target", "127.0.0.1:1", "--output", "json"])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_reads_until_two_reads_agree(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    began = fake_reads(monkeypatch, BEFORE, CARRIED, CARRIED)
    code, out, err = export(capsys)
    assert code == 0 and err == "", err
    assert [r["quantity"] for r in json.loads(out)] == ["0", "3"]  # the settled read, oldest first
    assert began == ["", "", ""]  # every read from the first page
    fake_reads(monkeypatch, BEFORE, BEFORE)
    code, out, err = export(capsys)
    assert code == 0 and [r["quantity"] for r in json.loads(out)] == ["2", "1"]


def test_export_of_records_that_keep_changing_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_reads(monkeypatch, BEFORE, CARRIED, BEFORE)
    code, out, err = export(capsys)
    assert code == 1 and out == ""
    assert err.strip() == (
        "127.0.0.1:1: records changed during the export (3 reads disagreed); retry, or export a closed month"
    )


def test_export_of_a_month_not_yet_closed_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    month = datetime.now(UTC).strftime("%Y-%m")
    fake_reads(monkeypatch, BEFORE, BEFORE)
    code, out, err = export(capsys, month)
    assert code == 0 and json.loads(out)
    assert err.startswith(f"note: {month} is not closed yet") and "may still be recorded or carried into it" in err, err


def test_an_unreachable_gateway_is_one_line_and_exit_1() -> None:
    done = run([CLI, "records", "list", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1s"])
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and ": UNAVAILABLE: " in done.stderr


def test_records_over_mtls(tmp_path: Path) -> None:
    ca = Authority(tmp_path, "admin-ca")
    server, client = ca.issue("gateway", server=True), ca.issue("operator", server=False)
    tls = ("--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", str(ca.pem))
    for gateway in start(tmp_path, *tls):
        flags = ("--tls-ca", str(ca.pem), "--tls-cert", str(client.cert), "--tls-key", str(client.key))
        done = gateway.records("list", "--output", "csv", *flags)
        assert done.returncode == 0 and done.stdout == ",".join(COLUMNS) + "\r\n", done.stderr
        anonymous = gateway.records("list", "--tls-ca", str(ca.pem), "--timeout", "2s")
        assert anonymous.returncode == 1 and anonymous.stderr.startswith(f"{gateway.target}: UNAVAILABLE")


# -- SaaS records: their customer ---------------------------------------------------------------

ACCOUNT, LICENSE = "111122223333", "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"


def saas_records() -> list[pb.MeteringRecord]:
    """A record of each kind of customer, and a container product's (newest first)."""
    hour = Timestamp(seconds=NOV)
    return [
        pb.MeteringRecord(
            record_id="3", hour=hour, usage_dimension="users", quantity="2", state=pb.MeteringRecord.STATE_PENDING,
            customer_aws_account_id=ACCOUNT, license_arn=LICENSE,
        ),
        pb.MeteringRecord(
            record_id="2", hour=hour, product_code="prod-s", usage_dimension="users", quantity="1",
            state=pb.MeteringRecord.STATE_PENDING, customer_identifier="x" * 60,
        ),
        pb.MeteringRecord(
            record_id="1", hour=hour, product_code="prod-a", usage_dimension="requests", quantity="5",
            state=pb.MeteringRecord.STATE_PENDING,
        ),
    ]  # fmt: skip


def test_json_and_csv_show_a_saas_records_customer_whole() -> None:
    listed = json.loads(records_output.as_json(saas_records()))
    assert [(r["customer_aws_account_id"], r["license_arn"], r["customer_identifier"]) for r in listed] == [
        (ACCOUNT, LICENSE, ""),
        ("", "", "x" * 60),
        ("", "", ""),
    ]
    rows = list(csv.DictReader(io.StringIO(records_output.as_csv(saas_records()), newline="")))
    assert [(r["customer_aws_account_id"], r["license_arn"], r["customer_identifier"]) for r in rows] == [
        (ACCOUNT, LICENSE, ""),
        ("", "", "x" * 60),
        ("", "", ""),
    ]
    # The customer comes last: a script reading the columns by position reads what it did.
    assert COLUMNS[:13] == (
        "hour",
        "product_code",
        "usage_dimension",
        "quantity",
        "state",
        "outcome_unknown",
        "metering_record_id",
        "client_token",
        "attempts",
        "carried_from",
        "allocations",
        "last_error",
        "record_id",
    )
    assert COLUMNS[13:] == ("customer_aws_account_id", "license_arn", "customer_identifier")


def test_the_table_shows_a_customer_in_one_short_column() -> None:
    header, *lines = records_output.as_table(saas_records()).splitlines()
    start, end = header.index("CUSTOMER"), header.index("DIMENSION")
    assert [line[start:end].strip() for line in lines] == [
        f"{ACCOUNT}/l-0123456789abcdef",  # the account and the license's id: the whole ARN is in JSON and CSV
        "x" * 39 + "…",
        "",
    ]
