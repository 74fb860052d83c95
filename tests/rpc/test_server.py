"""The server bounds the calls it holds: beyond --max-aws-calls, MeterUsage is refused at once.
Only unary methods are served through the interceptor: a streaming one is refused."""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import Settings
from gateway.local_aws import SLOW, LocalAws
from gateway.rpc import server as server_module
from gateway.rpc.interceptors import GatewayInterceptor
from gateway.rpc.server import METERING_SERVICE, REFLECTION_STREAMS, Gateway, Servicer, check_unary
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import (
    ENHANCE_YOUR_CALM,
    GOAWAY,
    PING,
    SETTINGS,
    details,
    h2_connect,
    h2_frame,
    h2_frames_until_closed,
    request,
    running_gateway,
)
from support.hostile import IdleStream
from support.recording import wait_for

SLOW_SECONDS = 6.0


def test_meter_usage_beyond_max_aws_calls_is_refused_at_once_and_health_still_answers(local_aws: LocalAws) -> None:
    """A slow AWS holds --max-aws-calls calls and no more: the next ones are refused with
    RESOURCE_EXHAUSTED CONCURRENCY_LIMIT_EXCEEDED while those still wait, and health answers."""
    local_aws.inject(SLOW, count=2, delay=SLOW_SECONDS)
    with (
        running_gateway(local_aws.endpoint_url, max_workers=4, max_aws_calls=2) as target,
        grpc.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.MeteringServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        grpc.channel_ready_future(channel).result(timeout=10)
        slow = [stub.MeterUsage.future(request(usage_dimension=f"slow-{n}"), timeout=60) for n in range(2)]
        wait_for(lambda: len(local_aws.faults) == 0, what="both slow calls at AWS")
        refused = []
        for n in range(6):
            with pytest.raises(grpc.RpcError) as err:
                stub.MeterUsage(request(usage_dimension=f"refused-{n}"), timeout=30)
            refused.append(details(err.value))
            reply = health.Check(health_pb2.HealthCheckRequest(service=METERING_SERVICE), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert not any(call.done() for call in slow), "refusals and health answered while AWS still held both calls"
        assert {(r.code, r.info.reason) for r in refused} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "CONCURRENCY_LIMIT_EXCEEDED")
        }
        assert all(r.retry is not None for r in refused)
        assert [call.result().metering_record_id != "" for call in slow] == [True, True]
        # The slots are free again: the server goes on serving.
        assert stub.MeterUsage(request(usage_dimension="after"), timeout=10).metering_record_id


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
    interceptor = GatewayInterceptor(
        {"test.Mixed"}, authorize=lambda identity, method, request: authorized.append(method)
    )
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


# -- streams cannot starve calls -------------------------------------------------------------------


