"""The Dockerfile, its lock file and `make image`; the image itself where docker or podman works.

Without a container engine the Dockerfile is parsed and its commands run here:
the HEALTHCHECK and CMD verbatim (exec form, the argv as written) with the
image's ENV, overridden the way ``docker run -e`` would: a free loopback port
instead of 0.0.0.0:50051, and the local backend instead of AWS. Where docker
(with an engine) or podman can build and run containers, the last test builds
the image with `make image` and runs it; elsewhere it says why it was skipped.
``PYTHON_IMAGE`` names another base image (a local one, for offline builds).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from concurrent import futures
from pathlib import Path

import pytest

from gateway.config import parse_listen
from metering_client import MeteringClient, MeteringError
from support import ROOT, first, locked_versions, parse_dockerfile, unchecked
from support.processes import free_port, gateway_process, tool_env

PREAMBLE, *STAGES = parse_dockerfile((ROOT / "Dockerfile").read_text())
BUILD, FINAL = STAGES if len(STAGES) == 2 else (None, None)
LOCK_PATH = "requirements/image.txt"
VENV = "/opt/metering-gateway"


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in FINAL:
        if instruction.keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(instruction.args))
    return env


def container_env(port: int) -> dict[str, str]:
    """The image's ENV, with what a test run changes, as ``docker run -e`` would.

    ``$PATH`` in the image's ENV is this environment's (the dev venv's bin first):
    the image's /opt/metering-gateway/bin does not exist here."""
    env = tool_env()
    image = {k: re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), v) for k, v in image_env().items()}
    return {**env, **image, "METERING_GATEWAY_LISTEN": f"127.0.0.1:{port}", "METERING_GATEWAY_LOCAL": "true"}


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(first(FINAL, "HEALTHCHECK").exec_form, env=env, capture_output=True, text=True, timeout=30)


def test_two_stages_on_slim_python() -> None:
    assert BUILD is not None and FINAL is not None, "a build stage and a final stage"
    arg = first(PREAMBLE, "ARG").args
    assert arg == "PYTHON_IMAGE=python:3.11-slim"
    assert first(BUILD, "FROM").args == "${PYTHON_IMAGE} AS build"
    assert first(FINAL, "FROM").args == "${PYTHON_IMAGE}"


def test_the_build_stage_installs_the_lock_file_then_the_gateway() -> None:
    runs = [i.args for i in BUILD if i.keyword == "RUN"]
    assert f"-r {LOCK_PATH}" in runs[0] and "--require-hashes" in runs[0] and "--only-binary=:all:" in runs[0]
    assert "--no-deps" in runs[1], "the gateway's dependencies come from the lock file only"
    assert first(BUILD, "ENV").args.count("PIP_NO_CACHE_DIR=1") == 1


def test_the_build_stage_removes_the_build_tools_and_tests_before_the_copy() -> None:
    last = [i.args for i in BUILD if i.keyword == "RUN"][-1]
    assert f"{VENV}/bin/pip check" in last
    uninstall = last[last.index("pip check") :]
    assert "uninstall --yes --quiet setuptools" in uninstall and "-m pip uninstall --yes --quiet pip" in uninstall
    assert "-name tests -o -name test" in uninstall


def test_the_final_stage_copies_the_built_environment_only() -> None:
    assert first(FINAL, "COPY").args == f"--from=build {VENV} {VENV}", "no source tree, no wheels, no pip run"
    assert not [i for i in FINAL if i.keyword == "ADD"]
    run = first(FINAL, "RUN").args
    for tool in ("pip", "gcc", "build-essential", "apt-get", "setup.py"):
        assert tool not in run
    assert f"PATH={VENV}/bin:$PATH" in first(FINAL, "ENV").args


def test_builds_offline_with_any_builder() -> None:
    """No `# syntax=` line (it pulls a frontend image), no BuildKit-only RUN --mount."""
    text = (ROOT / "Dockerfile").read_text()
    assert not re.match(r"\s*#\s*syntax\s*=", text, re.IGNORECASE)
    assert not [i for stage in STAGES for i in stage if i.keyword == "RUN" and "--mount" in i.args]


def test_runs_as_a_numeric_non_root_user_with_its_group() -> None:
    user = first(FINAL, "USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0  # numeric, so Kubernetes' runAsNonRoot can check it
    run = first(FINAL, "RUN").args
    # the group the image runs as exists, with that id (`id -gn` says gateway)
    assert f"groupadd --gid {gid} gateway" in run
    assert f"useradd --uid {uid} --gid {gid} " in run and "--user-group" not in run
    assert f"install -d -o {uid} -g {gid} /var/lib/metering-gateway" in run


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
    return any(
        fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p + "/*") or path.startswith(p + "/") for p in patterns
    )


