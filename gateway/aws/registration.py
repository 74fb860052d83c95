"""RegisterUsage for sidecar mode: register this pod once at start-up, or say why it may not run.

A paid container product calls RegisterUsage when it starts: AWS then meters the
ECS task or EKS pod that made the call (it is never an RPC of the gateway, which
would register its own pod, not the caller's). The call carries a fresh nonce; a
signed answer (a PS256/RS256 JWT) is verified against the seller's public key and
its claims checked (product code, key version, nonce), so a forged answer cannot
unlock the container.

Throttling, AWS's internal errors and an unreachable AWS are retried with capped,
full-jitter backoff for as long as it takes (the pod stays unready meanwhile);
the classification is the status table's (:mod:`gateway.domain.errors`), so
"retryable" means here what it means for MeterUsage. Everything else is final:
:class:`RegistrationRefused`, with the one line the process ends with.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
import structlog
from botocore.exceptions import (
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as AwsConnectionError
from botocore.parsers import ResponseParserError
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.aws.backend import RetryPolicy
from gateway.config import ConfigError
from gateway.domain import errors

if TYPE_CHECKING:
    from mypy_boto3_meteringmarketplace import MarketplaceMeteringClient

ALGORITHMS = ["PS256", "RS256"]  # what AWS Marketplace signs with; never "none", never HMAC
# Backoff stops doubling here: with the policy's cap reached long before, a higher
# power only risks a float overflow after days of retrying.
MAX_DOUBLINGS = 30

log = structlog.get_logger("gateway.registration")

# Why AWS refused, in words an operator acts on; other codes are shown as AWS sent them.
_EXPLAINED = {
    "CustomerNotEntitledException": "the buyer is not subscribed to {product}",
    "PlatformNotSupportedException": (
        "this platform does not support RegisterUsage (it runs on Amazon ECS, Amazon EKS and AWS Fargate)"
    ),
    "InvalidRegionException": "RegisterUsage is not available in the Region {region}",
    "InvalidProductCodeException": "AWS Marketplace does not know the product code {product}",
    "InvalidPublicKeyVersionException": (
        "public key version {version} is not the one AWS Marketplace gave for {product} (--register-usage-key-version)"
    ),
    "DisabledApiException": "the RegisterUsage API is disabled for this account",
}


class RegistrationRefused(Exception):
    """A final outcome: the pod may not run. ``line`` is what the process ends with."""

    def __init__(self, cause: str, detail: str) -> None:
        self.cause = cause  # the AWS error code, or the gateway's own word (BAD_SIGNATURE, ...)
        self.line = f"metering-gateway: RegisterUsage refused: {_one_line(detail)}; a paid container must stop"
        super().__init__(self.line)


class RegistrationAbandoned(Exception):
    """SIGTERM came before any final answer: no further attempt, nothing to end the process with."""

    def __init__(self, attempts: int) -> None:
        super().__init__(f"RegisterUsage abandoned after {attempts} attempt(s): the gateway is stopping")
        self.attempts = attempts


@dataclass(frozen=True)
class Registered:
    """RegisterUsage succeeded: with what nonce, after how many calls, and whether the signature was checked."""

    nonce: str
    attempts: int
    verified: bool
    aws_request_id: str | None
    claims: Mapping[str, Any]


def load_public_key(path: str) -> rsa.RSAPublicKey:
    """The seller's RSA public key from a PEM file; ConfigError (one line) for anything else."""
    try:
        with open(path, "rb") as f:
            key = load_pem_public_key(f.read())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"register-usage-public-key: {path!r} is not a PEM public key ({_one_line(str(exc)) or type(exc).__name__})"
        ) from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ConfigError(f"register-usage-public-key: {path!r} is not an RSA public key (PS256/RS256 need one)")
    return key


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Registrar:
    """Calls RegisterUsage until it succeeds or is refused for good.

    Everything that waits or draws is injected (``sleep``, ``rand``, ``nonce``), so a
    test runs hours of backoff in no time.
    """

    def __init__(
        self,
        client: MarketplaceMeteringClient,
        product_code: str,
        key_version: int,
        public_key: rsa.RSAPublicKey | None,
        policy: RetryPolicy,
        *,
        sleep: Callable[[float], object] = time.sleep,  # an Event's wait too: SIGTERM ends the pause
        rand: Callable[[], float] = random.random,
        nonce: Callable[[], str] = lambda: str(uuid.uuid4()),
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client = client
        self.product_code = product_code
        self.key_version = key_version
        self.public_key = public_key
        self.policy = policy
        self._sleep, self._rand, self._nonce = sleep, rand, nonce
        self._stopped = stopped  # SIGTERM: no further attempt (the pod is going away)

    def register(self) -> Registered:
        """Register this pod; RegistrationRefused for a final refusal or a bad answer."""
        if self.public_key is None:
            log.warning(
                "register_usage_unverified",
                product_code=self.product_code,
                problem="no --register-usage-public-key: RegisterUsage's signature is not verified",
            )
        attempt = 0
        while True:
            if self._stopped():
                raise RegistrationAbandoned(attempt)
            attempt += 1
            nonce = self._nonce()
            try:
                response = self.client.register_usage(
                    ProductCode=self.product_code, PublicKeyVersion=self.key_version, Nonce=nonce
                )
            except ClientError as exc:
                failure = self._refusal_or_retry(exc)
            except (AwsConnectionError, HTTPClientError, ResponseParserError) as exc:
                failure = f"AWS_UNREACHABLE ({_one_line(str(exc))})"
            except CredentialRetrievalError as exc:  # the credential endpoint (ECS agent, Pod Identity) not up yet
                failure = f"CREDENTIALS_UNAVAILABLE ({_one_line(str(exc))})"
            except (NoCredentialsError, PartialCredentialsError) as exc:
                raise RegistrationRefused(
                    "NO_CREDENTIALS",
                    f"no usable AWS credentials ({exc}): the pod needs the ECS task role or, on EKS, IRSA",
                ) from None
            except ParamValidationError as exc:
                raise RegistrationRefused("INVALID_REQUEST", f"botocore refused the request: {exc}") from None
            else:
                return self._accepted(response, nonce, attempt)
            pause = self.policy.delay(min(attempt, MAX_DOUBLINGS), self._rand)
            log.info("register_usage_retry", reason=failure, attempt=attempt, pause_ms=round(pause * 1000, 1))
            self._sleep(pause)

    def _refusal_or_retry(self, exc: ClientError) -> str:
        """The reason to retry for; raises RegistrationRefused when a retry cannot help."""
        error = exc.response.get("Error") or {}
        meta = exc.response.get("ResponseMetadata")
        status = meta.get("HTTPStatusCode") if meta else None
        code = str(error.get("Code") or status or "Unknown")
        classified = errors.from_aws(code, str(error.get("Message") or ""), None, http_status=status)
        if classified.retryable:
            return str(classified.reason)
        explained = _EXPLAINED.get(code)
        if explained is not None:
            detail = explained.format(
                product=self.product_code, version=self.key_version, region=self.client.meta.region_name
            )
        elif classified.reason in errors.CREDENTIALS_REFUSED or classified.reason in (
            errors.Reason.ACCESS_DENIED,
            errors.Reason.UNAUTHORIZED,
        ):
            detail = f"AWS refused the pod's credentials: {classified.message} (it needs aws-marketplace:RegisterUsage)"
        else:
            detail = f"AWS answered {classified.message}"
        raise RegistrationRefused(code, f"{detail} ({code})")

    def _accepted(self, response: Mapping[str, Any], nonce: str, attempts: int) -> Registered:
        meta = response.get("ResponseMetadata") or {}
        request_id = meta.get("RequestId")
        signature = response.get("Signature")
        if self.public_key is None:
            return Registered(nonce, attempts, False, request_id, {})
        if not signature:
            raise RegistrationRefused("NO_SIGNATURE", "AWS's answer carries no signature to verify")
        try:
            claims: dict[str, Any] = jwt.decode(signature, self.public_key, algorithms=ALGORITHMS)
        except jwt.PyJWTError as exc:
            raise RegistrationRefused(
                "BAD_SIGNATURE", f"the answer's signature does not verify against --register-usage-public-key ({exc})"
            ) from None
        expected = {"productCode": self.product_code, "publicKeyVersion": self.key_version, "nonce": nonce}
        # Compared as text: the version may come as a number or a string (AWS's own example compares text).
        wrong = [name for name, want in expected.items() if name not in claims or str(claims[name]) != str(want)]
        if wrong:
            shown = ", ".join(f"{name} {claims.get(name)!r} (sent {expected[name]!r})" for name in wrong)
            raise RegistrationRefused("CLAIMS_MISMATCH", f"the signed answer is not for this request: {shown}")
        return Registered(nonce, attempts, True, request_id, claims)
