"""RegisterUsage at start-up (gateway/aws/registration.py), against the local backend through a real boto3 client.

Backoff runs on an injected sleep: no test waits on the wall clock.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, CredentialRetrievalError, EndpointConnectionError
from cryptography.hazmat.primitives.asymmetric import rsa
from structlog.testing import capture_logs

from gateway.aws.backend import RetryPolicy
from gateway.aws.registration import Registrar, RegistrationAbandoned, RegistrationRefused, load_public_key
from gateway.config import ConfigError
from gateway.local_aws import LocalAws
from support import local_session

PRODUCT = "prod-abc123"
POLICY = RetryPolicy(max_attempts=4, base=0.1, cap=2.0)


@pytest.fixture
def aws() -> Iterator[LocalAws]:
    with LocalAws(quiet=True, products={PRODUCT: ["requests"]}) as backend:
        yield backend


def client(aws: LocalAws) -> Any:
    conf = Config(retries={"total_max_attempts": 1}, read_timeout=5)
    return local_session().client("meteringmarketplace", endpoint_url=aws.endpoint_url, config=conf)


def public_key(aws: LocalAws, tmp_path: Path) -> rsa.RSAPublicKey:
    path = tmp_path / "seller.pem"
    path.write_text(aws.registrar.public_key_pem())
    return load_public_key(str(path))


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def registrar(aws: LocalAws, key: rsa.RSAPublicKey | None, **overrides: Any) -> Registrar:
    options: dict[str, Any] = {"sleep": Sleeps(), "rand": lambda: 1.0}
    options.update(overrides)
    product = options.pop("product", PRODUCT)
    version = options.pop("version", 1)
    return Registrar(options.pop("client", None) or client(aws), product, version, key, POLICY, **options)


def test_a_subscribed_buyer_registers_with_a_verified_signature(aws: LocalAws, tmp_path: Path) -> None:
    nonces = iter(["nonce-1"])
    done = registrar(aws, public_key(aws, tmp_path), nonce=lambda: next(nonces)).register()
    assert (done.verified, done.attempts, done.nonce) == (True, 1, "nonce-1")
    assert (done.claims["productCode"], done.claims["publicKeyVersion"], done.claims["nonce"]) == (
        PRODUCT,
        1,
        "nonce-1",
    )
    [registered] = aws.registrar.registrations
    assert (registered.product_code, registered.nonce) == (PRODUCT, "nonce-1")


def test_each_registration_sends_a_fresh_nonce(aws: LocalAws) -> None:
    registrar(aws, None).register()
    registrar(aws, None).register()
    first, second = (r.nonce for r in aws.registrar.registrations)
    assert first and second and first != second


@pytest.mark.parametrize(
    ("switch", "code", "words"),
    [
        ({"subscribed": False}, "CustomerNotEntitledException", f"the buyer is not subscribed to {PRODUCT}"),
        ({"platformSupported": False}, "PlatformNotSupportedException", "does not support RegisterUsage"),
        ({"regionSupported": False}, "InvalidRegionException", "not available in the Region us-east-1"),
        ({"publicKeyVersion": 2}, "InvalidPublicKeyVersionException", "public key version 1 is not the one"),
    ],
)
def test_a_final_refusal_is_one_line_naming_the_reason(
    aws: LocalAws, switch: dict[str, Any], code: str, words: str
) -> None:
    aws.registrar.configure(switch)
    sleeps = Sleeps()
    with pytest.raises(RegistrationRefused) as caught:
        registrar(aws, None, sleep=sleeps).register()
    line = caught.value.line
    assert caught.value.cause == code and "\n" not in line and sleeps == []
    assert line.startswith("metering-gateway: RegisterUsage refused: ") and words in line and f"({code})" in line
    assert aws.registrar.registrations == []


def test_an_unknown_product_is_final(aws: LocalAws) -> None:
    with pytest.raises(RegistrationRefused) as caught:
        registrar(aws, None, product="prod-unknown").register()
    assert caught.value.cause == "InvalidProductCodeException" and "prod-unknown" in caught.value.line


def test_throttling_is_retried_with_capped_backoff_until_it_succeeds(aws: LocalAws, tmp_path: Path) -> None:
    aws.inject("ThrottlingException", count=6, operation="RegisterUsage")
    aws.inject("InternalServiceErrorException", count=1, operation="RegisterUsage")
    sleeps = Sleeps()
    done = registrar(aws, public_key(aws, tmp_path), sleep=sleeps).register()
    assert (done.attempts, done.verified) == (8, True)
    # rand() is 1.0: the full delay, doubling from 0.1 s and capped at 2 s.
    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert len(aws.registrar.registrations) == 1


def test_an_unreachable_aws_is_retried(aws: LocalAws) -> None:
    calls: list[str] = []
    real = client(aws)

    class Flaky:
        meta = real.meta

        def register_usage(self, **params: Any) -> Any:
            calls.append(params["Nonce"])
            if len(calls) < 3:
                raise EndpointConnectionError(endpoint_url=aws.endpoint_url)
            return real.register_usage(**params)

    done = registrar(aws, None, client=Flaky()).register()
    assert done.attempts == 3 and len(set(calls)) == 3


def test_retrying_for_days_never_overflows_the_backoff(aws: LocalAws) -> None:
    real = client(aws)

    class Throttled:
        meta = real.meta
        calls = 0

        def register_usage(self, **params: Any) -> Any:
            self.calls += 1
            if self.calls <= 2000:  # 0.1 s × 2**1999 would not fit a float
                raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "RegisterUsage")
            return {}

    sleeps = Sleeps()
    assert registrar(aws, None, client=Throttled(), sleep=sleeps).register().attempts == 2001
    assert max(sleeps) == POLICY.cap and len(sleeps) == 2000


def test_a_signature_from_another_key_is_refused(aws: LocalAws, tmp_path: Path) -> None:
    key = public_key(aws, tmp_path)
    aws.registrar.configure({"wrongKey": True})
    with pytest.raises(RegistrationRefused) as caught:
        registrar(aws, key).register()
    assert caught.value.cause == "BAD_SIGNATURE" and "does not verify" in caught.value.line


class Forged:
    """A client whose RegisterUsage answer is signed by the right key with claims of its choosing."""

    def __init__(self, aws: LocalAws, **claims: Any) -> None:
        self.aws, self.claims = aws, claims
        self.meta = client(aws).meta

    def register_usage(self, **params: Any) -> dict[str, Any]:
        claims = {"productCode": params["ProductCode"], "publicKeyVersion": params["PublicKeyVersion"]}
        claims["nonce"] = params["Nonce"]
        claims.update(self.claims)
        claims = {k: v for k, v in claims.items() if v is not None}
        return {"Signature": jwt.encode(claims, self.aws.registrar.private_key, algorithm="PS256")}


@pytest.mark.parametrize(
    ("claims", "named"),
    [
        ({"nonce": "replayed-nonce"}, "nonce"),
        ({"nonce": None}, "nonce"),
        ({"productCode": "prod-other"}, "productCode"),
        ({"publicKeyVersion": 2}, "publicKeyVersion"),
    ],
)
def test_claims_that_do_not_match_the_request_are_refused(
    aws: LocalAws, tmp_path: Path, claims: dict[str, Any], named: str
) -> None:
    with pytest.raises(RegistrationRefused) as caught:
        registrar(aws, public_key(aws, tmp_path), client=Forged(aws, **claims)).register()
    assert caught.value.cause == "CLAIMS_MISMATCH" and named in caught.value.line


def test_matching_claims_verify_with_the_version_as_text(aws: LocalAws, tmp_path: Path) -> None:
    done = registrar(aws, public_key(aws, tmp_path), client=Forged(aws, publicKeyVersion="1")).register()
    assert done.verified


def test_an_unsigned_or_hmac_answer_is_refused(aws: LocalAws, tmp_path: Path) -> None:
    class Unsigned(Forged):
        def register_usage(self, **params: Any) -> dict[str, Any]:
            claims = {"productCode": PRODUCT, "publicKeyVersion": 1, "nonce": params["Nonce"]}
            return {"Signature": jwt.encode(claims, "a-shared-secret-anyone-could-guess", algorithm="HS256")}

    with pytest.raises(RegistrationRefused) as caught:
        registrar(aws, public_key(aws, tmp_path), client=Unsigned(aws)).register()
    assert caught.value.cause == "BAD_SIGNATURE"


def test_without_a_public_key_it_registers_unverified_and_warns(aws: LocalAws) -> None:
    with capture_logs() as logs:
        done = registrar(aws, None).register()
    assert (done.verified, done.attempts) == (False, 1)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["register_usage_unverified"]


def test_a_bad_key_file_is_a_one_line_config_error(tmp_path: Path) -> None:
    path = tmp_path / "not-a-key.pem"
    path.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError) as caught:
        load_public_key(str(path))
    assert "register-usage-public-key" in str(caught.value) and "\n" not in str(caught.value)


def test_a_credential_endpoint_not_up_yet_is_retried(aws: LocalAws) -> None:
    """The ECS agent's or Pod Identity's endpoint may answer late at a pod's start: a retry, not a refusal."""
    real = client(aws)
    calls: list[str] = []

    class EarlyPod:
        meta = real.meta

        def register_usage(self, **params: Any) -> Any:
            calls.append(params["Nonce"])
            if len(calls) < 3:
                raise CredentialRetrievalError(provider="container-role", error_msg="connection refused")
            return real.register_usage(**params)

    assert registrar(aws, None, client=EarlyPod()).register().attempts == 3


