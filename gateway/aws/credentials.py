"""What the gateway can tell at startup about the credentials it will sign with.

AWS accepts MeterUsage only when signed with the buyer's EC2 instance role, ECS
task role or, on EKS, IRSA. EKS Pod Identity, node roles and long-term access
keys are refused at call time; saying so at startup saves a confusing first
billing hour. Pure: it reads the resolved credentials and the environment.

In Amazon Bedrock AgentCore Runtime (``--agentcore``) AWS takes only the agent's
execution role. AgentCore Runtime hands it to the microVM the way EC2 hands an
instance its role: through a metadata service (MMDS, the microVM Metadata
Service, which speaks IMDS's protocol), so the SDK's default chain resolves it as
botocore's ``iam-role``. Anything earlier in the chain (keys in the environment,
a web identity token left from IRSA, a container credentials URI from ECS or
Pod Identity) shadows it.

For SaaS products (``--saas``) the gateway runs in the seller's account and signs
BatchMeterUsage and ResolveCustomer with the seller's credentials: any role or keys
of that account will do (a role is better practice), so only their absence warns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

POD_IDENTITY_HOSTS = ("169.254.170.23", "fd00:ec2::23")
STATIC_METHODS = {"env", "shared-credentials-file", "config-file", "explicit", "boto-config"}


def diagnose(credentials: Any, env: Mapping[str, str], *, agentcore: bool = False, saas: bool = False) -> list[str]:
    """Warnings about the credential source, empty when it looks right for what the
    gateway serves (``agentcore``: AgentCore Runtime's rules; ``saas``: the seller's
    account; see the module's docstring)."""
    if saas:
        return [] if credentials is not None else [SAAS_NO_CREDENTIALS]
    if agentcore:
        return _diagnose_agentcore(credentials, env)
    if credentials is None:
        return [
            "no AWS credentials found: MeterUsage calls will fail with FAILED_PRECONDITION/NO_CREDENTIALS. "
            "Run on EC2 with an instance role, on ECS with a task role, or on EKS with IRSA"
        ]
    method = getattr(credentials, "method", "")
    on_eks = "KUBERNETES_SERVICE_HOST" in env
    full_uri = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI", "")
    if method == "container-role" and any(h in full_uri for h in POD_IDENTITY_HOSTS):
        return ["credentials come from EKS Pod Identity, which AWS refuses for MeterUsage: use IRSA"]
    if method in STATIC_METHODS and not getattr(credentials, "token", None):
        return [
            f"credentials are access keys ({method}); AWS refuses long-term keys for MeterUsage: use the "
            "EC2 instance role, the ECS task role or IRSA"
        ]
    if method == "iam-role" and on_eks:
        return ["credentials are the EKS node's instance role, which AWS refuses for MeterUsage: use IRSA"]
    return []


SAAS_NO_CREDENTIALS = (
    "no AWS credentials found: BatchMeterUsage and ResolveCustomer calls will fail with "
    "FAILED_PRECONDITION/NO_CREDENTIALS. --saas signs with the seller's account (the one that published "
    "the product): give the gateway a role of that account (IRSA, EKS Pod Identity, an ECS task role or an "
    "instance role all work here) or its keys"
)

AGENTCORE_ROLE = (
    "AgentCore Runtime signs MeterUsage with the agent's execution role, which the SDK reads from the "
    "microVM's metadata service"
)


def _diagnose_agentcore(credentials: Any, env: Mapping[str, str]) -> list[str]:
    """--agentcore: only the execution role (botocore's ``iam-role``, from MMDS) is right."""
    out: list[str] = []
    if "KUBERNETES_SERVICE_HOST" in env:
        out.append(
            "--agentcore is set, but this runs in a Kubernetes pod: AWS applies AgentCore Runtime's rules only in "
            "AgentCore Runtime; elsewhere it keeps one record per dimension and hour. Unset --agentcore"
        )
    method = getattr(credentials, "method", "")
    if credentials is None:
        disabled = env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"
        out.append(
            "no AWS credentials found: MeterUsage calls will fail with FAILED_PRECONDITION/NO_CREDENTIALS. "
            f"{AGENTCORE_ROLE}: give the agent runtime an execution role"
            + ("; AWS_EC2_METADATA_DISABLED=true stops the SDK from reading it: unset it" if disabled else "")
        )
    elif method == "iam-role":
        pass
    elif method in STATIC_METHODS and not getattr(credentials, "token", None):
        out.append(
            f"credentials are access keys ({method}); AWS refuses long-term keys for MeterUsage. {AGENTCORE_ROLE}: "
            "remove the keys (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY among the runtime's environment "
            "variables, or a credentials file in the image)"
        )
    else:
        source = {
            "assume-role-with-web-identity": "a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN: IRSA)",
            "container-role": "a container credentials endpoint (AWS_CONTAINER_CREDENTIALS_*: an ECS task role or "
            "EKS Pod Identity)",
        }.get(method, f"temporary keys ({method})" if method in STATIC_METHODS else method or "an unknown provider")
        out.append(
            f"credentials come from {source}, not from the AgentCore Runtime execution role. {AGENTCORE_ROLE}: "
            "remove what points the SDK elsewhere"
        )
    return out
