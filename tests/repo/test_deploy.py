"""deploy/*.yaml: valid Kubernetes, and every workload agrees with the gateway and its image.

The first tests read deploy/kubernetes.yaml (MeterUsage only); the rest read every manifest.
"""

from __future__ import annotations

import argparse
import base64
import copy
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from kubernetes_validate.utils import major_minor

from gateway.assembly.app import SHUTDOWN_MARGIN
from gateway.config import (
    ENV_PREFIX,
    SETTINGS_FIELDS,
    Settings,
    add_settings_arguments,
    env_name,
    parse_listen,
    settings_from,
)
from gateway.rpc.server import METERING_SERVICE, RECORDER_SERVICE
from support import ROOT, first, parse_dockerfile

DOCS = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()) if d]
BY_KIND: dict[str, Any] = {d["kind"]: d for d in DOCS}
DEPLOYMENT, SERVICE, ACCOUNT = BY_KIND["Deployment"], BY_KIND["Service"], BY_KIND["ServiceAccount"]
POD = DEPLOYMENT["spec"]["template"]["spec"]
[CONTAINER] = POD["containers"]
ENV = {e["name"]: e["value"] for e in CONTAINER.get("env", [])}
PORT = 50051


def test_kinds_and_names() -> None:
    assert sorted(BY_KIND) == ["Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]
    assert POD["serviceAccountName"] == ACCOUNT["metadata"]["name"]
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert SERVICE["spec"]["selector"].items() <= labels.items()


def test_the_container_serves_on_50051_and_the_service_points_there() -> None:
    [port] = [p for p in CONTAINER["ports"] if p["name"] == "grpc"]
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


# --- Every manifest under deploy/: schema-valid, and each workload agrees with the gateway ---
#
# Any *.yaml / *.yml under deploy/ is read; a document is a Kubernetes object when it
# has both apiVersion and kind (so a plain Prometheus rules file is skipped), and a
# built-in one (core, apps, policy, *.k8s.io, ...) is validated against the schemas
# kubernetes-validate bundles: offline, strict (unknown fields refused), for the
# Kubernetes version pinned here. Objects of other API groups (custom resources) have
# no bundled schema and are skipped by the schema check.

K8S_VERSION = "1.34"  # kubernetes-validate >= 1.34 bundles it (pyproject.toml)
WORKLOAD_KINDS = {
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "ReplicationController",
    "Pod",
    "Job",
    "CronJob",
}
APP_PROTOCOLS = {"grpc", "kubernetes.io/h2c"}  # gRPC over cleartext HTTP/2
DSN = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)


def is_kubernetes_object(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str)


def is_builtin_api(api_version: str) -> bool:
    """``v1``, ``apps/v1``, ``policy/v1``, ``networking.k8s.io/v1``: not a custom resource's group."""
    group = api_version.rpartition("/")[0]
    return group == "" or "." not in group or group.endswith(".k8s.io")


@dataclass(frozen=True)
class Manifest:
    path: Path
    objects: tuple[dict[str, Any], ...]  # its Kubernetes objects, in order

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)


