"""SaaS usage in the spool, on both databases: an event that names a customer is kept
in records of that customer (per product or license, customer, dimension and hour),
apart from container usage and from every other customer; it is placed inside AWS's
SaaS window (24 hours, and the previous month only until 06:00 UTC on the 1st); a
taken hour is one customer's; listing shows and filters customers. Container usage
keeps its digests and ClientTokens, and a schema-4 spool is migrated with every row
kept as container usage. Every time is injected (epoch seconds), never the clock."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import test_spool
from test_spool import (
    NOW,
    POSTGRES_V4,
    SQLITE_V4_INDEXES,
    SQLITE_V4_TABLES,
    Store,
    reopen,
    row,
    schema_version,
    v4_columns,
)

from gateway.recording import placement
from gateway.recording.placement import Content, EventRow
from gateway.recording.spool import PENDING, SENT, EventIdConflict, Spool, open_spool
from gateway.recording.spool.base import SCHEMA_VERSION
from support.recording import ACCOUNT, LICENSE

store = test_spool.store  # the fixture: every test here runs on SQLite and on PostgreSQL
HOUR = placement.HOUR
DAY = 24 * HOUR
H0 = placement.hour_of(NOW)  # NOW is 2025-06-15T15:06:40Z: no month ends near it
OTHER = "444455556666"
APRIL = int(datetime(2026, 4, 1, tzinfo=UTC).timestamp())


def saas_row(
    event_id: str,
    hour_back: int = 1,
    quantity: str = "1",
    *,
    account: str = ACCOUNT,
    license_arn: str = LICENSE,
    identifier: str = "",
    product: str = "",
    dimension: str = "requests",
    second: int = 0,
    at: int | None = None,
) -> EventRow:
    """An event of SaaS usage as the servicer stores it: by default of ``account`` under
    ``license_arn`` (no product code); with ``identifier``, the legacy way. ``at`` (epoch
    seconds) places it instead of ``hour_back`` hours before NOW's hour."""
    when = (H0 - hour_back * HOUR + second) if at is None else at
    customer = (
        placement.customer_key("", "", identifier) if identifier else placement.customer_key(account, license_arn, "")
    )
    digest = placement.event_digest(product, dimension, when, 0, quantity, "", customer)
    return EventRow(
        event_id,
        product,
        dimension,
        placement.hour_of(when),
        "",
        quantity,
        "." not in quantity,
        digest,
        placement.event_time(when, 0),
        customer,
    )


def by_key(spool: Spool) -> dict[tuple[str, str, str, str, str, int], str]:
    """Every record as (product, account, license, identifier, dimension, hour) → quantity."""
    return {
        (
            r.product_code,
            r.customer_aws_account_id,
            r.license_arn,
            r.customer_identifier,
            r.usage_dimension,
            r.hour,
        ): r.quantity
        for r in spool.list_records(limit=10_000)
    }


# -- records per customer ---------------------------------------------------------------


def test_saas_usage_goes_to_one_record_per_customer_dimension_and_hour(store: Store) -> None:
    spool = reopen(store)
    accounts = [f"{100_000_000_000 + i}" for i in range(30)]
    events = [saas_row(f"{a}-{n}", 1, "2", account=a) for a in accounts for n in range(2)]
    events += [saas_row("early", 2, "5"), saas_row("gb", 1, "7", dimension="gb")]
    events += [saas_row(f"legacy-{c}", 1, "3", identifier=c, product="prod-a") for c in ("cust-a", "cust-b")]
    assert spool.record(events) == (len(events), 0)
    assert spool.assign(NOW) == []
    expected = {("", a, LICENSE, "", "requests", H0 - HOUR): "4" for a in accounts}
    expected[("", ACCOUNT, LICENSE, "", "requests", H0 - 2 * HOUR)] = "5"
    expected[("", ACCOUNT, LICENSE, "", "gb", H0 - HOUR)] = "7"
    expected[("prod-a", "", "", "cust-a", "requests", H0 - HOUR)] = "3"
    expected[("prod-a", "", "", "cust-b", "requests", H0 - HOUR)] = "3"
    assert by_key(spool) == expected
    records = spool.list_records(limit=10_000)
    assert all(r.saas for r in records) and len({r.client_token for r in records}) == len(records)


