"""The sender's SaaS path against the local backend over HTTP, on an injected clock:
BatchMeterUsage calls of up to 25 records of one product or license, each record
settled by its own status (Success → SENT, DuplicateRecord → carried,
CustomerNotSubscribed → FAILED), unprocessed and unanswered records resent
identically, one bad record isolated from a refused call, and AWS's SaaS window
(24 hours, the month-end cutoff) in place of six hours."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.aws.backend import Backend, RetryPolicy, make_client
from gateway.config import Settings
from gateway.local_aws import DROP, UNPROCESSED, LocalAws
from gateway.observability import metrics
from gateway.recording.placement import HOUR, hour_of
from gateway.recording.sender import Sender
from gateway.recording.servicer import event_row
from gateway.recording.spool import FAILED, PENDING, SENT, RecordRow
from gateway.recording.spool.sqlite import SqliteSpool
from marketplace.metering.v1 import metering_pb2 as pb
from support import FIXED_NOW, Clock, local_session
from support.recording import RETENTION, event, saas_event

LICENSES = (
    "arn:aws:license-manager::123456789012:license:l-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1",
    "arn:aws:license-manager::123456789012:license:l-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb2",
)
PRODUCTS = ("prod-saas-1", "prod-saas-2")


@dataclass
class Rig:
    clock: Clock
    aws: LocalAws
    spool: SqliteSpool
    sender: Sender
    calls: list[list[Any]]  # the records of every BatchMeterUsage call the sender made

    def record(self, *events: pb.UsageEvent) -> None:
        self.spool.record([event_row(e) for e in events])

    def tick(self, advance: float = 0.0) -> None:
        self.clock.advance(advance)
        self.sender.tick()

    def batch_calls(self) -> int:
        return self.aws.calls

    def billed(self) -> dict[tuple[str, str, str], Decimal]:
        """AWS's total per (account or identifier, license, dimension), over every hour."""
        out: dict[tuple[str, str, str], Decimal] = {}
        for u in self.aws.saas_usage():
            key = (u["CustomerAWSAccountId"] or u["CustomerIdentifier"], u["LicenseArn"], u["Dimension"])
            out[key] = out.get(key, Decimal(0)) + Decimal(u["Quantity"])
        return out

    def hours_billed(self) -> list[tuple[str, str, str, str]]:
        return [
            (u["CustomerAWSAccountId"] or u["CustomerIdentifier"], u["LicenseArn"], u["Dimension"], u["Hour"])
            for u in self.aws.saas_usage()
        ]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    clock = Clock(FIXED_NOW)
    with LocalAws(quiet=True, clock=clock) as aws:
        for product, license_arn in zip(PRODUCTS, LICENSES, strict=True):
            for i in range(60):
                aws.subscribe(customer_aws_account_id=account(i), license_arn=license_arn, product_code=product)
        settings = dataclasses.replace(Settings(), aws_read_timeout=0.5, aws_connect_timeout=0.5)
        client = make_client(settings, endpoint_url=aws.endpoint_url, session=local_session())
        backend = Backend(client, RetryPolicy(1, 0.01, 0.02), source=metrics.SENDER, sleep=lambda _: None)
        spool = SqliteSpool(str(tmp_path / "spool.db"), now=clock)
        sender = Sender(
            spool,
            backend,
            interval=60,
            grace=0,
            max_rps=1e9,
            now=clock,
            sleep=lambda _: None,
            call_timeout=2.0,
            **RETENTION,
        )
        calls: list[list[Any]] = []
        original = backend.batch_meter_usage

        def spy(params: Any, **kw: Any) -> Any:
            calls.append(list(params["UsageRecords"]))
            return original(params, **kw)

        backend.batch_meter_usage = spy  # type: ignore[method-assign]
        try:
            yield Rig(clock, aws, spool, sender, calls)
        finally:
            spool.close()


def account(i: int) -> str:
    return str(100000000000 + i)