def yaml_files() -> list[Path]:
    return sorted(p for p in (ROOT / "deploy").iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def read_manifests() -> list[Manifest]:
    found = []
    for path in yaml_files():
        objects = tuple(d for d in yaml.safe_load_all(path.read_text()) if is_kubernetes_object(d))
        if objects:
            found.append(Manifest(path, objects))
    return found


MANIFESTS = read_manifests()


def object_id(manifest: Manifest, obj: dict[str, Any]) -> str:
    return f"{manifest.path.name}:{obj['kind']}/{obj['metadata']['name']}"


BUILTIN_OBJECTS = [
    pytest.param(m, o, id=object_id(m, o)) for m in MANIFESTS for o in m.objects if is_builtin_api(o["apiVersion"])
]


@dataclass(frozen=True)
class Workload:
    manifest: Manifest
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def pod(self) -> dict[str, Any]:
        return self.obj["spec"]["template"]["spec"]

    @property
    def labels(self) -> dict[str, str]:
        return self.obj["spec"]["template"]["metadata"]["labels"]

    @property
    def container(self) -> dict[str, Any]:
        [container] = self.pod["containers"]
        return container

    @property
    def grpc_port(self) -> int:
        [port] = [p for p in self.container["ports"] if p.get("name") == "grpc"]
        return int(port["containerPort"])

    def env_entry(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.container.get("env", []) if e["name"] == name), None)

    def secret_value(self, ref: dict[str, Any]) -> str | None:
        """A secretKeyRef's value when the Secret is in the same manifest (as kubectl apply would create it)."""
        secret = self.manifest.named("Secret", ref["name"])
        if secret is None:
            return None
        if ref["key"] in secret.get("stringData", {}):
            return str(secret["stringData"][ref["key"]])
        if ref["key"] in secret.get("data", {}):
            return base64.b64decode(secret["data"][ref["key"]]).decode()
        return None

    @property
    def argv(self) -> list[str]:
        """What the container runs: the image has no ENTRYPOINT, so command+args, or args, replace its CMD."""
        argv = [*self.container.get("command", []), *self.container.get("args", [])]
        return argv or first(IMAGE_STAGE, "CMD").exec_form

    @property
    def env(self) -> dict[str, str]:
        """The container's environment as the gateway sees it: the image's ENV, then the pod's."""
        env = dict(IMAGE_ENV)
        for entry in self.container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = str(entry["value"])
            elif "secretKeyRef" in entry.get("valueFrom", {}):
                value = self.secret_value(entry["valueFrom"]["secretKeyRef"])
                if value is not None:
                    env[entry["name"]] = value
        return env

    @property
    def settings(self) -> Settings:
        argv = self.argv
        assert argv[:2] == ["metering-gateway", "serve"], argv
        parser = argparse.ArgumentParser(prog="metering-gateway serve")
        add_settings_arguments(parser)
        return settings_from(parser.parse_args(argv[2:]), self.env)

    @property
    def has_spool(self) -> bool:
        """Started with a spool (RecordUsage on), whether from a flag, a literal or a Secret."""
        flags = [a for a in self.argv if a == "--spool" or a.startswith("--spool=")]
        return bool(flags) or self.env_entry(env_name("spool")) is not None

    def selected_by(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.manifest.of_kind(kind) if selects(o["spec"].get("selector"), self.labels)]


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Service's plain selector or a label selector (matchLabels, matchExpressions) matches ``labels``."""
    if not selector:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return selector.items() <= labels.items()  # a Service's selector
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


_, *_STAGES = parse_dockerfile((ROOT / "Dockerfile").read_text())
IMAGE_STAGE = _STAGES[-1]
IMAGE_ENV = dict(kv.split("=", 1) for i in IMAGE_STAGE if i.keyword == "ENV" for kv in shlex.split(i.args))
WORKLOADS = [Workload(m, o) for m in MANIFESTS for o in m.objects if o["kind"] in WORKLOAD_KINDS]


def workload_params(*kinds: str) -> list[Any]:
    return [pytest.param(w, id=object_id(w.manifest, w.obj)) for w in WORKLOADS if not kinds or w.kind in kinds]


ALL, DEPLOYMENTS, STATEFULSETS = workload_params(), workload_params("Deployment"), workload_params("StatefulSet")


def test_the_pinned_kubernetes_version_is_bundled() -> None:
    bundled = {major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    assert K8S_VERSION in bundled, f"kubernetes-validate {kubernetes_validate.__version__} bundles {sorted(bundled)}"


@pytest.mark.parametrize(("manifest", "obj"), BUILTIN_OBJECTS)
def test_every_kubernetes_object_validates_strictly(manifest: Manifest, obj: dict[str, Any]) -> None:
    try:
        validated = kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path)
        pytest.fail(f"{object_id(manifest, obj)} is not valid Kubernetes {err.version}: {where}: {err.message}")
    except kubernetes_validate.SchemaNotFoundError as err:
        pytest.fail(err.message)
    assert validated == K8S_VERSION  # not an older schema standing in for it


