"""The local backend's RegisterUsage (gateway/local_aws/registration.py): botocore's model, the signed
answer, the switches of its control API, throttling; through a real boto3 client over HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from gateway.local_aws import LocalAws
from gateway.local_aws.registration import register_usage_spec
from support import local_session

FIXED = 1_763_893_200.0 + 1200
PRODUCT = "prod-abc123"


@pytest.fixture
def aws() -> Iterator[LocalAws]:
    with LocalAws(quiet=True, clock=lambda: FIXED, products={PRODUCT: ["requests"]}) as backend:
        yield backend


def client(aws: LocalAws, **config: Any) -> Any:
    conf = Config(read_timeout=2, connect_timeout=2, retries={"total_max_attempts": 1}, **config)
    return local_session().client("meteringmarketplace", endpoint_url=aws.endpoint_url, config=conf)


def control(aws: LocalAws, method: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(aws.endpoint_url + "/_local/register-usage", data=data, method=method)
    with urllib.request.urlopen(req, timeout=5) as reply:
        return json.loads(reply.read())


def code_of(call: Any) -> str:
    with pytest.raises(ClientError) as caught:
        call()
    return str(caught.value.response["Error"]["Code"])


def test_the_answer_is_a_ps256_jwt_echoing_the_request(aws: LocalAws) -> None:
    signature = client(aws).register_usage(ProductCode=PRODUCT, PublicKeyVersion=1, Nonce="n-1")["Signature"]
    assert jwt.get_unverified_header(signature)["alg"] == "PS256"
    published = control(aws, "GET")["publicKey"]
    claims = jwt.decode(signature, published, algorithms=["PS256"])
    assert {k: claims[k] for k in ("productCode", "publicKeyVersion", "nonce")} == {
        "productCode": PRODUCT,
        "publicKeyVersion": 1,
        "nonce": "n-1",
    }
    assert claims["customerIdentifier"] and claims["customerAWSAccountId"]
    assert claims["issuedAt"] == "2025-11-23T10:40:00Z"  # the backend's clock
    [registered] = control(aws, "GET")["registrations"]
    assert (registered["ProductCode"], registered["Nonce"], registered["Identity"]) == (PRODUCT, "n-1", "AKIDLOCALTEST")


def test_the_limits_come_from_botocores_model() -> None:
    spec = register_usage_spec()
    assert spec.required == ("ProductCode", "PublicKeyVersion")
    assert (spec.members["PublicKeyVersion"].min, spec.members["Nonce"].max) == (1, 255)
    assert spec.members["ProductCode"].pattern == "^[-a-zA-Z0-9/=:_.@]*$"


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"ProductCode": "prod abc", "PublicKeyVersion": 1}, "InvalidProductCodeException"),
        ({"ProductCode": "", "PublicKeyVersion": 1}, "InvalidProductCodeException"),
        ({"ProductCode": "prod-unknown", "PublicKeyVersion": 1}, "InvalidProductCodeException"),
        ({"ProductCode": PRODUCT, "PublicKeyVersion": 0}, "ValidationException"),
        ({"ProductCode": PRODUCT, "PublicKeyVersion": 1, "Nonce": "n" * 256}, "ValidationException"),
        ({"ProductCode": PRODUCT}, "ValidationException"),
        ({"ProductCode": PRODUCT, "PublicKeyVersion": 2}, "InvalidPublicKeyVersionException"),
    ],
)
def test_aws_refuses_what_its_model_and_rules_refuse(aws: LocalAws, params: dict[str, Any], code: str) -> None:
    lax = client(aws, parameter_validation=False)
    assert code_of(lambda: lax.register_usage(**params)) == code
    assert control(aws, "GET")["registrations"] == []


@pytest.mark.parametrize(
    ("switch", "code"),
    [
        ({"subscribed": False}, "CustomerNotEntitledException"),
        ({"platformSupported": False}, "PlatformNotSupportedException"),
        ({"regionSupported": False}, "InvalidRegionException"),
        ({"publicKeyVersion": 3}, "InvalidPublicKeyVersionException"),
    ],
)
def test_the_control_api_sets_what_the_account_decides(aws: LocalAws, switch: dict[str, Any], code: str) -> None:
    shown = control(aws, "POST", switch)
    assert all(shown[k] == v for k, v in switch.items())
    metering = client(aws)
    assert code_of(lambda: metering.register_usage(ProductCode=PRODUCT, PublicKeyVersion=1)) == code
    control(aws, "POST", {"subscribed": True, "platformSupported": True, "regionSupported": True})
    version = switch.get("publicKeyVersion", 1)
    assert metering.register_usage(ProductCode=PRODUCT, PublicKeyVersion=version)["Signature"]


def test_a_wrong_key_signs_an_answer_the_published_key_does_not_verify(aws: LocalAws) -> None:
    published = control(aws, "POST", {"wrongKey": True})["publicKey"]
    signature = client(aws).register_usage(ProductCode=PRODUCT, PublicKeyVersion=1, Nonce="n")["Signature"]
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(signature, published, algorithms=["PS256"])


def test_throttling_by_fault_and_by_rate(aws: LocalAws) -> None:
    metering = client(aws)
    aws.inject("ThrottlingException", count=2, operation="RegisterUsage")
    for _ in range(2):
        assert (
            code_of(lambda: metering.register_usage(ProductCode=PRODUCT, PublicKeyVersion=1)) == "ThrottlingException"
        )
    assert metering.register_usage(ProductCode=PRODUCT, PublicKeyVersion=1)["Signature"]
    limited = LocalAws(quiet=True, max_rps=1).start()
    try:
        fast = client(limited)
        fast.register_usage(ProductCode=PRODUCT, PublicKeyVersion=1)
        assert code_of(lambda: fast.register_usage(ProductCode=PRODUCT, PublicKeyVersion=1)) == "ThrottlingException"
    finally:
        limited.stop()


def test_a_meter_usage_fault_passes_register_usage(aws: LocalAws) -> None:
    aws.inject("ThrottlingException", operation="MeterUsage")
    assert client(aws).register_usage(ProductCode=PRODUCT, PublicKeyVersion=1)["Signature"]
    assert len(aws.faults) == 1


def test_reset_keeps_the_key_and_forgets_the_rest(aws: LocalAws) -> None:
    first = control(aws, "GET")["publicKeyVersion"]
    before = control(aws, "POST", {"subscribed": False, "wrongKey": True, "publicKeyVersion": first + 1})
    aws.reset()
    after = control(aws, "GET")
    assert after["publicKey"] == before["publicKey"]
    assert (after["subscribed"], after["wrongKey"], after["registrations"]) == (True, False, [])
    assert after["publicKeyVersion"] == first


@pytest.mark.parametrize("body", [{"subscribed": "no"}, {"colour": True}, {"publicKeyVersion": 0}, [1]])
def test_bad_switches_are_refused(aws: LocalAws, body: Any) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        control(aws, "POST", body)
    assert caught.value.code == 400
    assert control(aws, "GET")["subscribed"] is True
