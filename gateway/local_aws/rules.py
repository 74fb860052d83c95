"""What AWS refuses in a MeterUsage or BatchMeterUsage request: pure functions of the raw JSON body.

Deliberately independent of the gateway's own validation (:mod:`gateway.domain.validation`):
the limits come from botocore's model of the service, read at run time, and the
semantic rules the model cannot express are written out again here from AWS's
documentation. Two implementations that agree are evidence; one shared
implementation would only ever agree with itself.

BatchMeterUsage (:func:`batch_problems`) keeps the model's limits (at most 25
records; a record's patterns and lengths) and MeterUsage's quantity rules per
record, and adds what its documentation says of the call as a whole:

- the body must be less than 1 MB (1,000,000 bytes as received): ``ValidationException``;
- at least one record: the model allows an empty list (``min`` 0), the local
  backend refuses it (``ValidationException``), a call that meters nothing is a
  caller's mistake;
- each record names its customer one way: ``CustomerAWSAccountId`` with
  ``LicenseArn`` (Concurrent Agreements) or, legacy, ``CustomerIdentifier``
  with the request's ``ProductCode``; never both, never neither, never the
  two ways in one call, no ``LicenseArn`` on a legacy record, and no request
  ``ProductCode`` beside a ``LicenseArn`` ("do NOT include ProductCode"):
  ``ValidationException`` naming the problem.

A breach of the model inside a record is answered with the exception AWS names
for that field (:func:`code_for`): ``Dimension`` InvalidUsageDimensionException,
``UsageAllocations`` InvalidUsageAllocationsException or InvalidTagException,
``CustomerIdentifier`` InvalidCustomerIdentifierException, ``LicenseArn``
InvalidLicenseException ("ensure the LicenseArn is valid"), any other
ValidationException. Time windows and licenses need AWS's clock and state:
:mod:`.saas`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import botocore.session

SERVICE = "meteringmarketplace"
OPERATION = "MeterUsage"
BATCH_OPERATION = "BatchMeterUsage"
MAX_BATCH_BYTES = 1_000_000  # "each request must be less than 1 MB"
MAX_AGE = timedelta(hours=6)  # AWS takes no usage older than this
FUTURE_SKEW = timedelta(minutes=5)  # how far ahead of AWS's clock a timestamp may be

# The exceptions AWS answers; every field maps to one of them (see code_for).
VALIDATION = "ValidationException"
SERIALIZATION = "SerializationException"
INVALID_PRODUCT_CODE = "InvalidProductCodeException"
INVALID_USAGE_DIMENSION = "InvalidUsageDimensionException"
INVALID_TAG = "InvalidTagException"
INVALID_USAGE_ALLOCATIONS = "InvalidUsageAllocationsException"
TIMESTAMP_OUT_OF_BOUNDS = "TimestampOutOfBoundsException"
INVALID_CUSTOMER_IDENTIFIER = "InvalidCustomerIdentifierException"
INVALID_LICENSE = "InvalidLicenseException"

WHOLE = "whole"
DECIMAL = "decimal"
_QUANTITY = {WHOLE: "UsageQuantity", DECIMAL: "UsageQuantityAsDecimal"}
_ALLOCATED = {WHOLE: "AllocatedUsageQuantity", DECIMAL: "AllocatedUsageQuantityAsDecimal"}
_RECORD_QUANTITY = {WHOLE: "Quantity", DECIMAL: "QuantityAsDecimal"}  # a BatchMeterUsage record's names
_RECORD_PATH = re.compile(r"UsageRecords\[\d+\]\.(\w+)")
# The exception AWS names for a breach of the model in a record's field; any other: VALIDATION.
_RECORD_FIELD_CODES = {
    "Dimension": INVALID_USAGE_DIMENSION,
    "CustomerIdentifier": INVALID_CUSTOMER_IDENTIFIER,
    "LicenseArn": INVALID_LICENSE,
}

TagSet = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Problem:
    """One refused field, by its AWS path (``UsageAllocations[1].Tags[0].Key``)."""

    field: str
    message: str
    code: str

    def __str__(self) -> str:
        return f"{self.field} {self.message}"


@dataclass(frozen=True)
class Window:
    """The span AWS takes usage for, around its own clock."""

    now: datetime
    max_age: timedelta = MAX_AGE
    future_skew: timedelta = FUTURE_SKEW


@dataclass(frozen=True)
class Spec:
    """One shape of botocore's model, reduced to what is enforced here."""

    type: str
    required: tuple[str, ...] = ()
    members: Mapping[str, Spec] = field(default_factory=dict)
    member: Spec | None = None  # a list's element
    min: int | None = None
    max: int | None = None
    pattern: str | None = None
    regex: re.Pattern[str] | None = None  # the pattern, compiled as AWS applies it


