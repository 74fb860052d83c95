"""UsageRecorderService over a real gRPC channel, metering to LocalAws over boto3.

The gateway and the local backend share a simulated clock fixed at an awkward
minute (two and a half minutes past the hour), so nothing here depends on when
the tests run.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_spool_sqlite import BrokenReads

from gateway.local_aws import DROP, LocalAws
from gateway.recording import placement, servicer
from gateway.recording.lifecycle import Recording
from gateway.recording.spool import RecordRow
from gateway.rpc.server import RECORDER_SERVICE
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import FIXED_NOW, Clock, Details, details, local_session, using_clock
from support.metrics import uninstall
from support.postgres import PostgresServer
from support.recording import (
    ACCOUNT,
    LICENSE,
    event,
    running_recorder,
    saas_event,
    sums_of_events,
    sums_of_records,
    wait_for,
)

HOUR = 3600
State = pb.MeteringRecord.State
CLOCK = Clock(FIXED_NOW)  # this test's clock: the autouse fixture below makes a new one for each test


def now() -> float:
    return CLOCK()


def hours_ago(n: float) -> float:
    """A time inside the hour that started ``n`` hours before the current one."""
    return placement.hour_of(now()) - n * HOUR + 60


@pytest.fixture(autouse=True)
def clock() -> Iterator[Clock]:
    """Each test's own clock, for its gateway and conftest's local AWS: 10:02:30 when the
    test starts, then moving with real time (the sender waits out backoffs for real).
    A test lasts seconds, so its hour never changes; none inherits another's minutes."""
    global CLOCK
    with using_clock(Clock(FIXED_NOW, running=True)) as fresh:
        CLOCK = fresh
        yield fresh


@pytest.fixture
def recorder(local_aws: LocalAws, tmp_path: Path) -> Iterator[tuple[pb_grpc.UsageRecorderServiceStub, Recording]]:
    with running_recorder(local_aws.endpoint_url, str(tmp_path / "spool.db"), clock=CLOCK) as (target, recording):
        with grpc.insecure_channel(target) as channel:
            yield pb_grpc.UsageRecorderServiceStub(channel), recording


def record(stub: pb_grpc.UsageRecorderServiceStub, *events: pb.UsageEvent) -> pb.RecordUsageResponse:
    return stub.RecordUsage(pb.RecordUsageRequest(events=events), timeout=10)


def listed(stub: pb_grpc.UsageRecorderServiceStub, **filters: object) -> list[pb.MeteringRecord]:
    return list(stub.ListMeteringRecords(pb.ListMeteringRecordsRequest(**filters), timeout=10).records)


def listed_when(
    stub: pb_grpc.UsageRecorderServiceStub, ready: Callable[[list[pb.MeteringRecord]], bool], **filters: object
) -> list[pb.MeteringRecord]:
    """The listing once ``ready`` says so (for wait_for), else []."""
    found = listed(stub, **filters)
    return found if ready(found) else []


def metered(local_aws: LocalAws, expected: dict) -> bool:
    return sums_of_records(local_aws.records()) == expected


def test_invalid_batch_names_every_event_field_and_stores_nothing(recorder: tuple, local_aws: LocalAws) -> None:
    stub, _ = recorder
    no_time = pb.UsageEvent(event_id="e3", product_code="p", usage_dimension="d", usage_quantity=1)  # stamped: fine
    bad = [
        event("", hours_ago(1)),
        event("e1", hours_ago(1), product="bad code!"),
        event("e2", hours_ago(1), quantity="1.1234567"),
        no_time,
        pb.UsageEvent(event_id="e4", product_code="p", usage_dimension="d", timestamp=event("x", now()).timestamp),
        event("e5", hours_ago(1), **{"": "v"}),
        event("e6", now() + 3600),
        event("x" * 129, hours_ago(1)),
        event("ok", hours_ago(1)),
    ]
    with pytest.raises(grpc.RpcError) as err:
        record(stub, *bad)
    got = details(err.value)
    assert got.code == grpc.StatusCode.INVALID_ARGUMENT
    assert got.info.reason == "INVALID_REQUEST"
    assert got.fields == [
        "events[0].event_id",
        "events[1].product_code",
        "events[2].usage_quantity_as_decimal",
        "events[4].quantity",
        "events[5].tags[0].key",
        "events[6].timestamp",
        "events[7].event_id",
    ]
    recording = recorder[1]
    recording.sender.tick()
    assert listed(stub) == []  # all or nothing: the valid event was not kept either
    for events in ([], [event(f"e{i}", now()) for i in range(1001)]):
        with pytest.raises(grpc.RpcError) as err:
            record(stub, *events)
        assert details(err.value).fields == ["events"]


def test_duplicates_add_nothing(recorder: tuple) -> None:
    stub, _ = recorder
    first = [event(f"e{i}", now(), 2) for i in range(3)]
    assert record(stub, *first) == pb.RecordUsageResponse(accepted=3, duplicates=0)
    e3 = event("e3", now(), 5)
    again = record(stub, *first, e3, e3)
    assert again == pb.RecordUsageResponse(accepted=1, duplicates=4)
    wait_for(lambda: recorder[1].spool.stats().unassigned_events == 0, what="the events placed")
    (only,) = listed(stub)
    assert Decimal(only.quantity) == 11


