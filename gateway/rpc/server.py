"""Assembly: the gRPC server with health, reflection, interceptors and shutdown."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from gateway.config import ConfigError, Settings, format_listen
from gateway.observability import metrics
from gateway.rpc.interceptors import Authorize, GatewayInterceptor, Observer
from marketplace.metering.v1 import metering_pb2 as pb

METERING_SERVICE = pb.DESCRIPTOR.services_by_name["MeteringService"].full_name
RECORDER_SERVICE = pb.DESCRIPTOR.services_by_name["UsageRecorderService"].full_name
log = structlog.get_logger("gateway.server")
# Reflection streams hold a thread each for as long as the caller keeps them open: a
# few at once, on threads added for them, and none longer than a minute (grpcurl's
# last milliseconds). Health Watch streams hold no thread (grpcio's non-blocking
# servicer), but each counts as an RPC in flight: at most one per allowed connection,
# which is what gRPC's client-side health checking opens.
REFLECTION_STREAMS = 4
REFLECTION_MAX_AGE = 60.0


class _Streams:
    """At most ``limit`` streams at once; one more is refused with RESOURCE_EXHAUSTED."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind, self.limit = kind, limit
        self._free = threading.BoundedSemaphore(limit)

    def open(self, context: grpc.ServicerContext) -> None:
        """Take a place for this stream until it ends, or abort the call."""
        if not self._free.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.limit} {self.kind} streams are open already")
        context.add_callback(self._free.release)


class HealthServicer(health.HealthServicer):
    """grpcio's health servicer (Check as it is, but for a NOT_FOUND that explains), with
    Watch streams that can neither deadlock the server nor hold up a status change, and
    at most ``watches`` of them.

    grpcio-health-checking sends each Watch update while holding the lock that a
    stream's close callback needs on gRPC's serving thread, and waits for the send
    to complete, which that thread must report: a Watch ending while a status changes
    deadlocks the whole server (grpc/grpc#43403 reworks those locks). Here the lock
    (``_lock``, which Check takes too) guards only the statuses and the streams, and
    is never held while sending; updates go out from a thread of their own, one send
    at a time (gRPC takes one message at a time per stream), each with the status as
    it is when sent, so a stream's last message is always the latest status.
    """

    _gracefully_shutting_down: bool  # the library's, set in its __init__

    def __init__(self, watches: int) -> None:
        super().__init__(experimental_non_blocking=True)
        self._watches = _Streams("health Watch", watches)
        self._send_lock = threading.Lock()
        self._changed: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._broadcast, name="health-watch", daemon=True).start()

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC's method name
        """grpcio's Check, but an unknown service's NOT_FOUND says which one, and which there are,
        so that a probe pointed at a misspelt name fails with its own explanation."""
        with self._lock:
            status = self._server_status.get(request.service)
            known = sorted(self._server_status)
        if status is None:
            asked = request.service if len(request.service) <= 200 else request.service[:200] + "..."
            served = ", ".join(repr(s) + (" (the whole server)" if not s else "") for s in known)
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"no health status for service {asked!r}; this server has one for {served}"
            )
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, request: Any, context: grpc.ServicerContext, send_response_callback: Any = None) -> None:  # noqa: N802 - gRPC's method name
        self._watches.open(context)
        service = request.service
        with self._lock:
            self._send_response_callbacks.setdefault(service, set()).add(send_response_callback)
        context.add_callback(self._on_close_callback(send_response_callback, service))
        self._send(service, [send_response_callback])

    def _on_close_callback(self, send_response_callback: Any, service: str) -> Callable[[], None]:
        def closed() -> None:
            with self._lock:
                self._send_response_callbacks.get(service, set()).discard(send_response_callback)

        return closed

    def set(self, service: str, status: Any) -> None:
        with self._lock:
            if self._gracefully_shutting_down:
                return
            self._server_status[service] = status
        self._changed.put(service)

    def enter_graceful_shutdown(self) -> None:
        with self._lock:
            if self._gracefully_shutting_down:
                return
            for service in self._server_status:
                self._server_status[service] = health_pb2.HealthCheckResponse.NOT_SERVING
            self._gracefully_shutting_down = True
            changed = list(self._server_status)
        for service in changed:
            self._changed.put(service)

    def close(self) -> None:
        """Once the server has stopped: the updates thread ends after what it has queued."""
        self._changed.put(None)

    def _broadcast(self) -> None:
        while (service := self._changed.get()) is not None:
            with self._lock:
                watching = list(self._send_response_callbacks.get(service, ()))
            self._send(service, watching)

    def _send(self, service: str, callbacks: Iterable[Any]) -> None:
        """Each stream gets the service's status as it is now; one send at a time."""
        with self._send_lock:
            for send_response_callback in callbacks:
                with self._lock:
                    status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                try:
                    send_response_callback(health_pb2.HealthCheckResponse(status=status))
                except Exception:  # noqa: BLE001 - a stream ending meanwhile: its close callback drops it
                    log.debug("health_watch_send_failed", service=service)


