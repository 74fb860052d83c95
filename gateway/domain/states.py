"""The recording side's vocabulary, declared once: an hourly record's states (the spool
stores them, the sender moves records between them, metrics count them, the API and
the command line show them), and whether a spool may be created (``--spool-create``)."""

from __future__ import annotations

from enum import StrEnum


class RecordState(StrEnum):
    """PENDING: waiting for its hour to close, or for a retry. SENT: AWS took it.
    FAILED: AWS refused it for good, or the outcome stayed unknown: an operator's turn."""

    PENDING = "PENDING"
    SENT = "SENT"
    FAILED = "FAILED"


class SpoolCreate(StrEnum):
    """``--spool-create``: whether a spool that is not there yet may be made."""

    YES = "yes"
    NO = "no"  # start-up fails: a spool that must already be there
    IF_MOUNTED = "if-mounted"  # an SQLite file only when its directory is a mount point
