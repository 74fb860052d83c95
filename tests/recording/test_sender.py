"""The sender on a simulated clock against AWS's rules in process (FakeAws): unknown
outcomes resent, never carried; failures isolated per record; the rate limiter;
the lead checked before every record."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.domain import errors
from gateway.observability import metrics
from gateway.recording.placement import HOUR
from gateway.recording.sender import Sender
from gateway.recording.servicer import event_row
from gateway.recording.spool import FAILED, SENT, Carry, SpoolUnavailable
from gateway.recording.spool.sqlite import SqliteSpool as Spool
from support.metrics import uninstall
from support.recording import BARE_503, BARE_507, ISE, ISE_AFTER_RECORD, RETENTION, FakeAws, event, sums_of_records

NOW = 1_750_000_000.0


def sender_on_fake_aws() -> tuple[list[float], FakeAws, Spool, Sender]:
    """A sender sending at once (no grace), on a fake clock, to AWS's rules in process."""
    clock = [float(NOW)]
    aws = FakeAws(lambda: clock[0])
    spool = Spool(":memory:")
    sender = Sender(
        spool, aws, interval=60, grace=0, max_rps=1e9, now=lambda: clock[0], sleep=lambda _: None, **RETENTION
    )  # type: ignore[arg-type]
    return clock, aws, spool, sender


def test_a_lost_reply_then_an_outage_past_six_hours_never_bills_twice() -> None:
    clock, aws, spool, sender = sender_on_fake_aws()
    spool.record([event_row(event("lost-1", clock[0] - HOUR, 7))])
    aws.lose_replies = 1
    sender.tick()  # AWS records 7 for the last hour; the gateway hears nothing
    assert sums_of_records(aws.ours()) == {("prod-a", "requests"): 7}
    aws.down = BARE_503
    for _ in range(7 * 6):  # seven hours of 503s (which rule a record out), then AWS is back
        clock[0] += 10 * 60
        sender.tick()
    aws.down = None
    for _ in range(6):
        clock[0] += 20 * 60
        sender.tick()
    assert sums_of_records(aws.ours()) == {("prod-a", "requests"): 7}, "the usage was carried and billed twice"
    [record] = spool.list_records(state=FAILED)
    assert record.last_error.startswith("outcome unknown") and record.client_token in record.last_error


def test_an_unknown_outcome_is_resent_until_the_window_really_closes() -> None:
    """Not carried at the 30-minute safety margin: resent identically while AWS would still take it."""
    clock, aws, spool, sender = sender_on_fake_aws()
    spool.record([event_row(event("late-ok", clock[0] - HOUR, 4))])
    aws.down = ISE_AFTER_RECORD  # recorded, then a 500: unknown
    sender.tick()
    aws.down = ISE  # more 500s, recording nothing
    [record] = spool.list_records()
    clock[0] = record.hour + 5 * HOUR + 45 * 60  # past the 30-minute margin, still inside AWS's window
    sender.tick()
    [record] = spool.list_records()
    assert record.state == "PENDING" and record.attempts == 2 and not record.carried_hours
    assert record.last_error.startswith("outcome unknown, resending identically: INTERNAL_SERVICE_ERROR")
    aws.down = None
    clock[0] += 5 * 60
    sender.tick()  # the identical resend settles it: AWS answers with the record it holds
    [record] = spool.list_records()
    assert (
        record.state == "SENT" and len(aws.ours()) == 1 and sums_of_records(aws.ours()) == {("prod-a", "requests"): 4}
    )


def test_sending_continues_past_a_record_that_fails_unexpectedly() -> None:
    clock, aws, spool, sender = sender_on_fake_aws()
    spool.record([event_row(event(f"iso-{p}", clock[0] - HOUR, 1, product=p)) for p in ("prod-a", "prod-b")])
    original = aws.meter_usage

    def broken_for_a(params: dict, **kw: object) -> object:
        if params["ProductCode"] == "prod-a":
            raise RuntimeError("a bug in one record's path")
        return original(params, **kw)  # type: ignore[arg-type]

    aws.meter_usage = broken_for_a  # type: ignore[method-assign]
    sender.tick()
    assert [r.product_code for r in aws.ours()] == ["prod-b"]


