"""A local stand-in for the AWS Marketplace Metering endpoint. Nothing is billed.

It speaks AWS's JSON 1.1 protocol on a loopback port, so a real boto3 client
(signing, serialising, parsing errors) talks to it as it would to AWS, and it
keeps AWS's rules:

- one record per product, dimension and hour (the timestamp rounded down) per
  caller identity; the identical request again returns the same record id
  (quantities compared by value: 17 == 17.0), another quantity is a
  ``DuplicateRequestException``;
- a ``ClientToken`` replayed with the same parameters returns the same record,
  with other parameters an ``IdempotencyConflictException``;
- timestamps older than six hours (or in the future) are out of bounds;
- the request rules of :mod:`gateway.validation` (allocation sums, tags, ...),
  answered with AWS's exception names;
- ``DryRun`` answers ``DryRunOperation`` without recording anything.

For tests of the callers it can also refuse unknown products and dimensions,
throttle above a rate, and inject errors or dropped connections on demand, in
process (:meth:`LocalAws.inject`) or over HTTP (``POST /_local/faults``).
``GET /_local/records`` lists what it recorded, ``GET /_local/faults`` the faults not yet taken.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from gateway import params as aws_params
from gateway import validation
from gateway.ratelimit import RateLimiter

TARGET_PREFIX = "AWSMPMeteringService."
CONTENT_TYPE = "application/x-amz-json-1.1"
DROP = "drop"  # a fault that closes the connection without an answer
SLOW = "slow"  # a fault that only delays the answer (with ``delay``): a slow AWS
BANNER = "LOCAL AWS BACKEND: nothing sent here reaches AWS and nothing is billed"

log = structlog.get_logger("gateway.local_aws")
_AKID = re.compile(r"Credential=([^/,\s]+)/")


class AwsError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass
class Fault:
    error: str  # an AWS error code, DROP or SLOW
    remaining: int
    message: str = "injected by the local backend"
    status: int = 400
    delay: float = 0.0  # seconds to wait before failing (or, for SLOW, answering)


@dataclass(frozen=True)
class Record:
    """A metering record as AWS keeps it."""

    metering_record_id: str
    identity: str
    product_code: str
    usage_dimension: str
    hour: datetime
    timestamp: datetime
    quantity: Decimal
    allocations: tuple[tuple[frozenset[tuple[str, str]], Decimal], ...]
    client_token: str

    def to_json(self) -> dict[str, Any]:
        return {
            "MeteringRecordId": self.metering_record_id,
            "Identity": self.identity,
            "ProductCode": self.product_code,
            "UsageDimension": self.usage_dimension,
            "Hour": self.hour.isoformat(),
            "Timestamp": self.timestamp.isoformat(),
            "Quantity": str(self.quantity),
            "Allocations": [
                {"Tags": sorted([k, v] for k, v in tags), "Quantity": str(q)} for tags, q in self.allocations
            ],
            "ClientToken": self.client_token,
        }


def _value(q: Decimal) -> Decimal:
    """Quantities compare by value: 17, 17.0 and 17.00 are one quantity."""
    return q.normalize() if q else Decimal(0)


@dataclass
class State:
    """AWS's side of the rules: pure bookkeeping, no I/O."""

    products: Mapping[str, frozenset[str]] | None = None  # None: every product and dimension exists
    max_age: timedelta = validation.MAX_AGE
    future_skew: timedelta = timedelta(minutes=5)
    by_hour: dict[tuple[str, str, str, datetime], tuple[tuple[Any, ...], Record]] = field(default_factory=dict)
    by_token: dict[str, tuple[tuple[Any, ...], Record]] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)

    def meter_usage(self, body: Mapping[str, Any], identity: str, now: datetime) -> Record | None:
        """Apply AWS's rules; return the record (None for an accepted dry run)."""
        req = aws_params.from_aws(dict(body))
        window = validation.Window(now=now, future_skew=self.future_skew, max_age=self.max_age)
        violations = validation.validate_meter_usage(req, window)
        if violations:
            first = violations[0]
            raise AwsError(first.aws_error, f"{_aws_field(first.field)} {first.description}")
        if self.products is not None:
            if req.product_code not in self.products:
                raise AwsError("InvalidProductCodeException", f"Unknown product code {req.product_code}")
            if req.usage_dimension not in self.products[req.product_code]:
                raise AwsError("InvalidUsageDimensionException", f"Unknown usage dimension {req.usage_dimension}")
        if req.dry_run:
            return None
        when = req.timestamp.ToDatetime(tzinfo=timezone.utc)
        hour = when.replace(minute=0, second=0, microsecond=0)
        _, quantity, _ = validation.quantity_of(req)
        total = _value(quantity or Decimal(0))
        allocations = tuple(
            sorted(
                ((validation.tag_set(a.tags), _value(validation.quantity_of(a)[1] or Decimal(0))) for a in req.usage_allocations),
                key=lambda item: sorted(item[0]),
            )
        )
        same_hour_value = (total, allocations)
        token_value = (req.product_code, req.usage_dimension, when, total, allocations)
        token = req.client_token
        if token and token in self.by_token:
            seen, record = self.by_token[token]
            if seen != token_value:
                raise AwsError("IdempotencyConflictException", "ClientToken was used with other parameters")
            return record
        key = (identity, req.product_code, req.usage_dimension, hour)
        if key in self.by_hour:
            seen, record = self.by_hour[key]
            if seen != same_hour_value:
                raise AwsError(
                    "DuplicateRequestException",
                    f"A record for {req.usage_dimension} in the hour {hour.isoformat()} exists with another quantity",
                )
        else:
            record = Record(
                metering_record_id=str(uuid.uuid4()),
                identity=identity,
                product_code=req.product_code,
                usage_dimension=req.usage_dimension,
                hour=hour,
                timestamp=when,
                quantity=quantity or Decimal(0),
                allocations=allocations,
                client_token=token,
            )
            self.by_hour[key] = (same_hour_value, record)
            self.records.append(record)
        if token:
            self.by_token[token] = (token_value, record)
        return record


