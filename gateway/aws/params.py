"""A validated MeterUsage request → boto3's keyword arguments, as a pure function.

The way back (AWS's JSON → the proto request) is the tests' alone
(``tests/support/aws_params.py``): the local backend keeps AWS's rules in its own
code, sharing none with the gateway's.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, NotRequired, TypedDict

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
