"""Each attack of the hostile-callers review, against one real gateway process.

The process serves MeterUsage, BatchMeterUsage and RecordUsage (an SQLite spool, the
embedded local AWS) with metrics on. The tests run in file order, each an attack; a
watcher asks health every 100 ms throughout. The last test checks what every attack
must leave: the process alive, its peak memory (VmHWM) under 200 MiB, health answered
every time and quickly, and every event a RecordUsage acknowledged in the spool, once.
benchmarks/abuse.py is the longer version, with figures.
"""

from __future__ import annotations

import base64
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import Settings
from gateway.domain.validation import BATCH_BYTES_MAX, BATCH_RECORDS_MAX
from gateway.rpc.server import METERING_SERVICE, RECORDER_SERVICE
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import (
    ENHANCE_YOUR_CALM,
    GOAWAY,
    PING,
    SETTINGS,
    details,
    h2_connect,
    h2_frame,
    h2_frames_until_closed,
)
from support.hostile import ACCOUNT_ID, LICENSE_ARN, IdleStream, tag_bomb, trailer_bytes
from support.processes import SERVE, GatewayProcess, free_port, gateway_process, http_json, tool_env
from support.recording import event, wait_for

pytestmark = pytest.mark.slow
PEAK_RSS_MAX = 200 * 1024 * 1024
TRAILERS_MAX = 16 * 1024  # a refusal's trailers, however hostile the request
MAX_MESSAGE = Settings().max_message_size  # the gateway's (default) largest request
MAX_CONNECTIONS = 100
METER_USAGE = "/marketplace.metering.v1.MeteringService/MeterUsage"
BATCH_METER_USAGE = "/marketplace.metering.v1.MeteringService/BatchMeterUsage"
RECORD_USAGE = "/marketplace.metering.v1.UsageRecorderService/RecordUsage"


