"""Properties of aggregation and carry-over, on generated events and schedules.

The schedule test runs the real Spool and Sender on a fake clock against AWS's
rules in process (local_aws.State): random events, late events, outages longer
than six hours of every kind (refused connections and bare 503s, which rule a
record out; InternalServiceErrors, with or without AWS recording first, which
do not), and hours taken by someone else. Then: never two records per product,
dimension and hour, never a refusal for the six-hour window, and every unit is
either billed once or listed FAILED "outcome unknown" (never both, never lost).
"""

from __future__ import annotations

from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.domain import validation
from gateway.recording import placement
from gateway.recording.placement import HOUR, Content
from gateway.recording.sender import Sender
from gateway.recording.servicer import event_row
from gateway.recording.spool import FAILED, PENDING, EventIdConflict
from gateway.recording.spool.sqlite import SqliteSpool as Spool
from marketplace.metering.v1 import metering_pb2 as pb
from support.recording import (
    BARE_507,
    ISE,
    ISE_AFTER_RECORD,
    OUTAGES,
    RETENTION,
    FakeAws,
    event,
    sums_of_events,
    sums_of_records,
)

NOW = 1_750_000_000.0

whole = st.integers(0, validation.QUANTITY_MAX)
decimal = st.builds(
    lambda i, f: f"{i}.{f:06d}".rstrip("0").rstrip(".") if f else str(i),
    st.integers(0, 9_999_999_999),
    st.integers(0, 999_999),
)
tag_keys = st.sampled_from(["", '[["t","1"]]', '[["t","2"]]', '[["a","x"],["t","1"]]'])
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef0"
customers = st.sampled_from(
    [
        "",  # container usage
        placement.customer_key("111122223333", LICENSE, ""),
        placement.customer_key("444455556666", LICENSE, ""),
        placement.customer_key("", "", "legacy-1"),
    ]
)
rows = st.lists(
    st.tuples(
        st.sampled_from(["p1", "p2"]),
        customers,
        st.sampled_from(["d1", "d2"]),
        st.integers(0, 8),
        tag_keys,
        st.one_of(whole.map(lambda q: (str(q), True)), decimal.map(lambda q: (q, False))),
    ),
    max_size=60,
)


def as_rows(generated: list) -> list[placement.GroupRow]:
    return [(i, p, c, d, int(NOW) - h * HOUR, t, q, w) for i, (p, c, d, h, t, (q, w)) in enumerate(generated)]


@given(rows)
def test_grouping_keeps_every_unit_and_respects_aws_limits(generated: list) -> None:
    data = as_rows(generated)
    pieces = placement.group(data)
    expected: dict[tuple[str, str, str, int], Decimal] = {}
    for _, p, c, d, h, _, q, _ in data:
        k = (placement.keyed_product(p, c), c, d, h)  # a license's usage is kept under no product
        expected[k] = expected.get(k, Decimal(0)) + Decimal(q)
    totals: dict[tuple[str, str, str, int], Decimal] = {}
    for p in pieces:  # every piece is one customer's: container and SaaS usage, customers, never mixed
        where = (*p.key, p.hour)
        totals[where] = totals.get(where, Decimal(0)) + p.content.total
    assert totals == expected
    assert sorted(i for piece in pieces for i in piece.ids) == list(range(len(data)))
    for piece in pieces:
        assert piece.content.total <= placement.MAX_TOTAL
        assert len(piece.content.allocations) <= validation.ALLOCATIONS_MAX
        product = piece.product_code or "prod-of-the-license"  # the limits checked are the same for SaaS
        request = placement.build_request(
            product,
            piece.usage_dimension,
            int(NOW) // HOUR * HOUR,
            piece.content,
            placement.client_token(product, piece.usage_dimension, 0, piece.content),
        )
        window = validation.Window(placement.timestamp_of(int(NOW)))
        assert validation.validate_meter_usage(request, window) == []  # sums, kinds, unique tag sets, limits
        tag_sets = [validation.tag_set(a.tags) for a in request.usage_allocations]
        assert len(tag_sets) == len(set(tag_sets))


