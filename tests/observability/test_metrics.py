"""Prometheus metrics as an operator scrapes them: /metrics after real calls, values exact.

The gateways run as real processes (``serve --local --metrics-listen``) and are
scraped over HTTP; the text is parsed with prometheus_client's own parser. The
spool's gauges on a simulated clock, the collector's bounds and the pure parts run
in this process.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.assembly import metrics_server
from gateway.assembly.metrics_server import scrape_registry, start
from gateway.aws.backend import Backend, RetryPolicy
from gateway.config import Settings
from gateway.domain import errors
from gateway.local_aws import LocalAws
from gateway.observability import metrics
from gateway.recording import gauges, placement
from gateway.recording.servicer import event_row
from gateway.recording.spool import SpoolUnavailable
from gateway.recording.spool.sqlite import SqliteSpool
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import FIXED_NOW, Clock, request
from support.metrics import uninstall
from support.processes import SERVE, GatewayProcess, free_port, gateway_process, http_json, tool_env
from support.recording import event, running_recorder, wait_for

METERING = "marketplace.metering.v1.MeteringService"
RECORDER = "marketplace.metering.v1.UsageRecorderService"
HOUR = placement.HOUR
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> Samples:
    """GET /metrics, parsed: every sample by its name and labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def grpc_labels(service: str, method: str) -> dict[str, str]:
    return {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}


def aws(source: str, reason: str) -> dict[str, str]:
    return {"operation": "MeterUsage", "source": source, "reason": reason}


def inject(local_port: int, error: str, **fields: Any) -> None:
    http_json(
        f"http://127.0.0.1:{local_port}/_local/faults",
        "POST",
        {"error": error, "count": 1, "operation": "MeterUsage", **fields},
    )


def until(address: str, condition: Callable[[Samples], bool], what: str) -> Samples:
    def ready() -> Samples | None:
        samples = scrape(address)
        return samples if condition(samples) else None

    return wait_for(ready, timeout=30, what=what)


def meter(target: str, req: pb.MeterUsageRequest) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        try:
            pb_grpc.MeteringServiceStub(channel).MeterUsage(req, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def record(target: str, *events: pb.UsageEvent) -> pb.RecordUsageResponse:
    with grpc.insecure_channel(target) as channel:
        reply: pb.RecordUsageResponse = pb_grpc.UsageRecorderServiceStub(channel).RecordUsage(
            pb.RecordUsageRequest(events=events), timeout=10
        )
        return reply


def wall(seconds_ago: float = 60) -> datetime:
    """A timestamp on the wall clock (the gateway process runs on it)."""
    return datetime.fromtimestamp(time.time() - seconds_ago, UTC)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[GatewayProcess, int]]:
    """``serve --local`` with an SQLite spool, a fast sender and --metrics-listen; (process, local AWS port)."""
    local_port = free_port()
    with gateway_process(
        "--spool",
        str(tmp_path / "spool.db"),
        "--local-port",
        str(local_port),
        "--metrics-listen",
        f"127.0.0.1:{free_port()}",
        "--flush-interval",
        "200ms",
        "--flush-grace",
        "0s",
        "--aws-max-rps",
        "100",
        "--aws-backoff-base",
        "10ms",
    ) as gw:
        yield gw, local_port