class Target:
    """The gateway under attack, what watches it, and what it acknowledged."""

    def __init__(self, gw: GatewayProcess, spool: Path, aws_url: str, metrics_url: str) -> None:
        self.gw, self.spool, self.aws_url, self.metrics_url = gw, spool, aws_url, metrics_url
        self.channel = grpc.insecure_channel(gw.target)
        self.meter = pb_grpc.MeteringServiceStub(self.channel)
        self.recorder = pb_grpc.UsageRecorderServiceStub(self.channel)
        self.acknowledged: dict[str, Decimal] = {}  # event id -> quantity, of every OK RecordUsage
        self.health: list[tuple[float, bool]] = []  # (seconds, SERVING) of each watcher's check
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        with grpc.insecure_channel(self.gw.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.wait(0.1):
                started = time.monotonic()
                try:
                    ok = (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                        == health_pb2.HealthCheckResponse.SERVING
                    )
                except grpc.RpcError:
                    ok = False
                self.health.append((time.monotonic() - started, ok))

    def record(self, *events: pb.UsageEvent) -> pb.RecordUsageResponse:
        reply = self.recorder.RecordUsage(pb.RecordUsageRequest(events=events), timeout=30)
        self.acknowledged.update({e.event_id: Decimal(e.usage_quantity) for e in events})
        return reply

    def raw(self, method: str, payload: bytes) -> grpc.RpcError:
        """A call of request bytes, as a client with gRPC's default limits sends it; its error."""
        call = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            call(payload, timeout=30)
        return refused.value

    def peak_rss(self) -> int:
        with open(f"/proc/{self.gw.proc.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

    def close(self) -> None:
        self._stop.set()
        self._watcher.join(10)
        self.channel.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    directory = tmp_path_factory.mktemp("abuse")
    aws_port, metrics_port = free_port(), free_port()
    with gateway_process(
        "--spool",
        str(directory / "spool.db"),
        "--local-port",
        str(aws_port),
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--flush-interval",
        "200ms",
        "--max-workers",
        "8",
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--max-connection-idle",
        "2s",
    ) as gw:
        attacked = Target(
            gw, directory / "spool.db", f"http://127.0.0.1:{aws_port}", f"http://127.0.0.1:{metrics_port}/metrics"
        )
        attacked.record(*[event(f"warm-{i}", time.time() - 3600, 1) for i in range(10)])
        try:
            yield attacked
        finally:
            attacked.close()


def invalid(error: grpc.RpcError) -> list[str]:
    """The fields a refusal names; the refusal must be INVALID_ARGUMENT with its details."""
    got = details(error)
    assert got.code == grpc.StatusCode.INVALID_ARGUMENT and got.info.reason == "INVALID_REQUEST", got
    return got.fields


# -- the attacks, in order -----------------------------------------------------------------------------


def test_a_tag_bomb_gets_invalid_argument(target: Target) -> None:
    """262,144 empty tags on one allocation (512 KiB), as many on one event, and on one
    allocation of a BatchMeterUsage's record."""
    assert "usage_allocations[0].tags" in invalid(target.raw(METER_USAGE, tag_bomb(262_144, record=False)))
    assert "events[0].tags" in invalid(target.raw(RECORD_USAGE, tag_bomb(262_144, record=True)))
    error = target.raw(BATCH_METER_USAGE, tag_bomb(262_144, batch=True))
    assert "usage_records[0].usage_allocations[0].tags" in invalid(error)
    assert trailer_bytes(error) < TRAILERS_MAX


def test_a_request_larger_than_the_limit_is_refused(target: Target) -> None:
    error = target.raw(METER_USAGE, pb.MeterUsageRequest(product_code="p" * (2 * 1024 * 1024)).SerializeToString())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_batch_of_invalid_events_gets_invalid_argument_with_its_details(target: Target) -> None:
    """1000 events wrong in every field: the caller, with default limits, reads the BadRequest."""
    bad = pb.UsageEvent(
        event_id="",
        product_code="bad code!",
        usage_quantity_as_decimal="-1",
        tags=[pb.Tag(key="", value="\x01" * 100)] * 5,
    )
    with pytest.raises(grpc.RpcError) as refused:
        target.recorder.RecordUsage(pb.RecordUsageRequest(events=[bad] * 1000), timeout=30)
    fields = invalid(refused.value)
    assert 0 < len(fields) <= 100
    assert int(details(refused.value).info.metadata["violations"]) > len(fields)


def test_a_batch_meter_usage_of_invalid_records_gets_invalid_argument_with_small_trailers(target: Target) -> None:
    """25 records wrong in every field: at most 100 fields named, every violation counted,
    and trailers a caller takes."""
    bad = pb.UsageRecord(
        dimension="",
        quantity_as_decimal="-1",
        customer_aws_account_id="12ab",
        license_arn="not-an-arn",
        usage_allocations=[
            pb.UsageAllocation(allocated_usage_quantity_as_decimal="-1", tags=[pb.Tag(key="", value="\x01" * 100)] * 5)
        ],
    )
    with pytest.raises(grpc.RpcError) as refused:
        target.meter.BatchMeterUsage(pb.BatchMeterUsageRequest(usage_records=[bad] * BATCH_RECORDS_MAX), timeout=30)
    fields = invalid(refused.value)
    assert 0 < len(fields) <= 100
    assert int(details(refused.value).info.metadata["violations"]) > len(fields)
    assert trailer_bytes(refused.value) < TRAILERS_MAX


def _saas_batch(allocations: int) -> pb.BatchMeterUsageRequest:
    """25 valid records of as many customers, each of ``allocations`` allocations with four
    tags of 253 characters: about 26 KB per allocation over the batch."""
    now = Timestamp(seconds=int(time.time()))
    return pb.BatchMeterUsageRequest(
        usage_records=[
            pb.UsageRecord(
                timestamp=now,
                customer_aws_account_id=str(int(ACCOUNT_ID) + r),
                license_arn=LICENSE_ARN,
                dimension="d",
                quantity_as_decimal=str(allocations),
                usage_allocations=[
                    pb.UsageAllocation(
                        allocated_usage_quantity_as_decimal="1",
                        tags=[pb.Tag(key=f"k{t}", value=f"{a:>3}" + "v" * 250) for t in range(4)],
                    )
                    for a in range(allocations)
                ],
            )
            for r in range(BATCH_RECORDS_MAX)
        ]
    )


@pytest.mark.parametrize(
    ("allocations", "wire_over"), [pytest.param(38, True, id="request"), pytest.param(37, False, id="aws-json")]
)
def test_a_batch_meter_usage_over_aws_1_mb_is_refused_before_aws(
    target: Target, allocations: int, wire_over: bool
) -> None:
    """Over AWS's 1 MB, under the gateway's largest message: the request's bytes, or only the
    JSON body AWS would get (the records are valid). INVALID_ARGUMENT naming usage_records."""
    request = _saas_batch(allocations)
    if wire_over:
        assert BATCH_BYTES_MAX <= request.ByteSize() < MAX_MESSAGE
    else:
        assert request.ByteSize() < BATCH_BYTES_MAX
    error = target.raw(BATCH_METER_USAGE, request.SerializeToString())
    assert invalid(error) == ["usage_records"]
    assert "AWS takes under 1000000 (1 MB)" in details(error).violations[0][1]
    assert trailer_bytes(error) < TRAILERS_MAX


def test_idle_reflection_streams_starve_nothing(target: Target) -> None:
    streams = [IdleStream(target.channel) for _ in range(64)]
    try:
        wait_for(lambda: all(s.answers or s.error for s in streams), what="every stream answered or refused")
        for n in range(10):
            assert target.meter.MeterUsage(
                pb.MeterUsageRequest(
                    product_code="prod-abc123",
                    usage_dimension="beside",
                    usage_quantity=1,
                    timestamp=Timestamp(seconds=int(time.time())),
                ),
                timeout=5,
            ).metering_record_id
            assert target.record(event(f"beside-streams-{n}", time.time() - 3600, 2)).accepted == 1
    finally:
        for s in streams:
            s.close()


def test_a_slow_aws_and_a_flood_of_meter_usage_leave_health_and_record_usage(target: Target) -> None:
    faults = target.aws_url + "/_local/faults"
    http_json(faults, "POST", {"error": "slow", "delay": 5.0, "count": 100, "operation": "MeterUsage"})
    try:
        with futures.ThreadPoolExecutor(24) as pool:
            calls = [pool.submit(_meter, target, f"flood-{n}") for n in range(24)]
            # While AWS holds the calls it admitted: health, RecordUsage and quick refusals.
            wait_for(lambda: sum(1 for c in calls if c.done()) >= 12, timeout=30, what="the excess refused")
            refused = [c.result() for c in calls if c.done()]
            assert all(r == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CONCURRENCY_LIMIT_EXCEEDED") for r in refused), (
                refused
            )
            health = health_pb2_grpc.HealthStub(target.channel)
            for name in ("", METERING_SERVICE, RECORDER_SERVICE):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert target.record(event("during-flood", time.time() - 3600, 3)).accepted == 1
            assert not all(c.done() for c in calls), "the admitted calls still wait on AWS"
    finally:
        http_json(faults, "DELETE")


def _meter(target: Target, dimension: str) -> tuple[grpc.StatusCode, str]:
    try:
        target.meter.MeterUsage(
            pb.MeterUsageRequest(
                product_code="prod-abc123",
                usage_dimension=dimension,
                usage_quantity=1,
                timestamp=Timestamp(seconds=int(time.time())),
            ),
            timeout=60,
        )
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), details(exc).info.reason


def test_idle_connections_are_closed_and_capped(target: Target) -> None:
    conns = [h2_connect(target.gw.target) for _ in range(MAX_CONNECTIONS + 50)]
    try:
        outcomes = [h2_frames_until_closed(c, timeout=15) for c in conns]
        assert all(closed for _, closed in outcomes), "every idle connection closed, within the idle time"
        refused = [frames for frames, _ in outcomes if not frames]
        assert len(refused) >= 50, "the ones past --max-connections closed before a frame"
    finally:
        for c in conns:
            c.close()
    assert target.record(event("after-connections", time.time() - 3600, 4)).accepted == 1


def test_forty_thousand_dimensions_leave_the_scrape_small(target: Target) -> None:
    for batch in range(40):  # in the open hour: placed, and not sent during the test
        events = [event(f"dim-{batch}-{i}", time.time(), 1, dimension=f"d{batch * 1000 + i}") for i in range(1000)]
        assert target.record(*events).accepted == 1000
    with urllib.request.urlopen(target.metrics_url, timeout=10) as reply:
        scrape = reply.read()
    assert len(scrape) < 500 * 1024, len(scrape)
    assert b'metering_gateway_usage_series_overflow_total{family="recorded"}' in scrape


def test_bad_arguments_get_invalid_argument(target: Target) -> None:
    tokens = ["[Infinity,1]", "[1e400,1]", f"[{2**64},1]", "[" * 100_000 + "]" * 100_000]
    for token in tokens:
        with pytest.raises(grpc.RpcError) as refused:
            target.recorder.ListMeteringRecords(
                pb.ListMeteringRecordsRequest(page_token=base64.urlsafe_b64encode(token.encode()).decode()), timeout=10
            )
        assert invalid(refused.value) == ["page_token"]
    for request in (
        pb.ListMeteringRecordsRequest(start_time=Timestamp(seconds=2**63 - 1, nanos=1)),
        pb.ListMeteringRecordsRequest(state=99),  # type: ignore[arg-type]  # no such state, on purpose
    ):
        with pytest.raises(grpc.RpcError) as refused:
            target.recorder.ListMeteringRecords(request, timeout=10)
        invalid(refused.value)
    with pytest.raises(grpc.RpcError) as refused:
        target.recorder.RetryMeteringRecord(pb.RetryMeteringRecordRequest(record_id="9" * 5000), timeout=10)
    assert invalid(refused.value) == ["record_id"]


def test_a_ping_flood_is_sent_away(target: Target) -> None:
    conn = h2_connect(target.gw.target)
    conn.sendall(h2_frame(SETTINGS, flags=1) + h2_frame(PING, b"abcdefgh") * 1000)
    frames, closed = h2_frames_until_closed(conn, timeout=30)
    conn.close()
    goaway = [payload for kind, payload in frames if kind == GOAWAY]
    assert closed and goaway and int.from_bytes(goaway[0][4:8], "big") == ENHANCE_YOUR_CALM


# -- what every attack must leave ------------------------------------------------------------------------


def test_the_gateway_survived_every_attack(target: Target) -> None:
    assert target.gw.alive, target.gw.tail()
    peak = target.peak_rss()
    print(
        f"peak RSS {peak / 2**20:.0f} MiB; health checks {len(target.health)}, slowest "
        f"{max(s for s, _ in target.health) * 1000:.0f} ms"
    )
    assert peak < PEAK_RSS_MAX
    # Every check answered SERVING within its 5 s deadline (the figures are printed above).
    assert len(target.health) > 50 and all(ok for _, ok in target.health), "health answered SERVING every time"

    # Every acknowledged event is in the spool, once, with its quantity (read from the file itself).
    assert target.gw.terminate() == 0
    with sqlite3.connect(f"file:{target.spool}?mode=ro", uri=True) as db:
        stored = {
            event_id: Decimal(quantity) for event_id, quantity in db.execute("SELECT event_id, quantity FROM events")
        }
    assert {k: stored.get(k) for k in target.acknowledged} == target.acknowledged


# -- settings a careless deployment gives: refused at start-up, in one line ------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ("--spool", ":memory:"),
        ("--spool", "host=db user=alice password=s3cr3tpw dbname=m"),
        ("--aws-max-rps", "1e-300"),
        ("--grace", "٥s"),
        ("--max-workers", "١٢"),
        ("--spool-create", "no", "--spool", "/nonexistent-volume/spool.db"),
    ],
)
def test_a_bad_setting_stops_start_up_in_one_line(flags: tuple[str, ...]) -> None:
    done = subprocess.run(
        [*SERVE, "--local", "--listen", "127.0.0.1:0", *flags],
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "s3cr3tpw" not in done.stderr + done.stdout, done.stderr