@given(st.lists(st.integers(0, validation.QUANTITY_MAX), min_size=1, max_size=8))
def test_records_go_out_as_exact_decimals(quantities: list[int]) -> None:
    """AWS deprecated whole quantities: a record always uses the decimal fields, except
    the legacy whole form of a record frozen before, which fits a whole total only."""
    content = Content()
    for q in quantities:
        content.add(Content({"": Decimal(q)}, True))
    request = placement.build_request("p", "d", 0, content, "t")
    assert request.WhichOneof("quantity") == "usage_quantity_as_decimal"
    assert Decimal(request.usage_quantity_as_decimal) == sum(quantities)
    legacy = placement.build_request("p", "d", 0, content, "t", decimal=False)
    if sum(quantities) <= validation.QUANTITY_MAX:
        assert legacy.usage_quantity == sum(quantities)
    else:
        assert Decimal(legacy.usage_quantity_as_decimal) == sum(quantities)


@given(st.integers(-20, 20), st.integers(0, 7 * HOUR), st.sets(st.integers(-20, 30), max_size=20))
def test_placement_is_the_first_usable_hour_inside_the_window(own: int, offset: int, closed: set[int]) -> None:
    now = NOW + offset
    earliest = placement.earliest_hour(now)
    own_hour = placement.hour_of(now) + own * HOUR
    closed_hours = {placement.hour_of(now) + c * HOUR for c in closed}
    hour = placement.place(own_hour, earliest, lambda h: h not in closed_hours)
    assert hour % HOUR == 0 and hour >= own_hour and hour not in closed_hours
    assert hour - now > -validation.MAX_AGE.total_seconds() + placement.SAFETY_MARGIN - 1
    assert all(h in closed_hours for h in range(max(own_hour, earliest), hour, HOUR))


@given(st.integers(0, 10**9), st.sampled_from(["", '[["t","1"]]']), decimal)
def test_the_same_bucket_always_gets_the_same_token(hour: int, tags: str, quantity: str) -> None:
    a = Content({tags: Decimal(quantity)}, False)
    b = Content.from_json(a.to_json(), False)
    assert placement.client_token("p", "d", hour, a) == placement.client_token("p", "d", hour, b)
    assert placement.client_token("p", "d", hour + HOUR, a) != placement.client_token("p", "d", hour, a)
    assert len(placement.client_token("p", "d", hour, a)) <= validation.CLIENT_TOKEN_MAX
    # A customer makes its own token, and the same one each time; none is a container bucket's.
    saas = placement.customer_key("111122223333", LICENSE, "")
    other = placement.customer_key("444455556666", LICENSE, "")
    tokens = {placement.client_token("p", "d", hour, a, spool, c) for spool in ("", "s1") for c in ("", saas, other)}
    assert len(tokens) == 6
    assert placement.client_token("p", "d", hour, a, "s1", saas) == placement.client_token(
        "p", "d", hour, b, "s1", saas
    )


@given(st.text(max_size=20), st.text(max_size=300), st.text(max_size=30))
def test_a_customer_key_names_its_customer_and_nothing_else(account: str, license_arn: str, identifier: str) -> None:
    key = placement.customer_key(account, license_arn, identifier)
    assert placement.customer_of(key) == (account, license_arn, identifier)
    assert (key == "") == (not (account or license_arn or identifier))


step = st.one_of(
    st.tuples(
        st.just("record"),
        st.lists(
            st.tuples(st.integers(0, 9), st.integers(0, 3), st.integers(0, 50), st.sampled_from(["p1", "p2"])),
            min_size=1,
            max_size=8,
        ),
    ),
    st.tuples(st.just("advance"), st.integers(60, 4 * HOUR)),
    st.tuples(st.just("outage"), st.sampled_from((None, *OUTAGES))),
    st.tuples(st.just("take"), st.integers(-3, 2), st.sampled_from(["p1", "p2"])),
    st.tuples(st.just("tick"), st.just(0)),
    st.tuples(st.just("resend"), st.integers(0, 100)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40), st.integers(0, HOUR - 1))
