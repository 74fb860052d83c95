"""deploy/kubernetes.yaml: parses, and agrees with the gateway and its image."""

from __future__ import annotations

import re
from typing import Any

import yaml
from helpers_clients import ROOT, first, parse_dockerfile

from gateway.config import SETTINGS_FIELDS, env_name, parse_listen, settings_from
from gateway.server import METERING_SERVICE

DOCS = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()) if d]
BY_KIND: dict[str, Any] = {d["kind"]: d for d in DOCS}
DEPLOYMENT, SERVICE, ACCOUNT = BY_KIND["Deployment"], BY_KIND["Service"], BY_KIND["ServiceAccount"]
POD = DEPLOYMENT["spec"]["template"]["spec"]
[CONTAINER] = POD["containers"]
ENV = {e["name"]: e["value"] for e in CONTAINER.get("env", [])}
PORT = 50051


def test_kinds_and_names() -> None:
    assert sorted(BY_KIND) == ["Deployment", "Service", "ServiceAccount"]
    assert POD["serviceAccountName"] == ACCOUNT["metadata"]["name"]
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert SERVICE["spec"]["selector"].items() <= labels.items()


def test_the_container_serves_on_50051_and_the_service_points_there() -> None:
    [port] = CONTAINER["ports"]
    assert (port["containerPort"], port["name"], port["protocol"]) == (PORT, "grpc", "TCP")
    assert parse_listen(ENV["METERING_GATEWAY_LISTEN"]) == ("0.0.0.0", PORT)
    [svc] = SERVICE["spec"]["ports"]
    assert svc["port"] == PORT and svc["targetPort"] in (port["name"], PORT)


def test_probes_use_the_grpc_health_service() -> None:
    readiness, liveness = CONTAINER["readinessProbe"], CONTAINER["livenessProbe"]
    assert readiness["grpc"] == {"port": PORT, "service": METERING_SERVICE}
    assert liveness["grpc"]["port"] == PORT and liveness["grpc"].get("service", "") == ""
    assert set(readiness) & {"exec", "httpGet", "tcpSocket"} == set()


def test_irsa_role_annotation() -> None:
    arn = ACCOUNT["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", arn)


def test_the_platform_waits_longer_than_the_drain() -> None:
    grace = settings_from(None, ENV).grace
    pre_stop = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert POD["terminationGracePeriodSeconds"] > grace + float(pre_stop[1])


def test_every_gateway_variable_is_a_real_setting() -> None:
    known = {env_name(f.name) for f in SETTINGS_FIELDS}
    assert {k for k in ENV if k.startswith("METERING_GATEWAY_")} <= known
    settings_from(None, ENV)  # parses and checks, as the gateway will at start-up


def test_resources_and_a_non_root_user_matching_the_image() -> None:
    resources = CONTAINER["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    _, *stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    image_uid = int(first(stages[-1], "USER").args.split(":")[0])
    assert POD["securityContext"]["runAsNonRoot"] is True
    assert POD["securityContext"]["runAsUser"] == image_uid
    assert CONTAINER["securityContext"]["allowPrivilegeEscalation"] is False
    assert CONTAINER["securityContext"]["capabilities"]["drop"] == ["ALL"]
