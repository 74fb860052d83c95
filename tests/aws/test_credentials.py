"""Startup warnings about credentials AWS will refuse for MeterUsage."""

from __future__ import annotations

from botocore.credentials import Credentials

from gateway.aws.credentials import diagnose


def creds(method: str, token: str | None = None) -> Credentials:
    return Credentials("AKIDEXAMPLE", "secret", token, method=method)


def test_roles_pass() -> None:
    assert diagnose(creds("iam-role", "t"), {}) == []  # EC2 instance role
    assert (
        diagnose(creds("container-role", "t"), {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/x"}) == []
    )  # ECS task role
    assert diagnose(creds("assume-role-with-web-identity", "t"), {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == []  # IRSA


def test_refused_sources_are_named() -> None:
    assert "long-term keys" in diagnose(creds("env"), {})[0]
    assert (
        "Pod Identity"
        in diagnose(
            creds("container-role", "t"), {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials"}
        )[0]
    )
    assert "node's instance role" in diagnose(creds("iam-role", "t"), {"KUBERNETES_SERVICE_HOST": "10.0.0.1"})[0]
    assert "no AWS credentials" in diagnose(None, {})[0]


def test_temporary_keys_from_the_environment_pass() -> None:
    assert diagnose(creds("env", token="session-token"), {}) == []
