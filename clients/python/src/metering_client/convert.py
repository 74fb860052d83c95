"""Python values → request messages, and reply messages → Python values: pure functions, no I/O.

Every quantity goes out in the ``*_as_decimal`` fields: AWS deprecated the
whole-number ones (UsageQuantity, AllocatedUsageQuantity) on 2026-10-20, and a
decimal string carries any int exactly.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from google.protobuf import timestamp_pb2

from marketplace.metering.v1 import metering_pb2 as pb

Quantity = int | Decimal | str


@dataclass(frozen=True)
class Allocation:
    """A part of the quantity that belongs to one set of tags (empty: untagged)."""

    quantity: Quantity
    tags: Mapping[str, str] = field(default_factory=dict)


def decimal_text(value: int | Decimal | str) -> str:
    """A quantity as the gateway reads it: plain notation, never ``1E+2``.

    Strings pass unchanged, so that the gateway's validation names a bad one.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if not value.is_finite():
        raise ValueError(f"quantity {value!r} is not a finite number")
    return format(value, "f")


def set_quantity(msg: object, quantity: Quantity, decimal: str) -> None:
    """Set the oneof's decimal field from an ``int``, ``Decimal`` or ``str``."""
    if isinstance(quantity, bool) or isinstance(quantity, float):
        raise TypeError(f"quantity must be int, Decimal or str, not {type(quantity).__name__} (floats are inexact)")
    if not isinstance(quantity, (int, Decimal, str)):
        raise TypeError(f"quantity must be int, Decimal or str, not {type(quantity).__name__}")
    setattr(msg, decimal, decimal_text(quantity))


def timestamp(when: datetime | None) -> timestamp_pb2.Timestamp:
    """An aware datetime (None: now) → Timestamp. Naive datetimes are refused: their zone is a guess."""
    when = datetime.now(UTC) if when is None else when
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("timestamp must be timezone-aware, e.g. datetime.now(timezone.utc)")
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out


def tags(pairs: Mapping[str, str]) -> list[pb.Tag]:
    return [pb.Tag(key=k, value=v) for k, v in pairs.items()]


def allocation(item: Allocation | pb.UsageAllocation) -> pb.UsageAllocation:
    """An allocation in decimal, the request's kind (the gateway refuses mixed kinds).

    A message with the deprecated whole field is copied with it as a decimal.
    """
    if isinstance(item, pb.UsageAllocation):
        if item.WhichOneof("quantity") != "allocated_usage_quantity":
            return item
        msg = pb.UsageAllocation(tags=item.tags)
        msg.allocated_usage_quantity_as_decimal = str(item.allocated_usage_quantity)
        return msg
    msg = pb.UsageAllocation(tags=tags(item.tags))
    set_quantity(msg, item.quantity, "allocated_usage_quantity_as_decimal")
    return msg


def meter_usage_request(
    *,
    product_code: str,
    usage_dimension: str,
    quantity: Quantity,
    timestamp_: datetime | None,
    allocations: Iterable[Allocation | pb.UsageAllocation],
    dry_run: bool,
    client_token: str,
) -> pb.MeterUsageRequest:
    req = pb.MeterUsageRequest(
        product_code=product_code,
        usage_dimension=usage_dimension,
        timestamp=timestamp(timestamp_),
        dry_run=dry_run,
        usage_allocations=[allocation(a) for a in allocations],
        client_token=client_token,
    )
    set_quantity(req, quantity, "usage_quantity_as_decimal")
    return req


@dataclass(frozen=True)
class UsageEvent:
    """One unit of usage for UsageRecorderService; ``event_id`` makes resends safe.

    ``timestamp`` (aware) is when the usage happened; leave it None to have the
    gateway stamp the event when it first accepts it.
    """

    event_id: str
    product_code: str
    usage_dimension: str
    quantity: Quantity
    timestamp: datetime | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    # SaaS usage names its customer, and the gateway meters it with BatchMeterUsage per
    # customer: customer_aws_account_id with license_arn (product_code may then be
    # empty: the license names it), or the legacy customer_identifier with product_code.
    customer_aws_account_id: str = ""
    license_arn: str = ""
    customer_identifier: str = ""


def usage_event(event: UsageEvent | pb.UsageEvent) -> pb.UsageEvent:
    """The event's message; without a ``timestamp`` it goes without one (the gateway
    stamps it): a time made up here would differ on every resend of the same event,
    and the gateway would refuse the resend as a conflict."""
    if isinstance(event, pb.UsageEvent):
        return event
    msg = pb.UsageEvent(
        event_id=event.event_id,
        product_code=event.product_code,
        usage_dimension=event.usage_dimension,
        tags=tags(event.tags),
        customer_aws_account_id=event.customer_aws_account_id,
        license_arn=event.license_arn,
        customer_identifier=event.customer_identifier,
    )
    if event.timestamp is not None:
        msg.timestamp.CopyFrom(timestamp(event.timestamp))
    set_quantity(msg, event.quantity, "usage_quantity_as_decimal")
    return msg


# -- SaaS: BatchMeterUsage, ResolveCustomer ----------------------------------------------


