"""Every validation rule at its boundaries (docs/api.md, Validation)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.domain import validation as v
from marketplace.metering.v1 import metering_pb2 as pb
from support import allocation, request

NOW = datetime(2026, 11, 23, 12, 30, tzinfo=UTC)
WINDOW = v.Window(NOW, future_skew=timedelta(minutes=5))


def violations(**fields: object) -> list[v.Violation]:
    fields.setdefault("when", NOW)
    return v.validate_meter_usage(request(**fields), WINDOW)


def fields_of(**fields: object) -> list[str]:
    return [x.field for x in violations(**fields)]


def test_a_plain_request_is_valid() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("code", "ok"),
    [
        ("a", True),
        ("x" * 255, True),
        ("x" * 256, False),
        ("", False),
        ("prod-1/=:_.@A9", True),
        ("has space", False),
        ("ünï", False),
        ("abc\n", False),
    ],
)
def test_product_code(code: str, ok: bool) -> None:
    assert (fields_of(product_code=code) == []) is ok
    if not ok:
        assert violations(product_code=code)[0].aws_error == v.INVALID_PRODUCT_CODE


@pytest.mark.parametrize(
    ("dim", "ok"), [("d", True), ("d" * 255, True), ("d" * 256, False), ("", False), ("any thing!", True)]
)
def test_usage_dimension(dim: str, ok: bool) -> None:
    assert (fields_of(usage_dimension=dim) == []) is ok


@pytest.mark.parametrize(("qty", "ok"), [(0, True), (2147483647, True), (2147483648, False), (-1, False)])
def test_whole_quantity(qty: int, ok: bool) -> None:
    assert (fields_of(usage_quantity=qty) == []) is ok


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("0", True),
        ("17", True),
        ("17.42", True),
        ("0.000001", True),
        ("9999999999.999999", True),
        ("1.0000001", False),
        ("01", False),
        ("-1", False),
        ("+1", False),
        ("1.", False),
        (".5", False),
        ("1e3", False),
        ("", False),
        ("12345678901", False),
        ("1,5", False),
        ("17\n", False),
    ],
)
def test_decimal_quantity(text: str, ok: bool) -> None:
    assert (fields_of(usage_quantity_as_decimal=text) == []) is ok


def test_unset_quantity_is_zero_as_in_aws() -> None:
    req = request(when=NOW)
    req.ClearField("quantity")
    assert v.validate_meter_usage(req, WINDOW) == []


def test_timestamp_required() -> None:
    req = request(when=NOW)
    req.ClearField("timestamp")
    assert [(x.field, x.description) for x in v.validate_meter_usage(req, WINDOW)] == [("timestamp", "is required")]


@pytest.mark.parametrize(
    ("age", "ok"),
    [
        (timedelta(0), True),
        (timedelta(hours=6), True),
        (timedelta(hours=6, seconds=1), False),
        (timedelta(minutes=-5), True),
        (timedelta(minutes=-5, seconds=-1), False),
    ],
)
def test_timestamp_window(age: timedelta, ok: bool) -> None:
    found = violations(when=NOW - age)
    assert (found == []) is ok
    if not ok:
        assert found[0].aws_error == v.TIMESTAMP_OUT_OF_BOUNDS and v.only_timestamp_window(found)


def test_timestamp_nanos_out_of_range() -> None:
    req = request(when=NOW)
    req.timestamp.nanos = -1
    assert [x.field for x in v.validate_meter_usage(req, WINDOW)] == ["timestamp"]


def test_client_token_at_most_64() -> None:
    assert fields_of(client_token="t" * 64) == []
    assert fields_of(client_token="t" * 65) == ["client_token"]


@pytest.mark.parametrize(("count", "ok"), [(1, True), (2500, True), (2501, False)])
def test_allocation_count(count: int, ok: bool) -> None:
    allocs = [allocation(1, k=str(i)) for i in range(count)]
    assert (fields_of(usage_quantity=count, usage_allocations=allocs) == []) is ok


def test_allocations_must_sum_exactly() -> None:
    allocs = [allocation(2, team="a"), allocation(3, team="b")]
    assert fields_of(usage_quantity=5, usage_allocations=allocs) == []
    assert fields_of(usage_quantity=6, usage_allocations=allocs) == ["usage_allocations"]


def test_decimal_allocations_sum_by_value() -> None:
    allocs = [allocation("1.5", team="a"), allocation("2.50", team="b")]
    assert fields_of(usage_quantity_as_decimal="4", usage_allocations=allocs) == []
    assert fields_of(usage_quantity_as_decimal="4.000001", usage_allocations=allocs) == ["usage_allocations"]


def test_allocation_kind_must_match_request() -> None:
    found = fields_of(usage_quantity_as_decimal="2", usage_allocations=[allocation(2, team="a")])
    assert found == ["usage_allocations[0].quantity"]
    found = fields_of(usage_quantity=2, usage_allocations=[allocation("2", team="a")])
    assert found == ["usage_allocations[0].quantity"]


def test_allocation_quantity_required() -> None:
    assert "usage_allocations[0].quantity" in fields_of(usage_quantity=0, usage_allocations=[pb.UsageAllocation()])


def test_allocation_tag_sets_unique_in_any_order() -> None:
    a = allocation(1, team="a", env="prod")
    b = pb.UsageAllocation(
        allocated_usage_quantity=1, tags=[pb.Tag(key="env", value="prod"), pb.Tag(key="team", value="a")]
    )
    assert fields_of(usage_quantity=2, usage_allocations=[a, b]) == ["usage_allocations[1].tags"]


def test_untagged_bucket_is_allowed_once() -> None:
    assert fields_of(usage_quantity=2, usage_allocations=[allocation(1), allocation(1, team="a")]) == []
    assert fields_of(usage_quantity=2, usage_allocations=[allocation(1), allocation(1)]) == [
        "usage_allocations[1].tags"
    ]


@pytest.mark.parametrize(("count", "ok"), [(5, True), (6, False)])
def test_at_most_five_tags(count: int, ok: bool) -> None:
    tags = {f"k{i}": "v" for i in range(count)}
    assert (fields_of(usage_quantity=1, usage_allocations=[allocation(1, **tags)]) == []) is ok


@pytest.mark.parametrize(
    ("key", "value", "bad"),
    [
        ("k" * 100, "v" * 256, []),
        ("k" * 101, "v", ["key"]),
        ("k", "v" * 257, ["value"]),
        ("", "v", ["key"]),
        ("k", "", ["value"]),
        ("a+ -=._:/@9", "Z", []),
        ("k", "tab\there", ["value"]),
        ("k?", "v", ["key"]),
        ("k", "ok!#$%", []),
    ],
)
def test_tag_key_and_value(key: str, value: str, bad: list[str]) -> None:
    alloc = pb.UsageAllocation(allocated_usage_quantity=1, tags=[pb.Tag(key=key, value=value)])
    assert fields_of(usage_quantity=1, usage_allocations=[alloc]) == [f"usage_allocations[0].tags[0].{b}" for b in bad]


def test_every_offending_field_is_named_by_its_path() -> None:
    allocs = [allocation(1, team="a"), pb.UsageAllocation(allocated_usage_quantity=1, tags=[pb.Tag(key="", value="x")])]
    found = fields_of(
        product_code="", usage_dimension="", usage_quantity=3, usage_allocations=allocs, client_token="t" * 65
    )
    assert found == [
        "product_code",
        "usage_dimension",
        "usage_allocations[1].tags[0].key",
        "usage_allocations",
        "client_token",
    ]


PRODUCTS = v.Products({"prod-abc123": frozenset({"requests", "storage-gb"})})


def test_products_refuse_an_unlisted_product_or_dimension_naming_the_field() -> None:
    assert v.validate_meter_usage(request(when=NOW), WINDOW, PRODUCTS) == []
    assert [
        (x.field, x.description, x.aws_error)
        for x in v.validate_meter_usage(request(when=NOW, product_code="prod-abc124"), WINDOW, PRODUCTS)
    ] == [("product_code", "is not a product this gateway meters (--products: prod-abc123)", v.INVALID_PRODUCT_CODE)]
    assert [
        (x.field, x.description)
        for x in v.validate_meter_usage(request(when=NOW, usage_dimension="Requests"), WINDOW, PRODUCTS)
    ] == [
        ("usage_dimension", "is not a dimension of prod-abc123 this gateway meters (--products: requests, storage-gb)")
    ]
    # A malformed code is named for what is wrong with it, not for being unlisted.
    assert [
        x.description for x in v.validate_meter_usage(request(when=NOW, product_code="bad code!"), WINDOW, PRODUCTS)
    ] == ["may contain only letters, digits and - / = : _ . @"]


def test_a_long_product_list_is_shown_in_part() -> None:
    many = v.Products({f"prod-{i:03d}": frozenset({"d"}) for i in range(40)})
    (refused,) = many.check("prod-x", "d")
    assert refused.description.endswith("prod-009 and 30 more)") and len(refused.description) < 200


def test_an_event_may_leave_its_timestamp_to_the_gateway() -> None:
    event = pb.UsageEvent(event_id="e", product_code="prod-abc123", usage_dimension="requests", usage_quantity=1)
    assert v.validate_record_usage([event], WINDOW, PRODUCTS) == []
    event.timestamp.FromDatetime(NOW - timedelta(days=8))  # one given is checked as before
    assert [x.field for x in v.validate_record_usage([event], WINDOW)] == ["events[0].timestamp"]


# --- AgentCore Runtime mode (--agentcore) ---------------------------------------


def agentcore_violations(**fields: object) -> list[tuple[str, str, str]]:
    fields.setdefault("when", NOW)
    return [
        (x.field, x.description, x.aws_error) for x in v.validate_meter_usage(request(**fields), WINDOW, agentcore=True)
    ]


def test_agentcore_requires_a_client_token_naming_the_field() -> None:
    assert agentcore_violations(client_token="t-1") == []
    [(field, description, aws_error)] = agentcore_violations()
    assert field == "client_token" and aws_error == v.VALIDATION
    assert description.startswith("is required in AgentCore Runtime mode (--agentcore)")
    assert fields_of() == []  # hourly mode: AWS makes one up
    assert [f for f, *_ in agentcore_violations(client_token="t" * 65)] == ["client_token"]  # the length still counts


def test_agentcore_refuses_usage_allocations_naming_the_field() -> None:
    tagged = [allocation(2, team="a"), allocation(1)]
    [(field, description, aws_error)] = agentcore_violations(
        client_token="t-1", usage_quantity=3, usage_allocations=tagged
    )
    assert (field, aws_error) == ("usage_allocations", v.INVALID_USAGE_ALLOCATIONS)
    assert "AgentCore Runtime mode" in description and "usage allocations (vendor-metered tags)" in description
    assert fields_of(usage_quantity=3, usage_allocations=tagged) == []  # hourly mode takes them
    # Refused as a whole: a malformed allocation is not picked apart, nor the token forgotten.
    assert [f for f, *_ in agentcore_violations(usage_allocations=[allocation(9, **{"": "x"})])] == [
        "usage_allocations",
        "client_token",
    ]


def test_agentcore_refuses_event_tags_naming_each_event() -> None:
    def event(event_id: str, **tags: str) -> pb.UsageEvent:
        return pb.UsageEvent(
            event_id=event_id,
            product_code="prod-abc123",
            usage_dimension="requests",
            usage_quantity=1,
            tags=[pb.Tag(key=k, value=val) for k, val in tags.items()],
        )

    batch = [event("plain"), event("tagged", team="a"), event("also", team="b", env="prod")]
    refused = v.validate_record_usage(batch, WINDOW, PRODUCTS, agentcore=True)
    assert [(x.field, x.aws_error) for x in refused] == [
        ("events[1].tags", v.INVALID_TAG),
        ("events[2].tags", v.INVALID_TAG),
    ]
    assert all("AgentCore Runtime mode" in x.description for x in refused)
    assert v.validate_record_usage(batch, WINDOW, PRODUCTS) == []  # hourly mode: tags are allocations
    assert v.validate_record_usage(batch[:1], WINDOW, PRODUCTS, agentcore=True) == []
