"""``pip install ./clients/python`` into a fresh venv gives a client that meters through a live gateway.

The client's dependencies are installed at uv.lock's versions (exported, with their
hashes), and the client wheel is built with the locked setuptools, so a release on
PyPI cannot change what this test tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import ROOT
from support.processes import gateway_process

UV = Path(sys.executable).parent / "uv"  # the lock's uv, in the dev venv

SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    from datetime import datetime, timezone
    from decimal import Decimal
    from metering_client import DuplicateRequest, InvalidRequest, MeteringClient

    when = datetime.now(timezone.utc)
    out = {"has_server_code": importlib.util.find_spec("gateway") is not None}
    with MeteringClient(sys.argv[1]) as client:
        first = client.meter_usage(
            product_code="prod-venv", usage_dimension="gb", quantity=Decimal("1.25"), timestamp=when
        )
        out["record_id"], out["token"] = first.metering_record_id, first.client_token
        try:
            client.meter_usage(product_code="prod-venv", usage_dimension="gb", quantity=2, timestamp=when)
        except DuplicateRequest as exc:
            out["duplicate"] = [exc.code.name, exc.reason, exc.aws_error_code]
        try:
            client.meter_usage(product_code="", usage_dimension="gb", quantity=1)
        except InvalidRequest as exc:
            out["violations"] = [v.field for v in exc.field_violations]
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_the_client_installs_alone_and_meters(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    locked = tmp_path / "client-requirements.txt"
    subprocess.run(
        [
            str(UV),
            "export",
            "--frozen",
            "--quiet",
            "--package",
            "metering-gateway-client",
            "--no-dev",
            "--no-emit-workspace",
            "--output-file",
            str(locked),
        ],
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(ROOT / "clients" / "python"),
        ],
        check=True,
        timeout=300,
    )
    [wheel] = (tmp_path / "wheels").glob("metering_gateway_client-*.whl")
    for args in (["--require-hashes", "-r", str(locked)], ["--no-deps", str(wheel)]):
        install = subprocess.run(
            [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert install.returncode == 0, install.stdout + install.stderr
    (tmp_path / "meter.py").write_text(SCRIPT)
    with gateway_process() as gw:
        run = subprocess.run(
            [str(py), str(tmp_path / "meter.py"), gw.target], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert run.returncode == 0, run.stdout + run.stderr
        out = json.loads(run.stdout)
        records = gw.wait_for(lambda e: e.get("event") == "rpc" and e.get("code") == "OK")
    assert out["has_server_code"] is False  # only the client distribution is installed
    assert out["record_id"] and out["token"]
    assert out["duplicate"] == ["ALREADY_EXISTS", "DUPLICATE_REQUEST", "DuplicateRequestException"]
    assert out["violations"] == ["product_code"]
    assert records["product_code"] == "prod-venv"
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout.lower()
    assert "boto" not in freeze and "structlog" not in freeze  # the server's dependencies stay out
    check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout  # the wheel's own requirements are met by the locked versions