@pytest.mark.parametrize(("max_rps", "records"), [(10.0, 200), (1.0, 30), (0.5, 12)])
def test_the_sender_calls_aws_at_most_max_rps_a_second(max_rps: float, records: int) -> None:
    """``--aws-max-rps`` measured on the sender's own clock (its sleeps move it): after a
    burst of at most max(1, rate) calls, never more than the rate allows in any stretch
    of time, and no slower than it allows either."""
    clock = [float(NOW)]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    aws = FakeAws(lambda: clock[0])
    called: list[float] = []
    original = aws.meter_usage

    def timed(params: dict[str, Any], **kw: Any) -> Any:
        called.append(clock[0])
        return original(params, **kw)

    aws.meter_usage = timed  # type: ignore[method-assign]
    spool = Spool(":memory:")
    sender = Sender(
        spool,
        aws,
        interval=60,
        grace=0,
        max_rps=max_rps,
        now=lambda: clock[0],
        sleep=sleep,
        **RETENTION,  # type: ignore[arg-type]
        monotonic=lambda: clock[0],
    )
    spool.record([event_row(event(f"r{i}", NOW - HOUR, 1, dimension=f"d{i}")) for i in range(records)])
    assert sender.tick().sent == records
    burst = max(1.0, max_rps)
    assert len(called) == records
    for i in range(records):  # any stretch [called[i], called[j]] holds at most burst + rate * its length
        for j in range(i, records):
            assert j - i + 1 <= burst + max_rps * (called[j] - called[i]) + 1e-6, (i, j, called[i], called[j])
    assert called[-1] - called[0] == pytest.approx((records - burst) / max_rps, rel=0.02)


def test_the_rate_limiter_token_is_taken_before_a_record_is_marked_in_flight() -> None:
    clock, aws, spool, sender = sender_on_fake_aws()
    spool.record([event_row(event("rl", clock[0] - HOUR, 1))])
    seen: list[int] = []

    def sleep(_: float) -> None:  # called while waiting for a token
        seen.extend(r.in_flight for r in spool.list_records())
        raise KeyboardInterrupt  # the process dies while waiting

    sender.limiter = __import__("gateway.aws.ratelimit", fromlist=["RateLimiter"]).RateLimiter(1e-9)
    sender.limiter.allow()  # the one token is gone
    sender._sleep = sleep
    try:
        sender.tick()
    except KeyboardInterrupt:
        pass
    assert seen == [0]
    assert not spool.list_records()[0].outcome_unknown


def test_a_lost_reply_settled_by_the_resend_is_sent_once() -> None:
    clock, aws, spool, sender = sender_on_fake_aws()
    spool.record([event_row(event("lost-2", clock[0] - HOUR, 5))])
    aws.lose_replies = 1
    sender.tick()
    clock[0] += 10 * 60
    sender.tick()  # the identical resend: AWS answers with the same record id
    [record] = spool.list_records()
    assert record.state == SENT and record.metering_record_id == aws.ours()[0].metering_record_id
    assert len(aws.ours()) == 1


def test_an_unknown_outcome_is_resent_whatever_its_status_code() -> None:
    """A 5xx no row names (507) is not retryable for a caller, but only the identical
    resend can settle what it left unknown: the record is resent, never failed at once."""
    clock, aws, spool, sender = sender_on_fake_aws()
    spool.record([event_row(event("s507", clock[0] - HOUR, 6))])
    aws.down = BARE_507
    sender.tick()
    [record] = spool.list_records()
    assert record.state == "PENDING" and record.outcome_unknown
    assert record.last_error.startswith("outcome unknown, resending identically: HTTP_507")
    aws.down = None
    clock[0] += 10 * 60
    sender.tick()
    [record] = spool.list_records()
    assert record.state == "SENT" and sums_of_records(aws.ours()) == {("prod-a", "requests"): 6}


def test_an_hour_taken_by_someone_else_settles_an_unknown_outcome_and_the_usage_is_carried() -> None:
    """DUPLICATE_REQUEST to the identical resend: AWS holds no record of this request,
    so the usage is carried and billed, not left FAILED for reconciliation."""
    clock, aws, spool, sender = sender_on_fake_aws()
    spool.record([event_row(event("dup", clock[0] - HOUR, 9))])
    aws.down = ISE  # nothing recorded, outcome unknown
    sender.tick()
    [record] = spool.list_records()
    assert record.outcome_unknown
    aws.down = None
    aws.take_hour("prod-a", "requests", record.hour)  # another life of the pod metered that hour
    for _ in range(4):
        clock[0] += 20 * 60
        sender.tick()
    assert not spool.list_records(state=FAILED)
    assert sums_of_records(aws.ours()) == {("prod-a", "requests"): 9}
    [sent] = spool.list_records(state=SENT)
    assert sent.carried_hours == [record.hour]