def last_hour(rig: Rig) -> float:
    return hour_of(rig.clock()) - HOUR + 60


def test_many_customers_go_out_25_records_a_call_one_license_each(rig: Rig) -> None:
    when = last_hour(rig)
    events = [
        saas_event(f"e-{lic}-{i}-{dim}", when, i + 1, account=account(i), license_arn=LICENSES[lic], dimension=dim)
        for lic in range(2)
        for i in range(60)
        for dim in ("requests", "storage")
    ]
    rig.record(*events)
    rig.tick()
    records = rig.spool.list_records(limit=1000)
    assert len(records) == 240 and {r.state for r in records} == {SENT}
    assert rig.batch_calls() == 10  # 120 records a license: 5 calls of at most 25, never two licenses in one
    assert sorted(len(call) for call in rig.calls) == [20, 20] + [25] * 8
    assert all(len({r["LicenseArn"] for r in call}) == 1 for call in rig.calls)
    assert rig.billed() == {
        (account(i), LICENSES[lic], dim): Decimal(i + 1)
        for lic in range(2)
        for i in range(60)
        for dim in ("requests", "storage")
    }


def test_customer_not_subscribed_fails_that_record_only_and_an_operator_retry_sends_it(rig: Rig) -> None:
    when = last_hour(rig)
    stranger = "999988887777"
    rig.record(
        saas_event("ok", when, 2, account=account(1), license_arn=LICENSES[0]),
        saas_event("nobody", when, 3, account=stranger, license_arn=LICENSES[0]),
    )
    rig.tick()
    by_account = {r.customer_aws_account_id: r for r in rig.spool.list_records()}
    assert by_account[account(1)].state == SENT
    failed = by_account[stranger]
    assert failed.state == FAILED and failed.last_error.startswith("CUSTOMER_NOT_SUBSCRIBED")
    assert not failed.outcome_unknown
    rig.aws.subscribe(customer_aws_account_id=stranger, license_arn=LICENSES[0], product_code=PRODUCTS[0])
    rig.spool.retry_failed(failed.id, reconciled=False, now=rig.clock())
    rig.tick(60)
    assert rig.spool.get(failed.id).state == SENT  # type: ignore[union-attr]
    assert rig.billed()[(stranger, LICENSES[0], "requests")] == 3


def test_duplicate_record_carries_the_usage_to_the_customers_next_hour(rig: Rig) -> None:
    """Another sender (another spool) holds the customer's hour with another quantity:
    AWS bills that one; ours goes to the next hour, never into the same hour twice."""
    when = last_hour(rig)
    boto = make_client(Settings(), endpoint_url=rig.aws.endpoint_url, session=local_session())
    boto.batch_meter_usage(
        UsageRecords=[
            {
                "Timestamp": datetime.fromtimestamp(hour_of(when), UTC),
                "Dimension": "requests",
                "QuantityAsDecimal": "5",
                "CustomerAWSAccountId": account(2),
                "LicenseArn": LICENSES[0],
            }
        ]
    )  # type: ignore[list-item]  # the stubs predate CustomerAWSAccountId
    rig.record(saas_event("mine", when, 7, account=account(2), license_arn=LICENSES[0]))
    rig.tick()
    [carried] = [r for r in rig.spool.list_records() if r.state == PENDING]
    assert carried.hour == hour_of(when) + HOUR and carried.carried_hours == [hour_of(when)]
    rig.tick(HOUR)  # the next hour closes
    assert rig.billed()[(account(2), LICENSES[0], "requests")] == 12
    hours = rig.hours_billed()
    assert len(hours) == len(set(hours)) == 2


