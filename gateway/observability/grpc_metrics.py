"""The gRPC server metrics, as go-grpc-prometheus names and labels them, so that existing
dashboards and alerts work: the interceptor's observer (:class:`GrpcMetrics`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from gateway.observability import families

# The Go names of the codes (google.golang.org/grpc/codes, Code.String()), which
# go-grpc-prometheus writes in ``grpc_code``.
GO_CODE_NAMES: Mapping[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}


def service_methods(service: str) -> list[str]:
    """Every method of a service known to the protobuf runtime, as ``/pkg.Service/Method``."""
    try:
        found = descriptor_pool.Default().FindServiceByName(service)
    except KeyError:
        return []
    return [f"/{service}/{m.name}" for m in found.methods]


@dataclass(frozen=True)
class _MethodSeries:
    """One method's labelled series, looked up once: ``.labels()`` costs about as much as
    the increments themselves, on every call."""

    started: Any
    received: Any
    sent: Any
    handling: Any
    handled: Mapping[str, Any]  # by Go code name


class GrpcMetrics:
    """The interceptor's :class:`gateway.rpc.interceptors.Observer`: go-grpc-prometheus's
    server metrics. Every method of ``services`` starts at 0 (started, and handled for
    every code), as its InitializeMetrics does, so that rate() works from the first
    scrape. For a unary method one message is received per call and one sent per OK.
    ``grpc_type`` is always ``unary``: the interceptor observes no other kind (the
    server refuses to start with one, :func:`gateway.rpc.server.check_unary`)."""

    def __init__(self, services: Iterable[str]) -> None:
        self._families: families.Families | None = None
        self._series: dict[str, _MethodSeries] = {}
        for service in services:
            for method in service_methods(service):
                self._of(method)

    def _of(self, method: str) -> _MethodSeries | None:
        m = families.active()
        if m is None:
            return None
        if m is not self._families:  # installed anew (tests): the series of the new families
            self._families, self._series = m, {}
        series = self._series.get(method)
        if series is None:
            _, service, name = method.split("/", 2)
            key = ("unary", service, name)
            series = self._series[method] = _MethodSeries(
                m.started.labels(*key),
                m.received.labels(*key),
                m.sent.labels(*key),
                m.handling.labels(*key),
                {code: m.handled.labels(*key, code) for code in GO_CODE_NAMES.values()},
            )
        return series

    def started(self, method: str) -> None:
        series = self._of(method)
        if series is not None:
            series.started.inc()
            series.received.inc()

    def handled(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        series = self._of(method)
        if series is None:
            return
        series.handled[GO_CODE_NAMES.get(code, "Unknown")].inc()
        series.handling.observe(seconds)
        if code == grpc.StatusCode.OK:
            series.sent.inc()
