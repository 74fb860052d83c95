"""The rules a request must keep (MeterUsage, BatchMeterUsage, ResolveCustomer,
RecordUsage), as pure functions → violations.

This is the single source of truth for input rules: the gRPC services refuse a
request with these violations before anything reaches AWS, and the local backend
refuses the same request with AWS's own exception names. The limits are those of
botocore's model of the service (a test checks they still agree) plus the
semantic rules AWS documents: the six-hour window (MeterUsage), the 24-hour window
and the month-end cutoff (BatchMeterUsage), allocation sums and unique tag sets, one
way of naming a SaaS customer.

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
# BatchMeterUsage (SaaS): records up to 24 hours old, but the previous month's usage only
# until 06:00 UTC on the 1st; 25 records and under 1 MB a call.
SAAS_MAX_AGE = timedelta(hours=24)
MONTH_END_GRACE = timedelta(hours=6)
BATCH_RECORDS_MAX = 25
BATCH_BYTES_MAX = 1_000_000
CUSTOMER_ID_MAX = 255  # CustomerIdentifier and CustomerAWSAccountId alike
TOO_OLD_FOR_SAAS = "AWS takes SaaS usage up to 24 hours old"
PAST_MONTH_END = "AWS takes the previous month's usage only until 06:00 UTC on the 1st"
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
ACCOUNT_ID_RE = re.compile(r"[0-9]+")
LICENSE_ARN_RE = re.compile(
    r"arn:aws[a-zA-Z-]*:[A-Za-z0-9][A-Za-z0-9_/.-]{0,62}:[A-Za-z0-9_/.-]{0,63}:"
    r"[A-Za-z0-9_/.-]{0,63}:[A-Za-z0-9][A-Za-z0-9:_/+=,@.-]{0,1023}"
)
TAG_RE = re.compile(r"[a-zA-Z0-9+ -=._:\/@]+")
DECIMAL_RE = re.compile(r"(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?")

# The AWS exception raised for the same condition (see errors.py for codes).
INVALID_PRODUCT_CODE = "InvalidProductCodeException"
INVALID_USAGE_DIMENSION = "InvalidUsageDimensionException"
INVALID_TAG = "InvalidTagException"
INVALID_USAGE_ALLOCATIONS = "InvalidUsageAllocationsException"
TIMESTAMP_OUT_OF_BOUNDS = "TimestampOutOfBoundsException"
INVALID_CUSTOMER_IDENTIFIER = "InvalidCustomerIdentifierException"
INVALID_LICENSE = "InvalidLicenseException"
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


def month_cutoff(now: datetime) -> datetime | None:
    """The start of ``now``'s month once the previous month's grace is over (06:00 UTC on
    the 1st): BatchMeterUsage takes nothing older then. None while the grace lasts."""
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start if now >= start + MONTH_END_GRACE else None


def saas_oldest(now: datetime) -> datetime:
    """The oldest timestamp BatchMeterUsage takes at ``now``: 24 hours back, and not into
    the previous month after 06:00 UTC on the 1st (:meth:`Window.for_saas`)."""
    return Window.for_saas(now).earliest


@dataclass(frozen=True)
class Window:
    """The span of time AWS accepts usage for: six hours back (24 hours, and the month-end
    cutoff, with ``saas``), a little skew ahead."""

    now: datetime
    future_skew: timedelta = timedelta(minutes=5)
    max_age: timedelta = MAX_AGE
    why_max_age: str = TOO_OLD_FOR_AWS  # what a person is told when a timestamp is older
    saas: bool = False  # BatchMeterUsage's window: max_age 24 hours, and the month-end cutoff

    @classmethod
    def for_saas(cls, now: datetime, future_skew: timedelta = timedelta(minutes=5)) -> Window:
        return cls(now, future_skew, SAAS_MAX_AGE, TOO_OLD_FOR_SAAS, saas=True)

    @property
    def earliest(self) -> datetime:
        """The oldest timestamp taken: the one place of the month-end cutoff's rule."""
        oldest = self.now - self.max_age
        cutoff = month_cutoff(self.now) if self.saas else None
        return oldest if cutoff is None else max(oldest, cutoff)

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


