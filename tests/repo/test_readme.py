"""The README is a front page, and it and the docs say what the code does: the
settings table, the status reasons, the layout, the links, and the examples, one of
them run end to end against the gateway exactly as `make serve` starts it."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

from gateway.domain import errors
from marketplace.metering.v1 import metering_pb2
from support.processes import GatewayProcess, free_port, tool_env
from support.recording import wait_for

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "tools"))

import settings_table  # noqa: E402 - found through the sys.path entry above

FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.S | re.M)
# [text](target): the text may hold `code` and one level of [brackets].
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# The program `make serve` runs, and how the tests' launcher runs the same command.
PROGRAM = ".venv/bin/metering-gateway"
GATEWAY = [sys.executable, "-m", "gateway"]


def blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def section(text: str, heading: str) -> str:
    """From ``heading`` (a whole line) to the next heading of the same or a higher level
    (a `# comment` in a code block is no heading)."""
    level = len(heading.split(" ", 1)[0])
    lines = text.splitlines(keepends=True)
    start = lines.index(f"{heading}\n")
    inside = False
    for end in range(start + 1, len(lines)):
        if lines[end].lstrip().startswith("```"):
            inside = not inside
        elif not inside and re.match(rf"#{{1,{level}}} ", lines[end]):
            return "".join(lines[start:end])
    return "".join(lines[start:])


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than - and _ dropped, spaces → -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", prose(page.read_text()), re.M):
        s = slug(heading)
        seen[s] = seen.get(s, -1) + 1
    return {s if n == 0 else f"{s}-{n}" for s, count in seen.items() for n in range(count + 1)}


def test_readme_is_a_front_page() -> None:
    lines = README.read_text().count("\n")
    assert lines < 200, f"README.md has {lines} lines: move the detail to a page under docs/ and link it"


def test_settings_table_is_current() -> None:
    text = settings_table.PAGE.read_text()
    assert settings_table.PAGE == DOCS / "settings.md"
    assert settings_table.BEGIN in text and settings_table.END in text
    assert settings_table.render(text) == text, "docs/settings.md's settings table is stale: run `make docs`"


def test_every_status_reason_is_documented() -> None:
    """In the one status table, docs/api.md's (tests/repo/test_api_doc.py checks each reason's code)."""
    text = section((DOCS / "api.md").read_text(), "### Status codes")
    documented = [r for r in errors.RULES if f"`{r}`" in text]
    missing = set(errors.RULES) - set(documented)
    assert not missing, f"docs/api.md's status table does not mention {sorted(missing)}"


def test_there_is_one_status_table() -> None:
    """The README links the status table rather than keeping a copy of it."""
    header = re.compile(r"^\|\s*condition\s*\|\s*gRPC code\s*\|", re.M)
    holding = [page.name for page in [README, *DOCS.glob("*.md")] if header.search(page.read_text())]
    assert holding == ["api.md"], f"status tables in {holding}: keep the one in docs/api.md"


def test_layout_has_one_row_per_folder() -> None:
    """docs/layout.md's table has a row for every folder that holds code (the gateway's
    packages, the client, the tools, the benchmarks, the tests' folders), and every row
    names a folder that exists."""
    text = (DOCS / "layout.md").read_text()
    rows = [line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(set(rows)), "a folder has two rows"
    assert all((ROOT / row).is_dir() for row in rows), [row for row in rows if not (ROOT / row).is_dir()]
    code = {
        p.parent
        for top in ("gateway", "clients/python/src/metering_client", "tools", "benchmarks", "tests")
        for p in (ROOT / top).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(str(d.relative_to(ROOT)) + "/" for d in code if str(d.relative_to(ROOT)) + "/" not in rows)
    assert not missing, f"docs/layout.md has no row for {missing}"


def test_every_relative_link_resolves() -> None:
    """Links in README.md and docs/*.md point at files that exist, and their #anchors at headings."""
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        text = re.sub(r"`[^`\n]*`", "", prose(page.read_text()))  # code spans hold no links
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading in {dest.name})")
    assert not broken, "\n".join(broken)


def test_the_link_checker_knows_githubs_slugs() -> None:
    assert slug("`mode: single`, `spool.type: sqlite`: RecordUsage on one pod") == (
        "mode-single-spooltype-sqlite-recordusage-on-one-pod"
    )
    assert slug("Retries and idempotency") == "retries-and-idempotency"
    assert slug("One pod or many: SQLite or PostgreSQL") == "one-pod-or-many-sqlite-or-postgresql"
    assert slug("In brief: metrics, alerts, admin commands") == "in-brief-metrics-alerts-admin-commands"


def test_the_grpcurl_output_uses_proto_field_names() -> None:
    """grpcurl prints a reply with the proto's field names (`metering_record_id`), not JSON's lowerCamel."""
    text = README.read_text()
    call = next(m for m in FENCE.finditer(text) if "grpcurl" in m.group(2) and "/MeterUsage" in m.group(2))
    reply = FENCE.search(text, call.end())
    assert reply is not None and reply.group(1) == "json", (
        "the grpcurl call is not followed by its output, a json block"
    )
    assert text[call.end() : reply.start()].strip() == "", "the grpcurl call's output does not follow it"
    printed = json.loads(reply.group(2))
    fields = set(metering_pb2.MeterUsageResponse.DESCRIPTOR.fields_by_name)
    assert printed and set(printed) <= fields, f"{sorted(printed)} are not MeterUsageResponse's fields {sorted(fields)}"


def test_no_python_example_passes_a_literal_client_token() -> None:
    """Copied as it is, a literal token would make every request the same request."""
    for code in blocks(README.read_text(), "python"):
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.keyword) and node.arg == "client_token":
                assert not isinstance(node.value, ast.Constant), f"a literal client_token in:\n{code}"


def test_the_examples_meter_what_make_serve_knows() -> None:
    """`make serve` knows prod-abc123 with requests and storage-gb only; the examples use them."""
    text = README.read_text()
    code = "\n".join(body for _, body in FENCE.findall(text))
    assert set(re.findall(r"\bprod-[\w-]+", code)) == {"prod-abc123"}
    dimensions = re.findall(r"(?:usage_dimension\"?\s*[:=]\s*\"|--dimension )([\w-]+)", code)
    assert dimensions and set(dimensions) <= {"requests", "storage-gb"}, dimensions
    assert "PRODUCTS ?= prod-abc123=requests,storage-gb" in (ROOT / "Makefile").read_text()


def make_serve_argv(listen: str, state: Path, local_port: int = 0) -> list[str]:
    """The command `make serve` runs, as `make -n` prints it (nothing is run, nothing made)."""
    env = {k: v for k, v in tool_env().items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-n",
            "serve",
            f"LISTEN={listen}",
            f"STATE={state}",
            f"LOCAL_PORT={local_port}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    serve = [line for line in done.stdout.splitlines() if "metering-gateway serve" in line]
    assert len(serve) == 1, done.stdout
    argv = shlex.split(serve[0])
    assert argv[0].endswith("/metering-gateway") and argv[1] == "serve", argv
    return argv


def test_make_serve_records_usage_as_the_readme_says(tmp_path: Path) -> None:
    """The gateway exactly as `make serve` starts it takes the README's RecordUsage example,
    and `records list` shows its PENDING hourly record within seconds.

    It needs --products, events without a timestamp, RecordResult.carried and prompt
    placement (gateway/recording/placer.py)."""
    state = tmp_path / "state"
    port = free_port()
    argv = make_serve_argv(f"127.0.0.1:{port}", state)
    assert not state.exists(), "`make -n serve` made the state folder"
    assert f"{state}/spool.sqlite" in argv, argv  # the spool is the test's, never the repository's .state/
    state.mkdir()  # what the recipe's `mkdir -p $(STATE)` does

    text = section(README.read_text(), "## Recorded usage")
    example = blocks(text, "python")[0]
    shown = [line[2:] for line in example.splitlines() if line.startswith("# ")]
    assert "127.0.0.1:50051" in example and shown, example
    listing = re.search(r"`(\S*metering-gateway records list [^`]*)`", text)
    assert listing is not None, "the Recorded usage section does not show `metering-gateway records list`"
    records_list = shlex.split(listing.group(1))
    assert records_list[0] == PROGRAM and "127.0.0.1:50051" in records_list, records_list

    with GatewayProcess([*GATEWAY, *argv[1:]], tool_env()) as gateway:
        assert gateway.target == f"127.0.0.1:{port}"
        run = subprocess.run(
            [sys.executable, "-c", example.replace("127.0.0.1:50051", gateway.target)],
            cwd=tmp_path,
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert "accepted=1" in run.stdout, run.stdout
        assert run.stdout.strip() == shown[-1], f"the README says it prints {shown[-1]!r}; it printed {run.stdout!r}"

        command = [*GATEWAY, *(gateway.target if a == "127.0.0.1:50051" else a for a in records_list[1:])]

        def pending_row() -> list[str] | None:
            done = subprocess.run(command, cwd=tmp_path, env=tool_env(), capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            rows = [line.split() for line in done.stdout.splitlines()[1:]]
            return next((r for r in rows if {"prod-abc123", "requests", "PENDING"} <= set(r)), None)

        row = wait_for(pending_row, timeout=5, what="records list to show the PENDING record of prod-abc123/requests")
        assert "3" in row, row
    assert os.listdir(state) and "spool.sqlite" in os.listdir(state)


def test_make_serve_meters_saas_as_the_readme_says(tmp_path: Path) -> None:
    """The README's SaaS example, end to end against the gateway exactly as `make serve`
    starts it: the local backend issues a registration token (the README's curl), and
    the Python caller resolves it, meters the customer with BatchMeterUsage and records
    an event of theirs; `records list` then shows the customer's pending record."""
    state = tmp_path / "state"
    port, local_port = free_port(), free_port()
    argv = make_serve_argv(f"127.0.0.1:{port}", state, local_port)
    assert "--local-port" in argv and str(local_port) in argv, argv
    state.mkdir()

    text = section(README.read_text(), "## SaaS products")
    [shell] = blocks(text, "sh")
    curl = re.search(r"curl -s (\S+) -d '(.*?)'", shell, re.S)
    assert curl is not None and curl.group(1) == "127.0.0.1:50052/_local/tokens", shell
    body = json.loads(curl.group(2))
    assert "python3 -c" in shell and '["registration_token"]' in shell  # no tool beyond python3 and curl
    [example] = blocks(text, "python")
    shown = [line[2:] for line in example.splitlines() if line.startswith("# ")]

    with GatewayProcess([*GATEWAY, *argv[1:]], tool_env()) as gateway:
        request = urllib.request.Request(
            f"http://127.0.0.1:{local_port}/_local/tokens", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            token = json.load(answer)["registration_token"]
        run = subprocess.run(
            [sys.executable, "-c", example.replace("127.0.0.1:50051", gateway.target)],
            cwd=tmp_path,
            env={**tool_env(), "TOKEN": token},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines() == shown, f"the README says it prints {shown!r}; it printed {run.stdout!r}"

        command = [*GATEWAY, "records", "list", "--target", gateway.target, "--output", "json"]

        def pending_saas() -> dict[str, str] | None:
            done = subprocess.run(command, cwd=tmp_path, env=tool_env(), capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            rows = json.loads(done.stdout or "[]")
            return next((r for r in rows if r.get("customer_aws_account_id") == body["customer_aws_account_id"]), None)

        row = wait_for(pending_saas, timeout=5, what="records list to show the customer's PENDING record")
        assert row["license_arn"] == body["license_arn"] and row["state"] == "PENDING", row
