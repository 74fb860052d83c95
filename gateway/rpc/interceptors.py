"""Server interceptors: the access log and the turning of errors into statuses.

Servicers raise :class:`gateway.domain.errors.GatewayError`; this is the one place that
turns it (or any unexpected exception) into a gRPC status with details, and
writes the one log line per RPC. It also decodes request bytes itself, so that a
request that is not a valid protobuf gets INVALID_ARGUMENT with an ErrorInfo
instead of grpcio's bare INTERNAL (naming the field, when a string is not UTF-8).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import grpc
import structlog
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from gateway.domain import errors, validation
from gateway.domain.validation import Violation
from gateway.rpc.identity import caller_identity

if TYPE_CHECKING:  # grpc-stubs' generics: protobuf messages, or bytes for a method without (de)serializers
    Handler = grpc.RpcMethodHandler[Message | bytes, Message | bytes]
    _ServerInterceptor = grpc.ServerInterceptor[Message | bytes, Message | bytes]
else:  # grpcio's classes are not generic at run time
    _ServerInterceptor = grpc.ServerInterceptor

REQUEST_ID_KEY = "x-request-id"
# gRFC A6 server pushback: a negative value tells gRPC clients not to retry the call.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
_MAX_REQUEST_ID = 128
# Decoding builds an object per element, up to about 25 bytes of memory per byte of the
# request (a 1 MiB message of empty tags: 25 MB). Requests larger than LARGE_REQUEST are
# decoded LARGE_AT_ONCE at a time, so that the threads together cannot hold more than a
# few such decodings; the rest are small whatever they hold. Before that, a large request
# whose capped field (events, usage_records) holds more than validation takes is refused
# unread (over_cap): an empty event or record costs about 130 bytes decoded.
LARGE_REQUEST = 64 * 1024
LARGE_AT_ONCE = 4
LARGE_WAIT = 10.0  # seconds a large request waits for a place at most (less when its deadline is nearer)
# Fields the search for a request's bad UTF-8 reads at most (each a few steps of Python,
# about 0.5 µs; nested messages that parse are skipped in one): past what a valid request
# holds along the path to one string (1000 events, one event's fields and tags), so only a
# hostile one gives up early, with the message-level violation.
WALK_FIELDS = 10_000
_WALK_DEPTH = 100  # protobuf's own nesting limit

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
        if (
            key == REQUEST_ID_KEY
            and isinstance(value, str)
            and 0 < len(value) <= _MAX_REQUEST_ID
            and value.isprintable()
        ):
            return value
    return uuid.uuid4().hex


class _Status(
    NamedTuple("_Status", [("code", grpc.StatusCode), ("details", str), ("trailing_metadata", Any)]), grpc.Status
):
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


def _refused(method: str, handler: Handler) -> Handler:
    """A handler of ``handler``'s kind that refuses every call with INTERNAL.

    Only unary-unary methods are wrapped (authorization, access log, metrics): a
    streaming method of a wrapped service fails closed instead of running unchecked.
    :class:`gateway.rpc.server.Gateway` refuses to start with one; this is the backstop.
    """

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        request_id = _request_id(context)
        log.error("rpc_refused", method=method, request_id=request_id, error="not a unary method")
        _abort(
            context, errors.internal("streaming methods are not supported by the gateway").to_grpc_status(), request_id
        )

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make: Any = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    refused: Handler = make(
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
    return refused


class _Unreadable(Exception):
    """The wire bytes end or go wrong (or the budget runs out) before a bad string is found."""


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Unreadable


def _parses(message: Descriptor, data: bytes, start: int, end: int) -> bool:
    """Whether ``data[start:end]`` decodes as a ``message``: protobuf's C parser skips a good
    nested message (an event of a batch) far faster than reading its fields here."""
    try:
        GetMessageClass(message).FromString(data[start:end])
    except (DecodeError, ValueError, RuntimeError):
        return False
    return True


def _bad_utf8_in(message: Descriptor, data: bytes, pos: int, end: int, depth: int, budget: list[int]) -> str | None:
    """The path below ``message`` (its bytes ``data[pos:end]``) of its first string that is not UTF-8."""
    if depth > _WALK_DEPTH:
        raise _Unreadable
    occurrences: dict[int, int] = {}  # of each repeated field so far: the next one's index
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0:
            raise _Unreadable
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(data, pos, end)
            start, pos = pos, pos + size
            if pos > end:
                raise _Unreadable
            field = message.fields_by_number.get(number)
            if field is None or field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
                continue  # unknown, bytes or packed: nothing to check inside
            name = field.name
            if field.is_repeated:
                index = occurrences.get(number, 0)
                occurrences[number] = index + 1
                name = f"{name}[{index}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    str(memoryview(data)[start:pos], "utf-8")
                except UnicodeDecodeError:
                    return name
            elif (nested := field.message_type) is not None and not _parses(nested, data, start, pos):
                inner = _bad_utf8_in(nested, data, start, pos, depth + 1, budget)
                return None if inner is None else f"{name}.{inner}"
        else:  # groups (proto2 only) and invalid wire types
            raise _Unreadable
    if pos > end:
        raise _Unreadable
    return None


def invalid_utf8_field(message: Descriptor, data: bytes, max_fields: int = WALK_FIELDS) -> str | None:
    """The proto path (``events[1].event_id``) of the first string field in ``data``, the wire
    bytes of a ``message``, that is not valid UTF-8; None when none is found.

    protobuf's DecodeError only says that some string was bad; this reads the bytes again
    against the descriptor so that the caller learns which one. It stops at the first
    bad string, at bytes it cannot read, or after ``max_fields`` fields, and allocates
    nothing per field but the string checked, so it costs no more than the failed parse.
    """
    try:
        return _bad_utf8_in(message, data, 0, len(data), 0, [max_fields])
    except _Unreadable:
        return None


def over_cap(message: Descriptor, data: bytes, max_fields: int = WALK_FIELDS) -> errors.GatewayError | None:
    """INVALID_REQUEST for the wire bytes of a :data:`validation.CAPPED` ``message`` that
    hold more elements of its capped field than validation takes, counted before decoding;
    None otherwise (or when the bytes cannot be read: the decoder says why).

    Decoding makes an object of every element, and an empty one (2 bytes on the wire) costs
    about 130 bytes of memory: a request of a million empty events must never become them.
    The count stops one past the cap, and after ``max_fields`` fields of any kind.
    """
    capped = validation.CAPPED.get(message.name)
    if capped is None:
        return None
    name, most, _ = capped
    number = message.fields_by_name[name].number
    count, pos, end = 0, 0, len(data)
    try:
        for _ in range(max_fields):
            if pos >= end:
                return None
            key, pos = _varint(data, pos, end)
            wire_type = key & 7
            if wire_type == 2:  # length-delimited: an element, or another field to skip
                length, pos = _varint(data, pos, end)
                pos += length
                if key >> 3 == number:
                    count += 1
                    if count > most:
                        return errors.invalid([validation.count_violation(message.name, None)])
            elif wire_type == 0:
                _, pos = _varint(data, pos, end)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            else:
                return None  # groups: nothing a valid request holds
    except _Unreadable:
        return None
    return None


def _input_of(method: str) -> Descriptor | None:
    """The request message of ``method`` ("/package.Service/Method"), when the default pool has it."""
    service, _, name = method[1:].partition("/")
    try:
        return descriptor_pool.Default().FindMethodByName(f"{service}.{name}").input_type
    except KeyError:  # a service whose descriptors are not in the default pool
        return None


def _undecodable(method: str, raw: bytes, exc: Exception) -> errors.GatewayError:
    """INVALID_REQUEST for request bytes that do not decode, naming the bad string's field
    when that is the cause, else the request message as a whole (never an empty field)."""
    name = method.rpartition("/")[2]
    message = _input_of(method)
    path = invalid_utf8_field(message, raw) if message is not None else None
    if path is not None:
        return errors.GatewayError(
            errors.Reason.INVALID_REQUEST,
            f"the request is not a valid {name} message: {path} is not valid UTF-8",
            violations=[Violation(path, "is not valid UTF-8")],
        )
    return errors.GatewayError(
        errors.Reason.INVALID_REQUEST,
        f"the request is not a valid {name} message: {exc}",
        violations=[
            Violation(
                message.name if message is not None else f"{name}Request",
                "is not a valid protobuf encoding of the request",
            )
        ],
    )


class GatewayInterceptor(_ServerInterceptor):
    """Wraps the unary-unary methods of the given services; refuses their other methods."""

    def __init__(
        self, services: set[str], *, observer: Observer | None = None, authorize: Authorize | None = None
    ) -> None:
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
            raise errors.GatewayError(
                errors.Reason.CONCURRENCY_LIMIT_EXCEEDED,
                f"{LARGE_AT_ONCE} large requests are being decoded already; nothing was done: retry shortly",
                retry_delay=0.1,
            )
        try:
            return deserialize(raw)
        finally:
            self._large.release()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Handler | None], details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(details)
        method = details.method  # "/package.Service/Method"
        if handler is None or method.split("/")[1] not in self._services:
            return handler
        if handler.unary_unary is None:
            return _refused(method, handler)
        behavior = handler.unary_unary
        deserialize = handler.request_deserializer
        message = _input_of(method)

        def parse(raw: bytes) -> Any:
            """The request, or INVALID_REQUEST naming what is wrong; found within the decoding's place."""
            assert deserialize is not None
            try:
                return deserialize(raw)
            except (DecodeError, ValueError, RuntimeError) as exc:
                raise _undecodable(method, raw, exc) from None

        def wrapped(raw: bytes, context: grpc.ServicerContext) -> Any:
            structlog.contextvars.clear_contextvars()
            request_id = _request_id(context)
            # Who calls (the mTLS identity, null without one) and from where, on every line of the RPC.
            caller = caller_identity(context.auth_context())
            structlog.contextvars.bind_contextvars(
                request_id=request_id, method=method, caller=caller, peer=context.peer()
            )
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            if self._observer is not None:
                self._observer.started(method)
            try:
                if message is not None and len(raw) > LARGE_REQUEST:  # never decode a hostile count of elements
                    refused = over_cap(message, raw)
                    if refused is not None:
                        raise refused
                request = self._decode(parse, raw, context) if deserialize else raw
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
                _abort(
                    context,
                    errors.internal("the gateway failed unexpectedly; see its log").to_grpc_status(),
                    request_id,
                )
            finally:
                if code == grpc.StatusCode.OK and not context.is_active():  # the caller left first
                    remaining = context.time_remaining()
                    code = (
                        grpc.StatusCode.DEADLINE_EXCEEDED
                        if remaining is not None and remaining <= 0
                        else grpc.StatusCode.CANCELLED
                    )
                elapsed = time.perf_counter() - started
                log.info("rpc", code=code.name, duration_ms=round(elapsed * 1000, 3))
                if self._observer is not None:
                    self._observer.handled(method, code, elapsed)
                structlog.contextvars.clear_contextvars()

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=None, response_serializer=handler.response_serializer
        )