def test_strict_validation_refuses_unknown_fields() -> None:
    """The check above can fail: a misspelt field is refused, not ignored."""
    deployment = copy.deepcopy(next(w.obj for w in WORKLOADS if w.kind == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servcie"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError, match="servcie"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_documents_are_told_apart_by_api_version_and_kind() -> None:
    prometheus_rules = yaml.safe_load("groups: [{name: gateway, rules: [{alert: Down, expr: up == 0}]}]")
    custom = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"}}
    assert not is_kubernetes_object(prometheus_rules)
    assert is_kubernetes_object(custom) and not is_builtin_api(custom["apiVersion"])
    assert all(is_builtin_api(v) for v in ("v1", "apps/v1", "policy/v1", "networking.k8s.io/v1"))


def test_no_document_is_half_a_kubernetes_object() -> None:
    """apiVersion without kind (or the reverse) is a typo that would skip the checks, not a non-Kubernetes file."""
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and ("apiVersion" in doc) != ("kind" in doc):
                pytest.fail(f"{path.name}: a document has only one of apiVersion and kind: {sorted(doc)}")


def test_the_manifests_hold_both_kinds_of_spool() -> None:
    """Guards against the checks below passing on nothing."""
    assert any(w.kind == "Deployment" and w.has_spool for w in WORKLOADS), "no Deployment with a PostgreSQL spool"
    assert any(w.kind == "StatefulSet" and w.has_spool for w in WORKLOADS), "no StatefulSet with a SQLite spool"
    assert {w.kind for w in WORKLOADS} <= {"Deployment", "StatefulSet"}


@pytest.mark.parametrize("w", ALL)
def test_ports_agree_with_listen_probes_and_services(w: Workload) -> None:
    port = w.grpc_port
    assert w.settings.listen_host_port == ("0.0.0.0", port)
    # Metrics on a port of their own, named "metrics", that no Service exposes, and the
    # scrape annotations point at it.
    metrics = parse_listen(w.settings.metrics_listen)
    assert metrics[0] == "0.0.0.0" and metrics[1] != port
    assert {"name": "metrics", "containerPort": metrics[1], "protocol": "TCP"} in w.container["ports"]
    annotations = w.obj["spec"]["template"]["metadata"].get("annotations", {})
    assert (
        annotations.get("prometheus.io/port") == str(metrics[1]) and annotations.get("prometheus.io/scrape") == "true"
    )
    services = w.selected_by("Service")
    assert services, "no Service selects the pods"
    by_name = {p["name"]: p["containerPort"] for p in w.container["ports"] if "name" in p}
    for service in services:
        for svc_port in service["spec"]["ports"]:
            target = svc_port.get("targetPort", svc_port["port"])
            assert by_name.get(target, target) == port, f"{service['metadata']['name']} targets {target}"
            assert svc_port["name"] == "grpc" and svc_port.get("appProtocol") in APP_PROTOCOLS


@pytest.mark.parametrize("w", ALL)
def test_every_probe_is_grpc_health_on_the_grpc_port(w: Workload) -> None:
    # Readiness asks for MeteringService, with a spool too: the pod is one endpoint for
    # both services, and the recorder (NOT_SERVING while the spool cannot write) turns
    # so on every replica at once when a shared database is down, so readiness on it
    # would take MeterUsage away as well (docs/deploy.md, "Probes and readiness").
    expected = {"startupProbe": "", "livenessProbe": "", "readinessProbe": METERING_SERVICE}
    for name, service in expected.items():
        probe = w.container.get(name)
        assert probe is not None, f"no {name}"
        assert set(probe) & {"exec", "httpGet", "tcpSocket"} == set(), f"{name} is not (only) a gRPC probe"
        assert probe["grpc"]["port"] == w.grpc_port, f"{name} probes port {probe['grpc']['port']}"
        assert probe["grpc"].get("service", "") == service, f"{name} asks for {probe['grpc'].get('service', '')!r}"


# The health statuses that follow the spool's writability (tests/rpc/test_health.py shows ""
# and MeteringService do not, and that nothing about AWS changes any of them).
SPOOL_DEPENDENT = {RECORDER_SERVICE}


@pytest.mark.parametrize("w", ALL)
def test_no_probe_depends_on_the_spool(w: Workload) -> None:
    """A full disk or an unreachable database must neither restart the pod (liveness, startup:
    a restart fixes neither) nor take it out of the Service (readiness: MeterUsage needs no spool)."""
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        service = w.container[name]["grpc"].get("service", "")
        assert service not in SPOOL_DEPENDENT, f"{name} follows the spool: {service}"


@pytest.mark.parametrize("w", [w for w in ALL if w.values[0].has_spool and w.values[0].kind == "Deployment"])
def test_replicas_with_a_spool_have_a_headless_service_for_client_side_health_checks(w: Workload) -> None:
    """Callers that skip a replica whose recorder is down (round_robin + healthCheckConfig) need each pod's address."""
    headless = [s for s in w.selected_by("Service") if s["spec"].get("clusterIP") == "None"]
    assert headless, "no headless Service selects the pods"
    assert all(not s["spec"].get("publishNotReadyAddresses", False) for s in headless)


@pytest.mark.parametrize("w", ALL)
def test_the_platform_waits_longer_than_the_drain_everywhere(w: Workload) -> None:
    pre_stop = w.container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert "terminationGracePeriodSeconds" in w.pod  # not Kubernetes' default of 30s by accident
    settings = w.settings
    # Everything after SIGTERM (the drain, the sender, --flush-on-shutdown, closing the spool) ends within
    # the grace plus SHUTDOWN_MARGIN (gateway/assembly/app.py), whatever AWS does.
    assert w.pod["terminationGracePeriodSeconds"] > settings.grace + float(pre_stop[1]) + SHUTDOWN_MARGIN


@pytest.mark.parametrize("w", ALL)
def test_settings_irsa_and_hardening(w: Workload) -> None:
    known = {env_name(f.name) for f in SETTINGS_FIELDS}
    assert {e["name"] for e in w.container.get("env", []) if e["name"].startswith(ENV_PREFIX)} <= known
    account = w.manifest.named("ServiceAccount", w.pod["serviceAccountName"])
    assert account is not None, "the pod's ServiceAccount is not in the manifest"
    arn = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", arn)
    image_uid = int(first(IMAGE_STAGE, "USER").args.split(":")[0])
    assert w.pod["securityContext"]["runAsNonRoot"] is True and w.pod["securityContext"]["runAsUser"] == image_uid
    hardened = w.container["securityContext"]
    assert hardened["allowPrivilegeEscalation"] is False and hardened["readOnlyRootFilesystem"] is True
    assert hardened["capabilities"]["drop"] == ["ALL"]
    resources = w.container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])


