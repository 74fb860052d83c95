"""The Dockerfile, checked without a Docker engine: parsed, and its commands run here.

The HEALTHCHECK and CMD run verbatim (exec form, the argv as written) with the
image's ENV, overridden the way ``docker run -e`` would: a free loopback port
instead of 0.0.0.0:50051, and the local backend instead of AWS.
"""

from __future__ import annotations

import fnmatch
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from processes import free_port, gateway_process, tool_env
from support import ROOT, first, parse_dockerfile

from gateway.config import parse_listen


PREAMBLE, *STAGES = parse_dockerfile((ROOT / "Dockerfile").read_text())
BUILD, FINAL = STAGES if len(STAGES) == 2 else (None, None)


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in FINAL:
        if instruction.keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(instruction.args))
    return env


def container_env(port: int) -> dict[str, str]:
    """The image's ENV, with what a test run changes, as ``docker run -e`` would."""
    return tool_env(**{**image_env(), "METERING_GATEWAY_LISTEN": f"127.0.0.1:{port}", "METERING_GATEWAY_LOCAL": "true"})


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(first(FINAL, "HEALTHCHECK").exec_form, env=env, capture_output=True, text=True, timeout=30)


def test_two_stages_on_slim_python() -> None:
    assert BUILD is not None and FINAL is not None, "a build stage and a final stage"
    arg = first(PREAMBLE, "ARG").args
    assert arg == "PYTHON_IMAGE=python:3.11-slim"
    assert first(BUILD, "FROM").args == "${PYTHON_IMAGE} AS build"
    assert first(FINAL, "FROM").args == "${PYTHON_IMAGE}"


def test_the_final_stage_installs_wheels_only() -> None:
    assert "pip wheel" in " ".join(i.args for i in BUILD if i.keyword == "RUN")
    runs = " ".join(i.args for i in FINAL if i.keyword == "RUN")
    assert "from=build" in runs and "--no-index" in runs and "--find-links=/wheels" in runs
    for tool in ("gcc", "build-essential", "apt-get", "pip wheel", "setup.py"):
        assert tool not in runs
    assert not [i for i in FINAL if i.keyword in ("COPY", "ADD")], "no source tree in the final image"


def test_runs_as_a_numeric_non_root_user() -> None:
    user = first(FINAL, "USER").args
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so Kubernetes' runAsNonRoot can check it


def test_port_signal_and_commands() -> None:
    assert first(FINAL, "EXPOSE").args == "50051"
    assert first(FINAL, "STOPSIGNAL").args == "SIGTERM"
    assert parse_listen(image_env()["METERING_GATEWAY_LISTEN"]) == ("0.0.0.0", 50051)
    assert first(FINAL, "CMD").exec_form == ["metering-gateway", "serve"]
    assert first(FINAL, "HEALTHCHECK").exec_form[:2] == ["metering-gateway", "health"]


def test_healthcheck_passes_against_the_cmd_and_fails_without_it() -> None:
    port = free_port()
    env = container_env(port)
    before = healthcheck(env)
    assert before.returncode != 0, before.stdout
    with gateway_process(argv=first(FINAL, "CMD").exec_form, env=env) as gw:
        assert gw.target == f"127.0.0.1:{port}"
        serving = healthcheck(env)
        assert serving.returncode == 0, serving.stdout + serving.stderr
        assert "SERVING" in serving.stdout
        assert gw.terminate() == 0  # STOPSIGNAL SIGTERM: a clean exit
    after = healthcheck(env)
    assert after.returncode != 0


def _ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p + "/*") or path.startswith(p + "/") for p in patterns)


def test_dockerignore_keeps_what_copy_needs_and_drops_the_rest() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    sources = [src for i in BUILD if i.keyword == "COPY" for src in i.args.split()[:-1]]
    assert sources, "the build stage copies something"
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _ignored(src, patterns), f".dockerignore drops {src}, which COPY needs"
    for junk in (".git", ".venv", "tests", "clients/node"):
        assert _ignored(junk, patterns), junk


@pytest.mark.slow
def test_the_server_wheel_has_the_console_script(tmp_path: Path) -> None:
    # What the build stage does for the server, without dependencies: the final
    # image's CMD exists only if the wheel declares it.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet",
                    "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)], check=True, timeout=300, cwd=tmp_path)
    [wheel] = tmp_path.glob("metering_gateway-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
        assert "metering-gateway = gateway.cli:main" in zf.read(entry_points).decode()
    assert "gateway/cli.py" in names and "marketplace/metering/v1/metering_pb2.py" in names
