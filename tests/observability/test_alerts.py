"""The chart's files/prometheus-rules.yaml and files/grafana-dashboard.json: valid, complete, and about
metrics the gateway exports.

With promtool on PATH (Debian: ``apt-get install prometheus``) the rules are checked by
``promtool check rules`` and their behaviour by ``promtool test rules`` on the synthetic
series of tests/data/prometheus-rules.test.yaml: each alert fires on its story and stays
silent on a healthy one. Without promtool those tests skip; the rest always run: every
rule is complete, every metric an expression or a panel names is one the gateway exports
(``gateway.observability.metrics.metric_names()``), every reason and service it names is a real one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.domain.errors import RULES
from gateway.rpc.server import METERING_SERVICE, RECORDER_SERVICE
from support import ROOT, unchecked

CHART_FILES = ROOT / "deploy" / "helm" / "metering-gateway" / "files"
RULES_FILE = CHART_FILES / "prometheus-rules.yaml"
RULE_TESTS = ROOT / "tests" / "data" / "prometheus-rules.test.yaml"
DASHBOARD_FILE = CHART_FILES / "grafana-dashboard.json"
RUNBOOK = ROOT / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool")


@pytest.fixture
def promtool() -> str:
    if PROMTOOL is None:
        unchecked(
            "promtool is not installed (Debian/Ubuntu: apt-get install prometheus): the alert rules' "
            "syntax and behaviour are unchecked, only their YAML and names"
        )
    return PROMTOOL


GROUPS: list[dict[str, Any]] = yaml.safe_load(RULES_FILE.read_text())["groups"]
ALERTS: list[dict[str, Any]] = [r for g in GROUPS for r in g["rules"] if "alert" in r]
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())

HISTOGRAMS = {"grpc_server_handling_seconds", "metering_gateway_aws_attempt_duration_seconds"}
# AWS-call outcomes that are not error reasons (gateway/observability/metrics.py); every other reason is a row of RULES.
CALL_OUTCOMES = {"OK", "DRY_RUN"}
SEVERITIES = {"warning", "critical"}
# PromQL's functions and aggregations the rules and panels may use (a typo is not a metric).
FUNCTIONS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "increase",
    "irate",
    "delta",
    "absent",
    "histogram_quantile",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "time",
    "vector",
    "clamp_min",
    "clamp_max",
    "topk",
}
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$job": ".+"}


def metric_names() -> frozenset[str]:
    """Every family the gateway exports, from the one list in gateway/observability/metrics.py."""
    try:
        from gateway.observability.metrics import metric_names as exported
    except ImportError as exc:  # pragma: no cover - only before gateway/observability/metrics.py exists
        pytest.fail(f"gateway.observability.metrics.metric_names() is needed to check the rules' metric names: {exc}")
    return exported()


def series_names() -> set[str]:
    """The series names a query may select: the families, a histogram's parts, and Prometheus' own ``up``."""
    names = set(metric_names())
    assert HISTOGRAMS <= names, f"not exported: {sorted(HISTOGRAMS - names)}"
    names |= {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    return names | {"up"}


def without_grafana_variables(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return expr


def identifiers(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, function names) that a PromQL expression uses.

    Not a parser, just enough for the expressions here: strings, label matchers, ranges
    and grouping clauses are cut out first, so label names and values are never taken
    for metrics; a name followed by ``(`` is a function or an aggregation.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    text = re.sub(r"(?<![\w:.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b", " ", text)
    metrics: set[str] = set()
    functions: set[str] = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        name = match.group()
        if name.lower() in KEYWORDS:
            continue
        (functions if re.match(r"\s*\(", text[match.end() :]) else metrics).add(name)
    return metrics, functions


def label_values(expr: str, label: str) -> set[str]:
    """Values an expression matches ``label`` against (=, !=, =~, !~; a regex's alternatives split)."""
    found: set[str] = set()
    for value in re.findall(rf'\b{label}\s*(?:=|!=|=~|!~)\s*"([^"]*)"', expr):
        found |= set(value.split("|"))
    return found


def panels() -> list[dict[str, Any]]:
    """Every panel, also those inside collapsed rows."""
    out = []
    for panel in DASHBOARD["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels() for t in p.get("targets", [])]


# --- the extractor the name checks rest on -----------------------------------------


def test_identifiers_finds_metrics_not_labels_functions_or_numbers() -> None:
    expr = (
        'sum by (le, source) (rate(a_bucket{x="y{z} b_total", le!~"1|2"}[5m])) / on (job) group_left '
        'max without (instance) (b:recorded offset 1h) > 2 * 3600 and absent(c{d="e"} == 1e3) or up'
    )
    assert identifiers(expr) == ({"a_bucket", "b:recorded", "c", "up"}, {"sum", "rate", "max", "absent"})
    assert label_values('x{reason!~"OK|DRY_RUN", state="FAILED"}', "reason") == {"OK", "DRY_RUN"}


# --- the rules -----------------------------------------------------------------------


def test_promtool_checks_the_rules(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_each_alert_fires_on_its_story_and_stays_silent_when_healthy(promtool: str) -> None:
    """tests/data/prometheus-rules.test.yaml: promtool evaluates the rules on synthetic series."""
    result = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    """The promtool tests hold, for every alert, a time it must fire and a time it must not."""
    fired: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {a["alert"] for a in ALERTS}
    assert names - fired == set(), "never tested firing"
    assert names - silent == set(), "never tested silent"
    assert (fired | silent) <= names, "tests of alerts that do not exist"
    rule_files = yaml.safe_load(RULE_TESTS.read_text())["rule_files"]
    assert [(RULE_TESTS.parent / f).resolve() for f in rule_files] == [RULES_FILE]


def test_every_alert_is_complete() -> None:
    assert ALERTS, "no alerts"
    names = [a["alert"] for a in ALERTS]
    assert len(names) == len(set(names)), "alert names repeat"
    assert all(set(r) & {"alert", "record"} for g in GROUPS for r in g["rules"])
    anchors = {heading_anchor(h) for h in re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), re.MULTILINE)}
    for alert in ALERTS:
        name = alert["alert"]
        assert re.fullmatch(r"MeteringGateway[A-Z]\w+", name), name
        assert isinstance(alert["expr"], str) and alert["expr"].strip(), name
        assert re.fullmatch(r"\d+[smh]", alert["for"]), f"{name}: 'for' is {alert.get('for')!r}"
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page.endswith("docs/operations.md") and anchor == name.lower(), f"{name}: {annotations['runbook_url']}"
        assert anchor in anchors, f"{name}: docs/operations.md has no section #{anchor}"


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_issue_asks_for_these_alerts() -> None:
    """Oldest pending near 6h, FAILED (new and still outstanding), outcome unknown (likewise), throttling,
    AWS errors, recorder NOT_SERVING, no sender."""
    by_metric: dict[str, set[str]] = {}
    for alert in ALERTS:
        for metric in identifiers(alert["expr"])[0]:
            by_metric.setdefault(metric, set()).add(alert["alert"])
    for metric in (
        "metering_gateway_oldest_pending_record_age_seconds",
        "metering_gateway_records",
        "metering_gateway_records_failed_outcome_unknown",
        "metering_gateway_records_failed_total",
        "metering_gateway_records_outcome_unknown_total",
        "metering_gateway_aws_attempts_total",
        "metering_gateway_aws_calls_total",
        "metering_gateway_serving",
        "metering_gateway_spool_up",
        "metering_gateway_sender_leader",
        "up",
    ):
        assert metric in by_metric, f"no alert on {metric}"
    severity = {a["alert"]: a["labels"]["severity"] for a in ALERTS}
    critical = {name for name, level in severity.items() if level == "critical"}
    assert {
        "MeteringGatewayNewRecordsOutcomeUnknown",
        "MeteringGatewayRecordsNearAwsLimit",
        "MeteringGatewayRecorderNotServing",
    } <= critical


def test_standing_failed_alerts_are_reminders_and_new_ones_come_from_counters() -> None:
    """A record left FAILED on purpose keeps the gauge alerts firing for --record-retention, and they are
    silenced for it: so they are warnings that wait an hour, and new failures page from the counters,
    which such a silence does not hide."""
    by_name = {a["alert"]: a for a in ALERTS}
    for standing, new in (
        ("MeteringGatewayRecordsFailed", "MeteringGatewayNewRecordsFailed"),
        ("MeteringGatewayRecordsOutcomeUnknown", "MeteringGatewayNewRecordsOutcomeUnknown"),
    ):
        assert by_name[standing]["labels"]["severity"] == "warning", standing
        assert by_name[standing]["for"] == "1h", standing
        gauges, _ = identifiers(by_name[standing]["expr"])
        assert gauges <= {"metering_gateway_records", "metering_gateway_records_failed_outcome_unknown"}, standing
        counters, functions = identifiers(by_name[new]["expr"])
        assert counters and all(m.endswith("_total") for m in counters), new
        assert "increase" in functions, new
    # An outcome-unknown record is counted by both counters: only its own alert may page for it.
    assert "metering_gateway_records_outcome_unknown_total" in by_name["MeteringGatewayNewRecordsFailed"]["expr"]


def test_rules_name_only_exported_metrics_and_functions() -> None:
    known = series_names()
    for alert in ALERTS:
        metrics, functions = identifiers(alert["expr"])
        assert metrics, f"{alert['alert']}: no metric found in its expr"
        assert metrics <= known, f"{alert['alert']}: not exported: {sorted(metrics - known)}"
        assert functions <= FUNCTIONS, f"{alert['alert']}: unknown functions {sorted(functions - FUNCTIONS)}"


def test_rules_name_real_reasons_and_services() -> None:
    """A misspelt reason or service would match nothing: the alert could never fire."""
    for alert in ALERTS:
        reasons = label_values(alert["expr"], "reason")
        assert reasons <= set(RULES) | CALL_OUTCOMES, f"{alert['alert']}: unknown reasons {reasons - set(RULES)}"
        services = label_values(alert["expr"], "service")
        assert services <= {METERING_SERVICE, RECORDER_SERVICE}, f"{alert['alert']}: unknown services {services}"


def test_spool_gauges_are_aggregated_with_max_never_sum() -> None:
    """Every replica of a shared spool reports the same spool-wide value: sum() would multiply it."""
    spool_wide = (
        "metering_gateway_records",
        "metering_gateway_records_failed_outcome_unknown",
        "metering_gateway_oldest_pending_record_age_seconds",
        "metering_gateway_spool_unassigned_events",
        "metering_gateway_spool_size_bytes",
    )
    exprs = [(a["alert"], a["expr"]) for a in ALERTS] + panel_exprs()
    for where, expr in exprs:
        for gauge in spool_wide:
            wrapping = re.findall(rf"(\w+)\s*(?:(?:by|without)\s*\([^()]*\)\s*)?\(\s*{gauge}\b(?![_:])", expr)
            assert "sum" not in wrapping, f"{where}: sum() of {gauge}"


# --- the dashboard -------------------------------------------------------------------


def test_dashboard_datasource_variable_and_ids() -> None:
    assert DASHBOARD["schemaVersion"] >= 39 and DASHBOARD["uid"] and DASHBOARD["title"]
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["datasource"] == panel["datasource"] for t in panel["targets"])
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in panels():
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_dashboard_queries_name_only_exported_metrics() -> None:
    known = series_names()
    shown: set[str] = set()
    for title, expr in panel_exprs():
        metrics, functions = identifiers(without_grafana_variables(expr))
        assert metrics and metrics <= known, f"{title}: not exported: {sorted(metrics - known)}"
        assert functions <= FUNCTIONS, f"{title}: unknown functions {sorted(functions - FUNCTIONS)}"
        assert label_values(expr, "grpc_service") <= {METERING_SERVICE, RECORDER_SERVICE}, title
        shown |= metrics
    # The issue's panels: RPCs by code and latency, AWS calls, attempts, retries and latency, events,
    # metered quantity, records by state, oldest pending, outcome unknown, carries, spool size, serving, leader.
    wanted = {
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "metering_gateway_aws_calls_total",
        "metering_gateway_aws_attempts_total",
        "metering_gateway_aws_retries_total",
        "metering_gateway_aws_attempt_duration_seconds_bucket",
        "metering_gateway_usage_events_total",
        "metering_gateway_usage_metered_quantity_total",
        "metering_gateway_records",
        "metering_gateway_oldest_pending_record_age_seconds",
        "metering_gateway_records_failed_outcome_unknown",
        "metering_gateway_usage_carried_total",
        "metering_gateway_spool_size_bytes",
        "metering_gateway_serving",
        "metering_gateway_sender_leader",
    }
    assert wanted - shown == set(), "no panel shows these"


def test_the_oldest_pending_panel_marks_awss_six_hours() -> None:
    [panel] = [p for p in panels() if any("oldest_pending" in t["expr"] for t in p.get("targets", []))]
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["unit"] == "s"
    assert 6 * 3600 in [s["value"] for s in defaults["thresholds"]["steps"]]
    assert defaults["custom"]["thresholdsStyle"]["mode"] != "off"


def test_dashboard_queries_are_valid_promql(tmp_path: Path, promtool: str) -> None:
    """promtool parses each panel query, given to it as a recording rule (Grafana's variables filled in)."""
    rules = [
        {"record": f"panel:{i}", "expr": without_grafana_variables(expr)} for i, (_, expr) in enumerate(panel_exprs())
    ]
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
