"""What a hostile request can make the gateway spend, and what its refusal weighs.

Validation stops at each limit (5 tags, 2500 allocations, 1000 events) and never
looks at an element past it; ``errors`` bounds a refusal: at most 100 violations,
fewer when they would not fit, in 4 KiB of details. Properties: hostile requests of
any shape and size up to the largest message cost time and memory in proportion to
their bytes, and their refusal always fits the 8 KiB of trailers a gRPC client
takes by default.
"""

from __future__ import annotations

import base64
import os
import resource
import threading
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Settings
from gateway.domain import errors, validation
from gateway.domain.validation import Violation
from gateway.rpc.interceptors import LARGE_AT_ONCE, LARGE_REQUEST, GatewayInterceptor, over_cap
from marketplace.metering.v1 import metering_pb2 as pb
from support.hostile import tag_bomb
from support.recording import wait_for

MAX_MESSAGE = Settings().max_message_size
NOW = datetime(2026, 11, 23, 10, 2, 30, tzinfo=UTC)
WINDOW = validation.Window(NOW)
TRAILERS_MAX = 8 * 1024  # what gRPC clients take by default (grpc.max_metadata_size)


def trailer_bytes(error: errors.GatewayError) -> int:
    """What the refusal's trailers weigh as HTTP/2 counts them (name + value + 32 each):
    grpc-status, grpc-message (percent-encoded), grpc-status-details-bin (base64), and the
    request id and pushback the interceptor adds."""
    status = error.to_status_proto()
    encoded = "".join(
        c if " " <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode()) for c in status.message
    )
    details = base64.b64encode(status.SerializeToString())
    return sum(
        len(n) + len(v) + 32
        for n, v in (
            ("grpc-status", "3"),
            ("grpc-message", encoded),
            ("grpc-status-details-bin", details),
            ("x-request-id", "f" * 128),
            ("grpc-retry-pushback-ms", "-1"),
        )
    )


def refusal(request_type: Any, raw: bytes) -> errors.GatewayError | None:
    """What the gateway answers a request of these bytes, before AWS or the spool: a large
    one's count of capped elements, decoding, then validation (the servicers' first step)."""
    if len(raw) > LARGE_REQUEST:
        refused = over_cap(request_type.DESCRIPTOR, raw)
        if refused is not None:
            return refused
    request = request_type.FromString(raw)
    if request_type is pb.MeterUsageRequest:
        found = validation.validate_meter_usage(request, WINDOW)
    else:
        found = validation.validate_record_usage(request.events, WINDOW)
    return errors.invalid(found) if found else None


# -- hostile requests: time and memory in proportion, small answers -----------------------------------


def peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def reset_peak_rss() -> bool:
    """Linux resets VmHWM to the current RSS on writing 5 to clear_refs; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def many_empty(count: int, record: bool) -> bytes:
    """``count`` empty allocations (or events)."""
    if record:
        return pb.RecordUsageRequest(events=[pb.UsageEvent()] * count).SerializeToString()
    return pb.MeterUsageRequest(usage_allocations=[pb.UsageAllocation()] * count).SerializeToString()


def many_bad(count: int, record: bool) -> bytes:
    """``count`` elements each wrong in several ways, within the limits where a limit stands."""
    if record:
        bad = pb.UsageEvent(
            event_id="",
            product_code="bad code!",
            usage_quantity_as_decimal="-1",
            tags=[pb.Tag(key="", value="\x00" * 300)] * 5,
        )
        return pb.RecordUsageRequest(events=[bad] * min(count, 1000)).SerializeToString()
    bad_alloc = pb.UsageAllocation(allocated_usage_quantity_as_decimal="x", tags=[pb.Tag(key="\u00e9" * 101)] * 5)
    return pb.MeterUsageRequest(
        product_code="é" * 300, usage_allocations=[bad_alloc] * min(count, 2500)
    ).SerializeToString()


def long_strings(size: int, record: bool) -> bytes:
    """A single string field as long as the message allows."""
    if record:
        return pb.RecordUsageRequest(events=[pb.UsageEvent(event_id="x" * size)]).SerializeToString()
    return pb.MeterUsageRequest(usage_dimension="é" * (size // 2)).SerializeToString()


SHAPES: dict[str, Callable[[int, bool], bytes]] = {
    "tag bomb": lambda n, r: tag_bomb(n, r),
    "empty elements": lambda n, r: many_empty(n, r),
    "bad elements": lambda n, r: many_bad(n // 40, r),
    "long strings": lambda n, r: long_strings(n, r),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from(sorted(SHAPES)),
    record=st.booleans(),
    size=st.integers(1, MAX_MESSAGE // 2).map(lambda n: n - n % 2),
)
def test_hostile_requests_cost_in_proportion_to_their_bytes_and_are_answered_small(
    shape: str, record: bool, size: int
) -> None:
    """For every shape and size up to the largest message: the CPU time and the memory
    (Python objects traced; the whole process's peak where Linux can reset it) of the
    gateway's answer grow at most linearly in the request's bytes, and the answer, a
    refusal, fits a client's default trailer limit."""
    raw = SHAPES[shape](size // 2, record)[:MAX_MESSAGE]
    request_type = pb.RecordUsageRequest if record else pb.MeterUsageRequest
    measured = reset_peak_rss()
    before = rss_kib()
    tracemalloc.start()
    started = time.thread_time()  # this thread's CPU: not other threads', nor the machine's load
    try:
        refused = refusal(request_type, raw)
    except Exception as exc:  # noqa: BLE001 - a cut-off request may be no message: the decoder says so
        refused = errors.invalid([Violation("", f"not a message: {exc}")])
    cpu = time.thread_time() - started
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = peak_rss_kib() - before
    if refused is not None:
        assert trailer_bytes(refused) < TRAILERS_MAX - 512
        assert refused.code.name in ("INVALID_ARGUMENT", "OUT_OF_RANGE")
    # Linear: 2 µs of CPU and 60 bytes of Python objects per byte, after a fixed allowance.
    assert cpu < 0.1 + 2e-6 * len(raw), (shape, len(raw), cpu)
    assert traced < 2_000_000 + 60 * len(raw), (shape, len(raw), traced)
    if measured:  # upb's own memory, decoding: about 25 bytes per byte at worst (an empty tag is 2 bytes)
        assert peak * 1024 < 8_000_000 + 40 * len(raw), (shape, len(raw), peak)


def test_a_tag_bomb_is_refused_at_the_limit() -> None:
    """262,144 empty tags in 512 KiB, the review's case: one violation, not 262,144."""
    raw = tag_bomb(262_144, record=False)
    assert len(raw) < 600 * 1024
    refused = refusal(pb.MeterUsageRequest, raw)
    assert refused is not None and trailer_bytes(refused) < TRAILERS_MAX
    assert (
        Violation("usage_allocations[0].tags", "must have at most 5 tags, got 262144", validation.INVALID_TAG)
        in refused.violations
    )
    assert len(refused.violations) < 10  # the timestamp and dimension it lacks, and the tags once


def test_the_most_violations_a_request_can_carry_fit_the_trailers() -> None:
    """A batch of 1000 events each wrong in every field: 100 violations at most are listed,
    fewer when they would not fit, and ErrorInfo counts them all."""
    refused = refusal(pb.RecordUsageRequest, many_bad(1000, record=True))
    assert refused is not None
    status = refused.to_status_proto()
    assert trailer_bytes(refused) < TRAILERS_MAX and status.ByteSize() <= errors.DETAILS_MAX
    info = next(d for d in status.details if d.Is(errors.error_details_pb2.ErrorInfo.DESCRIPTOR))
    unpacked = errors.error_details_pb2.ErrorInfo()
    info.Unpack(unpacked)
    assert int(unpacked.metadata["violations"]) == len(refused.violations) > errors.VIOLATIONS_MAX
    assert 0 < int(unpacked.metadata["violationsShown"]) <= errors.VIOLATIONS_MAX
    assert f"of {len(refused.violations)} violations listed" in status.message


@pytest.mark.parametrize("message", ["x" * 100_000, "é%\n" * 10_000, "\U0001f4a5" * 5000])
def test_any_message_fits_the_trailers(message: str) -> None:
    error = errors.GatewayError("INTERNAL", message, extra_metadata={"caller": "spiffe://" + "a" * 10_000})
    assert trailer_bytes(error) < TRAILERS_MAX
    assert error.to_status_proto().message.endswith("...")


def test_environment_allows_the_memory_measure() -> None:
    """Says whether the peak-memory half of the property ran (Linux's clear_refs)."""
    if not reset_peak_rss() and os.environ.get("REQUIRE_EVERY_TEST") == "1":
        pytest.fail("cannot reset VmHWM here: the hostile-request memory bound went unchecked")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


# -- large requests are decoded a few at a time ------------------------------------------------------


class Context:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def test_large_requests_wait_for_one_of_a_few_places_to_be_decoded() -> None:
    interceptor = GatewayInterceptor(set())
    large = b"\x0a" + bytes(LARGE_REQUEST)
    held = threading.Event()
    release = threading.Event()

    def slow_decode(raw: bytes) -> bytes:
        held.set()
        release.wait(30)
        return raw

    pool = [
        threading.Thread(target=interceptor._decode, args=(slow_decode, large, Context(30)))
        for _ in range(LARGE_AT_ONCE)
    ]
    for t in pool:
        t.start()
    try:
        wait_for(lambda: interceptor._large._value == 0, what="every place taken")  # type: ignore[attr-defined]
        assert interceptor._decode(lambda raw: "small", b"small", Context(0.01)) == "small"  # small ones never wait
        with pytest.raises(errors.GatewayError) as refused:
            interceptor._decode(lambda raw: "large", large, Context(0.2))  # its deadline comes first
        assert refused.value.reason == "CONCURRENCY_LIMIT_EXCEEDED" and refused.value.retryable
    finally:
        release.set()
        for t in pool:
            t.join(30)
    assert interceptor._decode(lambda raw: "large", large, Context(0.2)) == "large"
