"""The rules a MeterUsage request must keep, as pure functions → violations.

This is the single source of truth for input rules: the gRPC services refuse a
request with these violations before anything reaches AWS, and the local backend
refuses the same request with AWS's own exception names. The limits are those of
botocore's model of the service (a test checks they still agree) plus the
semantic rules AWS documents: the six-hour window, allocation sums and unique tag
sets.

Each violation carries the AWS exception that AWS raises for the same condition,
so the gateway and the local backend classify a condition the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

PRODUCT_CODE_MAX = 255
USAGE_DIMENSION_MAX = 255
QUANTITY_MAX = 2_147_483_647
DECIMAL_MAX_LEN = 17
ALLOCATIONS_MAX = 2500
TAGS_MAX = 5
TAG_KEY_MAX = 100
TAG_VALUE_MAX = 256
CLIENT_TOKEN_MAX = 64
EVENT_ID_MAX = 128
RECORD_BATCH_MAX = 1000
MAX_AGE = timedelta(hours=6)
# RecordUsage accepts old events and carries them into an hour AWS still takes, for as
# long as it can still recognise them (the deduplication window, --event-retention):
# an older event may have been metered and its id forgotten, so a replay of it would
# bill twice.
TOO_OLD_FOR_AWS = "AWS takes no older usage"
TOO_OLD_TO_DEDUPLICATE = (
    "the deduplication window, --event-retention: it may have been metered and its event_id forgotten already"
)

# Patterns exactly as in botocore's model, minus the anchors: fullmatch anchors
# them, and unlike ``$`` it does not let a trailing newline through.
PRODUCT_CODE_RE = re.compile(r"[-a-zA-Z0-9/=:_.@]*")
TAG_RE = re.compile(r"[a-zA-Z0-9+ -=._:\/@]+")
DECIMAL_RE = re.compile(r"(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?")

# The AWS exception raised for the same condition (see errors.py for codes).
INVALID_PRODUCT_CODE = "InvalidProductCodeException"
INVALID_USAGE_DIMENSION = "InvalidUsageDimensionException"
INVALID_TAG = "InvalidTagException"
INVALID_USAGE_ALLOCATIONS = "InvalidUsageAllocationsException"
TIMESTAMP_OUT_OF_BOUNDS = "TimestampOutOfBoundsException"
VALIDATION = "ValidationException"

WHOLE = "whole"
DECIMAL = "decimal"

# Amazon Bedrock AgentCore Runtime (--agentcore): MeterUsage there takes many records an
# hour, each deduplicated by its ClientToken alone, and no vendor-metered tags.
AGENTCORE = "AgentCore Runtime mode"
AGENTCORE_NO_ALLOCATIONS = "AgentCore Runtime takes no usage allocations (vendor-metered tags)"
AGENTCORE_NO_TAGS = (
    "an event's tags become usage allocations (vendor-metered tags), which AgentCore Runtime does not take"
)


@dataclass(frozen=True)
class Violation:
    """One offending field, by its proto path (``usage_allocations[2].tags[0].key``)."""

    field: str
    description: str
    aws_error: str = VALIDATION


@dataclass(frozen=True)
class Window:
    """The span of time AWS accepts usage for: six hours back, a little skew ahead."""

    now: datetime
    future_skew: timedelta = timedelta(minutes=5)
    max_age: timedelta = MAX_AGE
    why_max_age: str = TOO_OLD_FOR_AWS  # what a person is told when a timestamp is older

    @property
    def earliest(self) -> datetime:
        return self.now - self.max_age

    @property
    def latest(self) -> datetime:
        return self.now + self.future_skew


class _TagLike(Protocol):
    key: str
    value: str


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_product_code(value: str, path: str = "product_code") -> list[Violation]:
    if not value:
        return [Violation(path, "is required", INVALID_PRODUCT_CODE)]
    if len(value) > PRODUCT_CODE_MAX:
        return [
            Violation(path, f"must be at most {PRODUCT_CODE_MAX} characters, got {len(value)}", INVALID_PRODUCT_CODE)
        ]
    if not PRODUCT_CODE_RE.fullmatch(value):
        return [Violation(path, "may contain only letters, digits and - / = : _ . @", INVALID_PRODUCT_CODE)]
    return []


def check_usage_dimension(value: str, path: str = "usage_dimension") -> list[Violation]:
    if not value:
        return [Violation(path, "is required", INVALID_USAGE_DIMENSION)]
    if len(value) > USAGE_DIMENSION_MAX:
        return [
            Violation(
                path, f"must be at most {USAGE_DIMENSION_MAX} characters, got {len(value)}", INVALID_USAGE_DIMENSION
            )
        ]
    return []


def check_whole(value: int, path: str, aws_error: str = VALIDATION) -> list[Violation]:
    if not 0 <= value <= QUANTITY_MAX:
        return [Violation(path, f"must be between 0 and {QUANTITY_MAX}, got {value}", aws_error)]
    return []


def parse_decimal(text: str) -> Decimal | None:
    """The value of a decimal quantity string, or None when AWS would refuse it."""
    if len(text) > DECIMAL_MAX_LEN or not DECIMAL_RE.fullmatch(text):
        return None
    return Decimal(text)


def check_decimal(text: str, path: str, aws_error: str = VALIDATION) -> list[Violation]:
    if parse_decimal(text) is None:
        return [
            Violation(
                path,
                "must be a non-negative decimal like 17 or 17.42: at most 10 digits before "
                f"the point, 1-6 after it, no sign or leading zeros, at most {DECIMAL_MAX_LEN} characters",
                aws_error,
            )
        ]
    return []


def quantity_of(message: Any, prefix: str = "") -> tuple[str | None, Decimal | None, list[Violation]]:
    """(kind, value, violations) of a message's ``quantity`` oneof.

    Works for MeterUsageRequest, UsageAllocation and UsageEvent alike, whose oneof
    members are ``*_quantity`` (whole) and ``*_quantity_as_decimal``.
    """
    which = message.WhichOneof("quantity")
    if which is None:
        return None, None, []
    path = _join(prefix, which)
    raw = getattr(message, which)
    if which.endswith("_as_decimal"):
        errs = check_decimal(raw, path)
        return DECIMAL, (None if errs else Decimal(raw)), errs
    errs = check_whole(raw, path)
    return WHOLE, (None if errs else Decimal(raw)), errs


def check_tags(tags: Sequence[_TagLike], path: str) -> list[Violation]:
    """At most TAGS_MAX tags (and past that, not one more is looked at), each well formed, keys unique."""
    if len(tags) > TAGS_MAX:
        return [Violation(path, f"must have at most {TAGS_MAX} tags, got {len(tags)}", INVALID_TAG)]
    out: list[Violation] = []
    seen: set[str] = set()
    for i, tag in enumerate(tags):
        for name, value, limit in (("key", tag.key, TAG_KEY_MAX), ("value", tag.value, TAG_VALUE_MAX)):
            where = f"{path}[{i}].{name}"
            if not value:
                out.append(Violation(where, "is required", INVALID_TAG))
            elif len(value) > limit:
                out.append(Violation(where, f"must be at most {limit} characters, got {len(value)}", INVALID_TAG))
            elif not TAG_RE.fullmatch(value):
                out.append(
                    Violation(where, r"may contain only characters matching ^[a-zA-Z0-9+ -=._:\/@]+$", INVALID_TAG)
                )
        if tag.key in seen:
            out.append(Violation(f"{path}[{i}].key", f"repeats key {tag.key!r} within one tag set", INVALID_TAG))
        seen.add(tag.key)
    return out


def tag_set(tags: Iterable[_TagLike]) -> frozenset[tuple[str, str]]:
    """The identity of an allocation bucket: its tags, order ignored."""
    return frozenset((t.key, t.value) for t in tags)


def check_timestamp(message: Any, window: Window, path: str = "timestamp") -> list[Violation]:
    """Present, a real instant, and inside AWS's window."""
    if not message.HasField(path.rsplit(".", 1)[-1]):
        return [Violation(path, "is required", VALIDATION)]
    ts = getattr(message, path.rsplit(".", 1)[-1])
    if not 0 <= ts.nanos < 1_000_000_000:
        return [Violation(path, "nanos must be between 0 and 999999999", VALIDATION)]
    try:
        when = ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        return [Violation(path, "is not a valid time", VALIDATION)]
    if when < window.earliest:
        return [
            Violation(
                path, f"is more than {_hours(window.max_age)} old ({window.why_max_age})", TIMESTAMP_OUT_OF_BOUNDS
            )
        ]
    if when > window.latest:
        return [
            Violation(
                path, f"is more than {int(window.future_skew.total_seconds())}s in the future", TIMESTAMP_OUT_OF_BOUNDS
            )
        ]
    return []