def test_sigterm_ends_the_retries_without_an_outcome(aws: LocalAws) -> None:
    aws.inject("ThrottlingException", count=100, operation="RegisterUsage")
    stop = threading.Event()

    def sleep(seconds: float) -> None:
        stop.set()  # SIGTERM comes during the first pause

    with pytest.raises(RegistrationAbandoned) as caught:
        registrar(aws, None, sleep=sleep, stopped=stop.is_set).register()
    assert caught.value.attempts == 1


@pytest.mark.parametrize(
    "der",
    [  # SubjectPublicKeyInfo of a key cryptography cannot load (UnsupportedAlgorithm, not ValueError)
        pytest.param(b"\x30\x1a\x30\x05\x06\x03\x2a\x03\x04\x03\x11\x00" + b"\x01" * 16, id="unknown-oid"),
        pytest.param(
            b"\x30\x28\x30\x10\x06\x07\x2a\x86\x48\xce\x3d\x02\x01\x06\x05\x2b\x81\x04\x00\x06"
            b"\x03\x14\x00\x04" + b"\x01" * 18,
            id="unsupported-curve",
        ),
    ],
)
def test_a_key_of_an_unknown_algorithm_is_a_one_line_config_error(der: bytes, tmp_path: Path) -> None:
    path = tmp_path / "odd.pem"
    path.write_text("-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(der).decode() + "-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError) as caught:
        load_public_key(str(path))
    assert "\n" not in str(caught.value) and "is not a PEM public key" in str(caught.value)
