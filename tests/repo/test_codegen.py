"""The committed generated code is what the proto generates today."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from support import ROOT, locked_versions

sys.path.insert(0, str(ROOT / "tools"))

import genproto

GRPC_MODULE = genproto.GENERATED_DIR / "metering_pb2_grpc.py"
PB2_MODULE = genproto.GENERATED_DIR / "metering_pb2.py"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = genproto.generate(tmp_path)
    committed_dir = genproto.OUT_ROOT / genproto.GENERATED_DIR
    names = sorted(p.relative_to(tmp_path / genproto.GENERATED_DIR) for p in fresh)
    committed = sorted(
        p.relative_to(committed_dir) for p in committed_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert names == committed, "generated files differ from the committed set: run `make proto`"
    for name in names:
        assert (tmp_path / genproto.GENERATED_DIR / name).read_bytes() == (committed_dir / name).read_bytes(), (
            f"{name} is stale against protos/: run `make proto`"
        )


def test_the_code_is_generated_by_the_locked_grpcio_tools() -> None:
    """Compared like with like: the committed code and the fresh one both come from uv.lock's grpcio-tools."""
    locked = locked_versions()["grpcio-tools"]
    assert metadata.version("grpcio-tools") == locked, (
        "run the tests with `make test`, which installs uv.lock's versions"
    )
    stamped = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", (genproto.OUT_ROOT / GRPC_MODULE).read_text())
    assert stamped and stamped[1] == locked, "regenerate with `make proto`"


def test_both_distributions_require_the_runtimes_the_generated_code_checks_for() -> None:
    """The generated modules refuse to import under an older grpcio or protobuf than made them,
    so each distribution's floor is at least that: any version its metadata allows works."""
    grpc_code = (genproto.OUT_ROOT / GRPC_MODULE).read_text()
    pb2_code = (genproto.OUT_ROOT / PB2_MODULE).read_text()
    needs = {
        "grpcio": re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_code)[1],  # type: ignore[index]
        "protobuf": ".".join(
            re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", pb2_code).groups()
        ),  # type: ignore[union-attr]
    }
    for path in (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml"):
        for line in tomllib.loads(path.read_text())["project"]["dependencies"]:
            req = Requirement(line)
            if req.name in needs:
                floors = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
                assert floors and all(Version(f) >= Version(needs[req.name]) for f in floors), (
                    f"{path.relative_to(ROOT)}: {req} admits releases the generated code refuses "
                    f"(it needs {req.name}>={needs[req.name]})"
                )
