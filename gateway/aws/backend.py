"""The shared boto3 client and the one AWS call, retried within the deadline.

One client serves every RPC: boto3 clients are thread-safe and creating one costs
tens of milliseconds. botocore's own retries are off (one attempt per call)
because they cannot see the caller's gRPC deadline; this module retries instead,
only what the error table marks retryable, never starting an attempt or a sleep
that the deadline cannot hold, and always with the same ClientToken, so a retried
request is the same request. ``adaptive`` mode keeps botocore's client-side rate
limiter, which works per attempt.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ProxyConnectionError,
)
from botocore.exceptions import ConnectionError as AwsConnectionError

from gateway.aws.params import BatchMeterUsageParams, MeterUsageParams, RecordKey, loose_key, record_key
from gateway.config import Settings
from gateway.domain import errors
from gateway.observability import metrics

if TYPE_CHECKING:  # the stubs are a dev dependency only
    from mypy_boto3_meteringmarketplace import MarketplaceMeteringClient
    from mypy_boto3_meteringmarketplace.type_defs import MeterUsageRequestTypeDef

SERVICE: Final = "meteringmarketplace"
# The operations, as AWS names them (and the metrics' ``operation`` label).
METER_USAGE: Final = "MeterUsage"
BATCH_METER_USAGE: Final = "BatchMeterUsage"
RESOLVE_CUSTOMER: Final = errors.REGISTRATION_OPERATION  # the error table tells its ExpiredTokenException apart
# What NO_CREDENTIALS tells the operator the gateway needs (credentials.py diagnoses more).
BUYER_CREDENTIALS = "it needs the EC2 instance role, the ECS task role or, on EKS, IRSA"
SELLER_CREDENTIALS = "SaaS calls are signed by the seller's account: a role or keys of that account"
DRY_RUN_OK = "DryRunOperation"
# Below this much time left there is no point starting an AWS attempt.
MIN_ATTEMPT_SECONDS = 0.005

# botocore's transport failures. Only these say the request never left: no connection
# to AWS or to the proxy. Every other one (a read timeout, a dropped connection, a TLS
# error, which urllib3 raises for a handshake and for a broken response alike) may
# come after AWS recorded the request.
_TRANSPORT_ERRORS = (AwsConnectionError, HTTPClientError)
_NOT_SENT = (EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError)
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)

log = structlog.get_logger("gateway.backend")


@dataclass(frozen=True)
class Outcome:
    """What AWS said to a MeterUsage call that succeeded (or a dry run it accepted)."""

    metering_record_id: str
    dry_run: bool
    attempts: int
    aws_request_id: str | None
    client_token: str


@dataclass(frozen=True, order=True)
class RecordResult:
    """What AWS did with one record of a BatchMeterUsage call (``index`` into the call's records)."""

    index: int
    status: str  # Success, CustomerNotSubscribed, DuplicateRecord (or what AWS adds later)
    metering_record_id: str


@dataclass(frozen=True)
class BatchOutcome:
    """A BatchMeterUsage call that AWS answered: every record sent is in exactly one of
    ``results`` and ``unprocessed`` (indices into the call's records)."""

    results: tuple[RecordResult, ...]
    unprocessed: tuple[int, ...]
    attempts: int
    aws_request_id: str | None


@dataclass(frozen=True)
class Customer:
    """ResolveCustomer's answer."""

    customer_identifier: str
    product_code: str
    customer_aws_account_id: str
    license_arn: str


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    base: float = 0.1
    cap: float = 5.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Full-jitter exponential backoff before attempt ``attempt + 1``."""
        factor: int = 2 ** (attempt - 1)  # int ** int is typed Any (a negative power is a float)
        return rand() * min(self.cap, self.base * factor)

    def hint(self, attempt: int) -> float:
        """The delay a caller is told to wait (RetryInfo), without jitter."""
        factor: int = 2 ** (attempt - 1)
        return min(self.cap, self.base * factor)


def make_client(
    settings: Settings,
    *,
    endpoint_url: str | None = None,
    session: boto3.session.Session | None = None,
) -> MarketplaceMeteringClient:
    """The one shared client: default credential chain, region from the env."""
    session = session or boto3.session.Session()
    # Settings accepts only its choices (standard, adaptive).
    mode = cast(Literal["legacy", "standard", "adaptive"], settings.aws_retry_mode)
    config = Config(  # type: ignore[call-arg]  # botocore has user_agent_appid; botocore-stubs 1.43 does not
        retries={"mode": mode, "total_max_attempts": 1},
        max_pool_connections=settings.max_workers,
        connect_timeout=settings.aws_connect_timeout,
        read_timeout=settings.aws_read_timeout,
        user_agent_appid="metering-gateway",
        tcp_keepalive=True,
    )
    return session.client(SERVICE, endpoint_url=endpoint_url, config=config)


def _request_id(response: Mapping[str, Any]) -> str | None:
    meta = response.get("ResponseMetadata") or {}
    return meta.get("RequestId") or (meta.get("HTTPHeaders") or {}).get("x-amzn-requestid")


@dataclass(frozen=True)
class _Answer:
    """What one call's attempts ended with: AWS's answer (for an accepted dry run, the
    DryRunOperation error's, which carries the request id), and how many attempts it took."""

    response: Mapping[str, Any]
    attempts: int
    dry_run: bool = False


class Backend:
    """Calls AWS Marketplace Metering and turns every failure into a GatewayError."""

    def __init__(
        self,
        client: MarketplaceMeteringClient,
        policy: RetryPolicy = RetryPolicy(),
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        source: str = metrics.METER_USAGE,
        credentials_hint: str = BUYER_CREDENTIALS,
    ) -> None:
        self.client = client
        self.credentials_hint = credentials_hint  # what NO_CREDENTIALS says the gateway needs
        self.policy = policy
        self._clock = clock
        self._sleep = sleep
        self.source = source  # who calls through this backend, for the AWS metrics

    def meter_usage(self, params: MeterUsageParams, *, deadline: float | None = None) -> Outcome:
        """One MeterUsage, retried while it can help and the deadline allows.

        ``deadline`` is on this object's clock (monotonic seconds); None means no
        deadline. The ClientToken is fixed before the first attempt. Each call and
        each attempt is counted by its outcome (``gateway.observability.metrics``).
        """
        params = params.copy()
        params.setdefault("ClientToken", str(uuid.uuid4()))
        # The stubs' MeterUsageRequestTypeDef has no decimal quantities (params.py).
        answer = self._counted(
            METER_USAGE, lambda: self.client.meter_usage(**cast("MeterUsageRequestTypeDef", params)), deadline
        )
        request_id = _request_id(answer.response)
        if answer.dry_run:
            return Outcome("", True, answer.attempts, request_id, "")
        record_id = str(answer.response.get("MeteringRecordId") or "")
        return Outcome(record_id, False, answer.attempts, request_id, params["ClientToken"])

    def batch_meter_usage(self, params: BatchMeterUsageParams, *, deadline: float | None = None) -> BatchOutcome:
        """One BatchMeterUsage call, retried whole while it can help and the deadline allows
        (BatchMeterUsage has no ClientToken: AWS keeps one record per customer, dimension
        and hour, so the identical records again are the same records). Each record sent
        comes back once: in ``results`` with its status, or in ``unprocessed``."""
        answer = self._counted(BATCH_METER_USAGE, lambda: self.client.batch_meter_usage(**cast(Any, params)), deadline)
        response, attempts = answer.response, answer.attempts  # no dry run in BatchMeterUsage
        sent = params["UsageRecords"]
        waiting: dict[RecordKey, list[int]] = {}
        for i, record in enumerate(sent):
            waiting.setdefault(record_key(record), []).append(i)
        results: list[RecordResult] = []
        unmatched: list[tuple[RecordKey, Mapping[str, Any]]] = []
        for item in response.get("Results") or []:
            key = record_key(item.get("UsageRecord") or {})
            slots = waiting.get(key)
            if slots:
                results.append(
                    RecordResult(slots.pop(0), str(item.get("Status") or ""), item.get("MeteringRecordId") or "")
                )
            else:
                unmatched.append((key, item))
        if unmatched:  # AWS wrote the echo otherwise: match by customer, dimension and hour where unique
            loose: dict[tuple[str, str, str, str, int], list[int]] = {}
            for key, slots in waiting.items():
                for i in slots:
                    loose.setdefault(loose_key(key), []).append(i)
            for key, item in unmatched:
                candidates = loose.get(loose_key(key), [])
                if len(candidates) == 1:
                    index = candidates.pop()
                    waiting[record_key(sent[index])].remove(index)
                    results.append(
                        RecordResult(index, str(item.get("Status") or ""), item.get("MeteringRecordId") or "")
                    )
                else:
                    log.warning("aws_result_unmatched", usage_record=str(item.get("UsageRecord"))[:500])
        # Unprocessed, or (a broken answer) neither: AWS may hold it either way.
        unprocessed = sorted(i for slots in waiting.values() for i in slots)
        return BatchOutcome(tuple(sorted(results)), tuple(unprocessed), attempts, _request_id(response))

    def resolve_customer(self, token: str, *, deadline: float | None = None) -> Customer:
        """ResolveCustomer: a registration token → the customer it names."""
        response = self._counted(
            RESOLVE_CUSTOMER, lambda: self.client.resolve_customer(RegistrationToken=token), deadline
        ).response
        return Customer(
            customer_identifier=str(response.get("CustomerIdentifier") or ""),
            product_code=str(response.get("ProductCode") or ""),
            customer_aws_account_id=str(response.get("CustomerAWSAccountId") or ""),
            license_arn=str(response.get("LicenseArn") or ""),
        )

    def _counted(self, operation: str, send: Callable[[], Mapping[str, Any]], deadline: float | None) -> _Answer:
        """:meth:`_attempts`, with the call counted by its outcome."""
        try:
            answer = self._attempts(operation, send, deadline)
        except errors.GatewayError as exc:
            metrics.aws_call(self.source, exc.reason, operation)
            raise
        except Exception:
            metrics.aws_call(self.source, errors.Reason.INTERNAL, operation)  # what the interceptor will answer
            raise
        metrics.aws_call(self.source, metrics.DRY_RUN if answer.dry_run else metrics.OK, operation)
        return answer

    def _attempts(self, operation: str, send: Callable[[], Mapping[str, Any]], deadline: float | None) -> _Answer:
        """AWS's answer and the attempts it took, retrying what the error table marks
        retryable within ``deadline``."""
        if deadline is not None and deadline - self._clock() < MIN_ATTEMPT_SECONDS:
            raise errors.GatewayError(
                errors.Reason.DEADLINE_EXCEEDED, "the caller's deadline ran out before AWS could be called"
            )
        attempt = 0
        while True:
            attempt += 1
            structlog.contextvars.bind_contextvars(attempts=attempt)
            started = time.perf_counter()
            try:
                response = send()
            except ClientError as exc:
                failure = self._from_client_error(exc, attempt, operation)
                if failure is None:
                    metrics.aws_attempt(self.source, metrics.DRY_RUN, time.perf_counter() - started, operation)
                    return _Answer(exc.response, attempt, dry_run=True)
            except _TRANSPORT_ERRORS as exc:
                failure = errors.GatewayError(
                    errors.Reason.AWS_UNREACHABLE,
                    f"AWS Marketplace Metering is unreachable: {exc}",
                    retry_delay=self.policy.hint(attempt),
                    maybe_delivered=not isinstance(exc, _NOT_SENT),
                )
            except _CREDENTIAL_ERRORS as exc:  # before signing: this attempt sent nothing
                raise errors.GatewayError(
                    errors.Reason.NO_CREDENTIALS,
                    f"the gateway has no usable AWS credentials ({exc}); {self.credentials_hint}",
                    aws_attempts=attempt - 1,
                ) from None
            except ParamValidationError as exc:  # before sending
                raise errors.GatewayError(
                    errors.Reason.INVALID_REQUEST, f"refused by botocore: {exc}", aws_attempts=attempt - 1
                ) from None
            else:
                metrics.aws_attempt(self.source, metrics.OK, time.perf_counter() - started, operation)
                structlog.contextvars.bind_contextvars(aws_request_id=_request_id(response))
                return _Answer(response, attempt)

            # Every answer is an attempt (missing credentials and botocore's own checks,
            # raised above, sent nothing and count only as the call's reason).
            metrics.aws_attempt(self.source, failure.reason, time.perf_counter() - started, operation)
            # The caller hears how many AWS calls this request cost, so that its own
            # gRPC retries do not multiply them (see GatewayError.pushback_ms).
            failure.aws_attempts = attempt
            if not failure.retryable or attempt >= self.policy.max_attempts:
                raise failure
            pause = self.policy.delay(attempt)
            if deadline is not None:
                left = deadline - self._clock()
                if left - pause < MIN_ATTEMPT_SECONDS:
                    raise failure  # no time for another attempt: say what stopped us
            log.info("aws_retry", reason=failure.reason, attempt=attempt, pause_ms=round(pause * 1000, 1))
            metrics.aws_retry(self.source, failure.reason, operation)
            self._sleep(pause)

    def _from_client_error(self, exc: ClientError, attempt: int, operation: str) -> errors.GatewayError | None:
        """AWS's error answer as a GatewayError; None for an accepted dry run."""
        error = exc.response.get("Error") or {}
        meta = exc.response.get("ResponseMetadata")
        status = meta.get("HTTPStatusCode") if meta else None
        code = str(error.get("Code") or status or "Unknown")  # no error type: its HTTP status
        request_id = _request_id(exc.response)
        structlog.contextvars.bind_contextvars(aws_request_id=request_id)
        if code == DRY_RUN_OK:
            return None
        return errors.from_aws(
            code,
            str(error.get("Message") or ""),
            request_id,
            retry_delay=self.policy.hint(attempt),
            http_status=status,
            operation=operation,
        )
