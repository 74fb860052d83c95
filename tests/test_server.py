"""The server bounds the calls it holds: beyond --max-concurrent-rpcs, a call is refused at once."""

from __future__ import annotations

import functools
import threading
import time

import grpc
from support import request, running_gateway

from gateway.local_aws import SLOW, LocalAws
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc

SLOW_SECONDS = 2.0


def test_calls_beyond_the_limit_are_refused_at_once_while_aws_is_slow(local_aws: LocalAws) -> None:
    local_aws.inject(SLOW, count=6, delay=SLOW_SECONDS)
    with running_gateway(local_aws.endpoint_url, max_workers=2, max_concurrent_rpcs=2) as target, \
            grpc.insecure_channel(target) as channel:
        stub = pb_grpc.MeteringServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=10)
        done: dict[int, tuple[grpc.StatusCode, float]] = {}
        lock = threading.Lock()
        started = time.monotonic()

        def finished(n: int, call: grpc.Future) -> None:
            with lock:
                done[n] = (call.code(), time.monotonic() - started)  # type: ignore[attr-defined]

        calls = [stub.MeterUsage.future(request(usage_dimension=f"limit-{n}"), timeout=10) for n in range(6)]
        for n, call in enumerate(calls):
            call.add_done_callback(functools.partial(finished, n))
        for call in calls:
            call.exception()  # waits for the call's end
        time.sleep(0.1)  # the last done-callbacks run on gRPC's threads

        codes = sorted(code.name for code, _ in done.values())
        assert codes == ["OK", "OK"] + ["RESOURCE_EXHAUSTED"] * 4, done
        refused = [t for code, t in done.values() if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        served = [t for code, t in done.values() if code == grpc.StatusCode.OK]
        assert max(refused) < 0.8, f"refusals should not wait for a slot: {refused}"
        assert min(served) >= SLOW_SECONDS * 0.9, "the two served calls were held by the slow AWS"

        # The slots are free again: the server goes on serving.
        reply = stub.MeterUsage(request(usage_dimension="limit-after"), timeout=10)
        assert reply.metering_record_id