def test_container_and_saas_usage_of_one_hour_are_two_records(store: Store) -> None:
    spool = reopen(store)
    spool.record([row("c", 2, "5"), saas_row("s", 2, "3", identifier="cust-a", product="prod-a")])
    spool.assign(NOW)
    assert by_key(spool) == {
        ("prod-a", "", "", "", "requests", H0 - 2 * HOUR): "5",
        ("prod-a", "", "", "cust-a", "requests", H0 - 2 * HOUR): "3",
    }
    (container,) = [r for r in spool.list_records() if not r.saas]
    spool.begin_attempt(container.id)  # frozen: later container usage of that hour is carried, the customer's is not
    spool.record([row("c2", 2, "1"), saas_row("s2", 2, "1", identifier="cust-a", product="prod-a")])
    (carry,) = spool.assign(NOW)
    assert (carry.customer, carry.from_hour, carry.to_hour) == ("", H0 - 2 * HOUR, H0 - HOUR)
    assert by_key(spool)[("prod-a", "", "", "cust-a", "requests", H0 - 2 * HOUR)] == "4"


def test_an_event_id_of_another_customer_is_a_conflict_and_a_resend_a_duplicate(store: Store) -> None:
    spool = reopen(store)
    assert spool.record([saas_row("e", quantity="2"), row("c", quantity="2")]) == (2, 0)
    assert spool.record([saas_row("e", quantity="2"), row("c", quantity="2")]) == (0, 2)
    refused = [
        saas_row("e", quantity="2", account=OTHER),
        saas_row("e", quantity="2", identifier="cust-a"),
        row("e", quantity="2", product=""),  # the same usage, but container usage
        saas_row("c", hour_back=1, quantity="2", identifier="cust-a", product="prod-a"),
    ]
    said = [
        [("customer_aws_account_id", ACCOUNT, OTHER)],
        [
            ("customer_aws_account_id", ACCOUNT, '""'),
            ("license_arn", LICENSE, '""'),
            ("customer_identifier", '""', "cust-a"),
        ],
        [("customer_aws_account_id", ACCOUNT, '""'), ("license_arn", LICENSE, '""')],
        [("customer_identifier", '""', "cust-a")],
    ]
    for new, differences in zip(refused, said, strict=True):
        with pytest.raises(EventIdConflict) as caught:
            spool.record([row("fresh"), new])
        ((i, stored),) = caught.value.conflicts
        assert i == 1 and placement.differences(stored, new) == differences
    assert spool.record([row("fresh")]) == (1, 0)  # nothing of the refused batches was stored


# -- carrying ---------------------------------------------------------------------------


def test_a_taken_hour_is_one_customers_own(store: Store) -> None:
    spool = reopen(store)
    mine, theirs = ({"identifier": c, "product": "prod-a"} for c in ("cust-a", "cust-b"))
    spool.record([saas_row("a", 2, "5", **mine), saas_row("b", 2, "6", **theirs), row("c", 2, "7")])
    spool.assign(NOW)
    (record,) = [r for r in spool.list_records() if r.customer_identifier == "cust-a"]
    (carry,) = spool.carry(record.id, "DUPLICATE_REQUEST", NOW)
    assert (carry.customer, carry.from_hour, carry.to_hour, carry.quantity) == (
        record.customer,
        H0 - 2 * HOUR,
        H0 - HOUR,
        "5",
    )
    expected = {
        ("prod-a", "", "", "cust-a", "requests", H0 - HOUR): "5",
        ("prod-a", "", "", "cust-b", "requests", H0 - 2 * HOUR): "6",
        ("prod-a", "", "", "", "requests", H0 - 2 * HOUR): "7",
    }
    assert by_key(spool) == expected
    (moved,) = [r for r in spool.list_records() if r.customer_identifier == "cust-a"]
    assert moved.carried_hours == [H0 - 2 * HOUR]
    # Later usage of that hour: the carried customer's goes on to the next hour, the others' stays.
    spool.record([saas_row("a2", 2, "1", **mine), saas_row("b2", 2, "1", **theirs), row("c2", 2, "1")])
    (late,) = spool.assign(NOW)
    assert (late.customer, late.to_hour) == (record.customer, H0 - HOUR)
    assert set(by_key(spool).values()) == {"6", "7", "8"}
    # The taken hour is kept for as long as SaaS placement could still choose it (24 hours).
    last = H0 - 2 * HOUR + DAY - placement.SAFETY_MARGIN - 1
    assert placement.earliest_hour(last, saas=True) <= H0 - 2 * HOUR
    assert spool.prune(last, event_retention=DAY, record_retention=DAY).taken == 0
    assert spool.prune(NOW + 3 * DAY, event_retention=DAY, record_retention=DAY).taken == 1