def _aws_field(proto_path: str) -> str:
    """``usage_allocations[1].tags`` → ``UsageAllocations[1].Tags`` for AWS-like messages."""
    return ".".join(
        "".join(w.capitalize() for w in part.split("_"))
        for part in proto_path.split(".")
    )


class LocalAws:
    """The local backend: start(), use ``endpoint_url``, stop()."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        products: Mapping[str, Iterable[str]] | None = None,
        max_rps: float | None = None,
        clock: Callable[[], float] = time.time,
        quiet: bool = False,
    ) -> None:
        self.state = State(products=None if products is None else {p: frozenset(d) for p, d in products.items()})
        self.clock = clock
        self.limiter = RateLimiter(max_rps) if max_rps else None
        self.faults: deque[Fault] = deque()
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
            log.warning("local_aws_started", endpoint=self.endpoint_url, notice=BANNER)
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
        self, error: str, count: int = 1, *, message: str = "injected by the local backend", status: int | None = None,
        delay: float = 0.0,
    ) -> None:
        """The next ``count`` MeterUsage calls fail with ``error`` (or DROP), after ``delay`` seconds.

        ``inject(SLOW, delay=2)`` answers the next call normally, two seconds late.
        """
        if status is None:
            status = 500 if error in ("InternalServiceErrorException",) else 400
        with self.lock:
            self.faults.append(Fault(error, count, message, status, delay))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def records(self) -> list[Record]:
        with self.lock:
            return list(self.state.records)

    def reset(self) -> None:
        with self.lock:
            self.state = State(products=self.state.products)
            self.faults.clear()
            self.calls = 0

    def handle(self, target: str, body: Mapping[str, Any], identity: str) -> tuple[int, dict[str, Any]]:
        """One API call → (HTTP status, JSON body). Raises AwsError or returns."""
        with self.lock:
            self.calls += 1
            fault = self.faults[0] if self.faults else None
            if fault is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.faults.popleft()
        if fault is not None:
            time.sleep(fault.delay)  # outside the lock: other calls go on meanwhile
            if fault.error != SLOW:
                raise AwsError(fault.error, fault.message, fault.status)
        with self.lock:
            if self.limiter is not None and not self.limiter.allow():
                raise AwsError("ThrottlingException", "Rate exceeded")
            if target != TARGET_PREFIX + "MeterUsage":
                raise AwsError("UnknownOperationException", f"unknown operation {target}")
            now = datetime.fromtimestamp(self.clock(), tz=timezone.utc)
            record = self.state.meter_usage(body, identity, now)
        if record is None:
            raise AwsError("DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)
        return 200, {"MeteringRecordId": record.metering_record_id}

    def control(self, method: str, path: str, body: Mapping[str, Any]) -> tuple[int, Any]:
        if path == "/_local/records" and method == "GET":
            return 200, [r.to_json() for r in self.records()]
        if path == "/_local/faults" and method == "GET":  # what is still to come; empty once taken
            with self.lock:
                return 200, [{"error": f.error, "remaining": f.remaining, "delay": f.delay} for f in self.faults]
        if path == "/_local/faults" and method == "POST":
            self.inject(str(body["error"]), int(body.get("count", 1)), message=str(body.get("message", "injected")),
                        status=body.get("status"), delay=float(body.get("delay", 0.0)))
            return 200, {"ok": True}
        if path == "/_local/faults" and method == "DELETE":
            self.clear_faults()
            return 200, {"ok": True}
        if path == "/_local/reset" and method == "POST":
            self.reset()
            return 200, {"ok": True}
        return 404, {"message": f"no {method} {path}"}


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
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            if request_id:
                self.send_header("x-amzn-RequestId", request_id)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            self._control("GET")

        def do_DELETE(self) -> None:  # noqa: N802
            self._control("DELETE")

        def _control(self, method: str) -> None:
            try:
                body = self._read_json() if method != "GET" else {}
                status, payload = backend.control(method, self.path, body)
            except (ValueError, KeyError, TypeError) as exc:
                status, payload = 400, {"message": str(exc)}
            self._send(status, payload)

        def do_POST(self) -> None:  # noqa: N802
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
                self._send(exc.status, {"__type": exc.code, "message": exc.message}, request_id)
                return
            self._send(status, payload, request_id)

    return Handler
