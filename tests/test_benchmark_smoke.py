"""The pass-through benchmark still runs end to end and reports every figure.

Timings are not checked (they belong to the benchmark, not to a test); only that
one run starts both servers, makes every call succeed and prints a complete JSON
line, so the script cannot rot unnoticed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "passthrough.py"
PER_RUN = ("throughput", "throughput_rounds", "p50_ms", "p99_ms", "calls")
DERIVED = ("ratio", "added_p50_ms", "added_p99_ms")


@pytest.mark.slow
def test_quick_run_reports_every_figure() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--processes", "2"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["benchmark"] == "passthrough"
    assert result["failures"] == 0 and result["config"]["processes"] == 2
    for mode in ("direct", "gateway"):
        for c in (1, 16):
            run = result[f"{mode}_c{c}"]
            assert set(PER_RUN) <= run.keys(), run
            assert run["calls"] == result["config"]["calls"] * result["config"]["rounds"]
            assert all(isinstance(run[k], float) and math.isfinite(run[k]) and run[k] > 0
                       for k in ("throughput", "p50_ms", "p99_ms")), run
    for c in (1, 16):
        for name in DERIVED:
            assert isinstance(result[f"{name}_c{c}"], float), name
    assert set(result["targets"].values()) <= {"PASS", "MISS"}
    assert len(result["targets"]) == 2
    assert "c=16 added" in done.stdout  # the human-readable table came too