def test_idle_reflection_and_watch_streams_leave_calls_their_threads(local_aws: LocalAws) -> None:
    """64 reflection streams held open and silent, and 64 health watches: 4 reflection streams
    are served (on threads of their own), the other 60 refused at once; MeterUsage and health answer."""
    with running_gateway(local_aws.endpoint_url, max_workers=2) as target, grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [
            health.Watch(health_pb2.HealthCheckRequest(service=METERING_SERVICE), timeout=120) for _ in range(64)
        ]
        assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
        streams = [IdleStream(channel) for _ in range(64)]
        try:
            wait_for(
                lambda: sum(1 for s in streams if s.answers or s.error) == 64, what="every stream answered or refused"
            )
            held = [s for s in streams if s.answers and s.error is None]
            refused = [s.error for s in streams if s.error is not None]
            assert len(held) == REFLECTION_STREAMS
            assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED} and len(refused) == 60
            stub = pb_grpc.MeteringServiceStub(channel)
            for n in range(8):  # more calls than threads: each gets one, none waits behind a stream
                assert stub.MeterUsage(request(usage_dimension=f"beside-streams-{n}"), timeout=10).metering_record_id
                assert (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
        finally:
            for s in streams:
                s.close()
            for w in watches:
                w.cancel()


def test_a_reflection_stream_lasts_a_minute_at_most(local_aws: LocalAws, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "REFLECTION_MAX_AGE", 0.5)
    with running_gateway(local_aws.endpoint_url) as target, grpc.insecure_channel(target) as channel:
        stream = IdleStream(channel)
        wait_for(lambda: stream.error is not None, timeout=30, what="the idle stream cancelled by the server")
        assert stream.answers and stream.error is not None and stream.error.code() == grpc.StatusCode.CANCELLED
        stream.close()
        assert IdleStream(channel).answers is not None  # and a new one is served


def test_reflection_can_be_turned_off(local_aws: LocalAws) -> None:
    with running_gateway(local_aws.endpoint_url, reflection=False) as target, grpc.insecure_channel(target) as channel:
        stream = IdleStream(channel)
        wait_for(lambda: stream.error is not None, what="the call refused")
        assert stream.error is not None and stream.error.code() == grpc.StatusCode.UNIMPLEMENTED
        stream.close()


# -- connections: closed when idle, capped in number, and pings kept in their place -----------------------


def test_an_idle_connection_is_closed(local_aws: LocalAws) -> None:
    with running_gateway(local_aws.endpoint_url, max_connection_idle=1.0) as target:
        conn = h2_connect(target)
        frames, closed = h2_frames_until_closed(conn, timeout=30)
        assert closed and GOAWAY in [kind for kind, _ in frames]
        conn.close()


def test_connections_beyond_the_limit_are_closed_and_the_rest_keep_serving(local_aws: LocalAws) -> None:
    with running_gateway(local_aws.endpoint_url, max_connections=3) as target:
        held = [h2_connect(target) for _ in range(3)]
        for conn in held:  # each taken in: the server's SETTINGS came
            assert SETTINGS in [kind for kind, _ in h2_frames_until_closed(conn, 2)[0]]
        extra = h2_connect(target)
        frames, closed = h2_frames_until_closed(extra, timeout=10)
        assert closed and frames == [], "closed at once, before any HTTP/2 frame"
        for conn in held:
            conn.close()
        extra.close()
        with grpc.insecure_channel(target) as channel:  # once connections close, callers get in again
            reply = wait_for(lambda: _try_meter(channel), timeout=30, what="a call to get through")
            assert reply.metering_record_id


def _try_meter(channel: grpc.Channel) -> Any:
    try:
        return pb_grpc.MeteringServiceStub(channel).MeterUsage(request(usage_dimension="after-cap"), timeout=5)
    except grpc.RpcError:
        return None


def test_a_ping_flood_gets_goaway_enhance_your_calm(local_aws: LocalAws) -> None:
    """What gRPC enforces: pings with no call open count as strikes, and after two the connection
    is told to go away (ENHANCE_YOUR_CALM) and closed. (Until the server reads that far it still
    answers each ping: docs/operations.md, Limits.)"""
    with running_gateway(local_aws.endpoint_url) as target, grpc.insecure_channel(target) as channel:
        conn = h2_connect(target)
        conn.sendall(h2_frame(SETTINGS, flags=1) + h2_frame(PING, b"12345678") * 50)
        frames, closed = h2_frames_until_closed(conn, timeout=30)
        goaway = [payload for kind, payload in frames if kind == GOAWAY]
        assert closed and goaway and int.from_bytes(goaway[0][4:8], "big") == ENHANCE_YOUR_CALM
        conn.close()
        assert pb_grpc.MeteringServiceStub(channel).MeterUsage(request(), timeout=10).metering_record_id


def test_watch_streams_ending_while_health_changes_never_deadlock_the_server(local_aws: LocalAws) -> None:
    """grpcio-health-checking's servicer sends Watch updates under the lock a stream's close
    needs on gRPC's serving thread: streams cancelled while the status changes (here: at the
    stop) deadlocked the server about one time in three. Twenty rounds, each must stop."""
    for _ in range(20):
        stopped = threading.Event()

        def one_round() -> None:
            with (
                running_gateway(local_aws.endpoint_url, max_workers=2) as target,
                grpc.insecure_channel(target) as channel,
            ):
                health = health_pb2_grpc.HealthStub(channel)
                watches = [
                    health.Watch(health_pb2.HealthCheckRequest(service=METERING_SERVICE), timeout=60) for _ in range(32)
                ]
                for w in watches:
                    assert next(w).status == health_pb2.HealthCheckResponse.SERVING
                for w in watches:
                    w.cancel()
            stopped.set()  # noqa: B023 - called before the loop moves on

        threading.Thread(target=one_round, daemon=True).start()
        assert stopped.wait(30), "the gateway never stopped: deadlocked"


def test_a_watch_sees_every_change_to_the_end() -> None:
    """Updates go out from a thread of their own, each with the status as it is then: the
    last message a stream gets is the latest status, graceful shutdown's included."""
    gateway = Gateway(Settings(listen="127.0.0.1:0").check(), [])
    port = gateway.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="svc"), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            for status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING) * 5:
                gateway.health.set("svc", status)
            seen = [next(watch).status for _ in range(10)]
            assert seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING  # the last one is the latest
            gateway.health.set("svc", health_pb2.HealthCheckResponse.SERVING)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            gateway.health.enter_graceful_shutdown()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        gateway.stop(0.5)