@dataclass(frozen=True)
class Request:
    """A MeterUsage body that has no problems, in the values AWS books."""

    product_code: str
    usage_dimension: str
    timestamp: datetime
    kind: str
    quantity: Decimal
    allocations: tuple[tuple[TagSet, Decimal], ...] | None
    client_token: str
    dry_run: bool


Allocated = tuple[tuple[TagSet, Decimal], ...]


@dataclass(frozen=True)
class UsageRecord:
    """One record of a BatchMeterUsage body without problems, in the values AWS books."""

    index: int  # its place in the request
    sent: Mapping[str, Any]  # the record as sent: AWS echoes it in its result
    customer_identifier: str | None  # legacy; None: a CustomerAWSAccountId record
    customer_aws_account_id: str | None
    license_arn: str | None
    dimension: str
    timestamp: datetime
    kind: str
    quantity: Decimal
    allocations: Allocated | None


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A model pattern as AWS applies it: unanchored unless it says so.

    A final ``$`` becomes ``\\Z``: Python's ``$`` also matches before a trailing
    newline, which would let ``"prod\\n"`` through.
    """
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def spec_of(shape: Any, seen: frozenset[str] = frozenset()) -> Spec:
    """The Spec of a botocore shape, members walked recursively."""
    if shape.name in seen:
        raise ValueError(f"recursive shape {shape.name} is not supported")
    inner = seen | {shape.name}
    meta: Mapping[str, Any] = shape.metadata
    pattern = meta.get("pattern")
    common: dict[str, Any] = {
        "min": meta.get("min"),
        "max": meta.get("max"),
        "pattern": pattern,
        "regex": None if pattern is None else compile_pattern(pattern),
    }
    if shape.type_name == "structure":
        members = {name: spec_of(member, inner) for name, member in shape.members.items()}
        return Spec("structure", tuple(meta.get("required", ())), members, **common)
    if shape.type_name == "list":
        return Spec("list", member=spec_of(shape.member, inner), **common)
    return Spec(str(shape.type_name), **common)


@functools.cache
def input_spec(operation: str) -> Spec:
    """An operation's input shape in the botocore installed here (read once)."""
    model = botocore.session.get_session().get_service_model(SERVICE)
    return spec_of(model.operation_model(operation).input_shape)


def meter_usage_spec() -> Spec:
    """The MeterUsage input shape."""
    return input_spec(OPERATION)


def batch_meter_usage_spec() -> Spec:
    """The BatchMeterUsage input shape."""
    return input_spec(BATCH_OPERATION)


def record_spec() -> Spec:
    """One BatchMeterUsage UsageRecord's shape."""
    records = batch_meter_usage_spec().members["UsageRecords"]
    assert records.member is not None
    return records.member


def code_for(path: str) -> str:
    """The exception AWS names for a problem at ``path``."""
    record = _RECORD_PATH.match(path)
    if record is not None:
        name = record.group(1)
        if name == "UsageAllocations":
            return INVALID_TAG if ".Tags" in path else INVALID_USAGE_ALLOCATIONS
        return _RECORD_FIELD_CODES.get(name, VALIDATION)
    top = re.split(r"[.\[]", path, maxsplit=1)[0]
    if top == "ProductCode":
        return INVALID_PRODUCT_CODE
    if top == "UsageDimension":
        return INVALID_USAGE_DIMENSION
    if top == "UsageAllocations":
        return INVALID_TAG if ".Tags" in path else INVALID_USAGE_ALLOCATIONS
    return VALIDATION


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def is_int(value: Any) -> bool:
    """A JSON integer: Python's bool is an int, JSON's true is not."""
    return isinstance(value, int) and not isinstance(value, bool)


