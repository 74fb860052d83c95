"""The README says what the code does: settings and status codes."""

from __future__ import annotations

import sys
from pathlib import Path

from gateway import errors

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import settings_table  # noqa: E402


def test_settings_table_is_current() -> None:
    text = (ROOT / "README.md").read_text()
    assert settings_table.render(text) == text, "README settings table is stale: run `make docs`"


def test_every_status_reason_is_documented() -> None:
    text = (ROOT / "README.md").read_text()
    documented = [r for r in errors.RULES if f"`{r}`" in text]
    # Each reason is named in the table, or covered by a row's "…" family of AWS names.
    families = {"INVALID_USAGE_DIMENSION", "INVALID_TAG", "INVALID_USAGE_ALLOCATIONS", "INVALID_ENDPOINT_REGION",
                "DISABLED_API", "INTERNAL"}
    missing = set(errors.RULES) - set(documented) - families
    assert not missing, f"README's status table does not mention {sorted(missing)}"
