"""The README says what the code does: settings, status codes and the layout."""

from __future__ import annotations

import re
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


def test_layout_lists_every_module() -> None:
    """Every module of the gateway, the client, the tools, the benchmarks and the tests'
    shared helpers has its own row (or a place in a row) in the README's Layout table."""
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("\n## Layout\n") :]
    layout = layout[: layout.find("\n## ", 1)] if "\n## " in layout[1:] else layout
    listed = set(re.findall(r"`([^`]+)`", "\n".join(line.split("|")[1] for line in layout.splitlines() if line.startswith("| `"))))
    modules = [
        *(ROOT / "gateway").rglob("*.py"),
        *(ROOT / "clients" / "python" / "src" / "metering_client").glob("*.py"),
        *(ROOT / "tools").glob("*.py"),
        *(ROOT / "benchmarks").glob("*.py"),
        *(p for p in (ROOT / "tests").glob("*.py") if not p.name.startswith("test_")),
    ]
    missing = sorted(str(p.relative_to(ROOT)) for p in modules if str(p.relative_to(ROOT)) not in listed)
    assert not missing, f"README's Layout does not list {missing}"