def quantity_of(
    message: Any, prefix: str = "", oneof: str = "quantity"
) -> tuple[str | None, Decimal | None, list[Violation]]:
    """(kind, value, violations) of a message's ``quantity`` oneof.

    Works for MeterUsageRequest, UsageAllocation, UsageEvent and UsageRecord (whose
    oneof is ``quantity_value``) alike, whose oneof members are ``*quantity`` (whole)
    and ``*quantity_as_decimal``.
    """
    which = message.WhichOneof(oneof)
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
        if when >= window.now - window.max_age:  # inside max_age: the month-end cutoff refused it
            return [Violation(path, f"is usage of the previous month ({PAST_MONTH_END})", TIMESTAMP_OUT_OF_BOUNDS)]
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
    saas: bool = False,
) -> list[Violation]:
    """Every violation of one event, by its path in the request.

    ``inside`` (epoch seconds strictly inside the window) lets the common case
    skip the full timestamp check, which stays the authority on the rest.
    ``agentcore``: tags are refused (they would be usage allocations).
    """
    out: list[Violation] = []
    if not 1 <= len(event.event_id) <= EVENT_ID_MAX:
        out.append(Violation(f"{path}.event_id", f"must be 1-{EVENT_ID_MAX} characters, got {len(event.event_id)}"))
    out += check_event_customer(event, path, agentcore=agentcore)
    way = customer_way(event.customer_aws_account_id, event.license_arn, event.customer_identifier)
    if saas and way == NOT_SAAS:
        out.append(
            Violation(
                f"{path}.customer_aws_account_id",
                "is required (with license_arn, or the legacy customer_identifier): this gateway runs in the "
                "seller's account (--saas) and meters SaaS usage, which names its customer",
            )
        )
    # SaaS usage with a license may leave product_code empty: the license names the product.
    by_license = not event.product_code and way == ACCOUNT
    named = [] if by_license else check_product_code(event.product_code, f"{path}.product_code")
    named += check_usage_dimension(event.usage_dimension, f"{path}.usage_dimension")
    if products is not None and not named and event.product_code:
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


# The requests that cap their one repeated field: message name → (field, most, what one is).
CAPPED: Mapping[str, tuple[str, int, str]] = {
    "RecordUsageRequest": ("events", RECORD_BATCH_MAX, "events"),
    "BatchMeterUsageRequest": ("usage_records", BATCH_RECORDS_MAX, "records"),
}


def count_violation(message: str, count: int | None) -> Violation:
    """A :data:`CAPPED` request with ``count`` elements, outside 1 to the cap; None: more
    than the cap, counted on the wire before decoding (which stops counting there)."""
    name, most, noun = CAPPED[message]
    return Violation(name, f"must hold 1-{most} {noun}, got {f'more than {most}' if count is None else count}")


def validate_record_usage(
    events: Sequence[Any],
    window: Window,
    products: Products | None = None,
    *,
    agentcore: bool = False,
    saas: bool = False,
) -> list[Violation]:
    """Every violation of a RecordUsage batch (1-1000 events), named ``events[i].<field>``;
    ``agentcore`` (--agentcore) refuses tags and customers, ``saas`` (--saas) events
    without a customer."""
    if not 1 <= len(events) <= RECORD_BATCH_MAX:
        return [count_violation("RecordUsageRequest", len(events))]
    inside = (int(window.earliest.timestamp()) + 1, int(window.latest.timestamp()) - 1)
    out: list[Violation] = []
    for i, event in enumerate(events):
        out += check_usage_event(event, window, f"events[{i}]", inside, products, agentcore=agentcore, saas=saas)
    return out


def only_timestamp_window(violations: Sequence[Violation]) -> bool:
    """True when the only fault is a timestamp outside AWS's window (→ OUT_OF_RANGE)."""
    return bool(violations) and all(v.aws_error == TIMESTAMP_OUT_OF_BOUNDS for v in violations)


# -- SaaS: BatchMeterUsage, ResolveCustomer, and the customer of a recorded event -----

ACCOUNT = "account"  # CustomerAWSAccountId with LicenseArn (Concurrent Agreements)
LEGACY = "legacy"  # CustomerIdentifier with the request's ProductCode
NOT_SAAS = ""  # names no customer: container usage, metered with MeterUsage


def customer_way(account_id: str, license_arn: str, identifier: str) -> str:
    """How a record or event names its customer: ACCOUNT, LEGACY, or NOT_SAAS (none).
    Both ways at once is ACCOUNT here; :func:`check_customer` refuses it."""
    if account_id or license_arn:
        return ACCOUNT
    return LEGACY if identifier else NOT_SAAS


