"""Python values → request messages: pure functions, no I/O.

Every quantity goes out in the ``*_as_decimal`` fields: AWS deprecated the
whole-number ones (UsageQuantity, AllocatedUsageQuantity) on 2026-10-20, and a
decimal string carries any int exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    )
    if event.timestamp is not None:
        msg.timestamp.CopyFrom(timestamp(event.timestamp))
    set_quantity(msg, event.quantity, "usage_quantity_as_decimal")
    return msg
