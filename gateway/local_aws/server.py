"""The local backend over HTTP: AWS's JSON 1.1 protocol, a control API, faults."""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from gateway.local_aws.faults import DEFAULT_MESSAGE, DROP, UNPROCESSED, Fault, Faults, fault_from_json, make_fault
from gateway.local_aws.registration import Registrar
from gateway.local_aws.saas import BATCH_METER_USAGE, DEFAULT_TOKEN_TTL, RESOLVE_CUSTOMER, Saas, SaasRecord
from gateway.local_aws.state import AwsError, Record, State

TARGET_PREFIX = "AWSMPMeteringService."
METER_USAGE = "MeterUsage"
REGISTER_USAGE = "RegisterUsage"
CONTENT_TYPE = "application/x-amz-json-1.1"
BANNER = "LOCAL AWS BACKEND: nothing sent here reaches AWS and nothing is billed"

log = structlog.get_logger("gateway.local_aws")
_AKID = re.compile(r"Credential=([^/,\s]+)/")
# The bodies of POST/DELETE /_local/subscriptions: a license subscription, or (with customer_identifier) a legacy one.
_LICENSE_FIELDS = frozenset({"customer_aws_account_id", "license_arn", "product_code"})
_LEGACY_FIELDS = frozenset({"customer_identifier", "product_code", "customer_aws_account_id"})
_TOKEN_FIELDS = _LICENSE_FIELDS | _LEGACY_FIELDS | {"ttl"}


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
        self.saas = Saas(products=self.state.products)  # BatchMeterUsage, ResolveCustomer (:mod:`.saas`)
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
        type), DROP (the connection closes unanswered), SLOW (the normal answer,
        ``delay`` seconds late) or UNPROCESSED (BatchMeterUsage only, whatever
        ``operation`` says; other operations pass it by: the answer is 200, but the
        last ceil(n/2) of its n records come back in ``UnprocessedRecords`` as sent
        and not in ``Results``). With ``record`` the call is applied to AWS's state
        first, as a successful call would be, and only the answer is lost: a 5xx,
        DROP or SLOW past the client's read timeout; UNPROCESSED records were kept
        all the same, so only an identical resend settles them (``Success``, the
        same MeteringRecordId). ``operation="MeterUsage"`` limits the fault to that
        operation's calls ("BatchMeterUsage", "ResolveCustomer", "RegisterUsage" alike).
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

    # --- SaaS: what buyers did, what AWS billed (:mod:`.saas`) -----------------

    def subscribe(self, *, customer_aws_account_id: str, license_arn: str, product_code: str) -> None:
        """The account subscribed under the license, registered as one of ``product_code``'s
        (ValueError when it is another product's). Several accounts may share one license
        here (AWS grants each agreement its own), so tests meter many customers cheaply."""
        with self.lock:
            self.saas.subscribe(
                customer_aws_account_id=customer_aws_account_id, license_arn=license_arn, product_code=product_code
            )

    def subscribe_legacy(
        self, *, customer_identifier: str, product_code: str, customer_aws_account_id: str = ""
    ) -> None:
        """A legacy customer (CustomerIdentifier) subscribed to ``product_code``."""
        with self.lock:
            self.saas.subscribe_legacy(
                customer_identifier=customer_identifier,
                product_code=product_code,
                customer_aws_account_id=customer_aws_account_id,
            )

    def unsubscribe(
        self,
        *,
        product_code: str,
        customer_aws_account_id: str = "",
        license_arn: str = "",
        customer_identifier: str = "",
    ) -> None:
        """Either subscription ends (legacy when ``customer_identifier`` is given): later records
        for the customer are ``CustomerNotSubscribed``; those kept stay. ValueError: none such."""
        with self.lock:
            self.saas.unsubscribe(
                product_code=product_code,
                customer_aws_account_id=customer_aws_account_id,
                license_arn=license_arn,
                customer_identifier=customer_identifier,
            )

    def subscriptions(self) -> list[dict[str, str]]:
        with self.lock:
            return self.saas.subscriptions()

    def issue_token(
        self,
        *,
        product_code: str,
        customer_aws_account_id: str = "",
        license_arn: str = "",
        customer_identifier: str = "",
        ttl: float = DEFAULT_TOKEN_TTL,
    ) -> str:
        """A registration token for ResolveCustomer, valid ``ttl`` seconds of the backend's clock;
        the buyer it names has subscribed. Without ``customer_identifier`` the answer has none
        (a new integration)."""
        with self.lock:
            now = datetime.fromtimestamp(self.clock(), tz=UTC)
            return self.saas.issue_token(
                now,
                product_code=product_code,
                customer_aws_account_id=customer_aws_account_id,
                license_arn=license_arn,
                customer_identifier=customer_identifier,
                ttl=ttl,
            )

    def saas_records(self) -> list[SaasRecord]:
        """The SaaS records AWS kept (one per customer, dimension and hour)."""
        with self.lock:
            return list(self.saas.records)

    def saas_usage(self) -> list[dict[str, str]]:
        """What AWS bills for SaaS: quantities per ProductCode, LicenseArn, CustomerAWSAccountId,
        CustomerIdentifier, Dimension and Hour (``GET /_local/saas-usage``)."""
        with self.lock:
            return self.saas.usage()

    def reset(self, *, agentcore: bool | None = None) -> None:
        """Forget every record, subscription, token and fault; ``agentcore`` switches AgentCore
        Runtime's rules on or off (None: as they were), so one backend serves tests of both modes."""
        with self.lock:
            self.state = State(
                products=self.state.products, agentcore=self.state.agentcore if agentcore is None else agentcore
            )
            self.saas = Saas(products=self.state.products)
            self.faults.clear()
            self.calls = 0
        self.registrar.reset()

    def handle(
        self, target: str, body: Mapping[str, Any], identity: str, size: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One API call → (HTTP status, JSON body). Raises AwsError or returns.

        ``size`` is the body's length as received (BatchMeterUsage's 1 MB limit); None: unknown.
        """
        with self.lock:
            self.calls += 1
        fault = self.faults.take(target.removeprefix(TARGET_PREFIX))
        if fault is not None and not fault.record:
            _fail(fault)  # before AWS sees the call: nothing recorded (UNPROCESSED: only its delay)
        answer = self._answer(target, body, identity, size, fault)  # a refusal ends here, recorded fault or not
        if fault is not None and fault.record:
            _fail(fault)  # AWS has applied the call; the answer is what goes wrong
        if answer is None:
            raise AwsError("DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)
        return 200, answer

    def _answer(
        self, target: str, body: Mapping[str, Any], identity: str, size: int | None, fault: Fault | None
    ) -> dict[str, Any] | None:
        """AWS's answer to one call, its state changed; None for an accepted dry run."""
        operation = target.removeprefix(TARGET_PREFIX)
        if operation == REGISTER_USAGE:
            return self._register_usage(body, identity)
        if operation == BATCH_METER_USAGE:
            return self._batch_meter_usage(body, size, fault)
        if operation == RESOLVE_CUSTOMER:
            with self.lock:
                return dict(self.saas.resolve_customer(body, self._admit()))
        record = self._apply(target, body, identity)
        return None if record is None else {"MeteringRecordId": record.metering_record_id}

    def _batch_meter_usage(self, body: Mapping[str, Any], size: int | None, fault: Fault | None) -> dict[str, Any]:
        """Every record's result, in order; under an UNPROCESSED fault the last ceil(n/2) are
        handed back unprocessed instead (kept all the same when the fault records)."""
        with self.lock:
            batch = self.saas.accept(body, self._admit(), size)
            held = math.ceil(len(batch.records) / 2) if fault is not None and fault.error == UNPROCESSED else 0
            processed, unprocessed = (
                batch.records[: len(batch.records) - held],
                batch.records[len(batch.records) - held :],
            )
            results = [self.saas.meter(batch, r) for r in processed]
            if fault is not None and fault.record:
                for r in unprocessed:
                    self.saas.meter(batch, r)
        return {"Results": [r.to_json() for r in results], "UnprocessedRecords": [dict(r.sent) for r in unprocessed]}

    def _admit(self) -> datetime:
        """The account's rate limit, as AWS applies it to every operation (under the lock);
        the time the call is taken at."""
        if self.limiter is not None and not self.limiter.allow():
            raise AwsError("ThrottlingException", "Rate exceeded")
        return datetime.fromtimestamp(self.clock(), tz=UTC)

    def _apply(self, target: str, body: Mapping[str, Any], identity: str) -> Record | None:
        """MeterUsage (or an operation AWS does not have)."""
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
        if path.startswith(("/_local/subscriptions", "/_local/tokens", "/_local/saas-")):
            return self._saas_control(method, path, body)
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

    def _saas_control(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """The SaaS control paths: subscriptions, tokens, what AWS kept and bills."""
        if path == "/_local/subscriptions" and method == "GET":
            return 200, self.subscriptions()
        if path == "/_local/subscriptions" and method in ("POST", "DELETE"):
            fields = _fields(body, _LEGACY_FIELDS if "customer_identifier" in body else _LICENSE_FIELDS)
            if method == "DELETE":
                self.unsubscribe(**fields)
            elif "customer_identifier" in fields:
                self.subscribe_legacy(**fields)
            else:
                self.subscribe(**fields)
            return 200, {"ok": True}
        if path == "/_local/tokens" and method == "POST":
            return 200, {"registration_token": self.issue_token(**_fields(body, _TOKEN_FIELDS))}
        if path == "/_local/saas-records" and method == "GET":
            return 200, [r.to_json() for r in self.saas_records()]
        if path == "/_local/saas-usage" and method == "GET":
            return 200, self.saas_usage()
        return 404, {"message": f"no {method} {path}"}


def _fields(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    """A control body's fields as keyword arguments; ValueError for another body."""
    if not isinstance(body, Mapping):
        raise ValueError("the body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise ValueError(f"unknown fields: {sorted(unknown)} (known: {sorted(allowed)})")
    if "product_code" not in body:
        raise ValueError("product_code is required")
    return dict(body)


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

        def _read_raw(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _read_json(self) -> Any:
            raw = self._read_raw()
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
                raw = self._read_raw()
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    raise AwsError("SerializationException", "body is not JSON") from None
                status, payload = backend.handle(target, body, match.group(1), size=len(raw))
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
