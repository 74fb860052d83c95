"""An hourly record's states, declared once: the spool stores them, the sender moves
records between them, metrics count them, the API and the command line show them."""

from __future__ import annotations

from enum import StrEnum


class RecordState(StrEnum):
    """PENDING: waiting for its hour to close, or for a retry. SENT: AWS took it.
    FAILED: AWS refused it for good, or the outcome stayed unknown: an operator's turn."""

    PENDING = "PENDING"
    SENT = "SENT"
    FAILED = "FAILED"
