"""AWS's bookkeeping of metering records: pure, no I/O, no clock of its own.

AWS keeps one record per caller identity, product, dimension and hour; the
identical request again is answered with the same record, another quantity in
that hour is a duplicate; a ClientToken replayed with other parameters is a
conflict. Callers (the HTTP server, in-process fakes in tests) bring the time.

In Amazon Bedrock AgentCore Runtime (``agentcore``) AWS keeps every record: the
ClientToken is required and is the only key (the same token and parameters: the
same record; other parameters: a conflict), the timestamp is kept exact and
deduplicates nothing, and records of one hour add up (:meth:`State.totals`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from gateway.local_aws import rules


class AwsError(Exception):
    """An answer other than success: AWS's error code (or a fault's), message and HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


Allocations = tuple[tuple[rules.TagSet, Decimal], ...]


@dataclass(frozen=True)
class Record:
    """A metering record as AWS keeps it."""

    metering_record_id: str
    identity: str
    product_code: str
    usage_dimension: str
    hour: datetime
    timestamp: datetime
    quantity: Decimal
    allocations: Allocations
    client_token: str

    def to_json(self) -> dict[str, Any]:
        return {
            "MeteringRecordId": self.metering_record_id,
            "Identity": self.identity,
            "ProductCode": self.product_code,
            "UsageDimension": self.usage_dimension,
            "Hour": self.hour.isoformat(),
            "Timestamp": self.timestamp.isoformat(),
            "Quantity": str(self.quantity),
            "Allocations": [
                {"Tags": sorted([k, v] for k, v in tags), "Quantity": str(q)} for tags, q in self.allocations
            ],
            "ClientToken": self.client_token,
        }


def by_value(q: Decimal) -> Decimal:
    """Quantities compare by value: 17, 17.0 and 17.00 are one quantity."""
    return q.normalize() if q else Decimal(0)


def booked(allocations: rules.Allocated | None) -> Allocations:
    """Allocations as AWS compares them: quantities by value, in one order whatever the request's."""
    return tuple(sorted(((tags, by_value(q)) for tags, q in allocations or ()), key=lambda item: sorted(item[0])))


@dataclass
class State:
    """AWS's side of the rules: what it refuses (see :mod:`rules`) and what it keeps."""

    products: Mapping[str, frozenset[str]] | None = None  # None: every product and dimension exists
    agentcore: bool = False  # AgentCore Runtime's rules: many records an hour, keyed by ClientToken alone
    max_age: timedelta = rules.MAX_AGE
    future_skew: timedelta = rules.FUTURE_SKEW
    by_hour: dict[tuple[str, str, str, datetime], tuple[tuple[Any, ...], Record]] = field(default_factory=dict)
    by_token: dict[str, tuple[tuple[Any, ...], Record]] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)

    def meter_usage(self, body: Mapping[str, Any], identity: str, now: datetime) -> Record | None:
        """Apply AWS's rules to one MeterUsage body; the record (None for an accepted dry run).

        ``body`` is AWS's JSON (Timestamp in epoch seconds) or boto3's keyword
        arguments (Timestamp a datetime). Raises AwsError for a refusal.
        """
        found = rules.problems(body, rules.Window(now, self.max_age, self.future_skew))
        if not found and self.agentcore:
            found = rules.agentcore_problems(body)
        if found:
            raise AwsError(found[0].code, "; ".join(str(p) for p in found))
        req = rules.request_of(body)
        if self.products is not None:
            if req.product_code not in self.products:
                raise AwsError(rules.INVALID_PRODUCT_CODE, f"Unknown product code {req.product_code}")
            if req.usage_dimension not in self.products[req.product_code]:
                raise AwsError(rules.INVALID_USAGE_DIMENSION, f"Unknown usage dimension {req.usage_dimension}")
        if req.dry_run:
            return None
        when = req.timestamp
        hour = when.replace(minute=0, second=0, microsecond=0)
        total = by_value(req.quantity)
        allocations = booked(req.allocations)
        same_hour_value = (total, allocations)
        token_value = (req.product_code, req.usage_dimension, when, total, allocations)
        token = req.client_token
        if token and token in self.by_token:
            seen, record = self.by_token[token]
            if seen != token_value:
                raise AwsError("IdempotencyConflictException", "ClientToken was used with other parameters")
            return record
        if self.agentcore:  # no hourly key: a new token is a new record, whatever its timestamp
            record = _record(req, identity, hour, allocations)
            self.records.append(record)
            self.by_token[token] = (token_value, record)
            return record
        key = (identity, req.product_code, req.usage_dimension, hour)
        if key in self.by_hour:
            seen, record = self.by_hour[key]
            if seen != same_hour_value:
                raise AwsError(
                    "DuplicateRequestException",
                    f"A record for {req.usage_dimension} in the hour {hour.isoformat()} exists with another quantity",
                )
        else:
            record = _record(req, identity, hour, allocations)
            self.by_hour[key] = (same_hour_value, record)
            self.records.append(record)
        if token:
            self.by_token[token] = (token_value, record)
        return record

    def totals(self) -> dict[tuple[str, str, datetime], Decimal]:
        """The quantity AWS bills per product, dimension and hour: the sum of its records
        (one a caller identity in hourly mode, any number in AgentCore Runtime's)."""
        out: dict[tuple[str, str, datetime], Decimal] = {}
        for r in self.records:
            key = (r.product_code, r.usage_dimension, r.hour)
            out[key] = out.get(key, Decimal(0)) + r.quantity
        return out


def _record(req: rules.Request, identity: str, hour: datetime, allocations: Allocations) -> Record:
    return Record(
        metering_record_id=str(uuid.uuid4()),
        identity=identity,
        product_code=req.product_code,
        usage_dimension=req.usage_dimension,
        hour=hour,
        timestamp=req.timestamp,
        quantity=req.quantity,
        allocations=allocations,
        client_token=req.client_token,
    )