@pytest.mark.parametrize("w", ALL)
def test_disruption_budgets_allow_an_eviction(w: Workload) -> None:
    """A budget that allows no voluntary eviction blocks every node drain."""
    for budget in w.selected_by("PodDisruptionBudget"):
        spec, replicas = budget["spec"], w.obj["spec"].get("replicas", 1)
        if "minAvailable" in spec:
            assert isinstance(spec["minAvailable"], int) and spec["minAvailable"] < replicas
        else:
            assert isinstance(spec["maxUnavailable"], int) and spec["maxUnavailable"] >= 1


@pytest.mark.parametrize("w", DEPLOYMENTS)
def test_deployment_replicas_rollout_budget_and_spread(w: Workload) -> None:
    spec = w.obj["spec"]
    assert spec["replicas"] >= 2
    assert selects(spec["selector"], w.labels)
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] in (0, "0%")  # capacity kept during a rollout
    assert len(w.selected_by("PodDisruptionBudget")) == 1, "no PodDisruptionBudget selects the pods"
    spread = [
        c
        for c in w.pod.get("topologySpreadConstraints", [])
        if c["topologyKey"] == "kubernetes.io/hostname" and selects(c["labelSelector"], w.labels)
    ]
    anti = w.pod.get("affinity", {}).get("podAntiAffinity", {})
    terms = [
        *anti.get("requiredDuringSchedulingIgnoredDuringExecution", []),
        *(t["podAffinityTerm"] for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])),
    ]
    apart = [t for t in terms if t["topologyKey"] == "kubernetes.io/hostname" and selects(t["labelSelector"], w.labels)]
    assert spread or apart, "replicas are not spread across nodes"


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


