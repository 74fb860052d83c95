"""AWS JSON parameters → the proto request: the inverse of gateway.aws.params.to_aws, which only
the tests need (to hold the local backend's rules against the gateway's on the same inputs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from marketplace.metering.v1 import metering_pb2 as pb


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
        when = ts if isinstance(ts, datetime) else datetime.fromtimestamp(float(ts), tz=UTC)
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
