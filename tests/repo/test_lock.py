"""One lock for every install: uv.lock, read by `make test`, `make serve` and the image.

These tests compare the repository's files with each other (pyproject.toml, uv.lock,
requirements/image.txt), never with what PyPI holds today, so no release can break
them; the one comparison with this environment checks that `make test` installed
exactly what the lock lists.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from support import ROOT, lock, locked_versions, normalize, required
from support.processes import tool_env

UV = Path(sys.executable).parent / "uv"  # the lock's uv (its tools group), in the dev venv
IMAGE_REQUIREMENTS = ROOT / "requirements" / "image.txt"
WORKSPACE = {"metering-gateway", "metering-gateway-client"}
STALE = "uv.lock does not match pyproject.toml: run `make lock` and review its diff"


def declared() -> list[tuple[str, Requirement]]:
    """Every requirement the two distributions declare, with where it is declared."""
    found: list[tuple[str, str]] = []
    for path in (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml"):
        project = tomllib.loads(path.read_text())
        where = path.relative_to(ROOT)
        found += [(f"{where} [project] dependencies", r) for r in project["project"].get("dependencies", [])]
        found += [(f"{where} [build-system] requires", r) for r in project["build-system"]["requires"]]
        for group, items in project.get("dependency-groups", {}).items():
            found += [(f"{where} [dependency-groups] {group}", r) for r in items if isinstance(r, str)]
    return [(where, Requirement(r)) for where, r in found]


def test_every_declared_dependency_is_locked_within_its_range() -> None:
    versions = locked_versions()
    problems = []
    for where, req in declared():
        name = normalize(req.name)
        if name in WORKSPACE:
            continue
        if name not in versions:
            problems.append(f"{where}: {req} is not in uv.lock")
        elif not req.specifier.contains(versions[name], prereleases=True):
            problems.append(f"{where}: {req}, but uv.lock has {versions[name]}")
    assert problems == [], "run `make lock`"


def test_the_lock_holds_every_dependency_of_every_package_it_locks() -> None:
    """The whole graph is in the lock itself: nothing is left to resolve on the day of an install."""
    packages = lock()["package"]
    names = {normalize(p["name"]) for p in packages}
    edges = [
        (p["name"], d["name"])
        for p in packages
        for deps in [
            p.get("dependencies", []),
            *p.get("optional-dependencies", {}).values(),
            *p.get("dev-dependencies", {}).values(),
        ]
        for d in deps
    ]
    assert edges and [edge for edge in edges if normalize(edge[1]) not in names] == []
    assert {p["name"] for p in packages if "hash" not in p.get("sdist", {}) and not p.get("wheels")} <= WORKSPACE, (
        "every package from a registry has its hashes"
    )


def test_a_pyproject_changed_without_make_lock_stops_make_test_in_one_line(tmp_path: Path) -> None:
    """`make test` (and `make serve`) start with `make lock-check`, which needs no network."""
    for name in (
        "Makefile",
        "pyproject.toml",
        "uv.lock",
        "README.md",
        "tools/uv_bootstrap.py",
        "clients/python/pyproject.toml",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    tools = tmp_path / "uv-of-the-lock"
    (tools / "bin").mkdir(parents=True)
    (tools / "bin" / "uv").symlink_to(UV)
    (tools / ".lock-seen").touch()  # uv is the lock's: nothing to install

    def lock_check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["make", "--no-print-directory", "-C", str(tmp_path), "lock-check", f"UV_DIR={tools}"],
            env={**tool_env(), "UV_CACHE_DIR": str(tmp_path / "empty-cache"), "MAKEFLAGS": ""},
            capture_output=True,
            text=True,
            timeout=120,
        )

    fresh = lock_check()
    assert fresh.returncode == 0, fresh.stderr
    pyproject = tmp_path / "pyproject.toml"
    for change in (
        ('"PyYAML>=6",', '"PyYAML>=6",\n  "left-pad>=1",'),
        ('"boto3>=1.44.18,<2"', '"boto3>=1.44.18,<1.44.19"'),
    ):
        text = (ROOT / "pyproject.toml").read_text()
        assert change[0] in text
        pyproject.write_text(text.replace(*change))
        stale = lock_check()
        assert stale.returncode != 0
        assert [line for line in stale.stderr.splitlines() if not line.startswith("make")] == [STALE], stale.stderr


def test_the_image_requirements_are_the_lock_exported() -> None:
    """requirements/image.txt is what its own header's `uv export` makes of uv.lock today."""
    text = IMAGE_REQUIREMENTS.read_text()
    command = re.search(r"^#\s+(uv export .*)$", text, re.MULTILINE)
    assert command, "no `uv export` command in the file's header: run `make lock`"
    argv = shlex.split(command[1])
    assert "--frozen" in argv and "--no-dev" in argv
    at = argv.index("--output-file")
    del argv[at : at + 2]
    exported = subprocess.run(
        [str(UV), *argv[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "UV_NO_PROGRESS": "1"},
    )
    assert exported.returncode == 0, exported.stderr

    def body(s: str) -> list[str]:
        return [line for line in s.splitlines() if not line.startswith("#")]

    assert body(exported.stdout) == body(text), "requirements/image.txt is stale: run `make lock`"
    pins = required(text)
    blocks = re.split(r"\n(?=[A-Za-z])", text[text.index("\n" + next(iter(pins))) :].strip())
    assert len(blocks) == len(pins) and all("--hash=sha256:" in block for block in blocks)
    assert "setuptools" in pins, "the image builds the gateway with the locked setuptools"
    server = {
        normalize(Requirement(r).name)
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    assert server <= set(pins)


def test_the_image_installs_the_versions_make_test_tests() -> None:
    versions = locked_versions()
    assert {
        name: (pin, versions.get(name))
        for name, pin in required(IMAGE_REQUIREMENTS.read_text()).items()
        if versions.get(name) != pin
    } == {}


def test_this_environment_is_what_the_lock_lists() -> None:
    """`make test` syncs .venv to uv.lock first (`uv sync --frozen`): nothing newer, older or extra."""
    versions = locked_versions()
    installed = {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {
        name: f"{version} installed, uv.lock has {versions.get(name)}"
        for name, version in installed.items()
        if name not in WORKSPACE and versions.get(name) != version
    }
    assert wrong == {}, "run the tests with `make test`, which installs what uv.lock lists"