def test_every_schedule_meters_each_unit_exactly_once(steps: list, start_offset: int) -> None:
    clock = [NOW + start_offset]
    aws = FakeAws(lambda: clock[0])
    spool = Spool(":memory:")
    sender = Sender(
        spool, aws, interval=60, grace=300, max_rps=1e9, now=lambda: clock[0], sleep=lambda _: None, **RETENTION
    )  # type: ignore[arg-type]
    recorded: list[pb.UsageEvent] = []
    batches: list[list[pb.UsageEvent]] = []
    digests: dict[str, bytes] = {}
    unknown_possible = False
    for n, (kind, *args) in enumerate(steps):
        if kind == "record":
            # hours_back up to 9 (beyond six hours: carried); some ids are reused with
            # another payload, which must refuse the whole batch and store nothing
            batch = [
                event(f"e{i % 40}-{n if i % 3 else 0}", clock[0] - back * HOUR + minute * 60, qty, product=prod)
                for i, (back, minute, qty, prod) in enumerate(args[0])
            ]
            rows = [event_row(e) for e in batch]
            seen = dict(digests)
            conflict = any(seen.setdefault(r.event_id, r.digest) != r.digest for r in rows)
            try:
                spool.record(rows)
            except EventIdConflict:
                assert conflict
                continue
            assert not conflict
            digests.update(seen)
            recorded += batch
            batches.append(batch)
        elif kind == "resend":  # a caller that did not see the answer sends the same batch again
            if batches:
                again = batches[args[0] % len(batches)]
                assert spool.record([event_row(e) for e in again]) == (0, len(again))
        elif kind == "advance":
            clock[0] += args[0]
        elif kind == "outage":
            aws.down = args[0]
            unknown_possible |= args[0] in (ISE, ISE_AFTER_RECORD, BARE_507)
        elif kind == "take":
            hour = placement.hour_of(clock[0]) + args[0] * HOUR
            if placement.earliest_hour(clock[0]) <= hour <= clock[0]:
                aws.take_hour(args[1], "requests", hour)
        else:
            sender.tick()
    aws.down = None
    for _ in range(12):  # after recovery: a few hours of ticks send the rest
        clock[0] += 20 * 60
        sender.tick()
    first: dict[str, pb.UsageEvent] = {}
    for e in recorded:
        first.setdefault(e.event_id, e)  # the first time an id was recorded wins; the rest are duplicates
    failed = spool.list_records(state=FAILED, limit=10_000)
    assert all(r.last_error.startswith("outcome unknown") for r in failed)
    assert unknown_possible or not failed, "only an answer that leaves the outcome unknown may end FAILED"
    # Every unit is billed once, or listed for reconciliation because AWS may hold it; never both.
    listed_unbilled = [aggregator_record(r) for r in failed if not aws.holds(r.client_token)]
    assert add(sums_of_records(aws.ours()), sums_of_records(listed_unbilled, identity=None)) == nonzero(
        sums_of_events(first.values())
    )
    assert not spool.list_records(state=PENDING)
    hours = [(r.product_code, r.usage_dimension, r.hour) for r in aws.state.records]
    assert len(hours) == len(set(hours))
    assert "TimestampOutOfBoundsException" not in aws.refusals
    assert "IdempotencyConflictException" not in aws.refusals


def add(*sums: dict[tuple[str, str], Decimal]) -> dict[tuple[str, str], Decimal]:
    out: dict[tuple[str, str], Decimal] = {}
    for one in sums:
        for key, value in one.items():
            out[key] = out.get(key, Decimal(0)) + value
    return nonzero(out)


def nonzero(sums: dict[tuple[str, str], Decimal]) -> dict[tuple[str, str], Decimal]:
    """Sums without zero entries: a bucket of zeros is billed or not, either way nothing."""
    return {k: v for k, v in sums.items() if v}


def aggregator_record(row: object) -> object:
    """A spool record in the shape sums_of_records() reads (AWS's Record)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        identity=None,
        product_code=row.product_code,
        usage_dimension=row.usage_dimension,  # type: ignore[attr-defined]
        quantity=Decimal(row.quantity),
    )  # type: ignore[attr-defined]