def add_reflection(server: grpc.Server, names: Sequence[str]) -> None:
    """Server reflection (v1alpha, as grpcurl speaks it) with its streams bounded: REFLECTION_STREAMS
    at once, each cancelled REFLECTION_MAX_AGE seconds after it began."""
    max_age = REFLECTION_MAX_AGE
    servicer = reflection.ReflectionServicer(names)
    streams = _Streams("reflection", REFLECTION_STREAMS)
    answer: Callable[[Any, grpc.ServicerContext], Iterator[Any]] = servicer.ServerReflectionInfo  # type: ignore[assignment]

    def info(request_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        streams.open(context)
        timer = threading.Timer(max_age, context.cancel)
        timer.daemon = True
        timer.start()
        try:
            yield from answer(request_iterator, context)
        finally:
            timer.cancel()

    servicer.ServerReflectionInfo = info  # type: ignore[method-assign,assignment]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)


@dataclass(frozen=True)
class Servicer:
    """A servicer and how to add it: ``add(servicer, server)`` as generated."""

    name: str
    servicer: Any
    add: Callable[[Any, grpc.Server], None]
    serving: bool = True  # False: answers every call with an error (a disabled service), so health never says SERVING


def check_unary(services: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None) -> None:
    """ValueError unless every method of ``services`` is unary-unary, as their protobuf
    descriptors say: the interceptor wraps only those (authorization, access log,
    metrics), so a streaming method must not ship unnoticed."""
    pool = pool or descriptor_pool.Default()
    for name in sorted(services):
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            raise ValueError(
                f"service {name} has no protobuf descriptor; cannot check that its methods are unary"
            ) from None
        streaming = [m.name for m in service.methods if m.client_streaming or m.server_streaming]
        if streaming:
            raise ValueError(
                f"service {name} has streaming methods ({', '.join(streaming)}); "
                "the gateway's interceptor supports unary methods only"
            )


def channel_options(settings: Settings, share_port: bool = False) -> list[tuple[str, int]]:
    """gRPC's server options: what one caller may spend of the server (docs/operations.md, Limits)."""
    ms = 1000
    return [
        # A port in use is an error, unless sibling worker processes share it on purpose.
        ("grpc.so_reuseport", 1 if share_port else 0),
        ("grpc.max_receive_message_length", settings.max_message_size),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.max_connection_idle_ms", round(settings.max_connection_idle * ms)),
        ("grpc.max_connection_age_ms", round(settings.max_connection_age * ms)),
        ("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace * ms)),
        # Pings: one per --keepalive-min-time at most, and none without a call open; two
        # more and the connection is closed (GOAWAY ENHANCE_YOUR_CALM).
        ("grpc.http2.min_ping_interval_without_data_ms", round(settings.keepalive_min_time * ms)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 0),
        # The server's own pings find dead peers (a vanished pod, a cut network) on idle connections.
        ("grpc.keepalive_time_ms", 2 * 60 * ms),
        ("grpc.keepalive_timeout_ms", 20 * ms),
        # A TLS handshake or HTTP/2 preface that does not finish soon frees its connection.
        ("grpc.server_handshake_timeout_ms", 10 * ms),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    chain = Path(settings.tls_cert).read_bytes()
    key = Path(settings.tls_key).read_bytes()
    if settings.tls_client_ca:
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=Path(settings.tls_client_ca).read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials([(key, chain)])


class Gateway:
    """The running server. start() binds (or raises ConfigError), stop() drains.

    A servicer whose service has a method that is not unary-unary is refused at
    construction (ValueError, see :func:`check_unary`)."""

    def __init__(
        self,
        settings: Settings,
        servicers: Sequence[Servicer],
        *,
        share_port: bool = False,
        observer: Observer | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        self.settings = settings
        names = {s.name for s in servicers}
        check_unary(names)
        self.health = HealthServicer(watches=settings.max_connections)
        streams = REFLECTION_STREAMS if settings.reflection else 0
        self.server = grpc.server(
            # Reflection's streams get threads of their own, on top of --max-workers.
            futures.ThreadPoolExecutor(max_workers=settings.max_workers + streams, thread_name_prefix="rpc"),
            interceptors=[GatewayInterceptor(names, observer=observer, authorize=authorize)],
            options=channel_options(settings, share_port),
            # Calls beyond this fail at once with RESOURCE_EXHAUSTED (retryable) instead of
            # queueing without limit behind busy threads; open streams count apart.
            maximum_concurrent_rpcs=settings.concurrent_rpc_limit + settings.max_connections + streams,
        )
        for s in servicers:
            s.add(s.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection:
            add_reflection(self.server, (*sorted(names), health.SERVICE_NAME, reflection.SERVICE_NAME))
        self._names = sorted(s.name for s in servicers if s.serving)
        self.port = 0

    def start(self, *, ready: bool = True) -> int:
        """Listen and serve; health says SERVING for every name unless ``ready`` is False
        (then NOT_SERVING until the assembly says otherwise: a sidecar not yet registered)."""
        host, port = self.settings.listen_host_port
        address = format_listen(host, port)
        creds = server_credentials(self.settings)
        try:
            if creds is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, creds)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {self.settings.listen}: {exc} (is the port in use?)") from None
        if self.port == 0:
            raise ConfigError(f"cannot listen on {self.settings.listen} (is the port in use?)")
        self.server.start()
        for name in self.names:
            self.set_serving(name, ready)
        return self.port

    def set_serving(self, name: str, serving: bool) -> None:
        """One name's health status, and its ``serving`` gauge (``""``, the server as a
        whole, has none): the recorder's follows its spool, a sidecar's waits for RegisterUsage."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(name, status)
        if name:
            metrics.set_serving(name, serving)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name health answers SERVING for when all is well: ``""`` and each served service."""
        return ("", *self._names)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, then refuse new calls and let those in flight finish."""
        self.health.enter_graceful_shutdown()
        for name in self._names:
            metrics.set_serving(name, False)
        self.server.stop(self.settings.grace if grace is None else grace).wait()
        self.health.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)