def _hours(delta: timedelta) -> str:
    """6 hours, 7 days: the age limit as a person would say it."""
    hours = delta.total_seconds() / 3600
    if hours >= 48 and hours % 24 == 0:
        return f"{hours / 24:g} days"
    return f"{hours:g} hours"


def check_allocations(
    allocations: Sequence[Any], kind: str | None, total: Decimal | None, path: str = "usage_allocations"
) -> list[Violation]:
    """1-2500 allocations of the request's kind, unique tag sets, summing to the total."""
    out: list[Violation] = []
    if len(allocations) > ALLOCATIONS_MAX:
        return [
            Violation(
                path,
                f"must have at most {ALLOCATIONS_MAX} allocations, got {len(allocations)}",
                INVALID_USAGE_ALLOCATIONS,
            )
        ]
    expected_kind = kind or WHOLE  # an unset quantity is AWS's whole 0
    seen: dict[frozenset[tuple[str, str]], int] = {}
    running = Decimal(0)
    sum_known = True
    for i, alloc in enumerate(allocations):
        where = f"{path}[{i}]"
        a_kind, a_value, errs = quantity_of(alloc, where)
        for err in errs:
            out.append(Violation(err.field, err.description, INVALID_USAGE_ALLOCATIONS))
        if a_kind is None:
            out.append(
                Violation(
                    f"{where}.quantity",
                    "must be set (allocated_usage_quantity or allocated_usage_quantity_as_decimal)",
                    INVALID_USAGE_ALLOCATIONS,
                )
            )
        elif a_kind != expected_kind:
            want = "allocated_usage_quantity_as_decimal" if expected_kind == DECIMAL else "allocated_usage_quantity"
            out.append(
                Violation(
                    f"{where}.quantity",
                    f"must be {want}, the same kind as the request's quantity",
                    INVALID_USAGE_ALLOCATIONS,
                )
            )
        if a_value is None:
            sum_known = False
        else:
            running += a_value
        out.extend(check_tags(alloc.tags, f"{where}.tags"))
        key = tag_set(alloc.tags)
        if key in seen:
            out.append(
                Violation(
                    f"{where}.tags",
                    f"has the same set of tags as usage_allocations[{seen[key]}]",
                    INVALID_USAGE_ALLOCATIONS,
                )
            )
        else:
            seen[key] = i
    if sum_known and total is not None and running != total:
        out.append(
            Violation(
                path, f"quantities sum to {running}, not to the request's quantity {total}", INVALID_USAGE_ALLOCATIONS
            )
        )
    return out