@dataclass(frozen=True)
class UsageRecord:
    """One customer's usage of one dimension, for BatchMeterUsage (AWS's UsageRecord).

    Name the customer one way: ``customer_aws_account_id`` with ``license_arn`` (what
    ResolveCustomer returns; the call's product_code stays empty), or the legacy
    ``customer_identifier`` (the call needs its product_code). ``timestamp`` (aware)
    defaults to the time of the call; AWS takes usage up to 24 hours old, and the
    previous month's only until 06:00 UTC on the 1st.
    """

    dimension: str
    quantity: Quantity
    timestamp: datetime | None = None
    customer_aws_account_id: str = ""
    license_arn: str = ""
    customer_identifier: str = ""
    allocations: Sequence[Allocation] = ()

    def __post_init__(self) -> None:
        # A tuple, however given: a record built with a list equals the one the gateway echoes.
        object.__setattr__(self, "allocations", tuple(self.allocations))


class RecordStatus(enum.StrEnum):
    """What AWS did with one record (the proto's UsageRecordResult.Status, without ``STATUS_``)."""

    SUCCESS = "SUCCESS"  # kept (or an identical record sent before): metering_record_id is set
    CUSTOMER_NOT_SUBSCRIBED = "CUSTOMER_NOT_SUBSCRIBED"  # no subscription or agreement: not kept
    DUPLICATE_RECORD = "DUPLICATE_RECORD"  # the hour holds another quantity, which stays billed
    UNSPECIFIED = "UNSPECIFIED"  # a status this client does not know yet (a newer gateway's)


@dataclass(frozen=True)
class UsageRecordResult:
    """One record as it was sent (``timestamp`` filled in), AWS's status for it, and its id on SUCCESS."""

    record: UsageRecord
    status: RecordStatus
    metering_record_id: str


@dataclass(frozen=True)
class BatchMeterResult:
    """What BatchMeterUsage did: a result per processed record, and the records still
    ``unprocessed`` after the gateway's own resends, ready to be sent again as they are."""

    results: tuple[UsageRecordResult, ...]
    unprocessed: tuple[UsageRecord, ...]


@dataclass(frozen=True)
class Customer:
    """ResolveCustomer's answer: keep ``customer_aws_account_id`` and ``license_arn`` for BatchMeterUsage."""

    customer_identifier: str  # the legacy id; empty for products listed since 1 June 2026
    product_code: str
    customer_aws_account_id: str
    license_arn: str


def usage_record(record: UsageRecord | pb.UsageRecord, now: datetime) -> pb.UsageRecord:
    """The record's message, stamped ``now`` when it has no timestamp; a message passes unchanged."""
    if isinstance(record, pb.UsageRecord):
        return record
    msg = pb.UsageRecord(
        dimension=record.dimension,
        timestamp=timestamp(now if record.timestamp is None else record.timestamp),
        customer_aws_account_id=record.customer_aws_account_id,
        license_arn=record.license_arn,
        customer_identifier=record.customer_identifier,
        usage_allocations=[allocation(a) for a in record.allocations],
    )
    set_quantity(msg, record.quantity, "quantity_as_decimal")
    return msg


def batch_meter_usage_request(
    records: Iterable[UsageRecord | pb.UsageRecord], product_code: str, now: datetime | None = None
) -> pb.BatchMeterUsageRequest:
    """The request; records without a timestamp all get the same one, ``now`` (default: the current time)."""
    stamp = datetime.now(UTC) if now is None else now
    return pb.BatchMeterUsageRequest(usage_records=[usage_record(r, stamp) for r in records], product_code=product_code)


def _decimal(message: pb.UsageRecord | pb.UsageAllocation, whole: str, decimal: str, oneof: str) -> Decimal:
    which = message.WhichOneof(oneof)  # type: ignore[arg-type]  # each message's own oneof name
    if which == decimal:
        return Decimal(getattr(message, decimal))
    return Decimal(getattr(message, whole) if which == whole else 0)


def record_of(msg: pb.UsageRecord) -> UsageRecord:
    """A record the gateway echoed, as the caller's type: quantities as Decimal, exactly as
    sent ("2.50" stays 2.50), so sending it again is the identical record."""
    return UsageRecord(
        dimension=msg.dimension,
        quantity=_decimal(msg, "quantity", "quantity_as_decimal", "quantity_value"),
        timestamp=msg.timestamp.ToDatetime(tzinfo=UTC) if msg.HasField("timestamp") else None,
        customer_aws_account_id=msg.customer_aws_account_id,
        license_arn=msg.license_arn,
        customer_identifier=msg.customer_identifier,
        allocations=tuple(
            Allocation(
                _decimal(a, "allocated_usage_quantity", "allocated_usage_quantity_as_decimal", "quantity"),
                {t.key: t.value for t in a.tags},
            )
            for a in msg.usage_allocations
        ),
    )


def record_status(value: int) -> RecordStatus:
    """The proto's status number as a RecordStatus; one this client does not know is UNSPECIFIED."""
    try:
        name = pb.UsageRecordResult.Status.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return RecordStatus.UNSPECIFIED
    return RecordStatus.__members__.get(name.removeprefix("STATUS_"), RecordStatus.UNSPECIFIED)


def batch_meter_result(reply: pb.BatchMeterUsageResponse) -> BatchMeterResult:
    return BatchMeterResult(
        results=tuple(
            UsageRecordResult(record_of(r.usage_record), record_status(r.status), r.metering_record_id)
            for r in reply.results
        ),
        unprocessed=tuple(record_of(r) for r in reply.unprocessed_records),
    )


def customer(reply: pb.ResolveCustomerResponse) -> Customer:
    return Customer(
        customer_identifier=reply.customer_identifier,
        product_code=reply.product_code,
        customer_aws_account_id=reply.customer_aws_account_id,
        license_arn=reply.license_arn,
    )
