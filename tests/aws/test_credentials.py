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


# --- AgentCore Runtime (--agentcore): the execution role, from the microVM's metadata service ---


def agentcore(credentials: Credentials | None, env: dict[str, str] | None = None) -> list[str]:
    return diagnose(credentials, env or {}, agentcore=True)


def test_agentcore_expects_the_execution_role_from_the_metadata_service() -> None:
    assert agentcore(creds("iam-role", "t")) == []  # MMDS answers as IMDS does: botocore's instance-metadata role


def test_agentcore_names_what_shadows_the_execution_role() -> None:
    [keys] = agentcore(creds("env"))
    assert "long-term keys" in keys and "execution role" in keys and "AWS_ACCESS_KEY_ID" in keys
    [irsa] = agentcore(creds("assume-role-with-web-identity", "t"), {"AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/t"})
    assert "IRSA" in irsa and "not from the AgentCore Runtime execution role" in irsa
    pod_identity = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials"}
    [container] = agentcore(creds("container-role", "t"), pod_identity)
    assert "Pod Identity" in container and "execution role" in container
    [temporary] = agentcore(creds("env", token="session-token"))  # passes in hourly mode; not the execution role here
    assert "temporary keys (env)" in temporary
    # The same sources in hourly mode: IRSA and an ECS task role are right there.
    assert diagnose(creds("assume-role-with-web-identity", "t"), {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == []
    assert diagnose(creds("container-role", "t"), {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/x"}) == []


def test_agentcore_without_credentials_says_where_they_come_from() -> None:
    [none] = agentcore(None)
    assert "no AWS credentials" in none and "execution role" in none and "AWS_EC2_METADATA_DISABLED" not in none
    [disabled] = agentcore(None, {"AWS_EC2_METADATA_DISABLED": "true"})
    assert "AWS_EC2_METADATA_DISABLED=true" in disabled


def test_agentcore_on_kubernetes_is_a_misconfiguration() -> None:
    [warning] = agentcore(creds("iam-role", "t"), {"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert "--agentcore is set, but this runs in a Kubernetes pod" in warning
    # Hourly mode on EKS names the node role instead, as before.
    assert "node's instance role" in diagnose(creds("iam-role", "t"), {"KUBERNETES_SERVICE_HOST": "10.0.0.1"})[0]


# --- SaaS (--saas): the seller's account signs; any role or keys of it will do ---


def test_saas_takes_any_credentials_of_the_sellers_account() -> None:
    on_eks = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    pod_identity = {**on_eks, "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials"}
    # Each of these is refused for MeterUsage (the buyer's rules) and right for SaaS.
    assert diagnose(creds("env"), {}) and diagnose(creds("env"), {}, saas=True) == []
    assert diagnose(creds("container-role", "t"), pod_identity, saas=True) == []
    assert diagnose(creds("iam-role", "t"), on_eks, saas=True) == []
    assert diagnose(creds("assume-role-with-web-identity", "t"), on_eks, saas=True) == []


def test_saas_without_credentials_says_whose_are_needed() -> None:
    [missing] = diagnose(None, {}, saas=True)
    assert "BatchMeterUsage and ResolveCustomer" in missing and "seller's account" in missing
