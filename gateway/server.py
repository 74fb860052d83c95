"""Assembly: the gRPC server with health, reflection, interceptors and shutdown."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway import metrics
from gateway.config import ConfigError, Settings, format_listen
from gateway.interceptors import Authorize, GatewayInterceptor, Observer
from marketplace.metering.v1 import metering_pb2 as pb

METERING_SERVICE = pb.DESCRIPTOR.services_by_name["MeteringService"].full_name
RECORDER_SERVICE = pb.DESCRIPTOR.services_by_name["UsageRecorderService"].full_name


@dataclass(frozen=True)
class Servicer:
    """A servicer and how to add it: ``add(servicer, server)`` as generated."""

    name: str
    servicer: Any
    add: Callable[[Any, grpc.Server], None]


def check_unary(services: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None) -> None:
    """ValueError unless every method of ``services`` is unary-unary, as their protobuf
    descriptors say: the interceptor wraps only those (authorization, access log,
    metrics), so a streaming method must not ship unnoticed."""
    pool = pool or descriptor_pool.Default()
    for name in sorted(services):
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            raise ValueError(f"service {name} has no protobuf descriptor; cannot check that its methods are unary") from None
        streaming = [m.name for m in service.methods if m.client_streaming or m.server_streaming]
        if streaming:
            raise ValueError(f"service {name} has streaming methods ({', '.join(streaming)}); "
                             "the gateway's interceptor supports unary methods only")


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
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
            interceptors=[GatewayInterceptor(names, observer=observer, authorize=authorize)],
            options=[
                # A port in use is an error, unless sibling worker processes share it on purpose.
                ("grpc.so_reuseport", 1 if share_port else 0),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ],
            # With a slow AWS, calls beyond this fail at once with RESOURCE_EXHAUSTED
            # (retryable) instead of queueing without limit behind busy threads.
            maximum_concurrent_rpcs=settings.concurrent_rpc_limit,
        )
        for s in servicers:
            s.add(s.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((*sorted(names), health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self._names = sorted(names)
        self.port = 0

    def start(self) -> int:
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
        for name in ("", *self._names):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for name in self._names:
            metrics.set_serving(name, True)
        return self.port

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, then refuse new calls and let those in flight finish."""
        self.health.enter_graceful_shutdown()
        for name in self._names:
            metrics.set_serving(name, False)
        self.server.stop(self.settings.grace if grace is None else grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)