def test_one_scrape_shows_what_happened(gateway: tuple[GatewayProcess, int]) -> None:
    gw, local_port = gateway
    address = str(gw.serving["metrics"])
    assert value(scrape(address), "metering_gateway_build_info", version="0.1.0") == 1

    # MeterUsage: two OK, one refused by validation, one throttled once then OK, one AWS
    # refusal, one dry run.
    assert meter(gw.target, request(when=wall(), usage_dimension="d1")) == grpc.StatusCode.OK
    assert meter(gw.target, request(when=wall(), usage_dimension="d2")) == grpc.StatusCode.OK
    assert meter(gw.target, request(when=wall(), product_code="not a product!")) == grpc.StatusCode.INVALID_ARGUMENT
    inject(local_port, "ThrottlingException")
    assert meter(gw.target, request(when=wall(), usage_dimension="d3")) == grpc.StatusCode.OK
    inject(local_port, "CustomerNotEntitledException")
    assert meter(gw.target, request(when=wall(), usage_dimension="d4")) == grpc.StatusCode.FAILED_PRECONDITION
    assert meter(gw.target, request(when=wall(), usage_dimension="d5", dry_run=True)) == grpc.StatusCode.OK

    # Recorded usage, one record at a time, two hours back (closed, well inside AWS's window).
    when = placement.hour_of(time.time()) - 2 * HOUR + 600
    # prod-b: AWS fails (an internal error: the outcome is unknown), then refuses → FAILED, outcome unknown.
    inject(local_port, "InternalServiceErrorException")
    inject(local_port, "CustomerNotEntitledException")
    assert record(gw.target, event("b1", when, "4", product="prod-b")) == pb.RecordUsageResponse(accepted=1)
    until(
        address,
        lambda s: value(s, "metering_gateway_records_failed_total", reason="CUSTOMER_NOT_ENTITLED") == 1,
        "prod-b to fail",
    )
    # prod-c: the hour is taken (DUPLICATE_REQUEST) → carried to the next hour, then sent.
    inject(local_port, "DuplicateRequestException")
    assert record(gw.target, event("c1", when, "2", product="prod-c")) == pb.RecordUsageResponse(accepted=1)
    until(address, lambda s: value(s, "metering_gateway_records_sent_total") == 1, "prod-c to be sent")
    # prod-a: a batch, then one with a duplicate of it and a new event.
    assert record(
        gw.target, event("a1", when, "1.5", product="prod-a"), event("a2", when, "2", product="prod-a")
    ) == pb.RecordUsageResponse(accepted=2)
    assert record(
        gw.target,
        event("a1", when, "1.5", product="prod-a"),
        event("a3", when, "0.25", product="prod-a", dimension="gb"),
    ) == pb.RecordUsageResponse(accepted=1, duplicates=1)
    s = until(address, lambda s: value(s, "metering_gateway_records_sent_total") == 3, "prod-a to be sent")

    # gRPC server metrics, go-grpc-prometheus's names and labels; every code present.
    mu, ru = grpc_labels(METERING, "MeterUsage"), grpc_labels(RECORDER, "RecordUsage")
    assert value(s, "grpc_server_started_total", **mu) == 6
    handled = {
        code: value(s, "grpc_server_handled_total", **mu, grpc_code=code) for code in metrics.GO_CODE_NAMES.values()
    }
    assert handled == {**{code: 0 for code in handled}, "OK": 4, "InvalidArgument": 1, "FailedPrecondition": 1}
    assert value(s, "grpc_server_msg_received_total", **mu) == 6 and value(s, "grpc_server_msg_sent_total", **mu) == 4
    assert value(s, "grpc_server_handling_seconds_count", **mu) == 6
    assert value(s, "grpc_server_handling_seconds_bucket", **mu, le="+Inf") == 6
    assert value(s, "grpc_server_started_total", **ru) == 4
    assert value(s, "grpc_server_handled_total", **ru, grpc_code="OK") == 4
    assert value(s, "grpc_server_started_total", **grpc_labels(RECORDER, "ListMeteringRecords")) == 0
    # AWS: calls after retries, attempts, the one retry, latency; per source.
    calls = {"OK": 3, "DRY_RUN": 1, "CUSTOMER_NOT_ENTITLED": 1}
    for reason, n in calls.items():
        assert value(s, "metering_gateway_aws_calls_total", **aws("meter_usage", reason)) == n, reason
    attempts = {**calls, "THROTTLING": 1}
    for reason, n in attempts.items():
        assert value(s, "metering_gateway_aws_attempts_total", **aws("meter_usage", reason)) == n, reason
    assert value(s, "metering_gateway_aws_retries_total", **aws("meter_usage", "THROTTLING")) == 1
    assert (
        value(s, "metering_gateway_aws_attempt_duration_seconds_count", operation="MeterUsage", source="meter_usage")
        == 6
    )
    sender = {"OK": 3, "INTERNAL_SERVICE_ERROR": 1, "CUSTOMER_NOT_ENTITLED": 1, "DUPLICATE_REQUEST": 1}
    for reason, n in sender.items():
        assert value(s, "metering_gateway_aws_calls_total", **aws("sender", reason)) == n, reason
        assert value(s, "metering_gateway_aws_attempts_total", **aws("sender", reason)) == n, reason
    assert value(s, "metering_gateway_aws_attempt_duration_seconds_count", operation="MeterUsage", source="sender") == 6
    assert not [k for k in s if k[0] == "metering_gateway_aws_retries_total" and ("source", "sender") in k[1]]
    # Recorded usage.
    assert value(s, "metering_gateway_usage_events_total", result="accepted") == 5
    assert value(s, "metering_gateway_usage_events_total", result="duplicate") == 1
    recorded = {
        ("prod-a", "requests"): 3.5,
        ("prod-a", "gb"): 0.25,
        ("prod-b", "requests"): 4,
        ("prod-c", "requests"): 2,
    }
    for (product, dimension), quantity in recorded.items():
        assert (
            value(s, "metering_gateway_usage_recorded_quantity_total", product_code=product, usage_dimension=dimension)
            == quantity
        )
    metered = {("prod-a", "requests"): 3.5, ("prod-a", "gb"): 0.25, ("prod-c", "requests"): 2}
    assert {
        (dict(k[1])["product_code"], dict(k[1])["usage_dimension"]): v
        for k, v in s.items()
        if k[0] == "metering_gateway_usage_metered_quantity_total"
    } == metered
    assert value(s, "metering_gateway_records_retried_total", reason="INTERNAL_SERVICE_ERROR") == 1
    assert value(s, "metering_gateway_records_outcome_unknown_total") == 1
    assert value(s, "metering_gateway_usage_carried_total", reason="DUPLICATE_REQUEST") == 1
    assert value(s, "metering_gateway_sender_leader") == 1
    assert value(s, "metering_gateway_serving", service=METERING) == 1
    assert value(s, "metering_gateway_serving", service=RECORDER) == 1
    # Read from the spool at scrape time.
    assert value(s, "metering_gateway_spool_up") == 1
    assert {state: value(s, "metering_gateway_records", state=state) for state in ("PENDING", "SENT", "FAILED")} == {
        "PENDING": 0,
        "SENT": 3,
        "FAILED": 1,
    }
    assert value(s, "metering_gateway_records_failed_outcome_unknown") == 1
    assert value(s, "metering_gateway_oldest_pending_record_age_seconds") == 0
    assert value(s, "metering_gateway_spool_unassigned_events") == 0
    assert (value(s, "metering_gateway_spool_size_bytes") or 0) > 0
    # Every family metric_names() promises is there, and nothing else.
    families = {
        f.name + ("_total" if f.type == "counter" else "")
        for f in text_string_to_metric_families(
            urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
        )
    }
    assert families == metrics.metric_names()