def test_a_refusal_after_an_unknown_outcome_fails_for_reconciliation() -> None:
    clock, aws, spool, sender = sender_on_fake_aws()
    spool.record([event_row(event("nr", clock[0] - HOUR, 2))])
    aws.down = ISE_AFTER_RECORD
    sender.tick()
    aws.down = None
    aws.state.products = {}  # the product is gone: AWS refuses the identical resend
    clock[0] += 10 * 60
    sender.tick()
    [record] = spool.list_records(state=FAILED)
    assert record.last_error.startswith("outcome unknown after 2 attempt(s), then refused: INVALID_PRODUCT_CODE")
    assert record.client_token in record.last_error and aws.holds(record.client_token)


def test_a_sender_that_loses_the_lead_mid_pass_stops_sending() -> None:
    """A pass can outlast the lead (a rate limit, slow answers): the lead is checked
    before every record, so a former leader never sends beside its successor."""
    clock, aws, spool, sender = sender_on_fake_aws()
    spool.record([event_row(event(f"lead-{p}", clock[0] - HOUR, 1, product=p)) for p in ("prod-a", "prod-b", "prod-c")])
    answers = iter([True, True, False])  # the pass may start; the first record goes; then the lead is gone
    spool.leads = lambda: next(answers, False)  # type: ignore[method-assign]
    sender.tick()
    assert len(aws.ours()) == 1 and [r.attempts for r in spool.list_records()].count(0) == 2


def not_entitled_once(aws: FakeAws) -> None:
    """AWS refuses the next call as CUSTOMER_NOT_ENTITLED (the buyer's subscription lapsed)."""
    original = aws.meter_usage

    def refuse(params: dict, **kw: object) -> object:
        aws.meter_usage = original  # type: ignore[method-assign]  # then fixed
        raise errors.from_aws("CustomerNotEntitledException", "not entitled", "req-x", http_status=400)

    aws.meter_usage = refuse  # type: ignore[method-assign]


def test_a_retried_record_is_resent_identically_inside_the_window() -> None:
    clock, aws, spool, sender = sender_on_fake_aws()
    spool.record([event_row(event("ne", clock[0] - HOUR, 4))])
    not_entitled_once(aws)
    sender.tick()
    [failed] = spool.list_records(state=FAILED)
    clock[0] += 30 * 60
    spool.retry_failed(failed.id, reconciled=False, now=clock[0])
    sender.tick()
    [sent] = spool.list_records(state=SENT)
    assert (sent.id, sent.client_token, sent.hour, sent.attempts) == (failed.id, failed.client_token, failed.hour, 2)
    assert aws.holds(failed.client_token) and sums_of_records(aws.ours()) == {("prod-a", "requests"): 4}


def test_a_retried_record_whose_hour_left_the_window_is_carried() -> None:
    """Fixed a day later: AWS no longer takes the record's hour, so its usage goes to the
    next hour AWS takes, under a new ClientToken (AWS never held the old one)."""
    clock, aws, spool, sender = sender_on_fake_aws()
    spool.record([event_row(event("late-fix", clock[0] - HOUR, 5))])
    not_entitled_once(aws)
    sender.tick()
    [failed] = spool.list_records(state=FAILED)
    clock[0] += 24 * HOUR
    spool.retry_failed(failed.id, reconciled=False, now=clock[0])
    sender.tick()  # carried
    sender.tick()  # the new record is due in the same pass or the next
    assert not spool.list_records(state=FAILED)
    [sent] = spool.list_records(state=SENT)
    assert sent.carried_hours == [failed.hour] and sent.client_token != failed.client_token
    assert sums_of_records(aws.ours()) == {("prod-a", "requests"): 5} and not aws.holds(failed.client_token)


def test_a_reconciled_unknown_outcome_past_the_window_is_carried_once() -> None:
    """AWS answered 500 and held nothing; the resend was refused; the operator found no
    record in AWS's reports and retried it reconciled: its usage is billed once."""
    clock, aws, spool, sender = sender_on_fake_aws()
    spool.record([event_row(event("rec", clock[0] - HOUR, 6))])
    aws.down = ISE
    sender.tick()
    aws.down = None
    not_entitled_once(aws)
    clock[0] += 10 * 60
    sender.tick()
    [failed] = spool.list_records(state=FAILED)
    assert failed.outcome_unknown and failed.last_error.startswith("outcome unknown")
    clock[0] += 12 * HOUR
    spool.retry_failed(failed.id, reconciled=True, now=clock[0])
    sender.tick()
    sender.tick()
    [sent] = spool.list_records(state=SENT)
    assert sent.carried_hours == [failed.hour] and not spool.list_records(state=FAILED)
    assert sums_of_records(aws.ours()) == {("prod-a", "requests"): 6} and len(aws.ours()) == 1


