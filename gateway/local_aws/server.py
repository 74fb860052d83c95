"""The local backend over HTTP: AWS's JSON 1.1 protocol, a control API, faults."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from gateway.local_aws.faults import DEFAULT_MESSAGE, DROP, Fault, Faults, fault_from_json, make_fault
from gateway.local_aws.registration import Registrar
from gateway.local_aws.state import AwsError, Record, State

TARGET_PREFIX = "AWSMPMeteringService."
METER_USAGE = "MeterUsage"
REGISTER_USAGE = "RegisterUsage"
CONTENT_TYPE = "application/x-amz-json-1.1"
BANNER = "LOCAL AWS BACKEND: nothing sent here reaches AWS and nothing is billed"

log = structlog.get_logger("gateway.local_aws")
_AKID = re.compile(r"Credential=([^/,\s]+)/")


class Throttle:
    """AWS's rate limit as the local backend plays it: ``rate`` calls a second (a burst
    of as many), and a call past it is refused, never made to wait. Its own, not the
    sender's limiter: the stand-in imports nothing of the gateway, so that it stays a
    judge of the gateway rather than an echo of it."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self._clock = rate, clock
        self._burst = max(1.0, rate)
        self._tokens, self._last = self._burst, clock()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


class LocalAws:
    """The local backend: start(), use ``endpoint_url``, stop()."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        products: Mapping[str, Iterable[str]] | None = None,
        max_rps: float | None = None,
        agentcore: bool = False,
        clock: Callable[[], float] = time.time,
        quiet: bool = False,
        public_key_version: int = 1,
    ) -> None:
        self.state = State(
            products=None if products is None else {p: frozenset(d) for p, d in products.items()},
            agentcore=agentcore,  # AgentCore Runtime's rules (state.py): many records an hour, a ClientToken each
        )
        self.registrar = Registrar(public_key_version=public_key_version)  # RegisterUsage (:mod:`.registration`)
        self.clock = clock
        self.limiter = Throttle(max_rps) if max_rps else None
        self.faults = Faults()
        self.calls = 0
        self.lock = threading.Lock()
        self.quiet = quiet
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint_url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://{host}:{self.port}"

    def start(self) -> LocalAws:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="local-aws", daemon=True)
        self._thread.start()
        if not self.quiet:
            log.warning("local_aws_started", endpoint=self.endpoint_url, agentcore=self.agentcore, notice=BANNER)
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for a loop that must have started
            self._server.shutdown()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LocalAws:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(
        self,
        error: str,
        count: int = 1,
        *,
        message: str = DEFAULT_MESSAGE,
        status: int | None = None,
        delay: float = 0.0,
        record: bool = False,
        operation: str | None = None,
    ) -> None:
        """The next ``count`` API calls fail with ``error`` after ``delay`` seconds.

        ``error`` is an AWS error code, ``""`` (only the HTTP ``status``, no error
        type), DROP (the connection closes unanswered) or SLOW (the normal answer,
        ``delay`` seconds late). With ``record`` the call is applied to AWS's state
        first, as a successful call would be, and only the answer is lost: a 5xx,
        DROP or SLOW past the client's read timeout. ``operation="MeterUsage"``
        limits the fault to that operation's calls.
        """
        self.faults.add(
            make_fault(error, count, message=message, status=status, delay=delay, record=record, operation=operation)
        )

    def clear_faults(self) -> None:
        self.faults.clear()

    def records(self) -> list[Record]:
        with self.lock:
            return list(self.state.records)

    @property
    def agentcore(self) -> bool:
        """True while AgentCore Runtime's rules apply (the constructor's, or the last reset's)."""
        return self.state.agentcore

    def usage(self) -> list[dict[str, Any]]:
        """What AWS bills, per product, dimension and hour: the records' quantities summed
        (``GET /_local/usage``); in AgentCore Runtime mode an hour holds many records."""
        with self.lock:
            totals = self.state.totals()
        return [
            {"ProductCode": p, "UsageDimension": d, "Hour": h.isoformat(), "Quantity": str(q)}
            for (p, d, h), q in sorted(totals.items())
        ]

    def reset(self, *, agentcore: bool | None = None) -> None:
        """Forget every record and fault; ``agentcore`` switches AgentCore Runtime's rules on
        or off (None: as they were), so one backend serves tests of both modes."""
        with self.lock:
            self.state = State(
                products=self.state.products, agentcore=self.state.agentcore if agentcore is None else agentcore
            )
            self.faults.clear()
            self.calls = 0
        self.registrar.reset()

    def handle(self, target: str, body: Mapping[str, Any], identity: str) -> tuple[int, dict[str, Any]]:
        """One API call → (HTTP status, JSON body). Raises AwsError or returns."""
        with self.lock:
            self.calls += 1
        fault = self.faults.take(target.removeprefix(TARGET_PREFIX))
        if fault is not None and not fault.record:
            _fail(fault)  # before AWS sees the call: nothing recorded
        if target == TARGET_PREFIX + REGISTER_USAGE:
            answer = self._register_usage(body, identity)
            if fault is not None and fault.record:
                _fail(fault)  # AWS has registered the pod; the answer is lost
            return 200, answer
        record = self._apply(target, body, identity)  # a refusal ends here, recorded fault or not
        if fault is not None and fault.record:
            _fail(fault)  # AWS has recorded the call; the answer is what goes wrong
        if record is None:
            raise AwsError("DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)
        return 200, {"MeteringRecordId": record.metering_record_id}

    def _admit(self) -> datetime:
        """The account's rate limit, as AWS applies it to every operation (under the lock);
        the time the call is taken at."""
        if self.limiter is not None and not self.limiter.allow():
            raise AwsError("ThrottlingException", "Rate exceeded")
        return datetime.fromtimestamp(self.clock(), tz=UTC)

    def _apply(self, target: str, body: Mapping[str, Any], identity: str) -> Record | None:
        with self.lock:
            now = self._admit()
            if target != TARGET_PREFIX + METER_USAGE:
                raise AwsError("UnknownOperationException", f"unknown operation {target}")
            return self.state.meter_usage(body, identity, now)

    def _register_usage(self, body: Mapping[str, Any], identity: str) -> dict[str, Any]:
        with self.lock:
            now = self._admit()
            products = self.state.products
        return self.registrar.register(body, identity, now, products)

    def control(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if path == "/_local/register-usage" and method == "GET":
            return 200, self.registrar.describe()
        if path == "/_local/register-usage" and method == "POST":
            self.registrar.configure(body)
            return 200, self.registrar.describe()
        if path == "/_local/records" and method == "GET":
            return 200, [r.to_json() for r in self.records()]
        if path == "/_local/usage" and method == "GET":  # what AWS bills: records summed per product, dimension, hour
            return 200, self.usage()
        if path == "/_local/mode" and method == "GET":
            return 200, {"agentcore": self.agentcore}
        if path == "/_local/faults" and method == "GET":  # what is still to come; empty once taken
            return 200, [f.to_json() for f in self.faults.pending()]
        if path == "/_local/faults" and method == "POST":
            self.faults.add(fault_from_json(body))
            return 200, {"ok": True}
        if path == "/_local/faults" and method == "DELETE":
            self.clear_faults()
            return 200, {"ok": True}
        if path == "/_local/reset" and method == "POST":  # {"agentcore": true} also switches the rules
            self.reset(agentcore=_agentcore_of(body))
            return 200, {"ok": True}
        return 404, {"message": f"no {method} {path}"}


def _agentcore_of(body: Any) -> bool | None:
    """``{"agentcore": true|false}`` of a reset, or None (the rules stay as they are)."""
    value = body.get("agentcore") if isinstance(body, Mapping) else None
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"agentcore must be true or false, got {value!r}")
    return value


def _fail(fault: Fault) -> None:
    """Wait out the fault's delay (outside every lock), then fail unless it is SLOW."""
    time.sleep(fault.delay)
    failure = fault.failure()
    if failure is not None:
        raise failure


def _handler_for(backend: LocalAws) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects
        server_version = "local-aws"
        disable_nagle_algorithm = True  # headers and body go in two writes; don't wait 40 ms for an ACK

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            pass

        def _read_json(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            return json.loads(raw) if raw else {}

        def _send(self, status: int, payload: Any, request_id: str | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(data)))
                if request_id:
                    self.send_header("x-amzn-RequestId", request_id)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the caller gave up waiting (SLOW past its timeout)
                self.close_connection = True

        def do_GET(self) -> None:
            self._control("GET")

        def do_DELETE(self) -> None:
            self._control("DELETE")

        def _control(self, method: str) -> None:
            try:
                body = self._read_json() if method != "GET" else {}
                status, payload = backend.control(method, self.path, body)
            except (ValueError, KeyError, TypeError) as exc:
                status, payload = 400, {"message": str(exc)}
            self._send(status, payload)

        def do_POST(self) -> None:
            if self.path.startswith("/_local/"):
                self._control("POST")
                return
            request_id = str(uuid.uuid4())
            try:
                target = self.headers.get("X-Amz-Target", "")
                auth = self.headers.get("Authorization", "")
                match = _AKID.search(auth)
                if not auth.startswith("AWS4-HMAC-SHA256") or not match:
                    self._read_json()
                    raise AwsError("MissingAuthenticationTokenException", "Missing Authentication Token", 403)
                try:
                    body = self._read_json()
                except ValueError:
                    raise AwsError("SerializationException", "body is not JSON") from None
                status, payload = backend.handle(target, body, match.group(1))
            except AwsError as exc:
                if exc.code == DROP:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                # No error type at all (a load balancer's 5xx): botocore then takes the HTTP status as the code.
                error = {"__type": exc.code, "message": exc.message} if exc.code else {"message": exc.message}
                self._send(exc.status, error, request_id)
                return
            self._send(status, payload, request_id)

    return Handler