def test_zero_hours_are_container_usages_alone(store: Store) -> None:
    """A customer's usage of a product and dimension neither fills a container zero hour
    nor gets one: --zero-usage-hours meters container products."""
    spool = reopen(store)
    key = ("prod-a", "requests")
    spool.fill_zero_hours([key], NOW)
    spool.record([saas_row("s", 0, "2", identifier="cust-a", product="prod-a")])
    spool.assign(NOW)
    assert spool.fill_zero_hours([key], H0 + HOUR + 1).made == ((*key, H0),)
    assert by_key(spool) == {
        ("prod-a", "", "", "", "requests", H0): "0",
        ("prod-a", "", "", "cust-a", "requests", H0): "2",
    }


# -- AWS's SaaS window --------------------------------------------------------------------


def test_saas_usage_keeps_its_own_hour_for_24_hours(store: Store) -> None:
    spool = reopen(store)
    spool.record([saas_row("s20", 20, "1"), row("c20", 20, "2"), saas_row("s25", 25, "4")])
    carries = spool.assign(NOW)
    container, saas = placement.earliest_hour(NOW), placement.earliest_hour(NOW, saas=True)
    assert saas == H0 - 23 * HOUR  # 24 hours back from NOW plus the margin, to the hour
    assert by_key(spool) == {
        ("", ACCOUNT, LICENSE, "", "requests", H0 - 20 * HOUR): "1",  # its own hour: unlike container usage
        ("prod-a", "", "", "", "requests", container): "2",
        ("", ACCOUNT, LICENSE, "", "requests", saas): "4",
    }
    assert sorted((c.customer != "", c.from_hour, c.to_hour) for c in carries) == [
        (False, H0 - 20 * HOUR, container),
        (True, H0 - 25 * HOUR, saas),
    ]


def test_the_previous_months_usage_goes_to_its_own_hour_until_06_00_on_the_1st(store: Store) -> None:
    last_hour_of_march = APRIL - HOUR
    early = reopen(store, "early")  # 04:00 on the 1st: March is still taken
    early.record([saas_row("m", at=last_hour_of_march + 60)])
    assert early.assign(APRIL + 4 * HOUR) == []
    assert [r.hour for r in early.list_records()] == [last_hour_of_march]
    late = reopen(store, "late")  # 06:10: no longer; April's first hour takes it
    late.record([saas_row("m", at=last_hour_of_march + 60)])
    (carry,) = late.assign(APRIL + 6 * HOUR + 600)
    assert (carry.from_hour, carry.to_hour) == (last_hour_of_march, APRIL)
    assert [r.hour for r in late.list_records()] == [APRIL]
    # A March record not sent in time is carried into April's first hour too (the sender's carry).
    (record,) = early.list_records()
    (moved,) = early.carry(record.id, "saas_window", APRIL + 5 * HOUR + 40 * 60)  # the margin reaches 06:00
    assert (moved.from_hour, moved.to_hour) == (last_hour_of_march, APRIL)


# -- ClientTokens and digests ---------------------------------------------------------------