def check_client_token(token: str, path: str = "client_token", *, agentcore: bool = False) -> list[Violation]:
    """At most 64 characters; required in AgentCore Runtime mode, where AWS deduplicates by
    the token alone (not by the hour), so a retry without one would be a second record."""
    if agentcore and not token:
        return [
            Violation(
                path,
                f"is required in {AGENTCORE} (--agentcore): AWS keeps every record it gets there and "
                "deduplicates by ClientToken alone, so only a token makes a retry safe",
            )
        ]
    if len(token) > CLIENT_TOKEN_MAX:
        return [Violation(path, f"must be at most {CLIENT_TOKEN_MAX} characters, got {len(token)}")]
    return []


def check_no_tags_in_agentcore(count: int, path: str, why: str, aws_error: str) -> list[Violation]:
    """AgentCore Runtime's MeterUsage takes no vendor-metered tags: neither a request's
    usage_allocations nor, for recorded usage, an event's tags (they would become them)."""
    if count:
        return [Violation(path, f"must be empty in {AGENTCORE} (--agentcore): {why}", aws_error)]
    return []


@dataclass(frozen=True)
class Products:
    """``--products``: the products, and their dimensions, this gateway meters.

    A typo in a product code or dimension is refused here, before AWS, instead of
    by AWS in production (or never, by a local backend that takes anything); and a
    caller cannot meter a product the gateway was not deployed for.
    """

    dimensions: Mapping[str, frozenset[str]]

    def check(self, product_code: str, usage_dimension: str, prefix: str = "") -> list[Violation]:
        known = self.dimensions.get(product_code)
        if known is None:
            return [
                Violation(
                    _join(prefix, "product_code"),
                    f"is not a product this gateway meters (--products: {_listed(self.dimensions)})",
                    INVALID_PRODUCT_CODE,
                )
            ]
        if usage_dimension not in known:
            return [
                Violation(
                    _join(prefix, "usage_dimension"),
                    f"is not a dimension of {product_code} this gateway meters (--products: {_listed(known)})",
                    INVALID_USAGE_DIMENSION,
                )
            ]
        return []


