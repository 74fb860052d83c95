"""Generate the Python code for the gateway's protos.

One command, used by `make proto` and by the test that fails when the committed
code is stale: both call :func:`generate`, so they cannot drift apart. The output
lives under ``clients/python/src`` (never edited by hand), from where both the
client distribution and the server distribution ship it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "clients" / "python" / "src"
GENERATED_DIR = Path("marketplace") / "metering" / "v1"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_root: Path = OUT_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) with the grpc and mypy-protobuf plugins."""
    from grpc_tools import protoc  # noqa: PLC0415 - grpc_tools only when generating

    target = out_root / GENERATED_DIR
    if target.exists():
        shutil.rmtree(target)
    out_root.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    scripts = Path(sysconfig.get_path("scripts"))
    env_path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{scripts}{os.pathsep}{env_path}"  # protoc-gen-mypy lives here
    try:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"--mypy_out={out_root}",
            f"--mypy_grpc_out={out_root}",
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
        ]
        code = protoc.main(args)
    finally:
        os.environ["PATH"] = env_path
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return sorted(p for p in target.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT_ROOT)
    ns = parser.parse_args()
    for path in generate(ns.out):
        print(path.relative_to(ns.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