def test_container_tokens_and_digests_are_what_older_releases_made(store: Store) -> None:
    content = Content({"": Decimal(3), '[["t","1"]]': Decimal("1.5")}, False)
    # Values of release 0.2's formula, for fixed buckets: records frozen by it are resent with them.
    hour = 1_749_996_000
    assert (
        placement.client_token("prod-a", "requests", hour, content, "0d2f3c55-5c1e-4f43-8a0f-3f6f1c9a7e21")
        == "06f606d7-b44d-57a3-82a7-3c9780f9cdae"
    )
    assert placement.client_token("prod-a", "requests", hour, content) == "160d9f1b-5f6a-55b7-9c14-e9d68193c9fd"
    assert placement.event_digest("prod-a", "requests", hour, 0, "3", "").hex() == "1c48e5eb96ca65504fefcfd93d672fe7"
    assert (
        placement.event_digest("prod-a", "requests", None, 0, "3", '[["t","1"]]').hex()
        == "0088a07939fa801144ad1b45872d4df9"
    )
    spool = reopen(store)
    spool.record([row("c", 2, "3"), saas_row("s", 2, "3", identifier="cust-a", product="prod-a")])
    spool.assign(NOW)
    (container,) = [r for r in spool.list_records() if not r.saas]
    (saas,) = [r for r in spool.list_records() if r.saas]
    old_formula = "\x1f".join(("prod-a", "requests", str(H0 - 2 * HOUR), '{"":"3"}', "True", spool.spool_id))
    assert container.client_token == str(uuid.uuid5(uuid.UUID("6f1d2a0e-8f5c-4c43-9a51-2f4f5d3e7b10"), old_formula))
    assert saas.client_token == placement.client_token(
        "prod-a", "requests", saas.hour, saas.content, spool.spool_id, saas.customer
    )
    assert saas.client_token != container.client_token


# -- listing -----------------------------------------------------------------------------------


def test_listing_shows_customers_and_filters_by_account_and_license(store: Store) -> None:
    spool = reopen(store)
    longer = ACCOUNT + "4444"  # an account that starts like another
    license_2 = LICENSE[:-1] + "_"  # a license that differs in one character, one LIKE would match anything with
    spool.record(
        [
            saas_row("a1", 1),
            saas_row("a2", 2),
            saas_row("b", 1, account=OTHER),
            saas_row("l", 1, account=longer, license_arn=license_2),
            saas_row("legacy", 1, identifier="cust-a", product="prod-a"),
            row("c", 1),
        ]
    )
    spool.assign(NOW)

    def listed(**filters: Any) -> list[tuple[str, str, str, int]]:
        return [
            (r.product_code, r.customer_aws_account_id, r.license_arn, r.hour) for r in spool.list_records(**filters)
        ]

    assert listed(customer_aws_account_id=ACCOUNT) == [
        ("", ACCOUNT, LICENSE, H0 - HOUR),
        ("", ACCOUNT, LICENSE, H0 - 2 * HOUR),
    ]
    assert sorted(listed(license_arn=LICENSE)) == sorted(
        [("", ACCOUNT, LICENSE, H0 - HOUR), ("", ACCOUNT, LICENSE, H0 - 2 * HOUR), ("", OTHER, LICENSE, H0 - HOUR)]
    )
    assert listed(license_arn=license_2) == [("", longer, license_2, H0 - HOUR)]
    assert listed(customer_aws_account_id=OTHER, license_arn=LICENSE) == [("", OTHER, LICENSE, H0 - HOUR)]
    assert listed(customer_aws_account_id=OTHER, license_arn=license_2) == []
    assert listed(customer_aws_account_id=ACCOUNT, since=H0 - HOUR) == [("", ACCOUNT, LICENSE, H0 - HOUR)]
    assert listed(license_arn=LICENSE[:-1]) == [] and listed(customer_aws_account_id="1111") == []
    assert sorted(listed(product_code="prod-a")) == [("prod-a", "", "", H0 - HOUR)] * 2
    first = spool.list_records(license_arn=LICENSE, limit=2)
    rest = spool.list_records(license_arn=LICENSE, limit=2, after=(first[-1].hour, first[-1].id))
    assert len(first + rest) == 3 and first + rest == spool.list_records(license_arn=LICENSE)
    (legacy,) = [r for r in spool.list_records() if r.customer_identifier]
    assert (legacy.saas, legacy.customer_aws_account_id, legacy.license_arn) == (True, "", "")
    (container,) = [r for r in spool.list_records() if not r.saas]
    assert (container.customer, container.customer_identifier, container.license_arn) == ("", "", "")


