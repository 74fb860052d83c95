"""The retry loop of backend.Backend, with a fake client and a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ProxyConnectionError,
    ReadTimeoutError,
    SSLError,
)

from gateway.aws.backend import Backend, RetryPolicy
from gateway.domain import errors


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeClient:
    """Answers with the scripted outcomes in order; records the params it got."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[dict[str, Any]] = []

    def meter_usage(self, **params: Any) -> dict[str, Any]:
        self.calls.append(params)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def aws_error(code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"RequestId": "rid"}}, "MeterUsage"
    )


OK = {"MeteringRecordId": "rec-1", "ResponseMetadata": {"RequestId": "rid-ok"}}


def backend(client: FakeClient, clock: FakeClock, attempts: int = 4) -> Backend:
    policy = RetryPolicy(max_attempts=attempts, base=0.1, cap=1.0)
    return Backend(client, policy, clock=clock, sleep=clock.sleep)


def test_success_first_time_generates_one_token() -> None:
    client, clock = FakeClient(OK), FakeClock()
    out = backend(client, clock).meter_usage({"ProductCode": "p"})
    assert (out.metering_record_id, out.attempts, out.aws_request_id) == ("rec-1", 1, "rid-ok")
    assert client.calls[0]["ClientToken"] == out.client_token and len(out.client_token) == 36


def test_retryable_errors_are_retried_with_the_same_token() -> None:
    client = FakeClient(
        aws_error("ThrottlingException"),
        EndpointConnectionError(endpoint_url="http://x"),
        aws_error("InternalServiceErrorException"),
        OK,
    )
    clock = FakeClock()
    out = backend(client, clock).meter_usage({"ProductCode": "p"})
    assert out.attempts == 4 and len({c["ClientToken"] for c in client.calls}) == 1
    assert len(clock.sleeps) == 3 and all(0 <= s <= 1.0 for s in clock.sleeps)


def test_non_retryable_errors_are_not_retried() -> None:
    client = FakeClient(aws_error("DuplicateRequestException"))
    with pytest.raises(errors.GatewayError) as caught:
        backend(client, FakeClock()).meter_usage({})
    assert caught.value.reason == "DUPLICATE_REQUEST" and len(client.calls) == 1
    assert caught.value.aws_attempts == 1


def test_attempts_are_capped_and_the_last_error_is_reported() -> None:
    client = FakeClient(*[aws_error("ThrottlingException")] * 3)
    with pytest.raises(errors.GatewayError) as caught:
        backend(client, FakeClock(), attempts=3).meter_usage({})
    assert caught.value.reason == "THROTTLING" and caught.value.retry_delay is not None and len(client.calls) == 3
    assert caught.value.aws_attempts == 3  # the caller is told not to retry on top (pushback)


def test_no_sleep_or_attempt_past_the_deadline() -> None:
    client = FakeClient(*[aws_error("ThrottlingException")] * 100)
    clock = FakeClock()
    with pytest.raises(errors.GatewayError) as caught:
        backend(client, clock, attempts=100).meter_usage({}, deadline=clock.now + 0.5)
    assert caught.value.reason == "THROTTLING"
    assert clock.now <= 100.5 and len(client.calls) >= 2
    assert caught.value.aws_attempts == len(client.calls)


def test_deadline_already_gone_means_no_call() -> None:
    client, clock = FakeClient(OK), FakeClock()
    with pytest.raises(errors.GatewayError) as caught:
        backend(client, clock).meter_usage({}, deadline=clock.now - 1)
    assert caught.value.code.name == "DEADLINE_EXCEEDED" and client.calls == []
    assert caught.value.aws_attempts == 0


def test_aws_attempts_count_only_calls_that_were_sent() -> None:
    # Credentials fail before signing: the second attempt sent nothing.
    client = FakeClient(aws_error("ThrottlingException"), NoCredentialsError())
    with pytest.raises(errors.GatewayError) as caught:
        backend(client, FakeClock()).meter_usage({})
    assert (caught.value.reason, caught.value.aws_attempts) == ("NO_CREDENTIALS", 1)
    unreachable = FakeClient(*[EndpointConnectionError(endpoint_url="http://x")] * 2)
    with pytest.raises(errors.GatewayError) as caught:
        backend(unreachable, FakeClock(), attempts=2).meter_usage({})
    assert (caught.value.reason, caught.value.aws_attempts) == ("AWS_UNREACHABLE", 2)