def instant(value: Any) -> datetime | None:
    """A Timestamp as AWS reads it: epoch seconds (JSON) or a datetime (boto3 params).

    None when it is no instant at all (a string, NaN, out of datetime's range).
    """
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    try:
        return datetime.fromtimestamp(float(value), tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def model_problems(value: Any, spec: Spec, path: str = "") -> list[Problem]:
    """Every breach of the model's types, ``required``, lengths, ranges and patterns."""
    where = path or "request"
    if spec.type == "structure":
        if not isinstance(value, Mapping):
            return [Problem(where, "must be an object", SERIALIZATION)]
        out = [
            Problem(_join(path, name), "is required", code_for(_join(path, name)))
            for name in spec.required
            if value.get(name) is None
        ]
        for name, member in spec.members.items():
            if value.get(name) is not None:  # JSON null is an absent member
                out += model_problems(value[name], member, _join(path, name))
        return out
    if spec.type == "list":
        if not isinstance(value, list):
            return [Problem(where, "must be a list", SERIALIZATION)]
        out = _range(len(value), spec, where, "items")
        for i, item in enumerate(value):
            if item is None:
                out.append(Problem(f"{where}[{i}]", "must not be null", code_for(f"{where}[{i}]")))
            elif spec.member is not None:
                out += model_problems(item, spec.member, f"{where}[{i}]")
        return out
    if spec.type == "string":
        if not isinstance(value, str):
            return [Problem(where, "must be a string", SERIALIZATION)]
        out = _range(len(value), spec, where, "characters")
        if spec.regex is not None and not spec.regex.search(value):
            out.append(Problem(where, f"must match the pattern {spec.pattern}", code_for(where)))
        return out
    if spec.type in ("integer", "long"):
        if not is_int(value):
            return [Problem(where, "must be an integer", SERIALIZATION)]
        return _range(value, spec, where, "")
    if spec.type == "boolean":
        return [] if isinstance(value, bool) else [Problem(where, "must be true or false", SERIALIZATION)]
    if spec.type == "timestamp":
        if isinstance(value, datetime) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return [] if instant(value) is not None else [Problem(where, "is not a valid time", code_for(where))]
        return [Problem(where, "must be epoch seconds", SERIALIZATION)]
    return []  # no other types in this operation's input


def _range(size: int, spec: Spec, where: str, unit: str) -> list[Problem]:
    what = f" {unit}" if unit else ""
    if spec.min is not None and size < spec.min:
        return [Problem(where, f"must be at least {spec.min}{what}, got {size}", code_for(where))]
    if spec.max is not None and size > spec.max:
        return [Problem(where, f"must be at most {spec.max}{what}, got {size}", code_for(where))]
    return []


def _span(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    return f"{seconds / 3600:g} hours" if seconds >= 3600 else f"{seconds:g} seconds"


def _quantity(item: Mapping[str, Any], names: Mapping[str, str]) -> tuple[list[str], Decimal | None]:
    """(the kinds present, the value when exactly one is) of a quantity pair."""
    kinds = [kind for kind, name in names.items() if item.get(name) is not None]
    if len(kinds) != 1:
        return kinds, None
    return kinds, Decimal(item[names[kinds[0]]])


def semantic_problems(body: Mapping[str, Any], window: Window) -> list[Problem]:
    """AWS's documented rules the model cannot say; for a body without model problems."""
    out: list[Problem] = []
    if body["ProductCode"] == "":
        out.append(Problem("ProductCode", "must not be empty", INVALID_PRODUCT_CODE))
    when = instant(body["Timestamp"])
    assert when is not None  # model_problems refused it otherwise
    if when < window.now - window.max_age:
        out.append(
            Problem(
                "Timestamp", f"is more than {_span(window.max_age)} older than AWS's clock", TIMESTAMP_OUT_OF_BOUNDS
            )
        )
    elif when > window.now + window.future_skew:
        out.append(
            Problem(
                "Timestamp", f"is more than {_span(window.future_skew)} ahead of AWS's clock", TIMESTAMP_OUT_OF_BOUNDS
            )
        )
    kinds, total = _quantity(body, _QUANTITY)
    if len(kinds) > 1:
        out.append(Problem("UsageQuantityAsDecimal", "must not be given together with UsageQuantity", VALIDATION))
    allocations = body.get("UsageAllocations")
    if allocations is not None:
        out += _allocation_problems(allocations, kinds[0] if len(kinds) == 1 else WHOLE, total if kinds else Decimal(0))
    return out


def _allocation_problems(
    allocations: Sequence[Mapping[str, Any]], kind: str, total: Decimal | None, whose: str = "the request's"
) -> list[Problem]:
    """One quantity each, of the request's (or record's) kind; unique tag sets; summing to the total."""
    out: list[Problem] = []
    first_with: dict[TagSet, int] = {}
    running: Decimal | None = Decimal(0)
    for i, alloc in enumerate(allocations):
        where = f"UsageAllocations[{i}]"
        kinds, value = _quantity(alloc, _ALLOCATED)
        if len(kinds) != 1:
            out.append(
                Problem(
                    where, f"must have exactly one of {' and '.join(_ALLOCATED.values())}", INVALID_USAGE_ALLOCATIONS
                )
            )
        elif kinds[0] != kind:
            out.append(
                Problem(
                    f"{where}.{_ALLOCATED[kinds[0]]}",
                    f"must be {_ALLOCATED[kind]}, the same kind as {whose} quantity",
                    INVALID_USAGE_ALLOCATIONS,
                )
            )
        running = None if value is None or running is None else running + value
        tags = alloc.get("Tags") or []
        keys: set[str] = set()
        for j, tag in enumerate(tags):
            if tag["Key"] in keys:
                out.append(
                    Problem(f"{where}.Tags[{j}].Key", f"repeats the key {tag['Key']!r} in one tag set", INVALID_TAG)
                )
            keys.add(tag["Key"])
        tag_set = frozenset((t["Key"], t["Value"]) for t in tags)
        if tag_set in first_with:
            out.append(
                Problem(
                    f"{where}.Tags",
                    f"is the same tag set as UsageAllocations[{first_with[tag_set]}]'s",
                    INVALID_USAGE_ALLOCATIONS,
                )
            )
        first_with.setdefault(tag_set, i)
    if running is not None and total is not None and running != total:
        out.append(
            Problem(
                "UsageAllocations",
                f"quantities sum to {running}, not to {whose} quantity {total}",
                INVALID_USAGE_ALLOCATIONS,
            )
        )
    return out


def agentcore_problems(body: Mapping[str, Any]) -> list[Problem]:
    """What AgentCore Runtime refuses besides: a request without a ClientToken (AWS
    deduplicates there by the token alone; "you must include an idempotency token")
    and vendor-metered tags (UsageAllocations). For a body without other problems."""
    out: list[Problem] = []
    if not body.get("ClientToken"):
        out.append(Problem("ClientToken", "is required in Amazon Bedrock AgentCore Runtime", VALIDATION))
    if body.get("UsageAllocations") is not None:
        out.append(
            Problem(
                "UsageAllocations",
                "are not supported in Amazon Bedrock AgentCore Runtime (no vendor-metered tags)",
                INVALID_USAGE_ALLOCATIONS,
            )
        )
    return out


def problems(body: Any, window: Window, spec: Spec | None = None) -> list[Problem]:
    """Every reason AWS would refuse ``body``, in the model's member order; empty: it takes it."""
    spec = spec or meter_usage_spec()
    out = model_problems(body, spec)
    if not out:
        out = semantic_problems(body, window)
    order = {name: i for i, name in enumerate(spec.members)}
    return sorted(out, key=lambda p: order.get(re.split(r"[.\[]", p.field, maxsplit=1)[0], -1))


def _allocated(allocations: Sequence[Mapping[str, Any]] | None) -> Allocated | None:
    """Allocations without problems as (tag set, quantity) pairs; None when there are none."""
    if allocations is None:
        return None
    return tuple(
        (frozenset((t["Key"], t["Value"]) for t in a.get("Tags") or []), _quantity(a, _ALLOCATED)[1] or Decimal(0))
        for a in allocations
    )


def request_of(body: Mapping[str, Any]) -> Request:
    """The values of a body without problems (see :func:`problems`)."""
    kinds, quantity = _quantity(body, _QUANTITY)
    when = instant(body["Timestamp"])
    assert when is not None
    return Request(
        product_code=body["ProductCode"],
        usage_dimension=body["UsageDimension"],
        timestamp=when,
        kind=kinds[0] if kinds else WHOLE,
        quantity=quantity if quantity is not None else Decimal(0),
        allocations=_allocated(body.get("UsageAllocations")),
        client_token=body.get("ClientToken") or "",
        dry_run=bool(body.get("DryRun")),
    )


# --- BatchMeterUsage -----------------------------------------------------------


def batch_problems(body: Any, size: int | None = None) -> list[Problem]:
    """Every reason AWS refuses a BatchMeterUsage ``body`` whatever its clock and state.

    ``size`` is the body's length in bytes as received (None: not known, in process).
    The first group that finds anything is the answer: size, then the model, then
    the documented rules of records and customers.
    """
    if size is not None and size >= MAX_BATCH_BYTES:
        return [
            Problem(
                "request",
                f"is {size:,} bytes; BatchMeterUsage takes less than 1 MB ({MAX_BATCH_BYTES:,} bytes)",
                VALIDATION,
            )
        ]
    out = model_problems(body, batch_meter_usage_spec())
    if out:
        return out
    records: Sequence[Mapping[str, Any]] = body["UsageRecords"]
    if not records:
        return [Problem("UsageRecords", "must hold at least one record", VALIDATION)]
    for i, record in enumerate(records):
        out += _customer_problems(record, f"UsageRecords[{i}]")
        out += _record_quantity_problems(record, i)
    return out + _call_problems(body)


def _customer_problems(record: Mapping[str, Any], where: str) -> list[Problem]:
    """One way of naming the customer: an account with its license, or (legacy) an identifier."""
    has = {name: record.get(name) is not None for name in ("CustomerIdentifier", "CustomerAWSAccountId", "LicenseArn")}
    if has["CustomerIdentifier"] and has["CustomerAWSAccountId"]:
        return [Problem(where, "names the customer both by CustomerIdentifier and by CustomerAWSAccountId", VALIDATION)]
    if not has["CustomerIdentifier"] and not has["CustomerAWSAccountId"]:
        return [
            Problem(
                where,
                "names no customer: give CustomerAWSAccountId and LicenseArn (legacy: CustomerIdentifier)",
                VALIDATION,
            )
        ]
    if has["CustomerAWSAccountId"] and not has["LicenseArn"]:
        return [Problem(f"{where}.LicenseArn", "is required with CustomerAWSAccountId", VALIDATION)]
    if has["CustomerIdentifier"] and has["LicenseArn"]:
        return [
            Problem(
                f"{where}.LicenseArn",
                "must not be given with CustomerIdentifier (a legacy record's product is the request's ProductCode)",
                VALIDATION,
            )
        ]
    return []


def _record_quantity_problems(record: Mapping[str, Any], i: int) -> list[Problem]:
    """MeterUsage's quantity rules, for one record: one kind, allocations of that kind summing to it."""
    where = f"UsageRecords[{i}]"
    out: list[Problem] = []
    kinds, total = _quantity(record, _RECORD_QUANTITY)
    if len(kinds) > 1:
        out.append(Problem(f"{where}.QuantityAsDecimal", "must not be given together with Quantity", VALIDATION))
    allocations = record.get("UsageAllocations")
    if allocations is not None:
        kind = kinds[0] if len(kinds) == 1 else WHOLE
        found = _allocation_problems(allocations, kind, total if kinds else Decimal(0), "the record's")
        out += [Problem(f"{where}.{p.field}", p.message, p.code) for p in found]
    return out


def _call_problems(body: Mapping[str, Any]) -> list[Problem]:
    """The call as a whole: one way of naming customers, and ProductCode exactly for legacy records."""
    records: Sequence[Mapping[str, Any]] = body["UsageRecords"]
    by_license = [
        i for i, r in enumerate(records) if r.get("CustomerAWSAccountId") is not None or r.get("LicenseArn") is not None
    ]
    legacy = [i for i, r in enumerate(records) if r.get("CustomerIdentifier") is not None]
    out: list[Problem] = []
    if body.get("ProductCode") is not None and by_license:
        out.append(
            Problem(
                "ProductCode",
                f"must not be given with LicenseArn records (UsageRecords[{by_license[0]}]): "
                "the license names the product",
                VALIDATION,
            )
        )
    if body.get("ProductCode") is None and legacy:
        out.append(
            Problem(
                "ProductCode", f"is required with CustomerIdentifier records (UsageRecords[{legacy[0]}])", VALIDATION
            )
        )
    if set(legacy) - set(by_license) and set(by_license) - set(legacy):
        out.append(
            Problem(
                "UsageRecords",
                "mix CustomerIdentifier records and CustomerAWSAccountId/LicenseArn records; one way per call",
                VALIDATION,
            )
        )
    return out


def usage_records_of(body: Mapping[str, Any]) -> tuple[UsageRecord, ...]:
    """The records of a BatchMeterUsage body without problems (see :func:`batch_problems`)."""
    out = []
    for i, record in enumerate(body["UsageRecords"]):
        kinds, quantity = _quantity(record, _RECORD_QUANTITY)
        when = instant(record["Timestamp"])
        assert when is not None
        out.append(
            UsageRecord(
                index=i,
                sent=record,
                customer_identifier=record.get("CustomerIdentifier"),
                customer_aws_account_id=record.get("CustomerAWSAccountId"),
                license_arn=record.get("LicenseArn"),
                dimension=record["Dimension"],
                timestamp=when,
                kind=kinds[0] if kinds else WHOLE,
                quantity=quantity if quantity is not None else Decimal(0),
                allocations=_allocated(record.get("UsageAllocations")),
            )
        )
    return tuple(out)