def test_an_event_id_reused_with_another_payload_refuses_the_batch(recorder: tuple) -> None:
    stub, _ = recorder
    record(stub, event("job-1", hours_ago(1), 2))
    with pytest.raises(grpc.RpcError) as err:
        record(stub, event("job-2", hours_ago(1), 1), event("job-1", hours_ago(1), 3))
    got = details(err.value)
    assert (got.code, got.info.reason, got.info.domain) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "EVENT_ID_CONFLICT",
        "metering-gateway",
    )
    assert got.fields == ["events[1].event_id"] and got.retry is None
    # It says which field differs, with the stored and the new value, in the message and the BadRequest.
    said = "was accepted before with a different payload: quantity 2 then, 3 now"
    assert got.violations == [("events[1].event_id", said)]
    assert got.message == f"1 event id(s) were accepted before with a different payload: events[1].event_id {said}"
    # Nothing of the refused batch was kept, and the identical repeat is still a duplicate.
    assert record(stub, event("job-2", hours_ago(1), 1), event("job-1", hours_ago(1), 2)) == pb.RecordUsageResponse(
        accepted=1, duplicates=1
    )


def unstamped(event_id: str, quantity: int | str = 1, **tags: str) -> pb.UsageEvent:
    """An event as a caller who leaves the time to the gateway sends it."""
    ev = event(event_id, now(), quantity, **tags)
    ev.ClearField("timestamp")
    return ev


def test_an_event_without_a_timestamp_is_stamped_and_its_resend_is_a_duplicate(recorder: tuple) -> None:
    stub, recording = recorder
    assert record(stub, unstamped("order-1001", 3), unstamped("order-1002", "1.5")) == pb.RecordUsageResponse(
        accepted=2
    )
    CLOCK.advance(1800)  # the reply was lost; the caller builds the same events again, later, plus a new one
    again = record(stub, unstamped("order-1001", 3), unstamped("order-1002", "1.5"), unstamped("order-1003", 1))
    assert again == pb.RecordUsageResponse(accepted=1, duplicates=2)
    wait_for(lambda: recording.spool.stats().unassigned_events == 0, what="the events placed")
    (hour,) = listed(stub)  # stamped when first accepted: all in the hour the clock is in
    assert Decimal(hour.quantity) == Decimal("5.5")
    assert hour.hour.seconds == placement.hour_of(now())


def test_a_conflict_names_each_field_that_differs_with_both_values(recorder: tuple) -> None:
    stub, _ = recorder
    record(stub, event("t", hours_ago(1), 2), unstamped("u", 2), event("g", hours_ago(1), 2, team="a"))
    changed = [
        event("t", hours_ago(1) + 0.5, "2.0"),
        event("u", hours_ago(1), 2),
        event("g", hours_ago(1), 2, team="b"),
    ]
    with pytest.raises(grpc.RpcError) as err:
        record(stub, *changed)
    got = details(err.value)
    at = placement.event_time(int(hours_ago(1)), 0)
    later = placement.event_time(int(hours_ago(1)), 500_000_000)
    before = "was accepted before with a different payload:"
    assert got.violations == [
        ("events[0].event_id", f"{before} timestamp {at} then, {later} now"),  # 2 and 2.0 are one quantity
        ("events[1].event_id", f"{before} timestamp unset then, {at} now"),
        ("events[2].event_id", f"{before} tags {{team=a}} then, {{team=b}} now"),
    ]
    assert all(f"{field} {said}" in got.message for field, said in got.violations)


def test_an_event_id_repeated_in_one_batch_says_so(recorder: tuple) -> None:
    stub, _ = recorder
    with pytest.raises(grpc.RpcError) as err:
        record(stub, event("a", hours_ago(1), 1), event("b", hours_ago(1), 1), event("a", hours_ago(1), 4))
    got = details(err.value)
    assert (got.code, got.info.reason) == (grpc.StatusCode.ALREADY_EXISTS, "EVENT_ID_CONFLICT")
    said = "repeats events[0].event_id in this batch with a different payload: quantity 1 then, 4 now"
    assert got.violations == [("events[2].event_id", said)]
    assert "accepted before" not in got.message and said in got.message
    assert record(stub, event("a", hours_ago(1), 1), event("a", hours_ago(1), 1)) == pb.RecordUsageResponse(
        accepted=1, duplicates=1
    )  # an identical repeat is one event, as it always was


def test_the_response_counts_events_too_old_for_their_own_hour(recorder: tuple) -> None:
    stub, _ = recorder
    got = record(stub, event("old", hours_ago(8), 1), event("edge", hours_ago(6), 1), event("new", hours_ago(1), 1))
    assert got == pb.RecordUsageResponse(accepted=3, carried=2)
    again = record(stub, event("old", hours_ago(8), 1), event("older", hours_ago(20), 1))
    assert again == pb.RecordUsageResponse(accepted=1, duplicates=1, carried=1)  # a duplicate is carried no more


