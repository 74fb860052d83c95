"""The benchmarks still run end to end and report every figure.

Timings are not checked (they belong to the benchmarks, not to a test); only that
a quick run of each script succeeds and prints a complete JSON line and its table,
so no script can rot unnoticed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "passthrough.py"
PER_RUN = ("throughput", "throughput_rounds", "p50_ms", "p99_ms", "calls")
DERIVED = ("ratio", "added_p50_ms", "added_p99_ms")


@pytest.mark.slow
def test_quick_run_reports_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--processes", "2"], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["benchmark"] == "passthrough"
    assert result["failures"] == 0 and result["config"]["processes"] == 2
    for mode in ("direct", "gateway"):
        for c in (1, 16):
            run = result[f"{mode}_c{c}"]
            assert set(PER_RUN) <= run.keys(), run
            assert run["calls"] == result["config"]["calls"] * result["config"]["rounds"]
            assert all(
                isinstance(run[k], float) and math.isfinite(run[k]) and run[k] > 0
                for k in ("throughput", "p50_ms", "p99_ms")
            ), run
    for c in (1, 16):
        for name in DERIVED:
            assert isinstance(result[f"{name}_c{c}"], float), name
    assert set(result["targets"].values()) <= {"PASS", "MISS"}
    assert len(result["targets"]) == 2
    assert "c=16 added" in done.stdout  # the human-readable table came too


def quick_run(script: str, timeout: float) -> tuple[dict[str, Any], str]:
    """Run ``benchmarks/<script> --quick``; its JSON line and its whole stdout."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result, done.stdout


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_record_usage_quick_run_reports_every_figure() -> None:
    result, stdout = quick_run("record_usage.py", timeout=120)

    assert result["benchmark"] == "record_usage"
    for size in (100, 1000):
        run = result["throughput"][f"batch_{size}"]
        assert positive(run["events_per_s"]) and positive(run["events"]) and isinstance(run["exhausted"], bool), run
        assert f"batches of {size:>4}" in stdout
    placement = result["placement"]
    assert placement["failures"] == 0, placement["failure_examples"]
    assert placement["placed_events"] >= placement["preloaded_events"] > 0
    assert positive(placement["placement_s"]) and positive(placement["preload_s"])
    assert isinstance(placement["placement_finished_while_calling"], bool)
    for phase in ("during", "baseline"):
        figures = placement[phase]
        assert figures["calls"] > 0 and all(positive(figures[k]) for k in ("p50_ms", "p99_ms", "max_ms")), figures
    assert positive(placement["ratio_p99"]) and placement["target"] in ("PASS", "MISS")
    assert "during placement" in stdout and "p99 during placement / baseline" in stdout  # the table came too


@pytest.mark.slow
def test_spool_days_quick_run_reports_every_figure() -> None:
    result, stdout = quick_run("spool_days.py", timeout=60)

    assert result["benchmark"] == "spool_days"
    days = result["days"]
    assert [d["day"] for d in days] == list(range(1, result["config"]["days"] + 1))
    for day in days:
        assert all(positive(day[k]) for k in ("file_bytes", "in_use_bytes", "events", "records")), day
        assert all(isinstance(day[k], int) and day[k] >= 0 for k in ("wal_bytes", "pending", "sent", "failed")), day
        assert f"{day['events']:,}" in stdout  # one table row a day
    assert 1 <= result["plateau_from_day"] <= len(days)
    assert positive(result["ratio_file"]) and positive(result["ratio_in_use"])
    assert positive(result["plateau_file_bytes"]) and positive(result["plateau_in_use_bytes"])
    assert result["failed_records"] == 0
    assert "windows full from day" in stdout


@pytest.mark.slow
def test_record_usage_spools_quick_run_reports_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "record_usage.py"), "--only", "spools", "--quick"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["benchmark"] == "record_usage" and set(result) == {
        "benchmark",
        "spools",
        "config",
    }  # no other mode ran
    spools = result["spools"]
    assert spools["failures"] == 0, spools["failure_examples"]
    for setup, label in (
        ("sqlite_p1", "sqlite, 1 process"),
        ("postgresql_p1", "postgresql, 1 process"),
        ("postgresql_p2", "postgresql, 2 processes"),
    ):
        for size in (100, 1000):
            entry = spools[f"{setup}_b{size}"]
            assert positive(entry["events_per_s"]) and positive(entry["ratio_to_sqlite"]), entry
            assert len(entry["rounds"]) == result["config"]["rounds"] and all(positive(r) for r in entry["rounds"])
            assert all(isinstance(v, float) and v >= 0 for k, v in entry["cpu"].items()), entry["cpu"]
            assert positive(entry["cpu"]["gateway"]), entry["cpu"]  # the gateway's processes were found and measured
            assert any(line.startswith(label) and f" {size:>5} " in line for line in done.stdout.splitlines()), label
        assert spools[f"sqlite_p1_b{size}"]["ratio_to_sqlite"] == 1.0
    for size in (100, 1000):
        assert positive(spools[f"postgresql_p1_b{size}"]["cpu"]["postgres"])  # PostgreSQL did the storing
    assert set(spools["target"].values()) <= {"PASS", "MISS"} and len(spools["target"]) == 2
    assert len(spools["runs"]) == 6 and all(run["calls"] > 0 for run in spools["runs"])
    assert "vs SQLite" in done.stdout and "target PostgreSQL, batches of 1000" in done.stdout  # the table came too


@pytest.mark.slow
def test_abuse_reports_memory_and_health_for_each_attack() -> None:
    result, out = quick_run("abuse.py", timeout=300)
    assert result["alive"] is True
    for phase in ("baseline", "tag bomb MeterUsage", "tag bomb RecordUsage", "idle connections"):
        entry = result[phase]
        assert (
            positive(entry["peak_rss_mib"]) and entry["health_new"]["checks"] > 0 and entry["health_kept"]["checks"] > 0
        )
    assert result["tag bomb MeterUsage"]["answer"] == "INVALID_ARGUMENT"
    assert result["idle connections"]["still_open"] >= 0
    assert "peak RSS" in out


@pytest.mark.slow
def test_saas_quick_run_reports_every_figure() -> None:
    result, stdout = quick_run("saas.py", timeout=120)

    assert result["benchmark"] == "saas"
    throughput = result["throughput"]
    assert throughput["failures"] == 0, throughput["failure_examples"]
    rounds = result["config"]["rounds"]
    for size in (100, 1000):
        run = throughput[f"batch_{size}"]
        assert all(positive(run[k]) for k in ("container_events_per_s", "saas_events_per_s", "ratio")), run
        for kind in ("container", "saas"):
            assert len(run[f"{kind}_rounds"]) == rounds and all(positive(r) for r in run[f"{kind}_rounds"]), run
        assert any(line.split()[:1] == [str(size)] for line in stdout.splitlines()), size  # its table row
    calls = result["calls"]
    for case in ("no_fault", "unprocessed_fault"):
        entry = calls[case]
        assert all(positive(entry[k]) for k in ("events", "records", "calls", "calls_per_1000", "fewest_calls")), entry
        assert entry["exactly_once"] is True and entry["problems"] == [], entry["problems"]
        assert entry["billed_total"] == entry["recorded_total"]
    assert calls["no_fault"]["target"] in ("PASS", "MISS")
    assert calls["no_fault"]["calls_per_1000"] <= 40  # a count, not a timing: every call carries 25 records
    assert calls["unprocessed_fault"]["calls"] > calls["no_fault"]["calls"]  # the fault was met, and cost calls
    assert "SaaS / container" in stdout and "calls per 1,000 records" in stdout  # the tables came too