def test_processes_share_one_scrape(postgres_dsn: str) -> None:
    """--processes 2: calls spread over both workers, and one scrape of the parent counts them all."""
    calls = 24
    with gateway_process(
        "--processes", "2", "--spool", postgres_dsn, "--metrics-listen", f"127.0.0.1:{free_port()}"
    ) as gw:
        address = str(gw.serving["metrics"])
        for i in range(calls):  # a channel each: SO_REUSEPORT spreads connections, not calls
            assert meter(gw.target, request(when=wall(), usage_dimension=f"d{i}")) == grpc.StatusCode.OK
        workers = {line.get("worker") for line in gw.lines("rpc") if line.get("event") == "rpc"}
        assert workers == {0, 1}, "the calls did not spread over both workers"
        s = scrape(address)
        mu = grpc_labels(METERING, "MeterUsage")
        assert value(s, "grpc_server_started_total", **mu) == calls
        assert value(s, "grpc_server_handled_total", **mu, grpc_code="OK") == calls
        assert value(s, "grpc_server_handled_total", **mu, grpc_code="Internal") == 0
        assert value(s, "metering_gateway_aws_calls_total", **aws("meter_usage", "OK")) == calls
        assert value(s, "metering_gateway_serving", service=METERING) == 1
        assert value(s, "metering_gateway_sender_leader") == 1  # one of the two leads
        assert value(s, "metering_gateway_spool_up") == 1
        assert value(s, "metering_gateway_records", state="PENDING") == 0
        assert value(s, "metering_gateway_build_info", version="0.1.0") == 1


@pytest.mark.parametrize("processes", ["1", "2"])
def test_metrics_port_in_use_is_a_one_line_error(processes: str) -> None:
    with socket_listening() as port:
        result = subprocess.run(
            [
                *SERVE,
                "--local",
                "--listen",
                "127.0.0.1:0",
                "--processes",
                processes,
                "--metrics-listen",
                f"127.0.0.1:{port}",
            ],
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"metering-gateway: error: cannot serve metrics on 127.0.0.1:{port}: Address already in use "
        "(is the port in use?)"
    ], result.stderr