def test_records_show_accepted_usage_within_a_second_without_a_sender_pass(local_aws: LocalAws, tmp_path: Path) -> None:
    with (
        running_recorder(local_aws.endpoint_url, str(tmp_path / "s.db"), clock=CLOCK, flush_interval=900.0) as (
            target,
            _,
        ),
        grpc.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.UsageRecorderServiceStub(channel)
        record(stub, event("soon", hours_ago(0), 2))
        (pending,) = wait_for(lambda: listed(stub), timeout=5, what="a pending record")  # the sender waits 15 minutes
        assert (pending.state, Decimal(pending.quantity)) == (State.STATE_PENDING, 2)


def test_products_outside_the_allowlist_are_refused_naming_the_field(local_aws: LocalAws, tmp_path: Path) -> None:
    with (
        running_recorder(
            local_aws.endpoint_url, str(tmp_path / "s.db"), clock=CLOCK, products="prod-a=requests,storage"
        ) as (target, _),
        grpc.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.UsageRecorderServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            record(stub, event("1", now(), product="prod-b"), event("2", now(), dimension="reqests"), event("3", now()))
        got = details(err.value)
        assert (got.code, got.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        assert got.violations == [
            ("events[0].product_code", "is not a product this gateway meters (--products: prod-a)"),
            (
                "events[1].usage_dimension",
                "is not a dimension of prod-a this gateway meters (--products: requests, storage)",
            ),
        ]
        assert record(stub, event("3", now())) == pb.RecordUsageResponse(accepted=1)


def test_a_full_spool_is_unavailable_and_health_comes_back_by_itself(local_aws: LocalAws, tmp_path: Path) -> None:
    with (
        running_recorder(local_aws.endpoint_url, str(tmp_path / "s.db"), clock=CLOCK) as (target, recording),
        grpc.insecure_channel(target) as channel,
    ):
        spool_full_then_free(
            pb_grpc.UsageRecorderServiceStub(channel), health_pb2_grpc.HealthStub(channel), recording, local_aws
        )


def spool_full_then_free(
    stub: pb_grpc.UsageRecorderServiceStub,
    health: health_pb2_grpc.HealthStub,
    recording: Recording,
    local_aws: LocalAws,
) -> None:
    def status() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=RECORDER_SERVICE), timeout=5).status

    assert status() == health_pb2.HealthCheckResponse.SERVING
    record(stub, event("before", hours_ago(1), 1))
    db = recording.spool._db
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages}")  # the volume is full
    big = [event(f"full-{i}", hours_ago(2), i, tenant="x" * 200 + str(i)) for i in range(300)]
    with pytest.raises(grpc.RpcError) as err:
        record(stub, *big)
    got = details(err.value)
    assert (got.code, got.info.reason) == (grpc.StatusCode.UNAVAILABLE, "SPOOL_UNAVAILABLE")
    assert got.retry is not None and "full" in got.message and "no transaction is active" not in got.message
    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    db.execute("PRAGMA max_page_count = 1073741823")  # room again: nobody calls, health must see it alone
    wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, timeout=10, what="the recorder to serve again")
    assert record(stub, *big).accepted == 300
    expected = sums_of_events([event("before", hours_ago(1), 1), *big])
    wait_for(lambda: metered(local_aws, expected), what="everything acknowledged metered once")


def test_listing_only_reads(local_aws: LocalAws, tmp_path: Path) -> None:
    with running_recorder(local_aws.endpoint_url, str(tmp_path / "s.db"), clock=CLOCK, start_sender=False) as (
        target,
        recording,
    ):
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.UsageRecorderServiceStub(channel)
            record(stub, event("a", hours_ago(1), 1))
            assert listed(stub) == []  # the listing places nothing: the sender's pass does
            assert recording.spool.stats().unassigned_events == 1
            recording.sender.tick()
            (placed,) = listed(stub)
            assert placed.state == State.STATE_SENT


def test_closed_hours_are_metered_once_with_allocations(recorder: tuple, local_aws: LocalAws) -> None:
    stub, _ = recorder
    events = [
        event("a", hours_ago(2), 3, tenant="t1"),
        event("b", hours_ago(2), 4, tenant="t2"),
        event("c", hours_ago(2), 5),
        event("d", hours_ago(1), "0.25", product="prod-b", dimension="gb"),
        event("e", hours_ago(1), "1.5", product="prod-b", dimension="gb"),
    ]
    assert record(stub, *events).accepted == 5
    expected = sums_of_events(events)
    wait_for(lambda: metered(local_aws, expected), what="both hours metered")
    # AWS holds a record a moment before the sender, hearing back, marks it SENT.
    sent_records = wait_for(
        lambda: listed_when(stub, lambda found: len(found) == 2, state=State.STATE_SENT),
        what="both records SENT in the spool",
    )
    sent = {(r.product_code, r.hour.ToSeconds()): r for r in sent_records}
    by_id = {r.metering_record_id: r for r in local_aws.records()}
    tagged = sent[("prod-a", placement.hour_of(hours_ago(2)))]
    assert tagged.quantity == "12"
    assert tagged.metering_record_id in by_id and tagged.attempts == 1
    # Whole events, but sent with the decimal fields: AWS deprecated whole quantities.
    assert {
        (tuple((t.key, t.value) for t in a.tags), a.allocated_usage_quantity_as_decimal) for a in tagged.allocations
    } == {((), "5"), ((("tenant", "t1"),), "3"), ((("tenant", "t2"),), "4")}
    decimal = sent[("prod-b", placement.hour_of(hours_ago(1)))]
    assert decimal.quantity == "1.75" and not decimal.allocations
    assert by_id[decimal.metering_record_id].quantity == Decimal("1.75")
    assert len(local_aws.records()) == 2


