"""AWS's side of RegisterUsage, as the local backend plays it: checks, switches, a signed answer.

RegisterUsage registers the calling ECS task or EKS pod for a paid container
product and answers a JWT (PS256) signed with the seller's key pair, whose claims
echo the request (``productCode``, ``publicKeyVersion``, ``nonce``) and say who
and when (``customerIdentifier``, ``customerAWSAccountId``, ``issuedAt``), so that
the container can tell a real answer from a forged one.

The local backend makes its own RSA key pair (when first needed: most tests never
ask), knows one public key version (1 unless told otherwise), and has switches
for what a real account decides: whether the buyer is subscribed, whether the
platform and the Region support RegisterUsage, and a "sign with another key"
switch that forges the answer. The request rules come from botocore's model, like
MeterUsage's (:mod:`.rules`); nothing here comes from the gateway.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import botocore.session
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.local_aws import rules
from gateway.local_aws.state import AwsError

OPERATION = "RegisterUsage"
ALGORITHM = "PS256"  # RSASSA-PSS with SHA-256, as AWS signs
KEY_BITS = 2048
INVALID_PUBLIC_KEY_VERSION = "InvalidPublicKeyVersionException"
CUSTOMER_NOT_ENTITLED = "CustomerNotEntitledException"
PLATFORM_NOT_SUPPORTED = "PlatformNotSupportedException"
INVALID_REGION = "InvalidRegionException"
# The switches of ``POST /_local/register-usage``, by their JSON names.
SWITCHES = {
    "subscribed": "subscribed",
    "platformSupported": "platform_supported",
    "regionSupported": "region_supported",
    "wrongKey": "wrong_key",
    "publicKeyVersion": "public_key_version",
}


@functools.cache
def register_usage_spec() -> rules.Spec:
    """RegisterUsage's input shape in the botocore installed here (read once)."""
    model = botocore.session.get_session().get_service_model(rules.SERVICE)
    return rules.spec_of(model.operation_model(OPERATION).input_shape)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


@dataclass(frozen=True)
class Registration:
    """One RegisterUsage AWS answered: who registered what, when."""

    identity: str
    product_code: str
    public_key_version: int
    nonce: str | None
    issued_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "Identity": self.identity,
            "ProductCode": self.product_code,
            "PublicKeyVersion": self.public_key_version,
            "Nonce": self.nonce,
            "IssuedAt": self.issued_at.isoformat(),
        }


@dataclass
class Registrar:
    """The switches, the key pair and the registrations; thread-safe."""

    subscribed: bool = True
    platform_supported: bool = True
    region_supported: bool = True
    wrong_key: bool = False  # sign with a key that is not the published one (a forged answer)
    public_key_version: int = 1
    registrations: list[Registration] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._first_version = self.public_key_version  # what reset() goes back to

    @functools.cached_property
    def private_key(self) -> rsa.RSAPrivateKey:
        return _new_key()

    @functools.cached_property
    def other_key(self) -> rsa.RSAPrivateKey:
        return _new_key()

    def public_key_pem(self) -> str:
        """The seller's public key as AWS Marketplace hands it out (PEM, SubjectPublicKeyInfo)."""
        return (
            self.private_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def register(
        self, body: Mapping[str, Any], identity: str, now: datetime, products: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """AWS's answer to one RegisterUsage body; AwsError for a refusal."""
        found = rules.model_problems(body, register_usage_spec())
        if found:
            raise AwsError(found[0].code, "; ".join(str(p) for p in found))
        product, version, nonce = body["ProductCode"], body["PublicKeyVersion"], body.get("Nonce")
        if product == "" or (products is not None and product not in products):
            raise AwsError(rules.INVALID_PRODUCT_CODE, f"Unknown product code {product}")
        with self._lock:
            if version != self.public_key_version:
                raise AwsError(INVALID_PUBLIC_KEY_VERSION, f"Public key version {version} is not valid for {product}")
            if not self.region_supported:
                raise AwsError(INVALID_REGION, "RegisterUsage is not supported in this Region")
            if not self.platform_supported:
                raise AwsError(PLATFORM_NOT_SUPPORTED, "RegisterUsage is supported on Amazon ECS and Amazon EKS only")
            if not self.subscribed:
                raise AwsError(CUSTOMER_NOT_ENTITLED, f"Customer is not subscribed to {product}")
            self.registrations.append(Registration(identity, product, version, nonce, now))
            key = self.other_key if self.wrong_key else self.private_key
        claims: dict[str, Any] = {
            "productCode": product,
            "publicKeyVersion": version,
            "customerIdentifier": "local-" + hashlib.sha256(identity.encode()).hexdigest()[:12],
            "customerAWSAccountId": "000000000000",
            "issuedAt": now.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        }
        if nonce is not None:
            claims["nonce"] = nonce
        return {"Signature": jwt.encode(claims, key, algorithm=ALGORITHM)}

    def describe(self) -> dict[str, Any]:
        """``GET /_local/register-usage``: the public key, the switches, the registrations."""
        with self._lock:
            shown = {name: getattr(self, attr) for name, attr in SWITCHES.items()}
            registered = [r.to_json() for r in self.registrations]
        return {"publicKey": self.public_key_pem(), **shown, "registrations": registered}

    def configure(self, body: Any) -> None:
        """``POST /_local/register-usage``: set any of the switches; ValueError for a bad body."""
        if not isinstance(body, Mapping):
            raise ValueError("the body must be a JSON object")
        unknown = set(body) - set(SWITCHES)
        if unknown:
            raise ValueError(f"unknown register-usage fields: {sorted(unknown)} (known: {sorted(SWITCHES)})")
        for name, value in body.items():
            if name == "publicKeyVersion":
                if not rules.is_int(value) or value < 1:
                    raise ValueError(f"publicKeyVersion must be an integer of at least 1, got {value!r}")
            elif not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        with self._lock:
            for name, value in body.items():
                setattr(self, SWITCHES[name], value)

    def reset(self) -> None:
        """Forget the registrations and the switches (the key version back to the one it
        started with); the key pair stays (key files stay valid)."""
        with self._lock:
            self.registrations.clear()
            self.subscribed = self.platform_supported = self.region_supported = True
            self.wrong_key = False
            self.public_key_version = self._first_version
