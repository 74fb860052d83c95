"""How ``metering-gateway records list|export`` print hourly records: pure functions.

One row shape for every format, named as the proto names the fields, so a CSV
column, a JSON key and the API say the same thing. Times are ISO 8601 in UTC
(``2026-11-03T14:00:00Z``), quantities the exact decimal strings AWS was (or
will be) sent. The table is for a person: aligned columns, the long fields cut
short. JSON (one array) and CSV (RFC 4180, a header row) are for machines and
keep every field whole; lists (``allocations``, ``carried_from``) are compact
JSON inside a CSV cell. A SaaS record's customer is three fields there (empty for
a container product's record), and one short column in the table.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from marketplace.metering.v1 import metering_pb2 as pb

# The export's columns, in order: what reconciles against AWS's seller reports first.
COLUMNS = (
    "hour",
    "product_code",
    "usage_dimension",
    "quantity",
    "state",
    "outcome_unknown",
    "metering_record_id",
    "client_token",
    "attempts",
    "carried_from",
    "allocations",
    "last_error",
    "record_id",
    # SaaS usage's customer, last: scripts that read the columns by position keep working.
    "customer_aws_account_id",
    "license_arn",
    "customer_identifier",
)
DETAIL_MAX = 100  # characters of last_error a table shows
CUSTOMER_MAX = 40  # characters of a legacy customer identifier a table shows


def iso(stamp: Timestamp) -> str:
    """``2026-11-03T14:00:00Z``: whole seconds (an hour's start always is)."""
    return stamp.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")


def state_name(state: int) -> str:
    """``STATE_FAILED`` → ``FAILED``."""
    return pb.MeteringRecord.State.Name(state).removeprefix("STATE_")  # type: ignore[arg-type]


def allocation(alloc: pb.UsageAllocation) -> dict[str, Any]:
    which = alloc.WhichOneof("quantity")
    quantity = (
        str(alloc.allocated_usage_quantity)
        if which == "allocated_usage_quantity"
        else alloc.allocated_usage_quantity_as_decimal
    )
    return {"quantity": quantity, "tags": {t.key: t.value for t in alloc.tags}}


def record_fields(record: pb.MeteringRecord) -> dict[str, Any]:
    """One record as plain values, keyed by COLUMNS (the JSON form)."""
    return {
        "hour": iso(record.hour),
        "product_code": record.product_code,
        "usage_dimension": record.usage_dimension,
        "quantity": record.quantity,
        "state": state_name(record.state),
        "outcome_unknown": record.outcome_unknown,
        "metering_record_id": record.metering_record_id,
        "client_token": record.client_token,
        "attempts": record.attempts,
        "carried_from": [iso(t) for t in record.carried_from],
        "allocations": [allocation(a) for a in record.allocations],
        "last_error": record.last_error,
        "record_id": record.record_id,
        "customer_aws_account_id": record.customer_aws_account_id,
        "license_arn": record.license_arn,
        "customer_identifier": record.customer_identifier,
    }


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return _compact(value) if value else ""
    return str(value)


def as_json(records: Iterable[pb.MeteringRecord]) -> str:
    """One JSON array of objects, one line per record."""
    lines = [_compact(record_fields(r)) for r in records]
    return "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"


def as_csv(records: Iterable[pb.MeteringRecord]) -> str:
    """RFC 4180: a header row of COLUMNS, CRLF line ends, quoting as needed."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for record in records:
        fields = record_fields(record)
        writer.writerow([_cell(fields[c]) for c in COLUMNS])
    return out.getvalue()


def _detail(record: pb.MeteringRecord) -> str:
    """What a person needs next to the state: AWS's id once sent, else the last error."""
    text = record.metering_record_id if record.state == pb.MeteringRecord.STATE_SENT else record.last_error
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_MAX else text[: DETAIL_MAX - 1] + "…"


def customer_cell(record: pb.MeteringRecord) -> str:
    """A SaaS record's customer in one short cell: the account and the license's id
    (``123456789012/l-0123…``: the ARN's last part), or the legacy identifier; empty
    for a container product's record. JSON and CSV keep the whole ARN."""
    if record.customer_aws_account_id or record.license_arn:
        license_id = record.license_arn.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
        return f"{record.customer_aws_account_id}/{license_id}" if license_id else record.customer_aws_account_id
    text = record.customer_identifier
    return text if len(text) <= CUSTOMER_MAX else text[: CUSTOMER_MAX - 1] + "…"


def table_rows(records: Iterable[pb.MeteringRecord]) -> list[Sequence[str]]:
    header = (
        "ID",
        "HOUR (UTC)",
        "PRODUCT",
        "CUSTOMER",
        "DIMENSION",
        "QUANTITY",
        "STATE",
        "ATTEMPTS",
        "CARRIED FROM",
        "DETAIL",
    )
    rows: list[Sequence[str]] = [header]
    for r in records:
        state = state_name(r.state) + (" (outcome unknown)" if r.outcome_unknown else "")
        rows.append(
            (
                r.record_id,
                iso(r.hour),
                r.product_code,
                customer_cell(r),
                r.usage_dimension,
                r.quantity,
                state,
                str(r.attempts),
                ",".join(iso(t) for t in r.carried_from),
                _detail(r),
            )
        )
    return rows


def as_table(records: Iterable[pb.MeteringRecord]) -> str:
    """Aligned columns, two spaces apart; the last one left ragged."""
    rows = table_rows(records)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    # widths has no entry for the last cell, which stays unpadded: zip stops short on purpose.
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]).rstrip() for row in rows
    ]
    return "\n".join(lines) + "\n"


FORMATS = {"table": as_table, "json": as_json, "csv": as_csv}
