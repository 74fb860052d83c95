"""Validated requests → boto3's keyword arguments, as pure functions.

The way back (AWS's JSON → the proto request) is the tests' alone
(``tests/support/aws_params.py``): the local backend keeps AWS's rules in its own
code, sharing none with the gateway's. BatchMeterUsage's answer echoes records, and
:func:`record_key` is how an echoed record is matched to the one sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from marketplace.metering.v1 import metering_pb2 as pb

if TYPE_CHECKING:  # the stubs are a dev dependency only
    from mypy_boto3_meteringmarketplace.type_defs import TagTypeDef


# boto3's meter_usage keyword arguments, as botocore's model (1.44.1 on) has them. Not
# mypy_boto3_meteringmarketplace's MeterUsageRequestTypeDef: its newest release (1.43)
# predates the decimal quantities (UsageQuantityAsDecimal, AllocatedUsageQuantityAsDecimal).
class AllocationParams(TypedDict):
    AllocatedUsageQuantity: NotRequired[int]
    AllocatedUsageQuantityAsDecimal: NotRequired[str]
    Tags: NotRequired[list[TagTypeDef]]


class MeterUsageParams(TypedDict):
    ProductCode: str
    Timestamp: datetime
    UsageDimension: str
    UsageQuantity: NotRequired[int]
    UsageQuantityAsDecimal: NotRequired[str]
    DryRun: NotRequired[bool]
    UsageAllocations: NotRequired[list[AllocationParams]]
    ClientToken: NotRequired[str]


def _allocation_to_aws(alloc: pb.UsageAllocation) -> AllocationParams:
    out: AllocationParams = {}
    if alloc.WhichOneof("quantity") == "allocated_usage_quantity_as_decimal":
        out["AllocatedUsageQuantityAsDecimal"] = alloc.allocated_usage_quantity_as_decimal
    else:
        out["AllocatedUsageQuantity"] = alloc.allocated_usage_quantity
    if alloc.tags:
        out["Tags"] = [{"Key": t.key, "Value": t.value} for t in alloc.tags]
    return out


def to_aws(request: pb.MeterUsageRequest) -> MeterUsageParams:
    """boto3 ``meter_usage`` keyword arguments for a validated request."""
    params: MeterUsageParams = {
        "ProductCode": request.product_code,
        "Timestamp": request.timestamp.ToDatetime(tzinfo=UTC),
        "UsageDimension": request.usage_dimension,
    }
    which = request.WhichOneof("quantity")
    if which == "usage_quantity":
        params["UsageQuantity"] = request.usage_quantity
    elif which == "usage_quantity_as_decimal":
        params["UsageQuantityAsDecimal"] = request.usage_quantity_as_decimal
    if request.dry_run:
        params["DryRun"] = True
    if request.usage_allocations:
        params["UsageAllocations"] = [_allocation_to_aws(a) for a in request.usage_allocations]
    if request.client_token:
        params["ClientToken"] = request.client_token
    return params


# BatchMeterUsage's keyword arguments, as botocore's model (1.44.18 on, Concurrent
# Agreements) has them; the stubs predate CustomerAWSAccountId and LicenseArn.
class UsageRecordParams(TypedDict):
    Timestamp: datetime
    Dimension: str
    CustomerIdentifier: NotRequired[str]
    CustomerAWSAccountId: NotRequired[str]
    LicenseArn: NotRequired[str]
    Quantity: NotRequired[int]
    QuantityAsDecimal: NotRequired[str]
    UsageAllocations: NotRequired[list[AllocationParams]]


class BatchMeterUsageParams(TypedDict):
    UsageRecords: list[UsageRecordParams]
    ProductCode: NotRequired[str]


def record_to_aws(record: pb.UsageRecord) -> UsageRecordParams:
    """One validated UsageRecord as AWS's UsageRecord; empty customer fields left out."""
    out: UsageRecordParams = {"Timestamp": record.timestamp.ToDatetime(tzinfo=UTC), "Dimension": record.dimension}
    if record.customer_identifier:
        out["CustomerIdentifier"] = record.customer_identifier
    if record.customer_aws_account_id:
        out["CustomerAWSAccountId"] = record.customer_aws_account_id
    if record.license_arn:
        out["LicenseArn"] = record.license_arn
    which = record.WhichOneof("quantity_value")
    if which == "quantity":
        out["Quantity"] = record.quantity
    elif which == "quantity_as_decimal":
        out["QuantityAsDecimal"] = record.quantity_as_decimal
    if record.usage_allocations:
        out["UsageAllocations"] = [_allocation_to_aws(a) for a in record.usage_allocations]
    return out


def batch_to_aws(request: pb.BatchMeterUsageRequest) -> BatchMeterUsageParams:
    """boto3 ``batch_meter_usage`` keyword arguments for a validated request."""
    params: BatchMeterUsageParams = {"UsageRecords": [record_to_aws(r) for r in request.usage_records]}
    if request.product_code:
        params["ProductCode"] = request.product_code
    return params


def json_size(params: Mapping[str, Any]) -> int:
    """At least the bytes of the JSON body botocore sends (AWS's 1 MB limit is on the body):
    ``json.dumps`` with its default separators (``", "``, ``": "``), as botocore's JSON
    serializer writes them; timestamps go as epoch seconds, no longer than the ISO text here."""
    return len(json.dumps(params, default=str).encode())


RecordKey = tuple[str, str, str, str, float, str]


def record_key(record: Mapping[str, Any]) -> RecordKey:
    """What tells one record of a BatchMeterUsage call from another, whether sent or echoed
    back by AWS: the customer, dimension, exact timestamp and quantity by value."""
    when = record.get("Timestamp")
    seconds = when.timestamp() if isinstance(when, datetime) else float(when or 0)
    raw = record.get("QuantityAsDecimal", record.get("Quantity", 0))
    try:
        quantity = format(Decimal(str(raw)).normalize(), "f")
    except InvalidOperation:
        quantity = str(raw)
    license_arn = str(record.get("LicenseArn") or "")
    identifier = str(record.get("CustomerIdentifier") or "")
    return (
        # The customer the one way the record names it: an echo that adds the other way
        # (AWS may fill in the account of a legacy identifier) is still the same record.
        "" if identifier and not license_arn else str(record.get("CustomerAWSAccountId") or ""),
        license_arn,
        "" if license_arn else identifier,
        str(record.get("Dimension") or ""),
        round(seconds, 6),
        quantity,
    )


def loose_key(key: RecordKey) -> tuple[str, str, str, str, int]:
    """A record's customer, dimension and hour: AWS's own key, for an echo whose timestamp
    or quantity AWS wrote otherwise than it was sent (matched only where it is unique)."""
    account, license_arn, identifier, dimension, seconds, _ = key
    return (account, license_arn, identifier, dimension, int(seconds // 3600))
