"""The committed generated code is what the proto generates today."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import genproto  # noqa: E402


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = genproto.generate(tmp_path)
    committed_dir = genproto.OUT_ROOT / genproto.GENERATED_DIR
    names = sorted(p.relative_to(tmp_path / genproto.GENERATED_DIR) for p in fresh)
    committed = sorted(p.relative_to(committed_dir) for p in committed_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert names == committed, "generated files differ from the committed set: run `make proto`"
    for name in names:
        assert (tmp_path / genproto.GENERATED_DIR / name).read_bytes() == (committed_dir / name).read_bytes(), (
            f"{name} is stale against protos/: run `make proto`"
        )