def test_late_events_are_carried_to_the_next_open_hour(recorder: tuple, local_aws: LocalAws) -> None:
    stub, _ = recorder
    first = [event("a", hours_ago(3), 10)]
    record(stub, *first)
    wait_for(lambda: metered(local_aws, sums_of_events(first)), what="the first record")
    late = [event("b", hours_ago(3), 7)]
    record(stub, *late)
    wait_for(lambda: metered(local_aws, sums_of_events(first + late)), what="the carried record")
    carried = [r for r in listed(stub) if r.carried_from]
    assert len(carried) == 1
    assert carried[0].hour.ToSeconds() == placement.hour_of(hours_ago(2))
    assert [t.ToSeconds() for t in carried[0].carried_from] == [placement.hour_of(hours_ago(3))]
    hours = [(r.product_code, r.usage_dimension, r.hour) for r in local_aws.records()]
    assert len(hours) == len(set(hours)) == 2


def test_an_hour_taken_by_someone_else_is_carried(recorder: tuple, local_aws: LocalAws) -> None:
    stub, _ = recorder
    taken = datetime.fromtimestamp(placement.hour_of(hours_ago(2)), UTC)
    client = local_session().client("meteringmarketplace", endpoint_url=local_aws.endpoint_url)
    client.meter_usage(ProductCode="prod-a", UsageDimension="requests", Timestamp=taken, UsageQuantity=999)
    events = [event("a", hours_ago(2), 4), event("b", hours_ago(2), 6)]
    record(stub, *events)
    wait_for(lambda: listed(stub, state=State.STATE_SENT), what="the carried record sent")
    (sent,) = listed(stub)
    assert sent.hour.ToSeconds() == taken.timestamp() + HOUR
    assert [t.ToSeconds() for t in sent.carried_from] == [taken.timestamp()]
    assert sorted(r.quantity for r in local_aws.records()) == [Decimal(10), Decimal(999)]


def test_throttling_then_an_outage_then_recovery_meters_exact_sums(recorder: tuple, local_aws: LocalAws) -> None:
    stub, recording = recorder
    local_aws.inject("ThrottlingException", 3)
    local_aws.inject(DROP, 2)
    local_aws.inject("InternalServiceErrorException", 3)
    recording.sender.interval = 0.02
    events = [event(f"e{i}", hours_ago(1 + i % 3), i, product=f"prod-{i % 2}") for i in range(60)]
    record(stub, *events)
    wait_for(lambda: metered(local_aws, sums_of_events(events)), what="all hours metered after the outage")
    # AWS holds a record a moment before the sender, hearing back, marks it SENT.
    records = wait_for(
        lambda: listed_when(stub, lambda found: {r.state for r in found} == {State.STATE_SENT}),
        what="every record SENT in the spool",
    )
    assert max(r.attempts for r in records) > 1
    assert not local_aws.faults
    assert len(local_aws.records()) == 6


def test_events_older_than_the_deduplication_window_are_refused(recorder: tuple) -> None:
    """An event older than --event-retention may have been metered and its id forgotten:
    accepting it again could bill it twice."""
    stub, _ = recorder
    with pytest.raises(grpc.RpcError) as err:
        record(stub, event("ancient", now() - 7 * 24 * HOUR - 60, 5), event("recent", now() - 6 * 24 * HOUR, 5))
    got = details(err.value)
    assert (got.code, got.info.reason) == (grpc.StatusCode.OUT_OF_RANGE, "TIMESTAMP_OUT_OF_BOUNDS")
    assert got.fields == ["events[0].timestamp"]
    assert (
        "more than 7 days old (the deduplication window, --event-retention"
        in got.bad_request.field_violations[0].description
    )
    assert record(stub, event("recent", now() - 6 * 24 * HOUR, 5)).accepted == 1  # inside the window: carried


def test_events_older_than_aws_takes_are_carried_not_refused(recorder: tuple, local_aws: LocalAws) -> None:
    stub, _ = recorder
    old = [event("old", now() - 8 * HOUR, 5)]
    assert record(stub, *old).accepted == 1
    (rec,) = wait_for(lambda: listed(stub))
    assert rec.carried_from[0].ToSeconds() == placement.hour_of(now() - 8 * HOUR)
    assert rec.hour.ToSeconds() >= placement.earliest_hour(now())


def test_flush_on_shutdown_sends_the_open_hour(local_aws: LocalAws, tmp_path: Path) -> None:
    events = [event(f"e{i}", now(), 1) for i in range(5)]
    with running_recorder(local_aws.endpoint_url, str(tmp_path / "s.db"), flush_on_close=True, clock=CLOCK) as (
        target,
        _,
    ):
        with grpc.insecure_channel(target) as channel:
            record(pb_grpc.UsageRecorderServiceStub(channel), *events)
        assert local_aws.records() == []
    assert sums_of_records(local_aws.records()) == sums_of_events(events)


