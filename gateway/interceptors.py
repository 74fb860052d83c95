"""Server interceptors: the access log and the turning of errors into statuses.

Servicers raise :class:`gateway.errors.GatewayError`; this is the one place that
turns it (or any unexpected exception) into a gRPC status with details, and
writes the one log line per RPC. It also decodes request bytes itself, so that a
request that is not a valid protobuf gets INVALID_ARGUMENT with an ErrorInfo
instead of grpcio's bare INTERNAL.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import grpc
import structlog
from google.protobuf.message import DecodeError

from gateway import errors
from gateway.identity import caller_identity
from gateway.validation import Violation

REQUEST_ID_KEY = "x-request-id"
# gRFC A6 server pushback: a negative value tells gRPC clients not to retry the call.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
_MAX_REQUEST_ID = 128
# Decoding builds an object per element, up to about 25 bytes of memory per byte of the
# request (a 1 MiB message of empty tags: 25 MB). Requests larger than LARGE_REQUEST are
# decoded LARGE_AT_ONCE at a time, so that the threads together cannot hold more than a
# few such decodings; the rest are small whatever they hold.
LARGE_REQUEST = 64 * 1024
LARGE_AT_ONCE = 4
LARGE_WAIT = 10.0  # seconds a large request waits for a place at most (less when its deadline is nearer)

log = structlog.get_logger("gateway.rpc")


class Observer(Protocol):
    """Told of every RPC of the wrapped services (the gRPC server metrics)."""

    def started(self, method: str) -> None:
        """``method`` ("/package.Service/Method") began."""

    def handled(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """``method`` ended with ``code`` (the one the access log writes) after ``seconds``."""


# Called with the caller's identity (None without one), the method and the decoded
# request before the servicer runs; raises GatewayError (CALLER_NOT_ALLOWED) to refuse.
Authorize = Callable[[str | None, str, Any], None]


def _allow_all(identity: str | None, method: str, request: Any) -> None:
    return None


def _request_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= _MAX_REQUEST_ID and value.isprintable():
            return value
    return uuid.uuid4().hex


class _Status(NamedTuple("_Status", [("code", grpc.StatusCode), ("details", str), ("trailing_metadata", Any)]), grpc.Status):
    pass


def _abort(context: grpc.ServicerContext, status: grpc.Status, request_id: str, pushback_ms: int | None = None) -> None:
    """Fail with the request id (and any retry pushback) in the trailers, not in headers sent first.

    Response headers commit a call: the caller's gRPC retry policy (gRFC A6) then
    no longer retries UNAVAILABLE or RESOURCE_EXHAUSTED, so errors leave as
    trailers-only responses. ``pushback_ms`` (see :meth:`errors.GatewayError.pushback_ms`)
    keeps that policy from retrying what the gateway already retried against AWS.
    """
    pushback = () if pushback_ms is None else ((PUSHBACK_KEY, str(pushback_ms)),)
    trailers = (*status.trailing_metadata, (REQUEST_ID_KEY, request_id), *pushback)
    context.abort_with_status(_Status(status.code, status.details, trailers))


def _refused(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that refuses every call with INTERNAL.

    Only unary-unary methods are wrapped (authorization, access log, metrics): a
    streaming method of a wrapped service fails closed instead of running unchecked.
    :class:`gateway.server.Gateway` refuses to start with one; this is the backstop.
    """

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        request_id = _request_id(context)
        log.error("rpc_refused", method=method, request_id=request_id, error="not a unary method")
        _abort(context, errors.internal("streaming methods are not supported by the gateway").to_grpc_status(), request_id)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make: Any = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class GatewayInterceptor(grpc.ServerInterceptor):
    """Wraps the unary-unary methods of the given services; refuses their other methods."""

    def __init__(self, services: set[str], *, observer: Observer | None = None, authorize: Authorize | None = None) -> None:
        self._services = services
        self._observer = observer
        self._authorize = authorize or _allow_all
        self._large = threading.BoundedSemaphore(LARGE_AT_ONCE)

    def _decode(self, deserialize: Callable[[bytes], Any], raw: bytes, context: grpc.ServicerContext) -> Any:
        """``deserialize(raw)``; a large request first waits (within its deadline) for one of LARGE_AT_ONCE places."""
        if len(raw) <= LARGE_REQUEST:
            return deserialize(raw)
        remaining = context.time_remaining()
        if not self._large.acquire(timeout=LARGE_WAIT if remaining is None else max(0.0, min(remaining, LARGE_WAIT))):
            raise errors.GatewayError("CONCURRENCY_LIMIT_EXCEEDED", f"{LARGE_AT_ONCE} large requests are being "
                                      "decoded already; nothing was done: retry shortly", retry_delay=0.1)
        try:
            return deserialize(raw)
        finally:
            self._large.release()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        method = details.method  # "/package.Service/Method"
        if handler is None or method.split("/")[1] not in self._services:
            return handler
        if handler.unary_unary is None:
            return _refused(method, handler)
        behavior = handler.unary_unary
        deserialize = handler.request_deserializer

        def wrapped(raw: bytes, context: grpc.ServicerContext) -> Any:
            structlog.contextvars.clear_contextvars()
            request_id = _request_id(context)
            # Who calls (the mTLS identity, null without one) and from where, on every line of the RPC.
            caller = caller_identity(context.auth_context())
            structlog.contextvars.bind_contextvars(request_id=request_id, method=method, caller=caller, peer=context.peer())
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            if self._observer is not None:
                self._observer.started(method)
            try:
                try:
                    request = self._decode(deserialize, raw, context) if deserialize else raw
                except (DecodeError, ValueError, RuntimeError) as exc:
                    raise errors.GatewayError(
                        "INVALID_REQUEST",
                        f"the request is not a valid {method.split('/')[2]} message: {exc}",
                        violations=[Violation("", "is not a valid protobuf encoding of the request")],
                    ) from None
                # Trailers, on success as on failure: they travel with the status, so the
                # id costs no extra send and never commits a call before its outcome.
                context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                self._authorize(caller, method, request)
                return behavior(request, context)
            except errors.GatewayError as exc:
                code = exc.code
                structlog.contextvars.bind_contextvars(reason=exc.reason)
                _abort(context, exc.to_grpc_status(), request_id, exc.pushback_ms())
            except Exception as exc:
                aborted = context.code()  # type: ignore[attr-defined]  # grpcio has it; the stubs lag
                if isinstance(exc, grpc.RpcError) or aborted not in (None, grpc.StatusCode.OK):
                    code = aborted or grpc.StatusCode.UNKNOWN  # aborted by the servicer itself
                    raise
                code = grpc.StatusCode.INTERNAL
                log.exception("rpc_failed")
                _abort(context, errors.internal("the gateway failed unexpectedly; see its log").to_grpc_status(), request_id)
            finally:
                if code == grpc.StatusCode.OK and not context.is_active():  # the caller left first
                    remaining = context.time_remaining()
                    code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
                elapsed = time.perf_counter() - started
                log.info("rpc", code=code.name, duration_ms=round(elapsed * 1000, 3))
                if self._observer is not None:
                    self._observer.handled(method, code, elapsed)
                structlog.contextvars.clear_contextvars()

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=None, response_serializer=handler.response_serializer
        )
