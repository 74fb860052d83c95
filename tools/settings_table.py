"""Write the settings table of docs/settings.md from gateway.config.Settings.

`make docs` rewrites the table between the page's settings markers; a test fails
when the page and the settings disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gateway.config import SETTINGS_FIELDS, env_name, flag_name, shown_default, shown_range, spec

PAGE = Path(__file__).resolve().parent.parent / "docs" / "settings.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def table() -> str:
    rows = ["| flag | environment variable | default | range | what it does |", "|---|---|---|---|---|"]
    for f in SETTINGS_FIELDS:
        rows.append(
            f"| `{flag_name(f.name)}` | `{env_name(f.name)}` | `{shown_default(f)}` | {shown_range(f)} "
            f"| {spec(f).help} |"
        )
    return "\n".join(rows)


def render(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    PAGE.write_text(render(PAGE.read_text()))
    sys.exit(0)
