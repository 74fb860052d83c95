"""The wall clock, in one place: every "now" of the gateway that a test does not inject."""

from __future__ import annotations

from datetime import UTC, datetime

MINUTE, HOUR, DAY = 60, 3600, 86400  # seconds: AWS's hours, and the settings' units


def utcnow() -> datetime:
    """Now, aware, in UTC."""
    return datetime.now(UTC)
