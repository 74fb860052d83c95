"""Helpers for the recorded-usage tests: events, batches for the crash tests, and AWS's rules in process."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import grpc

from gateway.assembly.app import recording_servicer
from gateway.aws.backend import Outcome, make_client
from gateway.config import Settings
from gateway.domain import errors
from gateway.local_aws import AwsError, Record, State
from gateway.recording import placement
from gateway.recording.lifecycle import Recording, open_recording
from gateway.rpc.server import RECORDER_SERVICE, Gateway
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import local_session

IDENTITY = "AKIDLOCALTEST"
CRASH_BATCH = 50  # events per batch in the crash tests
HOUR = placement.HOUR


# The sender's retention windows as the gateway's defaults set them (tests that build a Sender by hand).
RETENTION = {"event_retention": Settings.event_retention, "record_retention": Settings.record_retention}


def event(
    event_id: str,
    when: float,
    quantity: int | str = 1,
    product: str = "prod-a",
    dimension: str = "requests",
    **tags: str,
) -> pb.UsageEvent:
    ev = pb.UsageEvent(
        event_id=event_id,
        product_code=product,
        usage_dimension=dimension,
        tags=[pb.Tag(key=k, value=v) for k, v in tags.items()],
    )
    ev.timestamp.FromDatetime(datetime.fromtimestamp(when, UTC))
    if isinstance(quantity, str):
        ev.usage_quantity_as_decimal = quantity
    else:
        ev.usage_quantity = quantity
    return ev


# A buyer's license (AWS License Manager's ARN shape) and accounts, for SaaS usage.
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef0123456789abcdef"
ACCOUNT = "111122223333"


def saas_event(
    event_id: str,
    when: float,
    quantity: int | str = 1,
    *,
    account: str = ACCOUNT,
    license_arn: str = LICENSE,
    identifier: str = "",
    product: str = "",
    dimension: str = "requests",
    **tags: str,
) -> pb.UsageEvent:
    """An event of SaaS usage: by default of ``account`` under ``license_arn`` (no product
    code: the license names it); with ``identifier``, the legacy way (give ``product``)."""
    ev = event(event_id, when, quantity, product=product, dimension=dimension, **tags)
    if identifier:
        ev.customer_identifier = identifier
    else:
        ev.customer_aws_account_id, ev.license_arn = account, license_arn
    return ev


def event_value(ev: pb.UsageEvent) -> Decimal:
    return (
        Decimal(ev.usage_quantity_as_decimal)
        if ev.WhichOneof("quantity") == "usage_quantity_as_decimal"
        else Decimal(ev.usage_quantity)
    )


def sums_of_events(events: Iterable[pb.UsageEvent]) -> dict[tuple[str, str], Decimal]:
    out: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for ev in events:
        out[(ev.product_code, ev.usage_dimension)] += event_value(ev)
    return dict(out)


def sums_of_records(records: Iterable[Record], identity: str | None = IDENTITY) -> dict[tuple[str, str], Decimal]:
    out: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for r in records:
        if identity is None or r.identity == identity:
            out[(r.product_code, r.usage_dimension)] += r.quantity
    return dict(out)


# How FakeAws fails while it is down (``FakeAws.down``):
REFUSED_CONNECTION = "refused"  # nothing listens: nothing was sent
BARE_503 = "503"  # the front door turned the request away
ISE = "500"  # AWS answered InternalServiceError without recording
ISE_AFTER_RECORD = "500-after-record"  # AWS recorded the request, then answered InternalServiceError
BARE_507 = "507"  # a 5xx no row names (a proxy's Insufficient Storage): unknown, not retryable
OUTAGES = (REFUSED_CONNECTION, BARE_503, ISE, ISE_AFTER_RECORD, BARE_507)


class FakeAws:
    """Backend.meter_usage's contract over local_aws.State, on a fake clock.

    ``down`` names how AWS fails (one of OUTAGES, or None when up);
    ``refusals`` counts what AWS refused.
    """

    def __init__(self, clock: Any) -> None:
        self.state = State()
        self.clock = clock
        self.down: str | None = None
        self.lose_replies = 0  # the next N calls are recorded, but the reply never comes
        self.calls = 0
        self.refusals: dict[str, int] = defaultdict(int)

    def meter_usage(self, params: dict[str, Any], *, deadline: float | None = None) -> Outcome:
        self.calls += 1
        if self.down == REFUSED_CONNECTION:
            raise errors.GatewayError("AWS_UNREACHABLE", "connection refused")
        if self.down == BARE_503:
            raise errors.from_aws("503", "", None, http_status=503)
        if self.down == ISE:
            self.refusals["InternalServiceErrorException"] += 1
            raise errors.from_aws("InternalServiceErrorException", "down", "req-x", http_status=500)
        if self.down == BARE_507:
            raise errors.from_aws("507", "", None, http_status=507)
        try:
            record = self.state.meter_usage(params, IDENTITY, datetime.fromtimestamp(self.clock(), UTC))
        except AwsError as exc:
            self.refusals[exc.code] += 1
            raise errors.from_aws(exc.code, exc.message, "req-x", http_status=exc.status) from None
        assert record is not None
        if self.down == ISE_AFTER_RECORD:
            raise errors.from_aws("InternalServiceErrorException", "recorded, then failed", "req-x", http_status=500)
        if self.lose_replies:
            self.lose_replies -= 1
            raise errors.GatewayError("AWS_UNREACHABLE", "read timeout", maybe_delivered=True)
        return Outcome(record.metering_record_id, False, 1, "req-x", params.get("ClientToken", ""))

    def holds(self, client_token: str) -> bool:
        """Whether AWS recorded a request with this ClientToken."""
        return client_token in self.state.by_token

    def take_hour(self, product: str, dimension: str, hour: int) -> None:
        """Someone else (an earlier life of the pod) already metered this hour."""
        when = datetime.fromtimestamp(hour, UTC)
        with contextlib.suppress(AwsError):  # we metered that hour ourselves already
            self.state.meter_usage(
                {"ProductCode": product, "UsageDimension": dimension, "Timestamp": when, "UsageQuantity": 999_999},
                IDENTITY,
                when,
            )

    def ours(self) -> list[Record]:
        return [r for r in self.state.records if r.quantity != 999_999]


@contextmanager
def running_recorder(
    endpoint_url: str,
    spool: str,
    *,
    flush_on_close: bool = False,
    clock: Callable[[], float] | None = None,
    start_sender: bool = True,
    **settings: Any,
) -> Iterator[tuple[str, Recording]]:
    """A real gateway with UsageRecorderService on 127.0.0.1:<free port>; yields (target, recording).

    ``clock`` (epoch seconds) is the time of the servicer and the sender;
    ``start_sender=False`` leaves the sender to the test (``recording.sender.tick()``).
    """
    base = {
        "listen": "127.0.0.1:0",
        "max_workers": 8,
        "grace": 1.0,
        "spool": spool,
        "flush_interval": 0.1,
        "flush_grace": 0.0,
        "aws_max_rps": 50.0,
    }
    conf = dataclasses.replace(Settings(), **{**base, **settings}).check()
    client = make_client(conf, endpoint_url=endpoint_url, session=local_session())
    recording = open_recording(conf, client, now=clock, start=start_sender)
    gateway = Gateway(conf, [recording_servicer(recording)])
    port = gateway.start()
    recording.watch_health(lambda ok: gateway.set_serving(RECORDER_SERVICE, ok))
    try:
        yield f"127.0.0.1:{port}", recording
    finally:
        gateway.stop(0.5)
        recording.close(flush=flush_on_close, budget=5.0)


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll until ``condition()`` is truthy; fail with ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# SaaS usage of the process tests: customers over two licenses (of two products).
SAAS_LICENSES = (
    ("prod-saas-0", "arn:aws:license-manager::123456789012:license:l-5aa5000000000000000000000000000a"),
    ("prod-saas-1", "arn:aws:license-manager::123456789012:license:l-5aa5000000000000000000000000000b"),
)
SAAS_CUSTOMERS = 5  # a license (each customer-hour is a record to place: the replicas test places its backlog)


def saas_customer(i: int) -> str:
    return str(300000000000 + i)


def saas_subscriptions() -> list[dict[str, str]]:
    """Every customer of SAAS_LICENSES, as ``POST /_local/subscriptions`` bodies."""
    return [
        {"customer_aws_account_id": saas_customer(i), "license_arn": license_arn, "product_code": product}
        for product, license_arn in SAAS_LICENSES
        for i in range(SAAS_CUSTOMERS)
    ]


def make_batch(rng: random.Random, caller: int, n: int, *, saas: bool = False) -> list[pb.UsageEvent]:
    """``CRASH_BATCH`` events over the open hour and the three before it, timed by the wall
    clock (the crash tests run real processes); with ``saas``, about half of them SaaS
    usage of SAAS_CUSTOMERS customers over SAAS_LICENSES."""
    now = time.time()
    current = placement.hour_of(now)
    out = []
    for i in range(CRASH_BATCH):
        hours_back = rng.choice((0, 0, 1, 2, 3))
        when = now if hours_back == 0 else current - hours_back * HOUR + rng.uniform(0, HOUR - 1)
        quantity: int | str = (
            rng.randint(0, 1000) if rng.random() < 0.7 else f"{rng.randint(0, 99)}.{rng.randint(0, 999999):06d}"
        )
        tags = {"tenant": f"t{rng.randint(0, 2)}"} if rng.random() < 0.5 else {}
        dimension = rng.choice(("requests", "gb"))
        if saas and rng.random() < 0.5:
            _, license_arn = rng.choice(SAAS_LICENSES)
            account = saas_customer(rng.randrange(SAAS_CUSTOMERS))
            out.append(
                saas_event(
                    f"c{caller}-b{n}-e{i}",
                    when,
                    quantity,
                    account=account,
                    license_arn=license_arn,
                    dimension=dimension,
                    **tags,
                )
            )
            continue
        out.append(
            event(
                f"c{caller}-b{n}-e{i}",
                when,
                quantity,
                product=f"prod-{rng.randint(0, 1)}",
                dimension=dimension,
                **tags,
            )
        )
    return out


def sums_of_saas_events(events: Iterable[pb.UsageEvent]) -> dict[tuple[str, str, str], Decimal]:
    """Quantity per (customer, license, dimension) of the SaaS events among ``events``."""
    out: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for ev in events:
        if ev.customer_aws_account_id or ev.customer_identifier:
            out[(ev.customer_aws_account_id or ev.customer_identifier, ev.license_arn, ev.usage_dimension)] += (
                event_value(ev)
            )
    return dict(out)


def record_usage(channel: grpc.Channel, batch: list[pb.UsageEvent]) -> pb.RecordUsageResponse | None:
    try:
        return pb_grpc.UsageRecorderServiceStub(channel).RecordUsage(pb.RecordUsageRequest(events=batch), timeout=5)
    except grpc.RpcError:
        return None


def send(target: str, batch: list[pb.UsageEvent]) -> pb.RecordUsageResponse | None:
    with grpc.insecure_channel(target) as channel:
        return record_usage(channel, batch)


def event_totals(spool: Any) -> list[tuple[str, str, str]]:
    """(product, dimension, exact sum) of every event a spool stores, read from its
    database: the tests' measure of what was acknowledged (no such call in production)."""
    with spool._reading() as db:
        rows = db.execute("SELECT product_code, usage_dimension, quantity FROM events").fetchall()
    sums: dict[tuple[str, str], Decimal] = {}
    for product, dimension, quantity in rows:
        sums[(product, dimension)] = sums.get((product, dimension), Decimal(0)) + Decimal(quantity)
    return [(p, d, placement.format_decimal(q)) for (p, d), q in sorted(sums.items())]