def test_bad_metrics_listen_is_a_one_line_error() -> None:
    result = subprocess.run(
        [*SERVE, "--local", "--metrics-listen", "nowhere"], env=tool_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("metering-gateway: error: ") and "--metrics-listen" in line and "nowhere" in line


@contextmanager
def socket_listening() -> Iterator[int]:
    """A port something listens on, for the length of the ``with``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# -- in this process: the spool's gauges on a simulated clock, and the collector's bounds --------


@pytest.fixture
def installed() -> Iterator[CollectorRegistry]:
    registry = metrics.install()
    try:
        yield registry
    finally:
        uninstall()


def test_spool_gauges_on_the_recording_clock(tmp_path: Path, installed: CollectorRegistry) -> None:
    clock = Clock(FIXED_NOW)
    with (
        LocalAws(quiet=True, clock=clock) as aws_backend,
        running_recorder(aws_backend.endpoint_url, str(tmp_path / "s.db"), clock=clock, start_sender=False) as (
            target,
            rec,
        ),
    ):
        endpoint = start("127.0.0.1:0", scrape_registry(installed, gauges.reader(rec.spool, rec.now)))
        try:
            old = placement.hour_of(clock()) - 3 * HOUR
            assert record(target, event("x1", old + 60, 3), event("x2", clock() - 60, 1)) == pb.RecordUsageResponse(
                accepted=2
            )
            s = scrape(endpoint.address)
            assert value(s, "metering_gateway_spool_unassigned_events") == 2
            assert value(s, "metering_gateway_oldest_pending_record_age_seconds") == 0  # nothing placed yet
            rec.sender.tick()  # places both; sends the closed hour three back
            clock.advance(90)
            s = scrape(endpoint.address)
            assert value(s, "metering_gateway_records", state="SENT") == 1
            assert value(s, "metering_gateway_records", state="PENDING") == 1  # the open hour
            current = placement.hour_of(FIXED_NOW.timestamp())
            assert value(s, "metering_gateway_oldest_pending_record_age_seconds") == clock() - current
            assert (
                value(
                    s,
                    "metering_gateway_usage_metered_quantity_total",
                    product_code="prod-a",
                    usage_dimension="requests",
                )
                == 3
            )
        finally:
            endpoint.stop()


def test_unreadable_or_stuck_spool_is_reported_down_within_the_bound() -> None:
    def broken() -> metrics.SpoolReading:
        raise SpoolUnavailable("the database is unavailable")

    release = threading.Event()

    def stuck() -> metrics.SpoolReading:
        release.wait(30)
        raise SpoolUnavailable("late")

    registry = CollectorRegistry()
    registry.register(metrics.ScrapeCollector(broken))
    names = {m.name: m for m in registry.collect()}
    assert names["metering_gateway_spool_up"].samples[0].value == 0
    assert "metering_gateway_records" not in names and "metering_gateway_build_info" in names

    collector = metrics.ScrapeCollector(stuck, timeout=0.3)
    try:
        for _ in range(2):  # the second scrape does not wait behind the first, stuck read
            started = time.monotonic()
            families = {m.name: m for m in collector.collect()}
            assert time.monotonic() - started < 1.0
            assert families["metering_gateway_spool_up"].samples[0].value == 0
    finally:
        release.set()


def test_spool_down_in_postgres_is_spool_up_0(private_postgres: Any) -> None:
    from gateway.recording.spool.postgres import PostgresSpool

    spool = PostgresSpool(private_postgres.create_database("down"), pool_size=2)
    try:
        collector = metrics.ScrapeCollector(gauges.reader(spool, time.time))
        assert {m.name: m for m in collector.collect()}["metering_gateway_spool_up"].samples[0].value == 1
        private_postgres.stop()
        started = time.monotonic()
        families = {m.name: m for m in collector.collect()}
        assert time.monotonic() - started < metrics.SCRAPE_SPOOL_TIMEOUT + 1
        assert families["metering_gateway_spool_up"].samples[0].value == 0
        assert "metering_gateway_records" not in families
    finally:
        spool.close()


def test_parent_spool_up_recovers_after_a_postgres_restart(private_postgres: Any) -> None:
    """--processes N: the parent reads the gauges through a spool of its own, with no
    health watcher beside it; a scrape during an outage closes that spool's gate, and
    a later scrape must reopen it (probe) once the database is back."""
    settings = Settings(metrics_listen="127.0.0.1:0", spool=private_postgres.create_database("parent"))
    with metrics_server.for_workers(settings) as exported:
        assert exported is not None
        assert value(scrape(exported.address), "metering_gateway_spool_up") == 1
        private_postgres.stop()
        assert value(scrape(exported.address), "metering_gateway_spool_up") == 0
        private_postgres.start()
        wait_for(
            lambda: value(scrape(exported.address), "metering_gateway_spool_up") == 1,
            timeout=15,
            what="spool_up 1 after the database came back",
        )
        assert value(scrape(exported.address), "metering_gateway_records", state="PENDING") == 0


def test_spool_record_says_which_events_were_new(tmp_path: Path) -> None:
    spool = SqliteSpool(str(tmp_path / "s.db"))
    try:
        first = [event_row(event(i, FIXED_NOW.timestamp(), 1)) for i in ("a", "b")]
        assert spool.record(first).new == (0, 1)
        again = [event_row(event(i, FIXED_NOW.timestamp(), 1)) for i in ("b", "c", "c", "a", "d")]
        recorded = spool.record(again)
        assert recorded == (2, 3) and recorded.new == (1, 4)
        assert spool.record(again).new == ()
    finally:
        spool.close()


def test_spool_record_says_which_events_were_new_in_postgres(postgres_dsn: str) -> None:
    from gateway.recording.spool.postgres import PostgresSpool

    spool = PostgresSpool(postgres_dsn, pool_size=2)
    try:
        assert spool.record([event_row(event(i, FIXED_NOW.timestamp(), 1)) for i in ("a", "b")]).new == (0, 1)
        recorded = spool.record([event_row(event(i, FIXED_NOW.timestamp(), 1)) for i in ("b", "c", "c", "a", "d")])
        assert recorded == (2, 3) and recorded.new == (1, 4)
    finally:
        spool.close()


# -- pure parts ------------------------------------------------------------------------------------


def test_go_code_names_cover_every_code() -> None:
    assert set(metrics.GO_CODE_NAMES) == set(grpc.StatusCode)
    assert metrics.GO_CODE_NAMES[grpc.StatusCode.CANCELLED] == "Canceled"  # Go's spelling


def test_method_labels_are_go_grpc_prometheus_ones() -> None:
    registry = metrics.install()
    try:
        observer = metrics.GrpcMetrics([METERING])
        for method in (f"/{METERING}/MeterUsage", "/unknown.Service/Call"):
            observer.started(method)
            observer.handled(method, grpc.StatusCode.OK, 0.01)
        started = {
            tuple(s.labels.values()): s.value
            for m in registry.collect()
            for s in m.samples
            if s.name == "grpc_server_started_total"
        }
    finally:
        uninstall()
    assert started == {
        ("unary", METERING, "MeterUsage"): 1,
        ("unary", METERING, "BatchMeterUsage"): 0,  # every method of the service, from 0
        ("unary", METERING, "ResolveCustomer"): 0,
        ("unary", "unknown.Service", "Call"): 1,
    }


class _Client:
    """A boto3 client stand-in: raises or answers as told, one item per attempt."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)

    def meter_usage(self, **params: Any) -> dict[str, Any]:
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return dict(answer)


def test_backend_counts_calls_attempts_and_retries(installed: CollectorRegistry) -> None:
    from botocore.exceptions import ClientError, NoCredentialsError

    throttled = ClientError(
        {"Error": {"Code": "ThrottlingException", "Message": "slow down"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
        "MeterUsage",
    )
    backend = Backend(
        _Client(throttled, {"MeteringRecordId": "r1"}, NoCredentialsError()),
        RetryPolicy(3, 0.001, 0.001),
        sleep=lambda _: None,
        source="sender",
    )
    backend.meter_usage({})
    with pytest.raises(errors.GatewayError):
        backend.meter_usage({})  # no credentials: before any attempt
    with pytest.raises(errors.GatewayError):
        backend.meter_usage({}, deadline=time.monotonic() - 1)  # the deadline ran out before AWS
    got = {
        (s.name, s.labels["reason"]): s.value
        for m in installed.collect()
        for s in m.samples
        if s.name.startswith(
            ("metering_gateway_aws_calls", "metering_gateway_aws_attempts", "metering_gateway_aws_retries")
        )
        and s.labels.get("source") == "sender"
    }
    assert got == {
        ("metering_gateway_aws_calls_total", "OK"): 1,
        ("metering_gateway_aws_calls_total", "NO_CREDENTIALS"): 1,
        ("metering_gateway_aws_calls_total", "DEADLINE_EXCEEDED"): 1,
        ("metering_gateway_aws_attempts_total", "THROTTLING"): 1,
        ("metering_gateway_aws_attempts_total", "OK"): 1,
        ("metering_gateway_aws_retries_total", "THROTTLING"): 1,
    }
    count = [
        s.value
        for m in installed.collect()
        for s in m.samples
        if s.name == "metering_gateway_aws_attempt_duration_seconds_count" and s.labels["source"] == "sender"
    ]
    assert count == [2]


def test_recording_is_off_until_installed() -> None:
    uninstall()
    metrics.aws_call("sender", "OK")  # no registry, no error
    metrics.GrpcMetrics([METERING]).started(f"/{METERING}/MeterUsage")
    assert not metrics.installed()


def test_metric_names_are_the_documented_ones() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    for name in metrics.metric_names():
        assert f"`{name}`" in text, f"{name} is not in docs/metrics.md"


def test_single_process_ignores_a_stray_multiproc_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    registry = metrics.install()
    try:
        metrics.record_sent("prod-a", "requests", "2.5")
        got = {s.name: s.value for m in registry.collect() for s in m.samples}
        assert got["metering_gateway_records_sent_total"] == 1
        assert not (tmp_path / "missing").exists()
        with pytest.raises(ValueError):
            metrics.install(multiprocess=True)
    finally:
        uninstall()
        from prometheus_client import values

        values.ValueClass = values.MutexValue


def test_a_record_failed_while_in_flight_stays_outcome_unknown(tmp_path: Path) -> None:
    """Its sender died mid-call (in flight), and the hour left AWS's window: FAILED, and AWS
    may hold it; the listing, retry_failed and the gauge must all still say so."""
    spool = SqliteSpool(str(tmp_path / "s.db"))
    try:
        now = FIXED_NOW.timestamp()
        spool.record([event_row(event("x", now - 2 * HOUR, 5))])
        spool.assign(now)
        [row] = spool.due(now, 0)
        assert spool.begin_attempt(row.id) is not None  # ... and the process dies here
        spool.mark_failed(row.id, "outcome unknown after 1 attempt(s), not carried", now)
        failed = spool.get(row.id)
        assert failed is not None and failed.state == "FAILED" and failed.outcome_unknown
        stats = spool.stats()
        assert (stats.failed, stats.failed_outcome_unknown) == (1, 1)
        assert gauges.reading(spool, now).outcome_unknown == 1
    finally:
        spool.close()


def test_usage_kept_under_no_product_is_labelled_license() -> None:
    """A license's SaaS usage is kept under no product: recorded and metered, its product
    label is "(license)" (never the license: one a customer), and it shares no series with
    a product's usage."""
    from prometheus_client import generate_latest

    registry = metrics.install()
    try:
        metrics.usage_recorded([("", "requests", "2"), ("prod-a", "requests", "1")], 2, 0)
        metrics.record_sent("", "requests", "2")
        families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    finally:
        uninstall()
    for family in ("metering_gateway_usage_recorded_quantity", "metering_gateway_usage_metered_quantity"):
        labels = {
            (s.labels["product_code"], s.labels["usage_dimension"]): s.value
            for s in families[family].samples
            if s.name.endswith("_total")
        }
        assert labels[("(license)", "requests")] == 2, family
        assert ("", "requests") not in labels, family


def test_caller_chosen_labels_are_bounded_by_metrics_max_series() -> None:
    """40,000 dimensions recorded and metered: the first --metrics-max-series pairs keep their
    labels, the rest are summed under "other", counted by the overflow counter, and the scrape
    stays the size of those series."""
    from prometheus_client import generate_latest

    registry = metrics.install(max_series=1000)
    try:
        baseline = len(generate_latest(registry))
        for start in range(0, 40_000, 1000):
            metrics.usage_recorded([("prod-a", f"dim-{n}", "1") for n in range(start, start + 1000)], 1000, 0)
        for n in range(40_000):
            metrics.record_sent("prod-a", f"dim-{n}", "2")
        scrape = generate_latest(registry)
        families = {f.name: f for f in text_string_to_metric_families(scrape.decode())}
        recorded = {
            (s.labels["product_code"], s.labels["usage_dimension"]): s.value
            for s in families["metering_gateway_usage_recorded_quantity"].samples
            if s.name.endswith("_total")
        }
        assert len(recorded) == 1001 and recorded[("other", "other")] == 39_000
        assert sum(recorded.values()) == 40_000  # nothing lost, only folded
        overflow = {
            s.labels["family"]: s.value
            for s in families["metering_gateway_usage_series_overflow"].samples
            if s.name.endswith("_total")
        }
        assert overflow == {"recorded": 39_000, "metered": 39_000}
        assert len(scrape) - baseline < 2 * 1001 * 120, "two families of 1001 series, about 120 bytes each"
    finally:
        uninstall()
