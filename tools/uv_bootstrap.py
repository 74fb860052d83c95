"""Install uv, at the version and hashes uv.lock names, into .tools/uv.

`make` needs uv before anything else, and a fresh machine has only python3 and
pip, so uv comes from PyPI through pip: the exact release the lock lists (its
``tools`` group), every file checked against the lock's hashes. Nothing is
installed when that version is already there, so every `make test` can call
this first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pinned(lock: Path, name: str = "uv") -> tuple[str, list[str]]:
    """``(version, sha256 hashes of every file)`` of ``name`` in a uv.lock."""
    for package in tomllib.loads(lock.read_text())["package"]:
        if package["name"] == name:
            files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
            return package["version"], [f["hash"] for f in files]
    raise SystemExit(f"{lock.name} locks no {name}: run `make lock`")


def requirement(lock: Path) -> str:
    """A pip requirement line that accepts only the locked files."""
    version, hashes = pinned(lock)
    return " ".join([f"uv=={version}", *(f"--hash={h}" for h in hashes)]) + "\n"


def installed(tools: Path) -> str | None:
    """The version of uv in ``tools``, if any."""
    uv = tools / "bin" / "uv"
    if not uv.exists():
        return None
    done = subprocess.run([str(uv), "--version"], capture_output=True, text=True, check=False)
    words = done.stdout.split()
    return words[1] if done.returncode == 0 and len(words) > 1 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lock", type=Path, default=ROOT / "uv.lock")
    parser.add_argument("--tools", type=Path, default=ROOT / ".tools" / "uv")
    ns = parser.parse_args()
    version, _ = pinned(ns.lock)
    if installed(ns.tools) == version:
        return 0
    print(f"installing uv {version} (from {ns.lock.name}) into {ns.tools}", file=sys.stderr)
    venv.EnvBuilder(clear=True, with_pip=True).create(ns.tools)
    pin = ns.tools / "requirement.txt"
    pin.write_text(requirement(ns.lock))
    subprocess.run(
        [
            str(ns.tools / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--require-hashes",
            "--no-deps",
            "--only-binary=:all:",
            "-r",
            str(pin),
        ],
        check=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
