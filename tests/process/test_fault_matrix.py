"""Exactly once against a hostile AWS: each fault × an outage past six hours × a restart.

On a simulated clock shared by the gateway and the local backend, with a real
gRPC server, a real boto3 client over HTTP and a spool file:

1. callers record usage for the last hours (RecordUsage, acknowledged);
2. the first MeterUsage the sender makes meets the fault: most faults let AWS
   record the request and then lose the answer (a 500, a bare 502/504, a dropped
   connection, an answer after the read timeout); the rest refuse it (a bare 503,
   throttling) or fail without recording (a 500 that recorded nothing);
3. AWS then turns every call away (bare 503s) for seven simulated hours;
4. in the middle the gateway restarts: cleanly, or killed in the very call that
   met the fault (its outcome never stored), and more usage is recorded;
5. AWS recovers and the sender runs on until nothing is pending.

Then, what a paid-per-record operator needs: no product, dimension and hour is
recorded twice; every unit acknowledged is either in AWS once or listed FAILED
"outcome unknown" because AWS may hold it; a record AWS did hold is never
carried (so AWS's total equals what was acknowledged whenever the fault
recorded); and a fault that rules a record out never ends FAILED.

Each case runs in four modes: hourly records; hourly with zero-usage hours for a
product that never has usage (and for one that does), whose zeros must go out once
per hour the outage left inside AWS's window and never take an hour from real
usage; AgentCore Runtime mode, where records cover one flush interval, AWS
keeps many an hour and deduplicates by ClientToken alone; and SaaS, where 60
customers over two licenses (and one legacy customer identifier) are metered with
BatchMeterUsage, 25 records a call, the fault meets the first call, and the outage
lasts past AWS's 24-hour SaaS window. Two faults are SaaS's own: AWS answers with
half the call's records unprocessed, having kept them or not. In SaaS mode the
checks are per customer, dimension and hour: AWS's total per customer and dimension
equals what was acknowledged, and no customer's hour is billed twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.local_aws import DROP, SLOW, UNPROCESSED, LocalAws
from gateway.recording import placement
from gateway.recording.lifecycle import Recording
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import FIXED_NOW, Clock
from support.recording import event, event_value, running_recorder, saas_event, sums_of_events

HOUR = 3600
START = FIXED_NOW.timestamp()  # 10:02:30; any minute would do
# The gateway's read timeout: long enough that a busy machine never times out an answer
# the local backend gave in time (that would be an unknown outcome the test did not plan),
# short enough that the late answer below is lost.
READ_TIMEOUT = 3.0
STEP = 20 * 60
State = pb.MeteringRecord.State


@dataclass(frozen=True)
class Fault:
    name: str
    error: str
    status: int | None = None
    record: bool = True  # AWS records the request before the answer is lost
    delay: float = 0.0
    settles: bool = False  # the answer rules a record out
    saas_only: bool = False  # a fault of BatchMeterUsage's alone

    def inject(self, aws: LocalAws, operation: str = "MeterUsage") -> None:
        aws.inject(self.error, 1, status=self.status, delay=self.delay, record=self.record, operation=operation)


FAULTS = [
    Fault("500-after-record", "InternalServiceErrorException", 500),
    Fault("bare-500-after-record", "", 500),
    Fault("bare-502-after-record", "", 502),
    Fault("bare-504-after-record", "", 504),
    Fault("drop-after-record", DROP),
    Fault("late-answer-after-record", SLOW, delay=READ_TIMEOUT * 1.5),
    Fault("500-nothing-recorded", "InternalServiceErrorException", 500, record=False),
    Fault("bare-503", "", 503, record=False, settles=True),
    Fault("throttling", "ThrottlingException", record=False, settles=True),
    Fault("unprocessed-kept", UNPROCESSED, saas_only=True),
    Fault("unprocessed-not-kept", UNPROCESSED, record=False, saas_only=True),
]


class Crash(BaseException):
    """The process dies: nothing after the AWS call runs (not even the sender's handlers)."""


MODES = ["hourly", "zero-hours", "agentcore", "saas"]
LICENSES = (
    "arn:aws:license-manager::123456789012:license:l-11111111111111111111111111111111",
    "arn:aws:license-manager::123456789012:license:l-22222222222222222222222222222222",
)
SAAS_PRODUCTS = ("prod-s1", "prod-s2")
CUSTOMERS = 13  # a license: 26 records an hour (two dimensions), more than one call takes
LEGACY = "legacy-customer-1"  # of SAAS_PRODUCTS[0], the legacy way
ZERO_HOURS = "prod-a=requests;prod-c=requests"  # prod-c never has usage
INTERVAL = 60.0  # AgentCore mode: one record per product and dimension a minute


def mode_settings(mode: str) -> dict[str, Any]:
    if mode == "zero-hours":
        return {"zero_usage_hours": ZERO_HOURS}
    if mode == "agentcore":
        return {"agentcore": True, "flush_interval": INTERVAL}
    return {}


def operation_of(mode: str) -> str:
    return "BatchMeterUsage" if mode == "saas" else "MeterUsage"


def outage_hours(mode: str) -> int:
    """Past AWS's window: six hours for MeterUsage, 24 for BatchMeterUsage."""
    return 25 if mode == "saas" else 7


def account(i: int) -> str:
    return str(200000000000 + i)


def subscribe(aws: LocalAws) -> None:
    for product, license_arn in zip(SAAS_PRODUCTS, LICENSES, strict=True):
        for i in range(CUSTOMERS):
            aws.subscribe(customer_aws_account_id=account(i), license_arn=license_arn, product_code=product)
    aws.subscribe_legacy(customer_identifier=LEGACY, product_code=SAAS_PRODUCTS[0])


@contextmanager
def gateway(
    aws: LocalAws, spool: Path, clock: Clock, mode: str = "hourly"
) -> Iterator[tuple[pb_grpc.UsageRecorderServiceStub, Recording]]:
    with running_recorder(
        aws.endpoint_url,
        str(spool),
        clock=clock,
        start_sender=False,
        aws_read_timeout=READ_TIMEOUT,
        flush_grace=300.0,
        aws_max_rps=1000.0,
        **mode_settings(mode),
    ) as (target, recording):
        with grpc.insecure_channel(target) as channel:
            yield pb_grpc.UsageRecorderServiceStub(channel), recording


def record(stub: pb_grpc.UsageRecorderServiceStub, events: list[pb.UsageEvent]) -> list[pb.UsageEvent]:
    reply = stub.RecordUsage(pb.RecordUsageRequest(events=events), timeout=10)
    assert reply.accepted == len(events)
    return events


def usage(tag: str, clock: Clock, hours_back: range, mode: str = "hourly") -> list[pb.UsageEvent]:
    if mode == "saas":
        return saas_usage(tag, clock, hours_back)
    now = clock()
    out = []
    for back in hours_back:
        for i, product in enumerate(("prod-a", "prod-b")):
            when = placement.hour_of(now) - back * HOUR + 60 * (i + 1)
            tags = {} if mode == "agentcore" else {"tenant": f"t{i}"}  # AgentCore takes no tags
            out.append(event(f"{tag}-{back}-{product}-w", when, 3 + back, product=product))
            out.append(event(f"{tag}-{back}-{product}-d", when, f"{back}.25", product=product, **tags))
    return out


def saas_usage(tag: str, clock: Clock, hours_back: range) -> list[pb.UsageEvent]:
    """Every customer of both licenses, whole and decimal usage, and the legacy customer."""
    now = clock()
    out = []
    for back in hours_back:
        when = placement.hour_of(now) - back * HOUR + 60
        for n, license_arn in enumerate(LICENSES):
            for i in range(CUSTOMERS):
                who = {"account": account(i), "license_arn": license_arn}
                out.append(saas_event(f"{tag}-{back}-{n}-{i}-w", when, 1 + i % 4, **who))
                out.append(saas_event(f"{tag}-{back}-{n}-{i}-d", when + 60, f"{back}.5", dimension="storage", **who))
        out.append(saas_event(f"{tag}-{back}-legacy", when, 2, identifier=LEGACY, product=SAAS_PRODUCTS[0]))
    return out


def tick_for(recording: Recording, clock: Clock, seconds: float, step: float = STEP) -> None:
    end = clock() + seconds
    while clock() < end:
        clock.advance(step)
        recording.sender.tick()


def step_of(mode: str) -> float:
    """A pass every 20 minutes; during SaaS mode's outage, three times as long, every hour.
    (Only passes closer together than the sender's half-hour margin send what they carry
    to the window's edge before it moves on: the test keeps those for after the outage.)"""
    return 3 * STEP if mode == "saas" else STEP


def crash_in_next_call(recording: Recording, mode: str) -> None:
    """The next AWS call goes out (and meets whatever fault AWS has), then the process dies."""
    backend = recording.sender.backend
    name = "batch_meter_usage" if mode == "saas" else "meter_usage"
    original = getattr(backend, name)

    def call_then_die(params: dict[str, Any], **kw: Any) -> Any:
        try:
            original(params, **kw)
        finally:
            raise Crash

    setattr(backend, name, call_then_die)


# Every fault in every mode, but BatchMeterUsage's own faults in SaaS mode only.
CASES = [
    pytest.param(fault, mode, id=f"{fault.name}-{mode}")
    for mode in MODES
    for fault in FAULTS
    if mode == "saas" or not fault.saas_only
]


@pytest.mark.parametrize("restart", ["clean-restart", "crash-mid-call"])
@pytest.mark.parametrize(("fault", "mode"), CASES)
def test_fault_then_an_outage_past_the_window_then_a_restart(
    tmp_path: Path, fault: Fault, restart: str, mode: str
) -> None:
    clock = Clock(START)
    spool = tmp_path / "spool.db"
    acknowledged: list[pb.UsageEvent] = []
    operation = operation_of(mode)
    with ExitStack() as stack:
        aws = stack.enter_context(LocalAws(quiet=True, clock=clock, agentcore=mode == "agentcore"))
        subscribe(aws)
        with gateway(aws, spool, clock, mode) as (stub, recording):
            acknowledged += record(stub, usage("life1", clock, range(1, 4), mode))
            fault.inject(aws, operation)
            aws.inject("", 10**9, status=503, operation=operation)  # then an outage: nothing taken
            if restart == "crash-mid-call":
                crash_in_next_call(recording, mode)
                with pytest.raises(Crash):
                    recording.sender.tick()
                recording.spool.close()  # killed: nothing else of this life runs
                recording.close = lambda **_: None  # type: ignore[method-assign]
            else:
                recording.sender.tick()
                tick_for(recording, clock, 3 * HOUR, step_of(mode))
        first_call = aws.calls
        assert first_call >= 1
        with gateway(aws, spool, clock, mode) as (stub, recording):
            acknowledged += record(stub, usage("life2", clock, range(0, 3), mode))
            tick_for(recording, clock, outage_hours(mode) * HOUR - (clock() - START), step_of(mode))
            aws.clear_faults()  # AWS is back
            recovered = clock()
            tick_for(recording, clock, 3 * HOUR)  # passes closer than the margin: what is carried goes out
            records = list(stub.ListMeteringRecords(pb.ListMeteringRecordsRequest(page_size=1000), timeout=10).records)
        held = aws.records()
        saas_held = aws.saas_records()

    if mode == "saas":
        check_saas(fault, restart, records, saas_held, acknowledged, aws.calls)
        return

    pending = [r for r in records if r.state == State.STATE_PENDING]
    # Only the zero of an hour that closed since the last pass but one may wait (for --flush-grace).
    assert all(r.quantity == "0" and r.hour.seconds > clock() - 2 * HOUR for r in pending), pending
    tokens_held = [r.client_token for r in held]
    assert len(tokens_held) == len(set(tokens_held)), "a ClientToken was recorded twice"
    if mode == "agentcore":  # many records an hour, one per interval (by its exact timestamp)
        stamps = [(r.product_code, r.usage_dimension, r.timestamp) for r in held]
        assert len(stamps) == len(set(stamps)), "an interval was recorded twice"
        assert any(r.timestamp != r.hour for r in held), "no record was cut finer than the hour"
    else:
        hours = [(r.product_code, r.usage_dimension, r.hour) for r in held]
        assert len(hours) == len(set(hours)), "an hour was recorded twice"
    if mode == "zero-hours":
        # prod-c never had usage: a zero for every closed hour from the first tick on that was
        # still inside AWS's window when AWS came back, and nothing else.
        zeros = sorted(int(r.hour.timestamp()) for r in held if r.product_code == "prod-c")
        assert all(r.quantity == 0 for r in held if r.product_code == "prod-c")
        waiting = {r.hour.seconds for r in pending if r.product_code == "prod-c"}
        first = placement.hour_of(START)
        last_closed = placement.hour_of(clock()) - HOUR
        window = placement.earliest_hour(recovered)
        assert set(range(max(first, window), last_closed + 1, HOUR)) <= set(zeros) | waiting, zeros
        assert all(first <= z <= last_closed for z in zeros)
    # What the gateway lists as sent is what AWS holds, record for record.
    by_id = {r.metering_record_id: r for r in held}
    for sent in (r for r in records if r.state == State.STATE_SENT):
        assert sent.metering_record_id in by_id
        assert Decimal(sent.quantity) == by_id[sent.metering_record_id].quantity
        assert sent.client_token == by_id[sent.metering_record_id].client_token
    tokens = {r.client_token for r in held}
    failed = [r for r in records if r.state == State.STATE_FAILED]
    assert all(r.last_error.startswith("outcome unknown") for r in failed), [r.last_error for r in failed]
    unbilled = [r for r in failed if r.client_token not in tokens]
    billed = sums(held)
    expected = sums_of_events(acknowledged)
    assert add(billed, sums(unbilled)) == expected, "usage lost or billed twice"
    if fault.record:
        assert billed == expected  # AWS's total is exactly what was acknowledged
        assert failed and not unbilled  # the unknown outcome was AWS's record: listed, never carried
    if fault.settles and restart == "clean-restart":
        assert not failed
    print(
        f"{fault.name} × {restart}: AWS calls {aws.calls}, records {len(held)}, failed (outcome unknown) "
        f"{len(failed)}, of which unbilled {len(unbilled)}"
    )


def sums(records: list[Any]) -> dict[tuple[str, str], Decimal]:
    """Quantity per product and dimension; a key with nothing but zero records is left out."""
    out: dict[tuple[str, str], Decimal] = {}
    for r in records:
        key = (r.product_code, r.usage_dimension)
        out[key] = out.get(key, Decimal(0)) + Decimal(str(r.quantity))
    return {k: v for k, v in out.items() if v}


def add(a: dict[tuple[str, str], Decimal], b: dict[tuple[str, str], Decimal]) -> dict[tuple[str, str], Decimal]:
    return {k: a.get(k, Decimal(0)) + b.get(k, Decimal(0)) for k in a.keys() | b.keys()}


Customer = tuple[str, str, str]  # (account or identifier, license, dimension)


def customer_of(r: Any) -> Customer:
    return (
        r.customer_aws_account_id or r.customer_identifier,
        r.license_arn,
        getattr(r, "dimension", "") or r.usage_dimension,
    )


def check_saas(
    fault: Fault,
    restart: str,
    records: list[pb.MeteringRecord],
    held: list[Any],
    acknowledged: list[pb.UsageEvent],
    calls: int,
) -> None:
    """What a SaaS seller paid per record needs: per customer, dimension and hour."""
    assert all(r.customer_aws_account_id or r.customer_identifier for r in records)
    pending = [
        (r.hour.seconds, r.attempts, r.last_error[:80], list(r.carried_from))
        for r in records
        if r.state == State.STATE_PENDING
    ]
    assert not pending, f"usage left pending: {pending[:3]} of {len(pending)}"
    hours = [(*customer_of(r), r.hour) for r in held]
    assert len(hours) == len(set(hours)), "a customer's hour was billed twice"
    # What the gateway lists as sent is what AWS holds, record for record.
    by_id = {r.metering_record_id: r for r in held}
    for sent in (r for r in records if r.state == State.STATE_SENT):
        kept = by_id[sent.metering_record_id]
        assert Decimal(sent.quantity) == kept.quantity and customer_of(sent) == customer_of(kept)
        assert sent.hour.seconds == int(kept.hour.timestamp())
    failed = [r for r in records if r.state == State.STATE_FAILED]
    assert all(r.last_error.startswith("outcome unknown") for r in failed), [r.last_error for r in failed]
    kept_keys = {(*customer_of(r), int(r.hour.timestamp()), r.quantity) for r in held}
    unbilled = [r for r in failed if (*customer_of(r), r.hour.seconds, Decimal(r.quantity)) not in kept_keys]
    expected: dict[Customer, Decimal] = {}
    for ev in acknowledged:
        key = (ev.customer_aws_account_id or ev.customer_identifier, ev.license_arn, ev.usage_dimension)
        expected[key] = expected.get(key, Decimal(0)) + event_value(ev)
    billed: dict[Customer, Decimal] = {}
    for r in held:
        billed[customer_of(r)] = billed.get(customer_of(r), Decimal(0)) + r.quantity
    lost: dict[Customer, Decimal] = {}
    for r in unbilled:
        lost[customer_of(r)] = lost.get(customer_of(r), Decimal(0)) + Decimal(r.quantity)
    together = {k: billed.get(k, Decimal(0)) + lost.get(k, Decimal(0)) for k in billed.keys() | lost.keys()}
    assert together == expected, "usage lost or billed twice"
    if fault.record:
        assert billed == expected  # AWS's total is exactly what was acknowledged
        assert failed and not unbilled  # the unknown outcome was AWS's record: listed, never carried
    if fault.settles and restart == "clean-restart":
        assert not failed
    print(
        f"saas {fault.name} × {restart}: AWS calls {calls}, records {len(held)}, failed (outcome unknown) "
        f"{len(failed)}, of which unbilled {len(unbilled)}"
    )
