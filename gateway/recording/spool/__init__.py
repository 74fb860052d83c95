"""The spool: durable events and hourly records, in SQLite (one pod) or PostgreSQL (replicas).

- :mod:`.base`: the interface (:class:`Spool`) and its types; imports no backend.
- :mod:`.sql`: the rules in SQL, once for both databases, as an abstract base class.
- :mod:`.sqlite`, :mod:`.postgres`: the two backends.

:func:`open_spool` picks a backend from ``--spool``; only it imports them, and only
when asked (psycopg is loaded for a PostgreSQL spool alone). May import
:mod:`gateway.domain`, :mod:`gateway.config` and :mod:`gateway.recording.placement`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.config import POSTGRES_SCHEMES
from gateway.domain.clock import HOUR
from gateway.recording.spool.base import (
    CREATE,
    CREATE_IF_MOUNTED,
    DECIMAL_WIRE,
    FAILED,
    LATE,
    NEVER_CREATE,
    NEW_SPOOL,
    PENDING,
    SENT,
    WHOLE_WIRE,
    Carry,
    EventIdConflict,
    OutcomeUnknown,
    Pruned,
    Recorded,
    RecordNotFailed,
    RecordNotFound,
    RecordRow,
    Requeue,
    RetryRefused,
    Spool,
    SpoolError,
    SpoolUnavailable,
    Stats,
    ZeroHours,
)

__all__ = [
    "CREATE",
    "CREATE_IF_MOUNTED",
    "DECIMAL_WIRE",
    "FAILED",
    "LATE",
    "NEVER_CREATE",
    "NEW_SPOOL",
    "PENDING",
    "SENT",
    "WHOLE_WIRE",
    "Carry",
    "EventIdConflict",
    "OutcomeUnknown",
    "Pruned",
    "Requeue",
    "RecordNotFailed",
    "RecordNotFound",
    "RecordRow",
    "Recorded",
    "RetryRefused",
    "Spool",
    "SpoolError",
    "SpoolUnavailable",
    "Stats",
    "ZeroHours",
    "open_spool",
]


def open_spool(
    location: str,
    *,
    now: Callable[[], float] = time.time,
    pool_size: int = 4,
    create: str = CREATE,
    span: int = HOUR,
) -> Spool:
    """The spool ``--spool`` names: a ``postgresql://`` URL, or an SQLite path.

    ``now`` dates migrations (tests pass their clock); ``pool_size`` bounds a
    PostgreSQL spool's connections; ``create`` says whether a spool that is not
    there yet may be made (``--spool-create``: yes, no, if-mounted); ``span`` is
    the seconds one record covers (an hour; one flush interval with --agentcore).
    Raises SpoolError with a one-line message.
    """
    if location.startswith(POSTGRES_SCHEMES):
        from gateway.recording.spool.postgres import PostgresSpool  # noqa: PLC0415 - psycopg only when asked for

        return PostgresSpool(location, pool_size=pool_size, now=now, create=create, span=span)
    from gateway.recording.spool.sqlite import SqliteSpool  # noqa: PLC0415 - a backend only when asked for

    return SqliteSpool(location, now=now, create=create, span=span)
