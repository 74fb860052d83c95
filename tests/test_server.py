"""The server bounds the calls it holds: beyond --max-concurrent-rpcs, a call is refused at once.
Only unary methods are served through the interceptor: a streaming one is refused."""

from __future__ import annotations

import functools
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from support import request, running_gateway

from gateway.config import Settings
from gateway.interceptors import GatewayInterceptor
from gateway.local_aws import SLOW, LocalAws
from gateway.server import Gateway, Servicer, check_unary
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


def streaming_pool() -> descriptor_pool.DescriptorPool:
    """A pool with ``test.Mixed``: one unary method and one server-streaming one."""
    file = descriptor_pb2.FileDescriptorProto(name="mixed.proto", package="test", syntax="proto3")
    file.message_type.add(name="Empty")
    service = file.service.add(name="Mixed")
    service.method.add(name="Unary", input_type=".test.Empty", output_type=".test.Empty")
    service.method.add(name="Watch", input_type=".test.Empty", output_type=".test.Empty", server_streaming=True)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool


def test_a_service_with_a_streaming_method_is_refused_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = streaming_pool()
    with pytest.raises(ValueError, match=r"test\.Mixed has streaming methods \(Watch\)"):
        check_unary(["test.Mixed"], pool)
    monkeypatch.setattr(descriptor_pool, "Default", lambda: pool)
    with pytest.raises(ValueError, match="streaming methods"):
        Gateway(Settings(listen="127.0.0.1:0"), [Servicer("test.Mixed", object(), lambda servicer, server: None)])
    with pytest.raises(ValueError, match="no protobuf descriptor"):
        Gateway(Settings(listen="127.0.0.1:0"), [Servicer("test.Unknown", object(), lambda servicer, server: None)])


def test_a_streaming_method_of_a_wrapped_service_fails_closed() -> None:
    """Not served unwrapped (no authorization, no access log): INTERNAL, the servicer never runs."""
    ran: list[Any] = []
    authorized: list[str] = []

    def watch(request: bytes, context: grpc.ServicerContext) -> Any:
        ran.append(request)
        yield b"data"

    handlers = {"Watch": grpc.unary_stream_rpc_method_handler(watch)}
    interceptor = GatewayInterceptor({"test.Mixed"}, authorize=lambda identity, method, request: authorized.append(method))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[interceptor])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Mixed", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/test.Mixed/Watch")(b"", timeout=10)
            with pytest.raises(grpc.RpcError) as failure:
                list(call)
        assert failure.value.code() == grpc.StatusCode.INTERNAL
        assert "streaming methods are not supported" in failure.value.details()
        assert ran == [] and authorized == []
    finally:
        server.stop(0)
