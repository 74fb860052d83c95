"""Dependencies point one way, as each package's docstring says: read from the imports themselves.

The assembly (and the command line above it) wires both paths; neither path imports
it; MeterUsage's path never imports the recording side; the shared rules import
nothing of the gateway's; the local backend imports nothing of the gateway's, so
that tests against it can catch the gateway's mistakes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import ROOT

GATEWAY = ROOT / "gateway"

# package → the gateway packages it may import (besides itself). `gateway` alone is the
# package's face (its version).
ALLOWED: dict[str, set[str]] = {
    "domain": set(),
    "config": {"domain"},
    "observability": {"domain", "config"},
    "aws": {"domain", "config", "observability"},
    "rpc": {"domain", "config", "observability"},
    "metering": {"domain", "config", "observability", "aws"},
    "recording": {"domain", "config", "observability", "aws", "metering"},
    "assembly": {"domain", "config", "observability", "aws", "rpc", "metering", "recording", "local_aws"},
    "cli": {"domain", "config", "observability", "aws", "rpc", "metering", "recording", "assembly", "local_aws"},
    "local_aws": set(),
}


def package_of(path: Path) -> str:
    parts = path.relative_to(GATEWAY).parts
    return parts[0] if len(parts) > 1 else ""


def gateway_imports(path: Path) -> set[str]:
    """The gateway packages a module imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module + ("." + a.name if node.module == "gateway" else "") for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "gateway" and len(parts) > 1 and parts[1] != "__version__":
                found.add(parts[1])
    return found


MODULES = sorted(p for p in GATEWAY.rglob("*.py") if package_of(p))


def test_every_module_sits_in_a_package_the_rules_know() -> None:
    assert {package_of(p) for p in MODULES} == set(ALLOWED)
    top = sorted(p.name for p in GATEWAY.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"], f"modules outside the packages: {top}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(GATEWAY)))
def test_imports_point_one_way(path: Path) -> None:
    package = package_of(path)
    wrong = gateway_imports(path) - ALLOWED[package] - {package}
    assert not wrong, f"gateway/{path.relative_to(GATEWAY)} ({package}) imports {sorted(wrong)}"


def test_each_package_says_what_it_holds_and_may_import() -> None:
    for package in ALLOWED:
        doc = ast.get_docstring(ast.parse((GATEWAY / package / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"gateway/{package}/__init__.py needs a docstring: what it holds, what it imports"