@pytest.mark.parametrize("kept", [False, True], ids=["not-kept", "kept-anyway"])
def test_unprocessed_records_are_resent_identically_and_billed_once(rig: Rig, kept: bool) -> None:
    when = last_hour(rig)
    rig.record(*(saas_event(f"u-{i}", when, i + 1, account=account(i), license_arn=LICENSES[0]) for i in range(10)))
    rig.aws.inject(UNPROCESSED, 3, record=kept, operation="BatchMeterUsage")
    for _ in range(6):
        rig.tick(600)  # each pass resends what is left, after its backoff
    assert {r.state for r in rig.spool.list_records()} == {SENT}
    assert rig.billed() == {(account(i), LICENSES[0], "requests"): Decimal(i + 1) for i in range(10)}
    sent_ids = {r.metering_record_id for r in rig.spool.list_records()}
    assert sent_ids == {r.metering_record_id for r in rig.aws.saas_records()}


@pytest.mark.parametrize(
    "fault",
    [
        {"error": "InternalServiceErrorException", "status": 500},
        {"error": "", "status": 502},
        {"error": DROP},
    ],
    ids=["500", "bare-502", "drop"],
)
def test_a_lost_answer_leaves_every_record_of_the_call_unknown_and_they_are_resent_identically(
    rig: Rig, fault: dict[str, Any]
) -> None:
    when = last_hour(rig)
    rig.record(*(saas_event(f"l-{i}", when, 4, account=account(i), license_arn=LICENSES[1]) for i in range(30)))
    rig.aws.inject(fault["error"], 1, status=fault.get("status"), record=True, operation="BatchMeterUsage")
    rig.tick()
    unknown = [r for r in rig.spool.list_records() if r.outcome_unknown]
    assert len(unknown) == 25  # the first call's records: AWS kept them, the answer was lost
    for _ in range(3):
        rig.tick(120)
    assert {r.state for r in rig.spool.list_records()} == {SENT}
    assert rig.billed() == {(account(i), LICENSES[1], "requests"): Decimal(4) for i in range(30)}
    assert len(rig.aws.saas_records()) == 30  # the resend found AWS's records: none twice


def test_a_call_refused_for_one_bad_license_is_split_until_the_bad_record_stands_alone(rig: Rig) -> None:
    """The product hint groups records of good licenses with one AWS does not know:
    AWS refuses the call whole; the sender bisects, and only the bad record fails."""
    when = last_hour(rig)
    unknown_license = "arn:aws:license-manager::123456789012:license:l-cccccccccccccccccccccccccccccc3"
    good = [
        saas_event(f"g-{i}", when, 1, account=account(i), license_arn=LICENSES[0], product=PRODUCTS[0])
        for i in range(15)
    ]
    bad = saas_event("bad", when, 1, account=account(40), license_arn=unknown_license, product=PRODUCTS[0])
    rig.record(*good[:7], bad, *good[7:])
    rig.tick()
    records = rig.spool.list_records()
    failed = [r for r in records if r.state == FAILED]
    assert [r.license_arn for r in failed] == [unknown_license]
    assert failed[0].last_error.startswith("INVALID_LICENSE")
    assert sum(1 for r in records if r.state == SENT) == 15
    assert rig.batch_calls() <= 1 + 2 * 4  # the whole call, then about two calls a level of the bisection


def test_saas_usage_20_hours_old_still_goes_out_under_its_own_hour(rig: Rig) -> None:
    """Six hours is MeterUsage's window; BatchMeterUsage takes 24: nothing is carried."""
    old = hour_of(rig.clock()) - 20 * HOUR + 60
    rig.record(
        saas_event("old-saas", old, 3, account=account(5), license_arn=LICENSES[0]),
        event("old-container", old, 3, product="prod-c"),
    )
    rig.tick()
    by_kind = {r.saas: r for r in rig.spool.list_records()}
    assert by_kind[True].hour == hour_of(old) and by_kind[True].state == SENT
    assert by_kind[False].hour > hour_of(old)  # the container usage was carried into the six-hour window
    assert rig.billed() == {(account(5), LICENSES[0], "requests"): Decimal(3)}


