"""docs/api.md, the callers' reference, says what the code does: every reason with its
code (every errors.Reason, by its rule in the one table, errors.RULES) and every RPC of the proto."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.domain import errors
from marketplace.metering.v1 import metering_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api.md"
TICKED = re.compile(r"`([^`]+)`")


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n")
    end = re.compile(rf"\n#{{1,{len(level)}}} ").search(text, start + 1)
    return text[start : end.start() if end else len(text)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text``, header and rule lines left out."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")
    ]
    return [r for r in rows if not all(set(c) <= set("-: ") for c in r)][1:]


def test_every_reason_is_documented_with_its_code() -> None:
    rows = table_rows(section(DOC.read_text(), "### Status codes"))
    header = ["condition", "gRPC code", "reason", "domain", "details"]
    assert all(len(r) == len(header) for r in rows), "a status row has the wrong number of cells"
    codes_by_reason: dict[str, set[str]] = {}
    for _, code, reasons, _, _ in rows:
        for reason in TICKED.findall(reasons):
            codes_by_reason.setdefault(reason, set()).update(TICKED.findall(code))
    missing = sorted(set(errors.Reason) - set(codes_by_reason))
    assert not missing, f"docs/api.md's status table does not name {missing}"
    wrong = {
        r: sorted(codes_by_reason[r]) for r, rule in errors.RULES.items() if codes_by_reason[r] != {rule.code.name}
    }
    assert not wrong, f"docs/api.md gives these reasons a code other than gateway/domain/errors.py's: {wrong}"


def test_every_rpc_of_the_proto_is_documented() -> None:
    rows = table_rows(section(DOC.read_text(), "## Services and RPCs"))
    documented = {(service, rpc) for service, rpc, *_ in rows for rpc in TICKED.findall(rpc)}
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            assert (f"`{service.name}`", method.name) in documented, (
                f"docs/api.md does not list {service.name}.{method.name}"
            )


def test_every_service_is_in_the_health_table() -> None:
    names = {c for row in table_rows(section(DOC.read_text(), "## Health")) for c in TICKED.findall(row[0])}
    assert '""' in names, "docs/api.md's health table does not name the overall status"
    for service in pb.DESCRIPTOR.services_by_name.values():
        assert service.full_name in names, f"docs/api.md's health table does not name {service.full_name}"


def test_reflection_is_said_to_be_v1alpha() -> None:
    from grpc_reflection.v1alpha import reflection

    assert reflection.SERVICE_NAME == "grpc.reflection.v1alpha.ServerReflection"
    assert reflection.SERVICE_NAME in section(DOC.read_text(), "## Server reflection")


def test_the_docs_restate_rather_than_cite_the_outside_contract() -> None:
    """The contract the project follows lives outside the repository; what callers
    need is restated in docs/api.md, never linked."""
    name = "CONTRACT" + ".md"
    places = [
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "protos").rglob("*.proto"),
        *(ROOT / "gateway").rglob("*.py"),
        *(ROOT / "clients" / "python" / "src").rglob("*.py"),
        *(ROOT / "clients" / "node").glob("*.js"),
    ]
    citing = [str(p.relative_to(ROOT)) for p in places if name in p.read_text()]
    assert not citing, f"{citing} cite {name}, which is not in the repository: point to docs/api.md"