def counted(registry: object, name: str) -> float:
    """A counter's total over its labels, read in this process."""
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == name)  # type: ignore[attr-defined]


def overtaken_sender(event_id: str, quantity: int, answer: Any) -> tuple[Any, Any, Sender]:
    """A sender whose AWS call is overtaken: inside it, a successor (a new leader) sends
    the same record first; ``answer(original, params, kw)`` then answers the first call."""
    clock, aws, spool, sender = sender_on_fake_aws()
    successor = Sender(
        spool, aws, interval=60, grace=0, max_rps=1e9, now=lambda: clock[0], sleep=lambda _: None, **RETENTION
    )  # type: ignore[arg-type]
    spool.record([event_row(event(event_id, clock[0] - HOUR, quantity))])
    original = aws.meter_usage

    def overtaken(params: dict, **kw: object) -> object:
        aws.meter_usage = original  # type: ignore[method-assign]
        successor.tick()  # resends the record in flight and stores its outcome first
        return answer(original, params, kw)

    aws.meter_usage = overtaken  # type: ignore[method-assign]
    return aws, spool, sender


def test_two_senders_hearing_one_ok_count_it_once() -> None:
    aws, spool, sender = overtaken_sender("twice", 3, lambda original, params, kw: original(params, **kw))
    registry = metrics.install()
    try:
        sender.tick()
        assert counted(registry, "metering_gateway_records_sent_total") == 1
        assert counted(registry, "metering_gateway_usage_metered_quantity_total") == 3
    finally:
        uninstall()
    [record] = spool.list_records(state=SENT)
    assert record.attempts == 2 and len(aws.ours()) == 1


def test_a_late_refusal_of_a_record_sent_meanwhile_is_not_counted_as_failed() -> None:
    def refuse(original: Any, params: dict, kw: dict) -> object:
        raise errors.from_aws("CustomerNotEntitledException", "not entitled", "req-x", http_status=400)

    _, spool, sender = overtaken_sender("late-no", 2, refuse)
    registry = metrics.install()
    try:
        sender.tick()
        assert counted(registry, "metering_gateway_records_sent_total") == 1
        assert counted(registry, "metering_gateway_records_failed_total") == 0
    finally:
        uninstall()
    assert [r.state for r in spool.list_records()] == [SENT]


def test_a_tick_failing_before_the_lead_is_known_clears_the_leader_gauge() -> None:
    clock, aws, spool, sender = sender_on_fake_aws()
    registry = metrics.install()
    try:
        sender.tick()
        assert counted(registry, "metering_gateway_sender_leader") == 1

        def unavailable(now: float, margin: float = 0.0) -> list[Carry]:
            raise SpoolUnavailable("disk I/O error")

        spool.assign = unavailable  # type: ignore[method-assign]
        with pytest.raises(SpoolUnavailable):
            sender.tick()
        assert counted(registry, "metering_gateway_sender_leader") == 0, "a stale 1 while no tick can run"
    finally:
        uninstall()


# --- Zero-usage hours -----------------------------------------------------------------


def sender_for(spool: Spool, aws: FakeAws, clock: list[float], **options: Any) -> Sender:
    """A sender sending at once (no grace) on ``clock``, with the Sender ``options`` of a test."""
    return Sender(
        spool,
        aws,  # type: ignore[arg-type]
        interval=60,
        grace=0,
        max_rps=1e9,
        now=lambda: clock[0],
        sleep=lambda _: None,
        **RETENTION,  # type: ignore[arg-type]
        **options,
    )


def zero_hour_sender(path: str, clock: list[float], aws: FakeAws) -> Sender:
    return sender_for(Spool(path), aws, clock, zero_hours={"prod-a": {"requests", "storage"}})


