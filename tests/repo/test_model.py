"""Our rules and proto still agree with botocore's model of the service."""

from __future__ import annotations

import botocore.loaders
import botocore.session
import pytest

from gateway.domain import errors, validation
from marketplace.metering.v1 import metering_pb2 as pb


@pytest.fixture(scope="module")
def shapes() -> dict:
    model = botocore.session.get_session().get_service_model("meteringmarketplace")
    return {name: model.shape_for(name) for name in model.shape_names}


def test_limits_match_the_model(shapes: dict) -> None:
    def meta(name: str) -> dict:
        return shapes[name].metadata

    assert meta("ProductCode")["max"] == validation.PRODUCT_CODE_MAX
    assert meta("ProductCode")["pattern"] == "^" + validation.PRODUCT_CODE_RE.pattern + "$"
    assert meta("UsageDimension")["max"] == validation.USAGE_DIMENSION_MAX
    assert meta("UsageQuantity")["max"] == meta("AllocatedUsageQuantity")["max"] == validation.QUANTITY_MAX
    for name in ("UsageQuantityAsDecimalString", "AllocatedUsageQuantityAsDecimalString"):
        assert meta(name)["pattern"] == "^" + validation.DECIMAL_RE.pattern + "$"
        assert meta(name)["max"] == validation.DECIMAL_MAX_LEN
    assert meta("UsageAllocations")["max"] == validation.ALLOCATIONS_MAX
    assert meta("TagList")["max"] == validation.TAGS_MAX
    assert meta("TagKey")["max"] == validation.TAG_KEY_MAX
    assert meta("TagValue")["max"] == validation.TAG_VALUE_MAX
    assert meta("TagKey")["pattern"] == meta("TagValue")["pattern"] == "^" + validation.TAG_RE.pattern + "$"
    assert meta("ClientToken")["max"] == validation.CLIENT_TOKEN_MAX


def test_proto_mirrors_every_request_member(shapes: dict) -> None:
    def snake(name: str) -> str:
        return errors._CAMEL_BOUNDARY.sub("_", name).lower()

    request_fields = set(pb.MeterUsageRequest.DESCRIPTOR.fields_by_name)
    assert {snake(m) for m in shapes["MeterUsageRequest"].members} == request_fields
    alloc_fields = set(pb.UsageAllocation.DESCRIPTOR.fields_by_name)
    assert {snake(m) for m in shapes["UsageAllocation"].members} == alloc_fields


def test_every_modelled_exception_has_a_row() -> None:
    model = botocore.session.get_session().get_service_model("meteringmarketplace")
    for shape in model.operation_model("MeterUsage").error_shapes:
        assert errors.reason_for_aws(shape.name) in errors.RULES, shape.name


def test_the_installed_model_has_the_decimal_quantities(shapes: dict) -> None:
    # botocore validates parameters against its model: one without these members
    # (botocore 1.44.0) refuses every decimal quantity, which is all the client sends.
    assert "UsageQuantityAsDecimal" in shapes["MeterUsageRequest"].members, "botocore too old: pyproject needs >=1.44.1"
    assert "AllocatedUsageQuantityAsDecimal" in shapes["UsageAllocation"].members, (
        "botocore too old: pyproject needs >=1.44.1"
    )


def test_the_whole_number_fields_are_deprecated_as_in_the_model() -> None:
    # Member traits such as ``deprecated`` are only in the raw model, not on botocore's Shape.
    raw = botocore.loaders.create_loader().load_service_model("meteringmarketplace", "service-2")["shapes"]
    fields = {
        ("MeterUsageRequest", "UsageQuantity"): pb.MeterUsageRequest.DESCRIPTOR.fields_by_name["usage_quantity"],
        ("UsageAllocation", "AllocatedUsageQuantity"): pb.UsageAllocation.DESCRIPTOR.fields_by_name[
            "allocated_usage_quantity"
        ],
    }
    for (shape, member), field in fields.items():
        assert raw[shape]["members"][member].get("deprecated") is True, (shape, member)
        assert field.GetOptions().deprecated, field.full_name
    assert pb.UsageEvent.DESCRIPTOR.fields_by_name["usage_quantity"].GetOptions().deprecated