# -- schema version 5 ----------------------------------------------------------------------------

SPOOL_ID = "8c0c7f8e-0a5e-4b7e-9d4b-5f3c4b1e2a10"


def run(location: str, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """Statements with ``?`` placeholders, in one transaction, on either database."""
    if location.startswith("postgresql://"):
        with psycopg.connect(location) as conn:
            for sql, args in statements:
                conn.execute(sql.replace("?", "%s"), args)
        return
    db = sqlite3.connect(location)
    try:
        for sql, args in statements:
            db.execute(sql, args)
        db.commit()
    finally:
        db.close()


def query(location: str, sql: str) -> list[tuple[Any, ...]]:
    if location.startswith("postgresql://"):
        with psycopg.connect(location) as conn:
            return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in conn.execute(sql)]
    db = sqlite3.connect(location)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def make_v4_spool(location: str) -> None:
    """A spool as schema version 4 left it (written out in test_spool.py): a SENT record and
    one in flight with their events, an event not yet placed, a taken hour, zero hours."""
    if location.startswith("postgresql://"):
        with psycopg.connect(location) as conn:
            conn.execute(POSTGRES_V4)
        meta = [("schema_version", "4"), ("spool_id", SPOOL_ID), ("span", str(HOUR))]
    else:
        ddl = [*SQLITE_V4_TABLES.values(), *(i for group in SQLITE_V4_INDEXES.values() for i in group)]
        run(location, [(sql, ()) for sql in ddl])
        schema_version(location, set_to=4)
        meta = [("spool_id", SPOOL_ID), ("span", str(HOUR))]
    sent, in_flight = Content({"": Decimal(3)}, True), Content({"": Decimal(4)}, True)
    events = [row("v4-a", 3, "1"), row("v4-b", 3, "2"), row("v4-c", 2, "4"), row("v4-new", 1, "5")]
    record = (
        "INSERT INTO records (product_code, usage_dimension, hour, state, allocations, whole, quantity, client_token, "
        "metering_record_id, attempts, in_flight, closed_at) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, 1, ?, ?)"
    )
    run(
        location,
        [
            *(("INSERT INTO meta (key, value) VALUES (?, ?)", m) for m in meta),
            (
                record,
                ("prod-a", "requests", H0 - 3 * HOUR, SENT, sent.to_json(), "3")
                + (placement.client_token("prod-a", "requests", H0 - 3 * HOUR, sent, SPOOL_ID), "mr-v4", 0, NOW - 60),
            ),
            (
                record,
                ("prod-a", "requests", H0 - 2 * HOUR, PENDING, in_flight.to_json(), "4")
                + (placement.client_token("prod-a", "requests", H0 - 2 * HOUR, in_flight, SPOOL_ID), "", 1, 0),
            ),
            *(
                (
                    "INSERT INTO events (event_id, product_code, usage_dimension, hour, tags, quantity, whole, digest, "
                    "timestamp, record_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*e[:6], int(e.whole), *e[7:9], {"v4-a": 1, "v4-b": 1, "v4-c": 2}.get(e.event_id)),
                )
                for e in events
            ),
            (
                "INSERT INTO taken (product_code, usage_dimension, hour, reason) VALUES (?, ?, ?, ?)",
                ("prod-a", "requests", H0 - 4 * HOUR, "DUPLICATE_REQUEST"),
            ),
            (
                "INSERT INTO zero_hours (product_code, usage_dimension, next_hour) VALUES (?, ?, ?)",
                ("prod-a", "requests", H0),
            ),
        ],
    )


V4_EVENT_COLUMNS = ", ".join(v4_columns("events"))
V4_RECORD_COLUMNS = ", ".join(v4_columns("records"))