def _listed(names: Iterable[str], most: int = 10) -> str:
    """A few names for a message (a refusal's size stays bounded, however long the list)."""
    ordered = sorted(names)
    more = f" and {len(ordered) - most} more" if len(ordered) > most else ""
    return ", ".join(ordered[:most]) + more


def validate_meter_usage(
    request: Any, window: Window, products: Products | None = None, *, agentcore: bool = False
) -> list[Violation]:
    """Every violation of a MeterUsageRequest; empty means it may go to AWS.

    ``agentcore`` (--agentcore) adds AgentCore Runtime's two rules: a client_token,
    and no usage allocations.
    """
    out = check_product_code(request.product_code)
    out += check_usage_dimension(request.usage_dimension)
    if products is not None and not out:
        out += products.check(request.product_code, request.usage_dimension)
    out += check_timestamp(request, window)
    kind, value, errs = quantity_of(request)
    out += errs
    if kind is None:
        value = Decimal(0)
    if agentcore:
        out += check_no_tags_in_agentcore(
            len(request.usage_allocations), "usage_allocations", AGENTCORE_NO_ALLOCATIONS, INVALID_USAGE_ALLOCATIONS
        )
    elif len(request.usage_allocations):
        out += check_allocations(request.usage_allocations, kind, value)
    out += check_client_token(request.client_token, agentcore=agentcore)
    return out


def check_usage_event(
    event: Any,
    window: Window,
    path: str,
    inside: tuple[int, int] | None = None,
    products: Products | None = None,
    *,
    agentcore: bool = False,
) -> list[Violation]:
    """Every violation of one event, by its path in the request.

    ``inside`` (epoch seconds strictly inside the window) lets the common case
    skip the full timestamp check, which stays the authority on the rest.
    ``agentcore``: tags are refused (they would be usage allocations).
    """
    out: list[Violation] = []
    if not 1 <= len(event.event_id) <= EVENT_ID_MAX:
        out.append(Violation(f"{path}.event_id", f"must be 1-{EVENT_ID_MAX} characters, got {len(event.event_id)}"))
    named = check_product_code(event.product_code, f"{path}.product_code")
    named += check_usage_dimension(event.usage_dimension, f"{path}.usage_dimension")
    if products is not None and not named:
        named += products.check(event.product_code, event.usage_dimension, path)
    out += named
    ts = event.timestamp  # unset: the gateway stamps the event when it accepts it
    if event.HasField("timestamp") and (
        inside is None or not (inside[0] < ts.seconds < inside[1] and 0 <= ts.nanos < 1_000_000_000)
    ):
        out += check_timestamp(event, window, f"{path}.timestamp")
    kind, _, errs = quantity_of(event, path)
    out += errs
    if kind is None:
        out.append(Violation(f"{path}.quantity", "must be set (usage_quantity or usage_quantity_as_decimal)"))
    if agentcore:
        out += check_no_tags_in_agentcore(len(event.tags), f"{path}.tags", AGENTCORE_NO_TAGS, INVALID_TAG)
    elif event.tags:
        out += check_tags(event.tags, f"{path}.tags")
    return out


def validate_record_usage(
    events: Sequence[Any], window: Window, products: Products | None = None, *, agentcore: bool = False
) -> list[Violation]:
    """Every violation of a RecordUsage batch (1-1000 events), named ``events[i].<field>``;
    ``agentcore`` (--agentcore) refuses tags."""
    if not 1 <= len(events) <= RECORD_BATCH_MAX:
        return [Violation("events", f"must hold 1-{RECORD_BATCH_MAX} events, got {len(events)}")]
    inside = (int(window.earliest.timestamp()) + 1, int(window.latest.timestamp()) - 1)
    out: list[Violation] = []
    for i, event in enumerate(events):
        out += check_usage_event(event, window, f"events[{i}]", inside, products, agentcore=agentcore)
    return out


def only_timestamp_window(violations: Sequence[Violation]) -> bool:
    """True when the only fault is a timestamp outside AWS's window (→ OUT_OF_RANGE)."""
    return bool(violations) and all(v.aws_error == TIMESTAMP_OUT_OF_BOUNDS for v in violations)