def check_customer(account_id: str, license_arn: str, identifier: str, prefix: str = "") -> list[Violation]:
    """The customer named one way: an account id (1-255 digits) with a license ARN (the
    model's pattern), or the legacy identifier (at most 255 characters) alone."""
    out: list[Violation] = []
    if identifier and (account_id or license_arn):
        out.append(
            Violation(
                _join(prefix, "customer_identifier"),
                "must be empty when customer_aws_account_id or license_arn is set: name the customer one way",
            )
        )
    if len(identifier) > CUSTOMER_ID_MAX:
        out.append(
            Violation(
                _join(prefix, "customer_identifier"),
                f"must be at most {CUSTOMER_ID_MAX} characters, got {len(identifier)}",
                INVALID_CUSTOMER_IDENTIFIER,
            )
        )
    if account_id or license_arn:
        where = _join(prefix, "customer_aws_account_id")
        if not account_id:
            out.append(Violation(where, "is required with license_arn"))
        elif len(account_id) > CUSTOMER_ID_MAX or not ACCOUNT_ID_RE.fullmatch(account_id):
            out.append(Violation(where, f"must be 1-{CUSTOMER_ID_MAX} digits (an AWS account id)"))
        where = _join(prefix, "license_arn")
        if not license_arn:
            out.append(Violation(where, "is required with customer_aws_account_id (the license names the product)"))
        elif not LICENSE_ARN_RE.fullmatch(license_arn):
            out.append(Violation(where, "must be a license ARN (arn:aws:license-manager::…:license:l-…)"))
    return out


def check_registration_token(token: str, path: str = "registration_token") -> list[Violation]:
    """ResolveCustomer's one input: a token the buyer's browser brought, never empty."""
    return [] if token else [Violation(path, "is required")]


def check_usage_record(
    record: Any, window: Window, path: str, products: Products | None, product_code: str
) -> list[Violation]:
    """Every violation of one BatchMeterUsage UsageRecord (customer, dimension, timestamp
    in the SaaS window, quantity, allocations), by its path."""
    out = check_customer(record.customer_aws_account_id, record.license_arn, record.customer_identifier, path)
    if customer_way(record.customer_aws_account_id, record.license_arn, record.customer_identifier) == NOT_SAAS:
        out.append(
            Violation(
                f"{path}.customer_aws_account_id",
                "is required (with license_arn), or the legacy customer_identifier: every record names its customer",
            )
        )
    dimension = check_usage_dimension(record.dimension, f"{path}.dimension")
    if products is not None and product_code and not dimension:  # with a license, the product is AWS's to know
        dimension = [
            Violation(f"{path}.dimension", v.description, v.aws_error)
            for v in products.check(product_code, record.dimension)
            if v.field.endswith("usage_dimension")
        ]
    out += dimension
    out += check_timestamp(record, window, f"{path}.timestamp")
    kind, value, errs = quantity_of(record, path, "quantity_value")
    out += errs
    if record.usage_allocations:
        out += check_allocations(
            record.usage_allocations, kind, Decimal(0) if kind is None else value, f"{path}.usage_allocations"
        )
    return out


def validate_batch_meter_usage(request: Any, window: Window, products: Products | None = None) -> list[Violation]:
    """Every violation of a BatchMeterUsageRequest; empty means it may go to AWS.

    1-25 records, each naming its customer the same one way; ``product_code`` required
    with the legacy identifier and refused with license ARNs (AWS: the license names the
    product, and both would bill twice). ``window`` should be :meth:`Window.for_saas`.
    """
    records = request.usage_records
    if not 1 <= len(records) <= BATCH_RECORDS_MAX:
        return [count_violation("BatchMeterUsageRequest", len(records))]
    ways = [customer_way(r.customer_aws_account_id, r.license_arn, r.customer_identifier) for r in records]
    way = next((w for w in ways if w != NOT_SAAS), NOT_SAAS)
    out: list[Violation] = []
    if way == LEGACY:
        out += check_product_code(request.product_code)
        if products is not None and not out and request.product_code not in products.dimensions:
            out += products.check(request.product_code, "")
    elif way == ACCOUNT and request.product_code:  # no customer named at all: the records say so
        out.append(
            Violation(
                "product_code",
                "must be empty when the records carry license_arn: the license names the product "
                "(AWS bills twice for usage sent with both)",
            )
        )
    for i, record in enumerate(records):
        path = f"usage_records[{i}]"
        if ways[i] not in (way, NOT_SAAS):
            out.append(
                Violation(
                    f"{path}.customer_identifier" if way == ACCOUNT else f"{path}.customer_aws_account_id",
                    "names the customer another way than the call's other records: one call, one way",
                )
            )
        out += check_usage_record(record, window, path, products, request.product_code if way == LEGACY else "")
    return out


def check_event_customer(event: Any, path: str, *, agentcore: bool = False) -> list[Violation]:
    """A recorded event's customer, when it names one (SaaS usage): one way, well formed;
    the legacy identifier needs the event's product_code; none in AgentCore Runtime mode."""
    way = customer_way(event.customer_aws_account_id, event.license_arn, event.customer_identifier)
    if way == NOT_SAAS:
        return []
    if agentcore:
        return [
            Violation(
                f"{path}.customer_aws_account_id" if way == ACCOUNT else f"{path}.customer_identifier",
                f"must be empty in {AGENTCORE} (--agentcore): it meters container usage with MeterUsage only",
            )
        ]
    return check_customer(event.customer_aws_account_id, event.license_arn, event.customer_identifier, path)
