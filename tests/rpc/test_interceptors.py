"""Request bytes that do not decode, as a caller sends them to a real gateway process: a string
that is not UTF-8 is refused with INVALID_ARGUMENT naming its field, and the server goes on."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from gateway.rpc.interceptors import LARGE_REQUEST, WALK_FIELDS, over_cap
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import Details, details, request
from support.processes import GatewayProcess, gateway_process

METER_USAGE = "/marketplace.metering.v1.MeteringService/MeterUsage"
RECORD_USAGE = "/marketplace.metering.v1.UsageRecorderService/RecordUsage"
MARK = "MARKED"  # a string whose bytes the tests turn into invalid UTF-8
BAD = b"\xff\xfe\xc3(\xed\xa0"[: len(MARK)]  # as many bytes, none of them UTF-8 (0xED 0xA0: a surrogate)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    spool = tmp_path_factory.mktemp("interceptors") / "spool.db"
    with gateway_process("--spool", str(spool)) as gw:
        yield gw


def spoiled(message: pb.MeterUsageRequest | pb.RecordUsageRequest) -> bytes:
    """``message``'s wire bytes with its one MARK string made invalid UTF-8."""
    raw = message.SerializeToString()
    assert raw.count(MARK.encode()) == 1
    return raw.replace(MARK.encode(), BAD)


def refusal(gateway: GatewayProcess, method: str, raw: bytes) -> Details:
    """The error of a call of ``raw`` request bytes, sent as they are."""
    with grpc.insecure_channel(gateway.target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            call(raw, timeout=30)
    got = details(refused.value)
    assert (got.code, got.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"), got
    return got


def event(event_id: str, tags: int = 0, value: str = "v") -> pb.UsageEvent:
    e = pb.UsageEvent(
        event_id=event_id,
        product_code="prod-abc123",
        usage_dimension="requests",
        usage_quantity_as_decimal="1",
        tags=[pb.Tag(key=f"k{n}", value=value) for n in range(tags)],
    )
    e.timestamp.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    return e


def test_a_top_level_string_is_named(gateway: GatewayProcess) -> None:
    got = refusal(gateway, METER_USAGE, spoiled(request(usage_dimension=MARK)))
    assert got.fields == ["usage_dimension"]
    assert got.bad_request is not None and got.bad_request.field_violations[0].description == "is not valid UTF-8"
    assert "usage_dimension is not valid UTF-8" in got.message


def test_an_event_of_a_batch_is_named_by_its_index(gateway: GatewayProcess) -> None:
    batch = pb.RecordUsageRequest(events=[event("e0"), event(MARK), event("e2")])
    assert refusal(gateway, RECORD_USAGE, spoiled(batch)).fields == ["events[1].event_id"]


def test_a_tag_deep_inside_a_large_batch_is_named(gateway: GatewayProcess) -> None:
    """Over LARGE_REQUEST, decoded in one of the few places for large requests: the search too."""
    events = [event(f"e{n}", tags=3) for n in range(999)] + [event("e999", tags=3)]
    events[999].tags[2].value = MARK
    raw = spoiled(pb.RecordUsageRequest(events=events))
    assert len(raw) > LARGE_REQUEST
    assert refusal(gateway, RECORD_USAGE, raw).fields == ["events[999].tags[2].value"]


def test_an_allocation_tag_is_named(gateway: GatewayProcess) -> None:
    meter = request()
    meter.usage_allocations.add(allocated_usage_quantity_as_decimal="1").tags.add(key="a", value="b")
    meter.usage_allocations.add(allocated_usage_quantity_as_decimal="1").tags.add(key=MARK, value="b")
    assert refusal(gateway, METER_USAGE, spoiled(meter)).fields == ["usage_allocations[1].tags[0].key"]


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\xff\xff\xff",  # a length that never ends
        b"\xff" * 64,  # no field at all
        b"\x12\x05abc",  # a timestamp cut short
    ],
    ids=["length", "noise", "cut-short"],
)
def test_other_bad_bytes_name_the_request_message_not_an_empty_field(gateway: GatewayProcess, raw: bytes) -> None:
    assert refusal(gateway, METER_USAGE, raw).fields == ["MeterUsageRequest"]


def test_a_bad_string_past_the_search_budget_names_the_request_message(gateway: GatewayProcess) -> None:
    """The search gives up after WALK_FIELDS fields, as only a hostile request has: the refusal stays."""
    raw = pb.RecordUsageRequest(events=[pb.UsageEvent()] * (WALK_FIELDS + 1) + [event(MARK)]).SerializeToString()
    assert refusal(gateway, RECORD_USAGE, raw.replace(MARK.encode(), BAD)).fields == ["RecordUsageRequest"]


BATCH_METER_USAGE = "/marketplace.metering.v1.MeteringService/BatchMeterUsage"


@pytest.mark.parametrize(
    ("method", "raw", "field", "cap"),
    [
        (RECORD_USAGE, pb.RecordUsageRequest(events=[pb.UsageEvent()] * 500_000).SerializeToString(), "events", 1000),
        (
            BATCH_METER_USAGE,
            pb.BatchMeterUsageRequest(usage_records=[pb.UsageRecord()] * 40_000).SerializeToString(),
            "usage_records",
            25,
        ),
    ],
    ids=["events", "usage_records"],
)
def test_a_large_request_over_its_cap_is_refused_before_decoding(
    gateway: GatewayProcess, method: str, raw: bytes, field: str, cap: int
) -> None:
    """Empty elements, 2 bytes each on the wire and about 130 in memory decoded: a large
    request holding more than validation takes is counted on the wire and refused unread."""
    assert len(raw) > LARGE_REQUEST
    got = refusal(gateway, method, raw)
    assert got.fields == [field]
    assert got.bad_request is not None
    assert got.bad_request.field_violations[0].description.endswith(f"got more than {cap}")


def test_the_count_before_decoding_takes_what_validation_takes() -> None:
    """Exactly the cap passes to decoding (and validation); past it, or any other message,
    or bytes it cannot read, the count says nothing and the decoder decides."""
    full = pb.RecordUsageRequest(events=[event(f"e{n}", tags=5) for n in range(1000)]).SerializeToString()
    assert len(full) > LARGE_REQUEST and over_cap(pb.RecordUsageRequest.DESCRIPTOR, full) is None
    over = full + pb.RecordUsageRequest(events=[pb.UsageEvent()]).SerializeToString()
    refused = over_cap(pb.RecordUsageRequest.DESCRIPTOR, over)
    assert refused is not None and [v.field for v in refused.violations] == ["events"]
    assert over_cap(pb.MeterUsageRequest.DESCRIPTOR, over) is None  # no cap of its own
    assert over_cap(pb.RecordUsageRequest.DESCRIPTOR, b"\x0a\xff\xff\xff") is None


def test_the_gateway_serves_on_after_bad_bytes(gateway: GatewayProcess) -> None:
    for _ in range(3):
        refusal(gateway, RECORD_USAGE, spoiled(pb.RecordUsageRequest(events=[event(MARK)])))
    with grpc.insecure_channel(gateway.target) as channel:
        recorded = pb_grpc.UsageRecorderServiceStub(channel).RecordUsage(
            pb.RecordUsageRequest(events=[event("after-bad-bytes")]), timeout=10
        )
        metered = pb_grpc.MeteringServiceStub(channel).MeterUsage(
            request(when=datetime.now(UTC) - timedelta(minutes=1), usage_dimension="after"), timeout=10
        )
    assert recorded.accepted == 1 and metered.metering_record_id