def test_dockerignore_keeps_what_copy_needs_and_drops_the_rest() -> None:
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
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
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    [wheel] = tmp_path.glob("metering_gateway-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
        assert "metering-gateway = gateway.cli:main" in zf.read(entry_points).decode()
    assert "marketplace/metering/v1/metering_pb2.py" in names
    # Packages are found, not listed: every module of the source tree is in the wheel.
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "gateway").rglob("*.py") if "__pycache__" not in p.parts}
    assert sources - set(names) == set()


# -- make image: docker, podman or buildah, whichever works -------------------------------------------------


def make_image(tmp_path: Path, working: set[str], **variables: str) -> subprocess.CompletedProcess[str]:
    """``make image`` with stand-ins for the three builders; ``working`` answer ``info``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("docker", "podman", "buildah"):
        script = bin_dir / tool
        script.write_text(
            f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls"\n'
            f'[ "$1" = info ] && exit {0 if tool in working else 1}\nexit 0\n'
        )
        script.chmod(0o755)
    env = {k: v for k, v in tool_env().items() if k not in ("PYTHON_IMAGE", "IMAGE", "MAKEFLAGS")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    args = [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "image", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def builds(tmp_path: Path) -> list[str]:
    return [c for c in (tmp_path / "calls").read_text().splitlines() if not c.endswith(" info")]


@pytest.mark.parametrize(
    ("working", "expected"),
    [
        ({"docker", "podman", "buildah"}, "docker build -t metering-gateway:dev ."),
        ({"podman", "buildah"}, "podman build --format docker -t metering-gateway:dev ."),  # a docker client, no engine
        ({"buildah"}, "buildah bud --format docker -t metering-gateway:dev ."),
    ],
)
def test_make_image_picks_the_builder_that_works(tmp_path: Path, working: set[str], expected: str) -> None:
    done = make_image(tmp_path, working)
    assert done.returncode == 0, done.stderr
    assert builds(tmp_path) == [expected]


def test_make_image_takes_the_tag_and_base_image(tmp_path: Path) -> None:
    done = make_image(tmp_path, {"podman"}, IMAGE="gw:1", PYTHON_IMAGE="localhost/python:3.11")
    assert done.returncode == 0, done.stderr
    assert builds(tmp_path) == ["podman build --format docker --build-arg PYTHON_IMAGE=localhost/python:3.11 -t gw:1 ."]


def test_make_image_without_a_builder_says_so(tmp_path: Path) -> None:
    done = make_image(tmp_path, set())
    assert done.returncode != 0
    assert "no container builder works here: install docker (with a running engine), podman or buildah" in done.stderr
    assert builds(tmp_path) == []


# -- the image for real, where docker or podman can build and run it ----------------------------------------

BASE_IMAGE = os.environ.get("PYTHON_IMAGE") or "python:3.11-slim"


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def _why(done: subprocess.CompletedProcess[str]) -> str:
    """The last line it complained with."""
    lines = [line.strip() for line in (done.stderr.strip() or done.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {done.returncode}"


def container_engine() -> str:
    """docker if its engine answers, else podman (as `make image` picks); skips the test when neither
    can build and run containers from BASE_IMAGE here, saying why."""
    reasons = []
    for engine in ("docker", "podman"):
        if shutil.which(engine) is None:
            reasons.append(f"{engine} is not installed")
            continue
        info = _run(engine, "info")
        if info.returncode == 0:
            break
        reasons.append(f"{engine} info: {_why(info)}")
    else:
        unchecked(
            f"no container builder: {'; '.join(reasons)} (buildah alone builds but cannot run the image): "
            "the image is not built, run or stopped"
        )
    if _run(engine, "image", "inspect", BASE_IMAGE).returncode != 0:
        try:
            pulled = _run(engine, "pull", BASE_IMAGE, timeout=300)
            why = _why(pulled) if pulled.returncode != 0 else ""
        except subprocess.TimeoutExpired:
            why = "no answer in 300 s"
        if why:
            unchecked(
                f"{engine}: the base image {BASE_IMAGE} is not here and cannot be pulled ({why}); set "
                "PYTHON_IMAGE to a local Python 3.11 image (docs/deploy.md, Container): the image is unchecked"
            )
    probe = _run(engine, "run", "--rm", BASE_IMAGE, "true")
    if probe.returncode != 0:
        unchecked(f"{engine} cannot run containers here: {_why(probe)}: the image is unchecked")
    return engine


# What the image's environment holds: its distributions, test folders and pip's files.
INVENTORY = """
import importlib.metadata as m, json, pathlib, re, sys
venv = pathlib.Path(sys.prefix)
print(json.dumps({
    "distributions": {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in m.distributions()},
    "tests": sorted(str(p) for p in venv.rglob("*") if p.is_dir() and p.name in ("tests", "test")),
    "pip": sorted(str(p) for p in [*venv.glob("lib/*/site-packages/*"), *venv.glob("bin/*")]
                  if re.fullmatch(r"pip(-.*|[0-9.]*)", p.name)),
}))
"""


def exec_python(engine: str, name: str, code: str) -> str:
    """Run Python code in the container (the image's own interpreter); its stdout."""
    done = _run(engine, "exec", name, "python3", "-c", code)
    assert done.returncode == 0, done.stderr
    return done.stdout


def local_faults(engine: str, name: str, body: dict[str, object] | None = None) -> list[dict[str, object]]:
    """The embedded local AWS's fault queue, POSTing ``body`` first (the endpoint listens in the container only)."""
    logs = _run(engine, "logs", name)
    [started] = [json.loads(line) for line in (logs.stdout + logs.stderr).splitlines() if '"local_aws_started"' in line]
    url = f"{started['endpoint']}/_local/faults"
    post = (
        ""
        if body is None
        else (f"u.urlopen(u.Request({url!r}, data={json.dumps(body).encode()!r}, method='POST')).read();")
    )
    return json.loads(
        exec_python(engine, name, f"import urllib.request as u;{post}print(u.urlopen({url!r}).read().decode())")
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_image_builds_runs_and_stops_within_the_default_10s(tmp_path: Path) -> None:
    """`make image`, run it (`serve` with the local backend), health through the image's own HEALTHCHECK and
    the published port, user 10001:10001 named gateway; then `stop` with its default 10 s while a call
    waits on a slow AWS: exit code 0, not 137."""
    engine = container_engine()
    tag = f"localhost/metering-gateway:test-{uuid.uuid4().hex[:8]}"
    name = f"metering-gateway-test-{uuid.uuid4().hex[:8]}"
    build = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            "image",
            f"IMAGE={tag}",
            *([f"PYTHON_IMAGE={BASE_IMAGE}"] if "PYTHON_IMAGE" in os.environ else []),
        ],
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    port = free_port()
    try:
        started = _run(
            engine,
            "run",
            "-d",
            "--name",
            name,
            "-p",
            f"127.0.0.1:{port}:50051",
            "-e",
            "METERING_GATEWAY_LOCAL=true",
            tag,
        )
        assert started.returncode == 0, started.stderr
        check = [engine, "exec", name, *first(FINAL, "HEALTHCHECK").exec_form]
        end = time.monotonic() + 60
        while (health := _run(*check)).returncode != 0:
            assert time.monotonic() < end, f"never SERVING: {_why(health)}\n{_run(engine, 'logs', name).stdout[-3000:]}"
            time.sleep(0.5)
        assert "SERVING" in health.stdout
        outside = subprocess.run(
            ["metering-gateway", "health", "--target", f"127.0.0.1:{port}"],
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert outside.returncode == 0, outside.stderr
        ids = [_run(engine, "exec", name, "id", flag).stdout.strip() for flag in ("-u", "-g", "-gn")]
        assert ids == ["10001", "10001", "gateway"]
        # Only what runs, at the versions `make test` tests: uv.lock's, with no build tools and no tests.
        inside = json.loads(exec_python(engine, name, INVENTORY))
        versions = locked_versions()
        assert {n: v for n, v in inside["distributions"].items() if versions.get(n) != v} == {
            "metering-gateway": "0.1.0"
        }
        assert not {"pip", "setuptools", "wheel"} & set(inside["distributions"]), inside["distributions"]
        assert inside["tests"] == [] and inside["pip"] == []

        local_faults(engine, name, {"error": "slow", "delay": 60.0, "count": 10, "operation": "MeterUsage"})
        with futures.ThreadPoolExecutor(1) as pool, MeteringClient(f"127.0.0.1:{port}", retry=None) as client:
            call = pool.submit(
                client.meter_usage, product_code="prod-abc123", usage_dimension="slow", quantity=1, timeout=120
            )
            end = time.monotonic() + 30
            while local_faults(engine, name)[0]["remaining"] == 10:  # the call has reached the local AWS
                assert time.monotonic() < end and not call.done()
                time.sleep(0.2)
            t0 = time.monotonic()
            stopped = _run(engine, "stop", name, timeout=60)  # no -t: the default 10 s
            took = time.monotonic() - t0
            with pytest.raises(MeteringError) as cut:
                call.result(timeout=5)
        assert stopped.returncode == 0, stopped.stderr
        code = _run(engine, "inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        print(f"{engine}: stop took {took:.2f}s, exit code {code}, the caller got {cut.value.code.name}")
        assert code == "0", _run(engine, "logs", name).stdout[-3000:]
        assert took < 10
    finally:
        _run(engine, "rm", "-f", name)
        _run(engine, "rmi", "-f", tag)
