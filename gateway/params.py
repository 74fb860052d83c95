"""Conversions between the proto messages and AWS MeterUsage parameters.

Pure functions on both sides of the wire: the gateway turns a validated request
into boto3 keyword arguments, and the local backend turns AWS's JSON back into
the proto request so that it can apply the very same validation rules.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from marketplace.metering.v1 import metering_pb2 as pb


def _allocation_to_aws(alloc: pb.UsageAllocation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if alloc.WhichOneof("quantity") == "allocated_usage_quantity_as_decimal":
        out["AllocatedUsageQuantityAsDecimal"] = alloc.allocated_usage_quantity_as_decimal
    else:
        out["AllocatedUsageQuantity"] = alloc.allocated_usage_quantity
    if alloc.tags:
        out["Tags"] = [{"Key": t.key, "Value": t.value} for t in alloc.tags]
    return out


def to_aws(request: pb.MeterUsageRequest) -> dict[str, Any]:
    """boto3 ``meter_usage`` keyword arguments for a validated request."""
    params: dict[str, Any] = {
        "ProductCode": request.product_code,
        "Timestamp": request.timestamp.ToDatetime(tzinfo=timezone.utc),
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


def from_aws(params: dict[str, Any]) -> pb.MeterUsageRequest:
    """The proto request for AWS JSON parameters (Timestamp in epoch seconds)."""
    req = pb.MeterUsageRequest(
        product_code=str(params.get("ProductCode", "")),
        usage_dimension=str(params.get("UsageDimension", "")),
        dry_run=bool(params.get("DryRun", False)),
        client_token=str(params.get("ClientToken", "")),
    )
    if "Timestamp" in params:
        ts = params["Timestamp"]
        when = ts if isinstance(ts, datetime) else datetime.fromtimestamp(float(ts), tz=timezone.utc)
        req.timestamp.FromDatetime(when)
    if "UsageQuantityAsDecimal" in params:
        req.usage_quantity_as_decimal = str(params["UsageQuantityAsDecimal"])
    elif "UsageQuantity" in params:
        req.usage_quantity = int(params["UsageQuantity"])
    for alloc in params.get("UsageAllocations", []) or []:
        a = req.usage_allocations.add()
        if "AllocatedUsageQuantityAsDecimal" in alloc:
            a.allocated_usage_quantity_as_decimal = str(alloc["AllocatedUsageQuantityAsDecimal"])
        elif "AllocatedUsageQuantity" in alloc:
            a.allocated_usage_quantity = int(alloc["AllocatedUsageQuantity"])
        for tag in alloc.get("Tags", []) or []:
            a.tags.add(key=str(tag.get("Key", "")), value=str(tag.get("Value", "")))
    return req
