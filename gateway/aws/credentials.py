"""What the gateway can tell at startup about the credentials it will sign with.

AWS accepts MeterUsage only when signed with the buyer's EC2 instance role, ECS
task role or, on EKS, IRSA. EKS Pod Identity, node roles and long-term access
keys are refused at call time; saying so at startup saves a confusing first
billing hour. Pure: it reads the resolved credentials and the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

POD_IDENTITY_HOSTS = ("169.254.170.23", "fd00:ec2::23")
STATIC_METHODS = {"env", "shared-credentials-file", "config-file", "explicit", "boto-config"}


def diagnose(credentials: Any, env: Mapping[str, str]) -> list[str]:
    """Warnings about the credential source, empty when it looks right."""
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
