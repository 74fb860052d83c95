"""What a metrics scrape shows of the spool: one read of its stats and its size.

Spool-wide: every replica sharing a PostgreSQL spool shows the same values (alerts
take ``max()``). The age of the oldest pending record is on the caller's clock, the
recording's own (``open_recording(now=...)``), so tests on a simulated clock see it too.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.observability import metrics
from gateway.recording.spool import FAILED, PENDING, SENT, Spool


def reading(spool: Spool, now: float) -> metrics.SpoolReading:
    """Raises what the spool raises (SpoolError, or a driver's error): the scrape says the spool is down."""
    stats = spool.stats()
    size = spool.size()
    oldest = stats.oldest_pending_hour
    return metrics.SpoolReading(
        records={PENDING: stats.pending, SENT: stats.sent, FAILED: stats.failed},
        outcome_unknown=stats.failed_outcome_unknown,
        oldest_pending_age=0.0 if oldest is None else max(0.0, now - oldest),
        unassigned_events=stats.unassigned_events,
        size_bytes=size,
    )


def reader(spool: Spool, clock: Callable[[], float], *, probe: bool = False) -> Callable[[], metrics.SpoolReading]:
    """A reading of ``spool`` at ``clock()`` on every call: the ``read`` of
    :class:`gateway.observability.metrics.ScrapeCollector`.

    ``probe``: a spool that cannot write is probed before it is read. For a spool with
    no health watcher beside it (the parent's of ``--processes N``): an outage closes
    its gate, and nothing else would ever reopen it. The collector bounds the time.
    """

    def read() -> metrics.SpoolReading:
        if probe and not spool.writable:
            spool.probe()  # False while still down: the read below then fails at once
        return reading(spool, clock())

    return read
