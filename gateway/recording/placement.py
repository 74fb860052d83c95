"""Hourly buckets as pure functions: grouping, placement (carry-over), requests.

Nothing here does I/O or reads a clock; the spool and the sender call these with
rows and times, and the property tests call them with generated ones. Times are
epoch seconds; an *hour* is the epoch second its hour starts at. In AgentCore
Runtime mode a bucket lasts one flush interval instead (``span`` seconds): the
functions that cut time take it, and an "hour" is then that bucket's start.

- :func:`group` turns events into *pieces*: the usage of one product (or license),
  customer, dimension and own hour, split by tag set. A piece always fits in an
  empty record. Container usage names no customer (:func:`customer_key` ``""``);
  SaaS usage is kept apart per customer, since BatchMeterUsage meters it so.
- :func:`place` picks the hour a piece goes to: its own hour when that hour can
  still take it, else the next hour that can (the carry rule).
- :func:`build_request` makes the one MeterUsage request for a bucket, with a
  ClientToken derived from the bucket, so a resend is the same request.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

from gateway.domain import validation
from gateway.domain.clock import HOUR
from marketplace.metering.v1 import metering_pb2 as pb

# The most one record can carry: AWS's decimal quantity has 10 integer digits and 6
# decimals. Whole totals above QUANTITY_MAX are sent as decimals (no fraction).
MAX_TOTAL = Decimal("9999999999.999999")
# A record for an hour is only planned while that hour starts this long inside
# AWS's six-hour window, so there is time to send (and resend) it.
SAFETY_MARGIN = 30 * 60
# A record whose outcome is unknown is resent, never carried, until its hour's start is
# this close to six hours old (a minute for the clocks of AWS and the gateway to differ).
RESEND_SKEW = 60
# The most a record's allocations may take in AWS's request (about: see allocation_bytes):
# well under AWS's 1 MB, so that a SaaS call fits at least two such records.
RECORD_BYTES_MAX = 400_000
# Bounds the carry search; reaching it means a bug, not a busy hour.
_MAX_CARRY_HOURS = 24 * 366
_TOKEN_NAMESPACE = uuid.UUID("6f1d2a0e-8f5c-4c43-9a51-2f4f5d3e7b10")

Key = tuple[str, str, str]  # (product_code, customer, usage_dimension): what records are kept per


def hour_of(seconds: float, span: int = HOUR) -> int:
    """The start of the hour ``seconds`` falls in (of the bucket, when ``span`` is not an hour)."""
    whole = int(seconds // 1)
    return whole - whole % span


def window_start(now: float, saas: bool = False) -> float:
    """The oldest timestamp AWS takes at ``now``: six hours back for MeterUsage; for SaaS
    usage (BatchMeterUsage) 24 hours back, and not into the previous month after 06:00
    UTC on the 1st (:func:`gateway.domain.validation.saas_oldest`)."""
    if not saas:
        return now - validation.MAX_AGE.total_seconds()
    return validation.saas_oldest(datetime.fromtimestamp(now, UTC)).timestamp()


def earliest_hour(now: float, margin: float = SAFETY_MARGIN, span: int = HOUR, *, saas: bool = False) -> int:
    """The first hour (bucket of ``span`` seconds) a record may still be planned for at ``now``.

    AWS refuses timestamps older than its window (:func:`window_start`); records are
    sent with their hour's start as timestamp, so that start must still be inside the
    window ``margin`` seconds from now, to leave time for sending and retrying.
    """
    oldest = window_start(now + margin, saas)
    start = hour_of(oldest, span)
    return start if start >= oldest else start + span


def too_old_goes_to(now: float, span: int) -> int | None:
    """Where usage too old for its own bucket goes (:func:`place`'s ``fallback``): for
    hourly records the earliest hour in the window (None), for shorter buckets the
    open one, which stays inside the window for hours."""
    return None if span >= HOUR else hour_of(now, span)


def still_accepted(hour: int, now: float, *, saas: bool = False) -> bool:
    """Whether AWS still takes a record timestamped at ``hour``'s start at ``now``."""
    return hour > window_start(now, saas) + RESEND_SKEW


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps with options makes one a call


def customer_key(account_id: str, license_arn: str, identifier: str) -> str:
    """A customer as canonical text, stored with events and records: "" for container
    usage (no customer), else the compact JSON list ``[account, license, identifier]``.
    One text per customer, so records are kept apart (and found) per customer."""
    if not (account_id or license_arn or identifier):
        return ""
    return _COMPACT.encode([account_id, license_arn, identifier])


def customer_of(key: str) -> tuple[str, str, str]:
    """``(customer_aws_account_id, license_arn, customer_identifier)`` of a :func:`customer_key`."""
    if not key:
        return "", "", ""
    account_id, license_arn, identifier = json.loads(key)
    return str(account_id), str(license_arn), str(identifier)


@functools.lru_cache(maxsize=4096)
def keyed_product(product_code: str, customer: str) -> str:
    """The product a record is kept under: for usage of a license, none (""), whatever
    product the event named. AWS keeps one record per license's customer, dimension and
    hour, so events with and without the product hint must share one record; the hint
    only groups calls (:meth:`gateway.recording.spool.Spool.product_hints`)."""
    return "" if customer and customer_of(customer)[1] else product_code


def allocation_bytes(key: str) -> int:
    """At least the bytes one allocation with tag set ``key`` (:func:`tags_key`) takes in
    AWS's JSON: its tags as {"Key": ..., "Value": ...} objects and a quantity of up to 17
    characters under its field name."""
    return 2 * len(key) + 128


def tags_key(tags: Iterable[tuple[str, str]]) -> str:
    """A tag set as canonical text (order ignored); "" for untagged usage."""
    pairs = sorted(tags)
    return json.dumps(pairs, separators=(",", ":")) if pairs else ""


def tags_of(key: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in json.loads(key)] if key else []


def format_decimal(value: Decimal) -> str:
    """Plain notation without trailing zeros: 17, 17.5, never 1.7E+1."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


@dataclass
class Content:
    """The usage of a bucket: quantity per tag set, and whether all of it is whole."""

    allocations: dict[str, Decimal] = field(default_factory=dict)
    whole: bool = True
    # About the bytes its usage allocations take in AWS's request (an overestimate), kept
    # up by add(): fits() asks for it once an event, and a sum over 2500 tag sets each time
    # made grouping a bucket's events quadratic.
    size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.size = sum(allocation_bytes(k) for k in self.allocations)

    @property
    def total(self) -> Decimal:
        return sum(self.allocations.values(), Decimal(0))

    @property
    def is_whole(self) -> bool:
        """Sent as whole quantities: every event was whole and the total fits."""
        return bool(self.whole) and self.total <= validation.QUANTITY_MAX

    def fits(self, other: Content) -> bool:
        """Whether ``other`` can join this bucket without breaking AWS's limits: the total,
        2500 tag sets, and a size that leaves the request under AWS's 1 MB."""
        if self.total + other.total > MAX_TOTAL:
            return False
        new_keys = other.allocations.keys() - self.allocations.keys()
        if len(self.allocations) + len(new_keys) > validation.ALLOCATIONS_MAX:
            return False
        return not new_keys or self.size + sum(allocation_bytes(k) for k in new_keys) <= RECORD_BYTES_MAX

    def add(self, other: Content) -> None:
        for key, quantity in other.allocations.items():
            if key not in self.allocations:
                self.size += allocation_bytes(key)
            self.allocations[key] = self.allocations.get(key, Decimal(0)) + quantity
        self.whole = bool(self.whole and other.whole)

    def to_json(self) -> str:
        return json.dumps({k: format_decimal(v) for k, v in sorted(self.allocations.items())}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, whole: bool) -> Content:
        return cls({k: Decimal(v) for k, v in json.loads(text).items()}, whole)


class EventRow(NamedTuple):
    """One validated event as the spool stores it (a tuple: it goes to SQLite as is)."""

    event_id: str
    product_code: str
    usage_dimension: str
    hour: int
    tags: str  # tags_key()
    quantity: str  # exact, as the caller sent it
    whole: bool
    digest: bytes  # event_digest(): tells an identical repeat from a reused event_id
    timestamp: str  # the caller's, as event_time() writes it; "" when the gateway stamped the event
    customer: str = ""  # customer_key(): "" for container usage


UNSET = "unset"  # an event's timestamp in its digest when the caller sent none


def event_digest(
    product_code: str,
    usage_dimension: str,
    seconds: int | None,
    nanos: int,
    quantity: str,
    tags: str,
    customer: str = "",
) -> bytes:
    """What an event says, in 16 bytes: product, dimension, exact timestamp (None:
    the caller sent none, so the time the gateway stamped is not part of it and an
    identical resend is a duplicate), the quantity's value (17 and 17.0 are one
    quantity, as to AWS), the tag set, and the customer (:func:`customer_key`) when it
    names one: only then, so a container event's digest is what older releases stored,
    and their spools keep telling duplicates from conflicts."""
    when = UNSET if seconds is None else f"{seconds}.{nanos:09d}"
    parts = (product_code, usage_dimension, when, format_decimal(Decimal(quantity)), tags)
    text = "\x1f".join((*parts, customer) if customer else parts)
    return hashlib.sha256(text.encode()).digest()[:16]


def event_time(seconds: int, nanos: int) -> str:
    """An event's timestamp as stored and shown: RFC 3339 UTC, with as many fraction digits as it has."""
    text = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"


# The fields of an event a conflict can name (EventRow's attributes, named as in UsageEvent;
# "customer" stands for the three fields that name one).
_COMPARED = ("product_code", "customer", "usage_dimension", "timestamp", "quantity", "tags")
_CUSTOMER_FIELDS = ("customer_aws_account_id", "license_arn", "customer_identifier")


def differences(stored: EventRow, new: EventRow) -> list[tuple[str, str, str]]:
    """(field, stored value, new value) for each field two events with one event_id
    differ in, as a person would read them: an unset timestamp says so, quantities
    compare by value, tags as their set, a customer as its three fields (the way it
    was named). ``stored.timestamp`` is None for events kept by a release that did not
    store it."""
    out: list[tuple[str, str, str]] = []
    for name in _COMPARED:
        old, now = getattr(stored, name), getattr(new, name)
        if name == "customer":
            out += [
                (field_name, _shown(field_name, a), _shown(field_name, b))
                for field_name, a, b in zip(_CUSTOMER_FIELDS, customer_of(old), customer_of(now), strict=True)
                if a != b
            ]
            continue
        if name == "timestamp" and old is None:
            continue  # not stored: named below if nothing else differs
        if name == "quantity":
            if Decimal(old) == Decimal(now):
                continue
        elif old == now:
            continue
        out.append((name, _shown(name, old), _shown(name, now)))
    if not out and stored.digest != new.digest:  # a difference the stored row cannot show
        out.append(("timestamp", _shown("timestamp", stored.timestamp), _shown("timestamp", new.timestamp)))
    return out


def _shown(name: str, value: str | None) -> str:
    if name == "timestamp":
        return "(not stored by the release that accepted it)" if value is None else (value or "unset")
    if name == "tags":
        return "{" + ", ".join(f"{k}={v}" for k, v in tags_of(value)) + "}" if value else "{} (untagged)"
    return value or '""'


@dataclass
class Piece:
    """Usage of one product, customer, dimension and own hour that moves as one unit."""

    product_code: str
    usage_dimension: str
    hour: int
    content: Content = field(default_factory=Content)
    ids: list[int] = field(default_factory=list)  # the events' row ids in the spool
    customer: str = ""  # customer_key(): "" for container usage

    @property
    def key(self) -> Key:
        """The record key this usage belongs to (its hour aside)."""
        return self.product_code, self.customer, self.usage_dimension


# An event as group() reads it, in the spool's column order (the key's order):
# (row_id, product_code, customer, usage_dimension, hour, tags, quantity, whole).
GroupRow = tuple[int, str, str, str, int, str, str, bool]


def group(rows: Iterable[GroupRow]) -> list[Piece]:
    """Sum events (:data:`GroupRow`) into pieces.

    Usually one piece per product (none for a license's usage: :func:`keyed_product`),
    customer, dimension and hour; a piece is cut in
    two when the next event would push it past what one record may carry (the total,
    or 2500 tag sets), so every piece fits in an empty record. Ordered by hour.
    """
    open_pieces: dict[tuple[str, str, str, int], Piece] = {}
    done: list[Piece] = []
    for row_id, named, customer, dimension, hour, tags, quantity, whole in rows:
        event = Content({tags: Decimal(quantity)}, bool(whole))
        product = keyed_product(named, customer)
        where = (product, customer, dimension, hour)
        piece = open_pieces.get(where)
        if piece is None or not piece.content.fits(event):
            if piece is not None:
                done.append(piece)
            piece = open_pieces[where] = Piece(product, dimension, hour, customer=customer)
        piece.content.add(event)
        piece.ids.append(row_id)
    done.extend(open_pieces.values())
    return sorted(done, key=lambda p: (p.hour, p.product_code, p.customer, p.usage_dimension))


def place(
    own_hour: int, earliest: int, can_take: Callable[[int], bool], span: int = HOUR, fallback: int | None = None
) -> int:
    """The hour usage of ``own_hour`` goes to: the first hour (bucket of ``span``
    seconds) from it on that is inside the window (``earliest``) and can take it.

    Usage too old for its own hour starts the search at ``earliest``, or at
    ``fallback`` when given: AgentCore Runtime's buckets last a minute or so, and
    one at the window's edge leaves it before the next pass could send it, so
    such usage goes to the open bucket instead (see :func:`too_old_goes_to`)."""
    if own_hour >= earliest:
        hour = own_hour
    else:
        hour = earliest if fallback is None else max(earliest, fallback)
    for _ in range(_MAX_CARRY_HOURS):
        if can_take(hour):
            return hour
        hour += span
    raise RuntimeError(f"no hour within {_MAX_CARRY_HOURS} hours after {own_hour} can take the usage")


def client_token(
    product_code: str, usage_dimension: str, hour: int, content: Content, spool_id: str = "", customer: str = ""
) -> str:
    """Derived from the bucket and its spool: the same bucket of the same spool always
    gets the same token (a resend is the same request), and two spools (two pods
    metering the same usage in the same hour) never share one, whatever AWS's scope
    for tokens. ``spool_id`` "" is release 0.1.0's formula. The customer
    (:func:`customer_key`) is part of it only when there is one: a container
    record's token is what older releases froze and resend."""
    parts: tuple[str, ...] = (product_code, usage_dimension, str(hour), content.to_json(), str(content.is_whole))
    if spool_id or customer:
        parts = (*parts, spool_id)
    if customer:
        parts = (*parts, customer)
    return str(uuid.uuid5(_TOKEN_NAMESPACE, "\x1f".join(parts)))


def allocations(content: Content, *, decimal: bool = True) -> list[pb.UsageAllocation]:
    """The UsageAllocations of a bucket; none when all its usage is untagged.

    Decimal unless ``decimal`` is False: AWS deprecated the whole-number fields
    (2026-10-20); only a record frozen by an older release in the whole form is
    resent in it, because a resend must be the identical request.
    """
    if set(content.allocations) <= {""}:
        return []
    whole = content.is_whole and not decimal
    out = []
    for key, quantity in sorted(content.allocations.items()):
        alloc = pb.UsageAllocation(tags=[pb.Tag(key=k, value=v) for k, v in tags_of(key)])
        if whole:
            alloc.allocated_usage_quantity = int(quantity)
        else:
            alloc.allocated_usage_quantity_as_decimal = format_decimal(quantity)
        out.append(alloc)
    return out


def timestamp_of(hour: int) -> datetime:
    return datetime.fromtimestamp(hour, tz=UTC)


def build_request(
    product_code: str, usage_dimension: str, hour: int, content: Content, token: str, *, decimal: bool = True
) -> pb.MeterUsageRequest:
    """The MeterUsage request for a bucket, timestamped at its hour's start, with
    decimal quantities (see :func:`allocations` for ``decimal``)."""
    request = pb.MeterUsageRequest(
        product_code=product_code,
        usage_dimension=usage_dimension,
        usage_allocations=allocations(content, decimal=decimal),
        client_token=token,
    )
    request.timestamp.FromDatetime(timestamp_of(hour))
    if content.is_whole and not decimal:
        request.usage_quantity = int(content.total)
    else:
        request.usage_quantity_as_decimal = format_decimal(content.total)
    return request