def late_march_usage_sent_at(when: datetime, tmp_path: Path) -> tuple[RecordRow, list[dict[str, str]]]:
    """Usage of 31 March 23:30 recorded and sent at ``when`` (1 April): its record and what AWS bills."""
    clock = Clock(when)
    with LocalAws(quiet=True, clock=clock) as aws:
        aws.subscribe(customer_aws_account_id=account(1), license_arn=LICENSES[0], product_code=PRODUCTS[0])
        client = make_client(Settings(), endpoint_url=aws.endpoint_url, session=local_session())
        spool = SqliteSpool(str(tmp_path / "spool.db"), now=clock)
        sender = Sender(
            spool, Backend(client, RetryPolicy(1)), interval=60, grace=0, max_rps=1e9, now=clock, **RETENTION
        )
        march = datetime(2026, 3, 31, 23, 30, tzinfo=UTC).timestamp()
        spool.record([event_row(saas_event("late-march", march, 9, account=account(1), license_arn=LICENSES[0]))])
        sender.tick()
        [record] = spool.list_records()
        spool.close()
        return record, aws.saas_usage()


def test_after_0600_on_the_first_last_months_usage_is_carried_into_the_new_month(tmp_path: Path) -> None:
    record, [billed] = late_march_usage_sent_at(datetime(2026, 4, 1, 6, 10, tzinfo=UTC), tmp_path)
    assert record.hour == datetime(2026, 4, 1, tzinfo=UTC).timestamp()  # the new month's first hour
    assert record.state == SENT and record.carried_hours == [int(datetime(2026, 3, 31, 23, tzinfo=UTC).timestamp())]
    assert billed["Hour"].startswith("2026-04-01T00:00") and Decimal(billed["Quantity"]) == 9


def test_before_0600_on_the_first_last_months_usage_keeps_its_own_hour(tmp_path: Path) -> None:
    record, [billed] = late_march_usage_sent_at(datetime(2026, 4, 1, 4, 0, tzinfo=UTC), tmp_path)
    assert record.hour == datetime(2026, 3, 31, 23, tzinfo=UTC).timestamp() and record.state == SENT
    assert billed["Hour"].startswith("2026-03-31T23:00")


def test_legacy_customer_identifiers_go_out_with_the_product_code(rig: Rig) -> None:
    rig.aws.subscribe_legacy(customer_identifier="cust-legacy-1", product_code=PRODUCTS[1])
    when = last_hour(rig)
    rig.record(saas_event("legacy", when, 6, identifier="cust-legacy-1", product=PRODUCTS[1]))
    rig.tick()
    [record] = rig.spool.list_records()
    assert record.state == SENT and record.customer_identifier == "cust-legacy-1"
    assert rig.billed() == {("cust-legacy-1", "", "requests"): Decimal(6)}


def test_container_and_saas_usage_of_one_pass_go_out_each_their_way(rig: Rig) -> None:
    when = last_hour(rig)
    rig.record(
        event("c-1", when, 2, product="prod-c"),
        saas_event("s-1", when, 2, account=account(3), license_arn=LICENSES[0]),
    )
    rig.tick()
    assert {r.state for r in rig.spool.list_records()} == {SENT}
    assert [(r.product_code, r.usage_dimension) for r in rig.aws.records()] == [("prod-c", "requests")]
    assert rig.billed() == {(account(3), LICENSES[0], "requests"): Decimal(2)}


def test_events_of_one_license_with_and_without_the_product_hint_share_one_record(rig: Rig) -> None:
    """AWS keeps one record per license's customer, dimension and hour, so the spool does
    too: two records would meet in AWS's one slot, and the second be taken as the first."""
    when = last_hour(rig)
    rig.record(
        saas_event("hinted", when, 4, account=account(6), license_arn=LICENSES[0], product=PRODUCTS[0]),
        saas_event("bare", when + 60, 4, account=account(6), license_arn=LICENSES[0]),
    )
    rig.tick()
    [record] = rig.spool.list_records()
    assert record.state == SENT and record.product_code == "" and record.quantity == "8"
    assert rig.billed() == {(account(6), LICENSES[0], "requests"): Decimal(8)}