def test_each_closed_hour_without_usage_is_metered_as_zero_once_across_restarts(tmp_path: Any) -> None:
    hour = int(NOW) - int(NOW) % HOUR
    clock = [float(hour + 10 * 60)]
    aws = FakeAws(lambda: clock[0])
    sender = zero_hour_sender(str(tmp_path / "spool.db"), clock, aws)
    sender.spool.record([event_row(event("used", clock[0], 5))])  # this hour has usage for requests
    sender.tick()
    clock[0] = hour + HOUR - 1  # the last second of the hour: nothing may go out for it yet
    sender.tick()
    assert aws.ours() == []
    clock[0] = hour + HOUR + 30
    sender.tick()
    sent = sorted((r.usage_dimension, r.hour.timestamp(), r.quantity) for r in aws.ours())
    assert sent == [("requests", hour, 5), ("storage", hour, 0)]
    sender.spool.close()
    clock[0] = hour + 3 * HOUR + 30  # a restart two hours later, on the same spool
    sender = zero_hour_sender(str(tmp_path / "spool.db"), clock, aws)
    sender.tick()
    sender.tick()
    sent = sorted((r.usage_dimension, int(r.hour.timestamp()) - hour, str(r.quantity)) for r in aws.ours())
    assert sent == [
        ("requests", 0, "5"),
        ("requests", HOUR, "0"),
        ("requests", 2 * HOUR, "0"),
        ("storage", 0, "0"),
        ("storage", HOUR, "0"),
        ("storage", 2 * HOUR, "0"),
    ]
    assert aws.refusals == {}, "a zero record was refused (sent twice, or for a taken hour)"


def test_late_usage_after_a_zero_went_out_is_carried_not_lost() -> None:
    clock, aws, spool, _ = sender_on_fake_aws()
    hour = int(NOW) - int(NOW) % HOUR
    clock[0] = hour + 10 * 60
    sender = sender_for(spool, aws, clock, zero_hours={"prod-a": {"requests"}})
    sender.tick()
    clock[0] = hour + HOUR + 30
    sender.tick()  # the zero for `hour` goes out
    spool.record([event_row(event("late", hour + 59 * 60, 7))])  # then usage of that hour arrives
    clock[0] = hour + 2 * HOUR + 30
    sender.tick()
    sent = sorted((int(r.hour.timestamp()) - hour, str(r.quantity)) for r in aws.ours())
    assert sent == [(0, "0"), (HOUR, "7")]
    (carried,) = [r for r in spool.list_records() if r.quantity == "7"]
    assert carried.carried_hours == [hour]


# --- AgentCore Runtime mode: a record per flush interval ------------------------------


def test_agentcore_usage_goes_out_every_interval_each_record_with_its_own_token() -> None:
    clock = [float(NOW)]
    aws = FakeAws(lambda: clock[0])
    aws.state.agentcore = True
    spool = Spool(":memory:", span=60)
    sender = sender_for(spool, aws, clock, agentcore=True)
    start = int(NOW) - int(NOW) % 60
    for minute in range(3):
        spool.record([event_row(event(f"m{minute}-{i}", start + 60 * minute + i, 2), span=60) for i in range(3)])
    # Usage too old for its own minute (5h50m ago) goes out with the open one, not carried pass after pass.
    spool.record([event_row(event("old", start - 5 * HOUR - 50 * 60, 5), span=60)])
    clock[0] = start + 2 * 60 + 30  # minutes 0 and 1 closed, minute 2 open
    sender.tick()
    assert sorted((int(r.timestamp.timestamp()) - start, r.quantity) for r in aws.ours()) == [(0, 6), (60, 6)]
    clock[0] = start + 3 * 60 + 1
    sender.tick()
    sent = sorted((int(r.timestamp.timestamp()) - start, r.quantity) for r in aws.ours())
    assert sent == [(0, 6), (60, 6), (120, 11)]  # the old usage joined the then open minute
    assert len({r.client_token for r in aws.ours()}) == 3
    assert {r.client_token for r in aws.ours()} == {r.client_token for r in spool.list_records(state=SENT)}
    assert aws.refusals == {}


def test_zero_hours_are_looked_for_once_an_hour_not_every_pass() -> None:
    """Only a closing hour can need a zero: the passes between ask the spool nothing (no write)."""
    clock, aws, spool, _ = sender_on_fake_aws()
    sender = sender_for(spool, aws, clock, zero_hours={"prod-a": {"requests"}})
    calls: list[float] = []
    fill = spool.fill_zero_hours

    def counted(keys: Any, now: float, margin: float = 0) -> Any:
        calls.append(now)
        return fill(keys, now, margin)

    spool.fill_zero_hours = counted  # type: ignore[method-assign]
    hour = int(NOW) - int(NOW) % HOUR
    for minute in range(0, 120, 5):  # two hours of passes every 5 minutes
        clock[0] = hour + minute * 60
        sender.tick()
    assert [int(c) - hour for c in calls] == [0, HOUR]
    assert [(int(r.hour.timestamp()) - hour, r.quantity) for r in aws.ours()] == [(0, 0)]
