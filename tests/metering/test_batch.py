"""batch_meter's resend loop (gateway/metering/batch.py), with a fake backend and a fake clock:
unprocessed records are sent again exactly as they were, after a backoff, while the deadline
leaves time; the rest come back unprocessed; nothing invalid reaches the backend."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.aws import params
from gateway.aws.backend import BatchOutcome, RecordResult, RetryPolicy
from gateway.domain import errors, validation
from gateway.metering import batch
from marketplace.metering.v1 import metering_pb2 as pb
from support import allocation

NOW = datetime(2026, 11, 23, 10, 2, 30, tzinfo=UTC)
WINDOW = validation.Window.for_saas(NOW)
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef0"


@dataclass(frozen=True)
class FixedPolicy(RetryPolicy):
    """Backoff without jitter, so that a test knows each pause."""

    def delay(self, attempt: int, rand: Any = None) -> float:
        return self.hint(attempt)


POLICY = FixedPolicy(max_attempts=4, base=0.1, cap=0.4)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


# An answer: the indices (into the call's records) AWS left unprocessed, or an error to raise.
Answer = tuple[int, ...] | errors.GatewayError


class FakeBackend:
    """Answers each call with the next scripted answer (the last one repeats); every call takes
    ``latency`` seconds of the fake clock. Records what it was sent and whether the guard was held."""

    def __init__(self, clock: FakeClock, *answers: Answer, latency: float = 0.01) -> None:
        self.policy = POLICY
        self.clock = clock
        self.answers = list(answers) or [()]
        self.latency = latency
        self.sent: list[params.BatchMeterUsageParams] = []
        self.started: list[float] = []
        self.deadlines: list[float | None] = []
        self.guarded: list[bool] = []
        self.held = False

    def batch_meter_usage(self, aws: params.BatchMeterUsageParams, *, deadline: float | None = None) -> BatchOutcome:
        self.sent.append(aws)
        self.started.append(self.clock())
        self.deadlines.append(deadline)
        self.guarded.append(self.held)
        self.clock.now += self.latency
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, errors.GatewayError):
            raise answer
        n = len(aws["UsageRecords"])
        unprocessed = tuple(i for i in answer if i < n)
        results = tuple(
            RecordResult(i, "Success", f"id-{aws['UsageRecords'][i]['Dimension']}")
            for i in range(n)
            if i not in unprocessed
        )
        return BatchOutcome(results, unprocessed, attempts=1, aws_request_id=f"rid-{len(self.sent)}")


def record(dimension: str, quantity: str = "1") -> pb.UsageRecord:
    msg = pb.UsageRecord(
        customer_aws_account_id="111122223333", license_arn=LICENSE, dimension=dimension, quantity_as_decimal=quantity
    )
    msg.timestamp.FromDatetime(NOW)
    return msg


def request(n: int = 4) -> pb.BatchMeterUsageRequest:
    return pb.BatchMeterUsageRequest(usage_records=[record(f"d{i}", f"{i}.5") for i in range(n)])


def run(backend: FakeBackend, req: pb.BatchMeterUsageRequest, deadline: float | None, **kw: Any) -> batch.BatchResult:
    return batch.batch_meter(
        backend,  # type: ignore[arg-type]  # the fake has what batch_meter uses
        req,
        WINDOW,
        deadline=deadline,
        clock=backend.clock,
        sleep=backend.clock.sleep,
        **kw,
    )


def test_all_processed_is_one_call() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock, ())
    result = run(backend, request(), clock() + 10)
    assert [r.index for r in result.results] == [0, 1, 2, 3] and result.unprocessed == ()
    assert (result.calls, result.attempts, result.aws_request_id) == (1, 1, "rid-1")
    assert backend.sent == [params.batch_to_aws(request())] and clock.sleeps == []


def test_unprocessed_records_are_resent_exactly_as_they_were() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock, (2, 3), ())
    req = request()
    result = run(backend, req, clock() + 10)
    first, second = backend.sent
    assert "ProductCode" not in first  # the license names the product
    assert second == {**first, "UsageRecords": first["UsageRecords"][2:]}  # the same records, the same values
    assert second["UsageRecords"] == params.batch_to_aws(req)["UsageRecords"][2:]
    # Each result points at its record in the caller's request, not in the resend.
    assert [(r.index, r.metering_record_id) for r in result.results] == [(i, f"id-d{i}") for i in range(4)]
    assert result.unprocessed == () and (result.calls, result.attempts, result.aws_request_id) == (2, 2, "rid-2")
    assert clock.sleeps == [POLICY.hint(1)]


def test_a_legacy_resend_keeps_the_product_code() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock, (1,), ())
    req = pb.BatchMeterUsageRequest(product_code="prod-abc123")
    for i in range(2):
        r = req.usage_records.add(customer_identifier=f"cust-{i}", dimension="requests", quantity_as_decimal="1")
        r.timestamp.FromDatetime(NOW)
    run(backend, req, clock() + 10)
    assert [s.get("ProductCode") for s in backend.sent] == ["prod-abc123", "prod-abc123"]
    assert backend.sent[1]["UsageRecords"] == [backend.sent[0]["UsageRecords"][1]]


def test_resends_back_off_and_stop_before_the_deadline() -> None:
    """4 → 2 → 1 → 1 …: the last record never gets through; the loop starts no resend that
    the deadline cannot hold, and hands that record back."""
    clock = FakeClock()
    backend = FakeBackend(clock, (2, 3), (1,), (0,))
    deadline = clock() + 1.0
    result = run(backend, request(), deadline)
    assert [r.index for r in result.results] == [0, 1, 2] and result.unprocessed == (3,)
    assert all(started < deadline for started in backend.started)
    assert backend.deadlines == [deadline] * len(backend.sent)  # the backend's own retries keep to it too
    assert clock.sleeps == [POLICY.hint(n) for n in range(1, len(clock.sleeps) + 1)]  # 0.1, 0.2, 0.4, 0.4, ...
    assert deadline - backend.started[-1] >= batch.MIN_RESEND_SECONDS
    # The next pause would have left less than MIN_RESEND_SECONDS: that is why it stopped.
    assert deadline - clock() - POLICY.delay(result.calls) < batch.MIN_RESEND_SECONDS
    assert result.calls == len(backend.sent) >= 3


def test_no_time_for_a_resend_returns_at_once() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock, (3,), latency=0.0)
    result = run(backend, request(), clock() + POLICY.hint(1) + batch.MIN_RESEND_SECONDS / 2)
    assert (result.calls, result.unprocessed, clock.sleeps) == (1, (3,), [])


def test_without_a_deadline_resends_are_bounded_by_the_attempts() -> None:
    """A caller with no deadline gets at most max_attempts calls, never an endless loop."""
    clock = FakeClock()
    backend = FakeBackend(clock, (0,))  # the first record, every time
    result = run(backend, request(2), None)
    assert result.calls == len(backend.sent) == POLICY.max_attempts
    assert [r.index for r in result.results] == [1] and result.unprocessed == (0,)


def test_a_failed_resend_leaves_what_aws_answered() -> None:
    clock = FakeClock()
    throttled = errors.from_aws("ThrottlingException", "Rate exceeded", "rid-x", retry_delay=0.1)
    backend = FakeBackend(clock, (2, 3), throttled)
    result = run(backend, request(), clock() + 10)
    assert [r.index for r in result.results] == [0, 1] and result.unprocessed == (2, 3)
    assert (result.calls, result.aws_request_id) == (1, "rid-1")


def test_a_refused_first_call_is_the_callers_error() -> None:
    clock = FakeClock()
    refused = errors.from_aws("InvalidLicenseException", "no such license", "rid-y")
    backend = FakeBackend(clock, refused)
    with pytest.raises(errors.GatewayError) as caught:
        run(backend, request(), clock() + 10)
    assert caught.value is refused and len(backend.sent) == 1


def test_the_guard_is_held_around_every_call_and_only_then() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock, (1,), ())
    entered: list[float] = []

    @contextmanager
    def guard() -> Iterator[None]:
        entered.append(clock())
        backend.held = True
        try:
            yield
        finally:
            backend.held = False

    run(backend, request(2), clock() + 10, guard=guard)
    assert backend.guarded == [True, True] and len(entered) == 2 and not backend.held


def test_a_guard_that_refuses_refuses_the_call() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock, ())

    @contextmanager
    def full() -> Iterator[None]:
        raise errors.GatewayError(errors.Reason.CONCURRENCY_LIMIT_EXCEEDED, "busy", retry_delay=0.5)
        yield  # pragma: no cover

    with pytest.raises(errors.GatewayError) as caught:
        run(backend, request(), clock() + 10, guard=full)
    assert caught.value.reason == errors.Reason.CONCURRENCY_LIMIT_EXCEEDED and backend.sent == []


def test_invalid_input_never_reaches_the_backend() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock, ())
    req = request(2)
    req.usage_records[1].license_arn = ""
    with pytest.raises(errors.GatewayError) as caught:
        run(backend, req, clock() + 10, what="hourly SaaS records")
    err = caught.value
    assert err.reason == errors.Reason.INVALID_REQUEST and "hourly SaaS records" in err.message
    assert [v.field for v in err.violations] == ["usage_records[1].license_arn"] and backend.sent == []


def test_a_body_of_1_mb_is_refused_before_the_backend() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock, ())
    tags = {f"k{k}": "v" * 250 for k in range(4)}
    big = pb.BatchMeterUsageRequest(
        usage_records=[
            pb.UsageRecord(
                customer_aws_account_id="111122223333",
                license_arn=LICENSE,
                dimension=f"d{i}",
                quantity_as_decimal="40",
                usage_allocations=[allocation("1", **tags, n=str(j)) for j in range(40)],
            )
            for i in range(25)
        ]
    )
    for r in big.usage_records:
        r.timestamp.FromDatetime(NOW)
    assert params.json_size(params.batch_to_aws(big)) >= validation.BATCH_BYTES_MAX
    with pytest.raises(errors.GatewayError) as caught:
        run(backend, big, clock() + 10)
    assert [v.field for v in caught.value.violations] == ["usage_records"] and backend.sent == []
    assert "1 MB" in caught.value.violations[0].description


def test_the_backends_policy_is_the_default() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock, (1,), ())
    backend.policy = FixedPolicy(max_attempts=2, base=0.3, cap=0.3)
    run(backend, request(2), clock() + 10)
    assert clock.sleeps == [0.3]