def v4_rows(location: str) -> dict[str, list[tuple[Any, ...]]]:
    """What version 4 stored, column by column (events and records as it named them)."""
    return {
        "events": sorted(query(location, f"SELECT {V4_EVENT_COLUMNS} FROM events")),
        "records": sorted(query(location, f"SELECT {V4_RECORD_COLUMNS} FROM records")),
        "taken": sorted(query(location, "SELECT product_code, usage_dimension, hour, reason FROM taken")),
        "zero_hours": sorted(query(location, "SELECT product_code, usage_dimension, next_hour FROM zero_hours")),
        "meta": sorted(query(location, "SELECT key, value FROM meta WHERE key <> 'schema_version'")),
    }


def test_a_schema_4_spool_keeps_every_row_as_container_usage(store: Store) -> None:
    location = store()
    make_v4_spool(location)
    before = v4_rows(location)
    spool = open_spool(location, now=lambda: NOW)
    assert schema_version(location) == SCHEMA_VERSION == 5
    assert v4_rows(location) == before  # every row, every value
    for table in ("events", "records", "taken"):
        assert query(location, f"SELECT DISTINCT customer FROM {table}") == [("",)]
    assert spool.spool_id == SPOOL_ID
    in_flight = spool.get(2)
    assert in_flight is not None and in_flight.outcome_unknown and not in_flight.saas
    # Its events' digests still tell a resend (a duplicate) from a reused id (a conflict).
    assert spool.record([row("v4-a", 3, "1")]) == (0, 1)
    with pytest.raises(EventIdConflict) as caught:
        spool.record([saas_row("v4-a", 3, "1", identifier="cust-a", product="prod-a")])
    ((_, stored),) = caught.value.conflicts
    assert stored.customer == "" and placement.differences(stored, saas_row("v4-a", 3, "1", identifier="cust-a")) == [
        ("product_code", "prod-a", '""'),
        ("customer_identifier", '""', "cust-a"),
    ]
    # Placement goes on as before for container usage (the taken hour, the frozen ones)...
    spool.record([row("late", 4, "6"), saas_row("s2", 2, "2", identifier="cust-a", product="prod-a")])
    spool.record([saas_row("s4", 4, "1", identifier="cust-a", product="prod-a")])
    spool.assign(NOW)
    assert by_key(spool) == {
        ("prod-a", "", "", "", "requests", H0 - 3 * HOUR): "3",
        ("prod-a", "", "", "", "requests", H0 - 2 * HOUR): "4",
        ("prod-a", "", "", "", "requests", H0 - HOUR): "11",  # v4-new, and `late`: its hour taken, the next two frozen
        # ...and a customer's usage of those hours is its own, in hours of its own.
        ("prod-a", "", "", "cust-a", "requests", H0 - 2 * HOUR): "2",
        ("prod-a", "", "", "cust-a", "requests", H0 - 4 * HOUR): "1",
    }
    sent = spool.get(1)
    assert sent is not None and sent.client_token == before["records"][0][8]  # id 1 first: its token as frozen
    spool.close()
    open_spool(location).close()  # opening again migrates nothing
    assert schema_version(location) == 5


def test_a_migrated_postgresql_spool_is_a_new_one(postgres_server: Any) -> None:
    """Migrating version 4 and creating a new spool give the same tables, columns,
    constraints and indexes (SQLite's counterpart: test_spool_sqlite.py)."""
    migrated = postgres_server.create_database(f"spool_{uuid.uuid4().hex}")
    make_v4_spool(migrated)
    new = postgres_server.create_database(f"spool_{uuid.uuid4().hex}")
    for location in (migrated, new):
        open_spool(location).close()

    def schema(location: str) -> list[list[tuple[Any, ...]]]:
        return [
            query(
                location,
                "SELECT table_name, column_name, data_type, column_default, is_nullable FROM "
                "information_schema.columns WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
            ),
            sorted(
                query(location, "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")
            ),
            sorted(
                query(
                    location,
                    "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE connamespace = 'public'::regnamespace",
                )
            ),
        ]

    assert schema(migrated) == schema(new)