def test_dry_run_operation_is_success() -> None:
    out = backend(FakeClient(aws_error("DryRunOperation")), FakeClock()).meter_usage({"DryRun": True})
    assert out.dry_run and out.metering_record_id == ""
    assert out.aws_request_id == "rid"  # AWS's id for the dry run, from its DryRunOperation answer


def test_backoff_is_full_jitter_and_capped() -> None:
    policy = RetryPolicy(max_attempts=10, base=0.1, cap=1.0)
    assert [policy.delay(n, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert policy.delay(3, rand=lambda: 0.0) == 0.0


@pytest.mark.parametrize(
    ("failure", "maybe_recorded"),
    [
        (EndpointConnectionError(endpoint_url="http://x"), False),  # nothing listens: nothing was sent
        (ConnectTimeoutError(endpoint_url="http://x"), False),
        (ProxyConnectionError(proxy_url="http://proxy"), False),
        (ReadTimeoutError(endpoint_url="http://x"), True),  # sent; the answer never came
        (ConnectionClosedError(endpoint_url="http://x"), True),
        (SSLError(endpoint_url="http://x", error="bad record mac"), True),  # urllib3 says the same mid-response
    ],
)
def test_only_a_connection_never_made_rules_a_record_out(failure: Exception, maybe_recorded: bool) -> None:
    client, clock = FakeClient(failure), FakeClock()
    with pytest.raises(errors.GatewayError) as caught:
        backend(client, clock, attempts=1).meter_usage({"ProductCode": "p"})
    assert caught.value.reason == "AWS_UNREACHABLE" and caught.value.retryable
    assert caught.value.delivery is (errors.UNKNOWN if maybe_recorded else errors.REFUSED)


# -- BatchMeterUsage: AWS's results matched to the records sent ---------------------------


class EchoClient:
    """Answers BatchMeterUsage with each record echoed as ``echo`` rewrites it."""

    def __init__(self, echo: Any) -> None:
        self.echo = echo

    def batch_meter_usage(self, **params: Any) -> dict[str, Any]:
        return {
            "Results": [
                {"UsageRecord": self.echo(dict(r)), "MeteringRecordId": f"id-{i}", "Status": "Success"}
                for i, r in enumerate(params["UsageRecords"])
            ],
            "UnprocessedRecords": [],
        }


def test_an_echo_that_aws_writes_otherwise_still_finds_its_record() -> None:
    """AWS may fill in a legacy customer's account, write the quantity as a whole number or
    cut the timestamp to the hour: each record still gets its own answer, none is left
    unknown (which would resend it until its window closed, though AWS billed it)."""
    when = datetime(2026, 11, 23, 9, 41, tzinfo=UTC)
    sent = [
        {"Timestamp": when, "Dimension": "requests", "CustomerIdentifier": "cust-a", "QuantityAsDecimal": "12"},
        {"Timestamp": when, "Dimension": "requests", "CustomerIdentifier": "cust-b", "QuantityAsDecimal": "1.5"},
    ]

    def rewritten(record: dict[str, Any]) -> dict[str, Any]:
        quantity = record.pop("QuantityAsDecimal")
        out = {**record, "CustomerAWSAccountId": "111122223333", "Timestamp": when.replace(minute=0)}
        return (
            {**out, "Quantity": int(float(quantity))} if "." not in quantity else {**out, "QuantityAsDecimal": quantity}
        )

    outcome = Backend(EchoClient(rewritten), RetryPolicy(1)).batch_meter_usage(  # type: ignore[arg-type]
        {"UsageRecords": sent, "ProductCode": "prod-a"}  # type: ignore[typeddict-item]
    )
    assert [(r.index, r.metering_record_id) for r in outcome.results] == [(0, "id-0"), (1, "id-1")]
    assert outcome.unprocessed == ()


def test_an_answer_that_names_no_record_sent_leaves_it_unprocessed() -> None:
    sent = [{"Timestamp": datetime(2026, 11, 23, 9, tzinfo=UTC), "Dimension": "d", "CustomerIdentifier": "a"}]
    stranger = Backend(EchoClient(lambda r: {**r, "CustomerIdentifier": "someone-else"}), RetryPolicy(1))
    outcome = stranger.batch_meter_usage({"UsageRecords": sent, "ProductCode": "p"})  # type: ignore[arg-type, typeddict-item]
    assert outcome.results == () and outcome.unprocessed == (0,)  # AWS may hold it: resent, never taken as sent