@pytest.mark.parametrize("w", DEPLOYMENTS)
def test_a_deployment_takes_its_spool_dsn_from_a_secret(w: Workload) -> None:
    # A Deployment's pods come and go: a spool of theirs must be a shared database,
    # named by a Secret, never a file or a literal DSN.
    leaked = [s for s in strings(w.obj) if DSN.search(s)]
    assert not leaked, f"a literal DSN in the Deployment: {leaked}"
    assert not any(a == "--spool" or a.startswith("--spool=") for a in w.argv)
    spool = w.env_entry(env_name("spool"))
    if spool is None:
        return  # MeterUsage only
    assert "value" not in spool and set(spool["valueFrom"]) == {"secretKeyRef"}
    ref = spool["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional", False)
    password = w.env_entry("PGPASSWORD")
    assert password is None or set(password.get("valueFrom", {})) == {"secretKeyRef"}
    for entry in (spool, password):
        secret = w.manifest.named("Secret", entry["valueFrom"]["secretKeyRef"]["name"]) if entry else None
        if entry and secret:  # the example Secret, when the manifest carries one, has the key
            assert w.secret_value(entry["valueFrom"]["secretKeyRef"]) is not None, f"{entry['name']}: no such key"
    dsn = w.secret_value(ref)
    if dsn is not None:  # the example Secret: a placeholder DSN without a password in it
        assert DSN.match(dsn) and "@" in dsn
        assert ":" not in dsn.split("://", 1)[1].split("@", 1)[0], "the password belongs in PGPASSWORD, not the DSN"
        assert w.settings.spool == dsn


@pytest.mark.parametrize("w", STATEFULSETS)
def test_statefulset_one_replica_and_its_spool_on_a_claimed_volume(w: Workload) -> None:
    spec = w.obj["spec"]
    assert spec["replicas"] == 1  # explicit: a second replica would have a spool of its own
    spool = w.settings.spool
    assert spool.startswith("/") and not DSN.match(spool)
    assert w.settings.processes == 1  # one sender per SQLite file
    claims = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
    assert not claims & {v["name"] for v in w.pod.get("volumes", [])}, "a pod volume shadows the claim"
    mounts = [m for m in w.container["volumeMounts"] if m["name"] in claims and not m.get("readOnly", False)]
    assert any(spool.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), f"{spool} is not on a claim"
    # The volume may hold usage not yet sent to AWS: deleting or scaling keeps it.
    retention = spec.get("persistentVolumeClaimRetentionPolicy", {})
    assert retention.get("whenDeleted", "Retain") == retention.get("whenScaled", "Retain") == "Retain"
    governing = w.manifest.named("Service", spec["serviceName"])
    assert governing is not None and governing["spec"].get("clusterIP") == "None"
    assert selects(governing["spec"]["selector"], w.labels)
    assert any(s["spec"].get("clusterIP") != "None" for s in w.selected_by("Service")), "no ClusterIP Service"