def test_listing_filters_and_pages(recorder: tuple) -> None:
    stub, _ = recorder
    events = [event(f"e{p}{h}", now() - h * HOUR, 1, product=f"prod-{p}") for p in range(2) for h in range(4)]
    record(stub, *events)
    wait_for(lambda: len(listed(stub)) == 8, what="the events placed")
    pages, token = [], ""
    while True:
        reply = stub.ListMeteringRecords(pb.ListMeteringRecordsRequest(page_size=3, page_token=token), timeout=10)
        pages.append(list(reply.records))
        token = reply.next_page_token
        if not token:
            break
    flat = [r for page in pages for r in page]
    assert [len(p) for p in pages] == [3, 3, 2]
    assert len({(r.product_code, r.hour.ToSeconds()) for r in flat}) == 8
    assert [r.hour.ToSeconds() for r in flat] == sorted((r.hour.ToSeconds() for r in flat), reverse=True)
    assert {r.product_code for r in listed(stub, product_code="prod-1")} == {"prod-1"}
    wait_for(lambda: len(listed(stub, state=State.STATE_SENT)) == 6, what="closed hours sent")
    assert len(listed(stub, state=State.STATE_PENDING)) == 2
    for bad in (pb.ListMeteringRecordsRequest(page_token="not-a-token"), pb.ListMeteringRecordsRequest(page_size=-1)):
        with pytest.raises(grpc.RpcError) as err:
            stub.ListMeteringRecords(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def stamp(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def test_listing_by_time_range(recorder: tuple) -> None:
    stub, _ = recorder
    record(stub, *[event(f"t{h}", hours_ago(h), h + 1) for h in range(1, 5)])
    wait_for(lambda: len(listed(stub)) == 4, what="the events placed")
    two_back = placement.hour_of(hours_ago(2))
    # Hours starting at or after the start, before the end; a bound inside an hour excludes that hour's start.
    inside = listed(stub, start_time=stamp(two_back - HOUR), end_time=stamp(two_back + HOUR))
    assert [r.hour.ToSeconds() for r in inside] == [two_back, two_back - HOUR]
    assert [r.hour.ToSeconds() for r in listed(stub, start_time=stamp(two_back - 0.5))] == [two_back + HOUR, two_back]
    assert [r.hour.ToSeconds() for r in listed(stub, end_time=stamp(two_back - HOUR + 0.5))] == [
        two_back - HOUR,
        two_back - 2 * HOUR,
    ]
    pages = [
        stub.ListMeteringRecords(
            pb.ListMeteringRecordsRequest(page_size=1, start_time=stamp(two_back - HOUR)), timeout=10
        )
    ]
    pages.append(
        stub.ListMeteringRecords(
            pb.ListMeteringRecordsRequest(
                page_size=5, start_time=stamp(two_back - HOUR), page_token=pages[0].next_page_token
            ),
            timeout=10,
        )
    )
    assert [r.hour.ToSeconds() for p in pages for r in p.records] == [two_back + HOUR, two_back, two_back - HOUR]
    assert len({r.record_id for p in pages for r in p.records}) == 3
    assert all(r.record_id.isdigit() for p in pages for r in p.records)
    for bad, fields in (
        (dict(start_time=stamp(two_back), end_time=stamp(two_back)), ["end_time"]),
        (dict(start_time=Timestamp(seconds=two_back, nanos=-1)), ["start_time"]),
    ):
        with pytest.raises(grpc.RpcError) as err:
            listed(stub, **bad)
        got = details(err.value)
        assert (got.code, got.info.reason, got.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", fields)


def retry(stub: pb_grpc.UsageRecorderServiceStub, record_id: str, reconciled: bool = False) -> pb.MeteringRecord:
    request = pb.RetryMeteringRecordRequest(record_id=record_id, reconciled=reconciled)
    return stub.RetryMeteringRecord(request, timeout=10).record


def refusal(stub: pb_grpc.UsageRecorderServiceStub, record_id: str, reconciled: bool = False) -> Details:
    with pytest.raises(grpc.RpcError) as err:
        retry(stub, record_id, reconciled)
    return details(err.value)


def test_retrying_records_maps_every_refusal(local_aws: LocalAws, tmp_path: Path) -> None:
    with (
        running_recorder(
            local_aws.endpoint_url, str(tmp_path / "s.db"), clock=CLOCK, start_sender=False, aws_max_attempts=1
        ) as (target, recording),
        grpc.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.UsageRecorderServiceStub(channel)
        record(stub, event("unknown", hours_ago(3), 3), event("refused", hours_ago(2), 2), event("ok", hours_ago(1), 1))
        local_aws.inject("InternalServiceErrorException", 1)  # hours_ago(3) goes first: AWS may hold it
        local_aws.inject("CustomerNotEntitledException", 1)  # hours_ago(2) is refused; hours_ago(1) is sent
        recording.sender.tick()
        local_aws.inject("CustomerNotEntitledException", 1)  # the unknown one's identical resend is refused
        time.sleep(0.3)  # its backoff
        recording.sender.tick()
        by_id = {r.product_code + str(r.hour.ToSeconds()): r for r in listed(stub)}
        unknown, refused, sent = (by_id[f"prod-a{placement.hour_of(hours_ago(n))}"] for n in (3, 2, 1))
        assert (unknown.state, unknown.outcome_unknown, refused.state, refused.outcome_unknown, sent.state) == (
            State.STATE_FAILED,
            True,
            State.STATE_FAILED,
            False,
            State.STATE_SENT,
        )

        for bad in ("", "abc", "-1", "1.0", "\uff11", str(2**63)):  # "１": a digit, but not an ASCII one
            got = refusal(stub, bad)
            assert (got.code, got.info.reason, got.fields) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_REQUEST",
                ["record_id"],
            ), bad
        got = refusal(stub, "987654")
        assert (got.code, got.info.reason, got.info.domain) == (
            grpc.StatusCode.NOT_FOUND,
            "RECORD_NOT_FOUND",
            "metering-gateway",
        )
        got = refusal(stub, sent.record_id, reconciled=True)
        assert (got.code, got.info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RECORD_NOT_FAILED")
        assert "SENT" in got.message and sent.metering_record_id in got.message
        got = refusal(stub, unknown.record_id)
        assert (got.code, got.info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "OUTCOME_UNKNOWN")
        for what in (
            placement.timestamp_of(unknown.hour.ToSeconds()).isoformat(),
            "quantity 3",
            unknown.client_token,
            f"records retry {unknown.record_id} --reconciled",
        ):
            assert what in got.message, what

        again = retry(stub, unknown.record_id, reconciled=True)
        assert (again.state, again.outcome_unknown, again.client_token, again.record_id) == (
            State.STATE_PENDING,
            False,
            unknown.client_token,
            unknown.record_id,
        )
        assert "reconciled" in again.last_error
        assert retry(stub, refused.record_id).state == State.STATE_PENDING
        got = refusal(stub, refused.record_id)  # the second retry of one record
        assert (got.code, got.info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RECORD_NOT_FAILED")
        assert "queued already" in got.message

        recording.sender.tick()  # the identical requests, same ClientTokens
        assert {r.state for r in listed(stub)} == {State.STATE_SENT}
        assert sorted(r.client_token for r in local_aws.records()) == sorted(
            r.client_token for r in (unknown, refused, sent)
        )


def test_a_retry_while_the_spool_cannot_write_is_unavailable(local_aws: LocalAws, tmp_path: Path) -> None:
    with (
        running_recorder(local_aws.endpoint_url, str(tmp_path / "s.db"), clock=CLOCK, start_sender=False) as (
            target,
            recording,
        ),
        grpc.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.UsageRecorderServiceStub(channel)
        record(stub, event("a", hours_ago(1), 1))
        local_aws.inject("CustomerNotEntitledException", 1)
        recording.sender.tick()
        (failed,) = listed(stub)
        recording.spool._db.execute("PRAGMA query_only = 1")  # every write now fails, as on a read-only volume
        try:
            got = refusal(stub, failed.record_id)
        finally:
            recording.spool._db.execute("PRAGMA query_only = 0")
        assert (got.code, got.info.reason) == (grpc.StatusCode.UNAVAILABLE, "SPOOL_UNAVAILABLE") and got.retry
        assert listed(stub)[0].state == State.STATE_FAILED
        assert retry(stub, failed.record_id).state == State.STATE_PENDING


def test_events_survive_a_restart_and_duplicates_are_still_known(local_aws: LocalAws, tmp_path: Path) -> None:
    spool = str(tmp_path / "spool.db")
    events = [event(f"e{i}", now(), 3) for i in range(4)]
    with running_recorder(local_aws.endpoint_url, spool, clock=CLOCK) as (target, _):
        with grpc.insecure_channel(target) as channel:
            record(pb_grpc.UsageRecorderServiceStub(channel), *events)
    with running_recorder(local_aws.endpoint_url, spool, flush_on_close=True, clock=CLOCK) as (target, _):
        with grpc.insecure_channel(target) as channel:
            assert record(pb_grpc.UsageRecorderServiceStub(channel), *events).duplicates == 4
    assert sums_of_records(local_aws.records()) == sums_of_events(events)


def test_a_database_outage_under_load_is_unavailable_and_recovers_by_itself(
    local_aws: LocalAws, private_postgres: PostgresServer
) -> None:
    """PostgreSQL stops while callers record: calls get UNAVAILABLE SPOOL_UNAVAILABLE
    with RetryInfo (not DEADLINE_EXCEEDED at their deadline), the recorder turns
    NOT_SERVING, and when the database is back health returns and the sender leads
    and sends again, with no call needed. Callers resend what was not acknowledged,
    and AWS gets every event exactly once."""
    dsn = private_postgres.create_database("spool")
    with (
        running_recorder(local_aws.endpoint_url, dsn, clock=CLOCK, flush_on_close=True) as (target, _),
        grpc.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.UsageRecorderServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=RECORDER_SERVICE), timeout=5).status

        batches: list[list[pb.UsageEvent]] = []
        unacknowledged: list[list[pb.UsageEvent]] = []
        refusals: list[Details] = []
        acknowledged = [0]
        stop = threading.Event()

        def caller(c: int) -> None:
            n = 0
            while not stop.is_set():
                batch = [event(f"c{c}-b{n}-e{i}", hours_ago(1 + i % 3), i % 7 + 1) for i in range(20)]
                n += 1
                batches.append(batch)
                try:
                    record(stub, *batch)
                    acknowledged[0] += 1
                except grpc.RpcError as exc:
                    refusals.append(details(exc))
                    unacknowledged.append(batch)
                    time.sleep(0.05)

        callers = [threading.Thread(target=caller, args=(c,)) for c in range(3)]
        for t in callers:
            t.start()
        try:
            wait_for(lambda: acknowledged[0] > 30, what="callers recording")
            private_postgres.stop("fast")
            wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, what="the recorder NOT_SERVING")
            wait_for(lambda: len(refusals) > 10, what="calls refused during the outage")
            with pytest.raises(grpc.RpcError) as err:
                stub.RecordUsage(pb.RecordUsageRequest(events=[event("during", hours_ago(1))]), timeout=30)
            unacknowledged.append([event("during", hours_ago(1))])
            private_postgres.start()
            wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, timeout=30, what="the recorder back")
            back = acknowledged[0]
            wait_for(lambda: acknowledged[0] > back + 10, timeout=30, what="callers recording again")
            # A record no earlier pass could have sent: only a sender that leads again sends it.
            record(stub, event("after", hours_ago(1), 5, dimension="after-outage"))
            wait_for(
                lambda: ("prod-a", "after-outage") in sums_of_records(local_aws.records()),
                timeout=30,
                what="the sender leading and sending again by itself",
            )
        finally:
            stop.set()
            for t in callers:
                t.join(30)
        assert not [t for t in callers if t.is_alive()]

        got = details(err.value)
        assert (got.code, got.info.reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "SPOOL_UNAVAILABLE",
        ) and got.retry is not None
        assert {(r.code, r.info.reason) for r in refusals} == {(grpc.StatusCode.UNAVAILABLE, "SPOOL_UNAVAILABLE")}
        for batch in unacknowledged:  # what a caller's retry policy does
            reply = record(stub, *batch)
            assert reply.accepted + reply.duplicates == len(batch)
    # Closed with a flush: usage carried into the open hour (its earlier hours were sent) goes too.
    expected = sums_of_events({e.event_id: e for b in batches + unacknowledged for e in b}.values())
    assert sums_of_records(local_aws.records()) == {**expected, ("prod-a", "after-outage"): Decimal(5)}


# -- what the hostile-callers review found ---------------------------------------------------------------


def test_a_spool_deleted_under_a_running_gateway_is_noticed_at_once(
    local_aws: LocalAws, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its files deleted while serving: the recorder turns NOT_SERVING with no call needed, every
    RecordUsage answers SPOOL_UNAVAILABLE (never OK into a file nobody will find), and an error
    line names the path."""
    path = tmp_path / "spool.db"
    with (
        running_recorder(local_aws.endpoint_url, str(path), clock=CLOCK, start_sender=False) as (target, _),
        grpc.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.UsageRecorderServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=RECORDER_SERVICE), timeout=5).status

        assert record(stub, event("before", hours_ago(1))).accepted == 1
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            name.unlink(missing_ok=True)
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, what="the recorder NOT_SERVING")
        for n in range(3):
            with pytest.raises(grpc.RpcError) as refused:
                record(stub, event(f"after-{n}", hours_ago(1)))
            got = details(refused.value)
            assert (got.code, got.info.reason) == (grpc.StatusCode.UNAVAILABLE, "SPOOL_UNAVAILABLE")
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    logged = capsys.readouterr().out
    assert "spool_file_vanished" in logged and str(path) in logged
    assert not path.exists()


@pytest.mark.parametrize(
    "token",
    [
        "[Infinity,1]",
        "[1e400,1]",
        f"[{2**64},1]",
        f"[1,{2**63}]",
        "[1,2,3]",
        '{"a":1}',
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_a_forged_page_token_is_invalid_argument(recorder: tuple, token: str) -> None:
    stub, _ = recorder
    encoded = base64.urlsafe_b64encode(token.encode()).decode()
    with pytest.raises(grpc.RpcError) as refused:
        listed(stub, page_token=encoded)
    got = details(refused.value)
    assert (got.code, got.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_token"])


@pytest.mark.parametrize(("seconds", "nanos"), [(2**63 - 1, 1), (-(2**63), 0), (253_402_300_800, 0)])
def test_a_time_outside_timestamps_range_is_invalid_argument(recorder: tuple, seconds: int, nanos: int) -> None:
    stub, _ = recorder
    for name in ("start_time", "end_time"):
        with pytest.raises(grpc.RpcError) as refused:
            listed(stub, **{name: Timestamp(seconds=seconds, nanos=nanos)})
        got = details(refused.value)
        assert got.code == grpc.StatusCode.INVALID_ARGUMENT and name in got.fields


@pytest.mark.parametrize("state", [99, -5, 4])
def test_an_unknown_state_is_invalid_argument_not_every_record(recorder: tuple, state: int) -> None:
    stub, _ = recorder
    with pytest.raises(grpc.RpcError) as refused:
        listed(stub, state=state)
    assert (details(refused.value).code, details(refused.value).fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["state"])


@pytest.mark.parametrize("record_id", ["9" * 5000, "1" * 20, str(2**63), "١٢"])
def test_a_record_id_of_too_many_digits_is_invalid_argument(recorder: tuple, record_id: str) -> None:
    stub, _ = recorder
    with pytest.raises(grpc.RpcError) as refused:
        stub.RetryMeteringRecord(pb.RetryMeteringRecordRequest(record_id=record_id), timeout=10)
    assert (details(refused.value).code, details(refused.value).fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["record_id"],
    )


def test_a_spool_that_fails_to_read_answers_spool_unavailable(recorder: tuple) -> None:
    stub, recording = recorder
    record(stub, event("a", hours_ago(1)))
    spool = recording.spool
    spool._db = BrokenReads(spool._db)
    with pytest.raises(grpc.RpcError) as refused:
        listed(stub)
    got = details(refused.value)
    assert (got.code, got.info.reason) == (grpc.StatusCode.UNAVAILABLE, "SPOOL_UNAVAILABLE")


# --- SaaS usage: events that name a customer ------------------------------------------------

OTHER = "444455556666"


@pytest.fixture
def unsent(local_aws: LocalAws, tmp_path: Path) -> Iterator[tuple[pb_grpc.UsageRecorderServiceStub, Recording]]:
    """A recorder whose sender never runs: what RecordUsage stored, placed by the test."""
    with (
        running_recorder(local_aws.endpoint_url, str(tmp_path / "s.db"), clock=CLOCK, start_sender=False) as (
            target,
            recording,
        ),
        grpc.insecure_channel(target) as channel,
    ):
        yield pb_grpc.UsageRecorderServiceStub(channel), recording


def test_an_events_customer_is_stored_and_only_a_customer_changes_its_digest() -> None:
    container = event("c", hours_ago(1), 3)
    row = servicer.event_row(container)
    assert row.customer == "" and row.digest == placement.event_digest(
        "prod-a", "requests", container.timestamp.seconds, 0, "3", ""
    )  # what older releases stored: their spools still tell a resend from a reused id
    saas = servicer.event_row(saas_event("s", hours_ago(1), 3))
    assert placement.customer_of(saas.customer) == (ACCOUNT, LICENSE, "")
    assert saas.digest != servicer.event_row(saas_event("s", hours_ago(1), 3, account=OTHER)).digest
    legacy = servicer.event_row(saas_event("l", hours_ago(1), 3, identifier="cust-a", product="prod-a"))
    assert placement.customer_of(legacy.customer) == ("", "", "cust-a") and legacy.digest != row.digest


def test_a_record_shows_its_customer() -> None:
    customer = placement.customer_key(ACCOUNT, LICENSE, "")
    stored = RecordRow(
        7, "", "requests", 0, "PENDING", '{"":"2"}', True, "2", "t", "", 0, "", "[]", 0, customer=customer
    )
    message = servicer.record_message(stored)
    assert (message.customer_aws_account_id, message.license_arn, message.customer_identifier) == (ACCOUNT, LICENSE, "")
    container = servicer.record_message(RecordRow(8, "p", "d", 0, "SENT", "{}", True, "0", "t", "m", 1, "", "[]", 0))
    assert (container.customer_aws_account_id, container.license_arn, container.customer_identifier) == ("", "", "")


def test_saas_events_are_kept_per_customer_and_counted_per_product_or_license(unsent: tuple) -> None:
    stub, recording = unsent
    registry = servicer.metrics.install()
    try:
        events = [
            saas_event("s1", hours_ago(1), "2"),
            saas_event("s2", hours_ago(1), "3", account=OTHER),
            saas_event("s3", hours_ago(1), 1, identifier="cust-a", product="prod-a"),
            event("c", hours_ago(1), 4),
        ]
        assert record(stub, *events) == pb.RecordUsageResponse(accepted=4)
        scrape = generate_latest(registry).decode()
    finally:
        uninstall()
    # A metric's product is the product code, or "(license)" for usage named by its license alone:
    # never the license (one per agreement) nor the customer.
    counted = {
        (s.labels["product_code"], s.labels["usage_dimension"]): s.value
        for family in text_string_to_metric_families(scrape)
        if family.name == "metering_gateway_usage_recorded_quantity"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert counted == {("(license)", "requests"): 5, ("prod-a", "requests"): 5}
    assert not any(who in scrape for who in (LICENSE, ACCOUNT, OTHER, "cust-a"))
    recording.spool.assign(now())
    assert {
        (r.product_code, r.customer_aws_account_id, r.license_arn, r.customer_identifier): r.quantity
        for r in listed(stub)
    } == {
        ("", ACCOUNT, LICENSE, ""): "2",
        ("", OTHER, LICENSE, ""): "3",
        ("prod-a", "", "", "cust-a"): "1",
        ("prod-a", "", "", ""): "4",
    }
    assert sorted(r.customer_identifier for r in listed(stub, product_code="prod-a")) == ["", "cust-a"]


def test_saas_usage_counts_as_carried_only_past_its_own_window(unsent: tuple) -> None:
    """SaaS usage goes back 24 hours (container usage six), less the half hour's margin."""
    stub, _ = unsent
    got = record(
        stub,
        saas_event("s8", hours_ago(8)),
        event("c8", hours_ago(8)),
        saas_event("s23", hours_ago(23)),
        saas_event("s25", hours_ago(25)),
    )
    assert got == pb.RecordUsageResponse(accepted=4, carried=2)  # c8 and s25


def test_an_event_id_reused_for_another_customer_names_the_customer(unsent: tuple) -> None:
    stub, _ = unsent
    assert record(stub, saas_event("e", hours_ago(1), 2)).accepted == 1
    assert record(stub, saas_event("e", hours_ago(1), 2)) == pb.RecordUsageResponse(duplicates=1)
    with pytest.raises(grpc.RpcError) as refused:
        record(stub, saas_event("e", hours_ago(1), 2, account=OTHER))
    got = details(refused.value)
    assert (got.code, got.info.reason) == (grpc.StatusCode.ALREADY_EXISTS, "EVENT_ID_CONFLICT")
    assert got.violations == [
        (
            "events[0].event_id",
            f"was accepted before with a different payload: customer_aws_account_id {ACCOUNT} then, {OTHER} now",
        )
    ]


def test_in_saas_mode_an_event_without_a_customer_is_refused_naming_the_field(
    local_aws: LocalAws, tmp_path: Path
) -> None:
    """--saas signs with the seller's account, which MeterUsage refuses: container usage
    acknowledged there could never be billed, so it is refused before it is stored."""
    with (
        running_recorder(local_aws.endpoint_url, str(tmp_path / "s.db"), clock=CLOCK, saas=True) as (target, _),
        grpc.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.UsageRecorderServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            record(stub, saas_event("s", now(), 1), event("c", now(), 1))
        got = details(err.value)
        assert (got.code, got.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        [(field, why)] = got.violations
        assert field == "events[1].customer_aws_account_id" and "--saas" in why
        assert record(stub, saas_event("s", now(), 1)).accepted == 1  # nothing of the refused batch was kept