def test_the_product_hint_packs_many_licenses_of_one_product_into_one_call(rig: Rig) -> None:
    """Each customer with a license of its own, as AWS gives them: the product the events
    name puts 25 of them in a call; without it, each license would be a call."""
    when = last_hour(rig)
    own = [f"arn:aws:license-manager::123456789012:license:l-{i:032x}" for i in range(30)]
    for i, license_arn in enumerate(own):
        rig.aws.subscribe(customer_aws_account_id=account(i), license_arn=license_arn, product_code=PRODUCTS[1])
    rig.record(
        *(saas_event(f"o-{i}", when, 1, account=account(i), license_arn=own[i], product=PRODUCTS[1]) for i in range(30))
    )
    rig.tick()
    assert sorted(len(call) for call in rig.calls) == [5, 25]
    assert {r.state for r in rig.spool.list_records()} == {SENT}


def test_resends_of_unprocessed_records_each_take_a_rate_limit_token(rig: Rig) -> None:
    taken: list[float] = []
    original = rig.sender.limiter.acquire

    def counted(sleep: Any) -> None:
        taken.append(rig.clock())
        original(sleep)

    rig.sender.limiter.acquire = counted  # type: ignore[method-assign]
    rig.sender.backend.policy = RetryPolicy(4, 0.01, 0.02)  # room for resends within the call
    rig.record(
        *(saas_event(f"r-{i}", last_hour(rig), 1, account=account(i), license_arn=LICENSES[0]) for i in range(8))
    )
    rig.aws.inject(UNPROCESSED, 2, operation="BatchMeterUsage")
    rig.tick()
    assert len(rig.calls) == 3 and len(taken) == 3  # the call and its two resends: a token each


def test_a_refusal_of_the_whole_call_is_not_split_when_no_one_record_can_cause_it(rig: Rig) -> None:
    """An unknown legacy product code is the call's: splitting would only multiply calls."""
    when = last_hour(rig)
    for i in range(6):
        rig.aws.subscribe_legacy(customer_identifier=f"legacy-{i}", product_code=PRODUCTS[1])
    rig.record(*(saas_event(f"p-{i}", when, 1, identifier=f"legacy-{i}", product=PRODUCTS[1]) for i in range(6)))
    rig.aws.inject("InvalidProductCodeException", 1, operation="BatchMeterUsage")
    rig.tick()
    assert len(rig.calls) == 1
    failed = rig.spool.list_records(state=FAILED)
    assert len(failed) == 6 and all(r.last_error.startswith("INVALID_PRODUCT_CODE") for r in failed)


def test_usage_too_large_for_one_request_is_split_over_records_each_under_aws_1_mb(rig: Rig) -> None:
    """Many long tag sets of one customer's hour: AWS takes under 1 MB a request, so the
    usage goes into as many records (and calls) as it needs, never one AWS refuses."""
    when = last_hour(rig)

    def tags(i: int) -> dict[str, str]:
        return {f"k{n}{'x' * 97}": f"{i:06d}{'v' * 250}" for n in range(5)}

    events = [
        saas_event(f"big-{i}", when, 1, account=account(7), license_arn=LICENSES[0], **tags(i)) for i in range(300)
    ]
    for chunk in range(0, 300, 100):
        rig.record(*events[chunk : chunk + 100])
    for _ in range(8):
        rig.tick(HOUR)
    records = rig.spool.list_records()
    assert len(records) >= 3 and {r.state for r in records} == {SENT}
    assert all(len(call) <= 2 for call in rig.calls)
    assert rig.billed() == {(account(7), LICENSES[0], "requests"): Decimal(300)}
