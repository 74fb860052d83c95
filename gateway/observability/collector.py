"""What /metrics reads at scrape time rather than keeps: the build info and the spool's
gauges (records by state, the oldest pending record's age, the spool's size), asked of a
``read`` function on every scrape, bounded in time."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import gateway
from gateway.domain.states import RecordState
from gateway.observability.families import (
    BUILD_INFO,
    OLDEST_PENDING_AGE,
    RECORDS,
    RECORDS_OUTCOME_UNKNOWN,
    SPOOL_SIZE,
    SPOOL_UP,
    UNASSIGNED_EVENTS,
)

log = structlog.get_logger("gateway.metrics")

SCRAPE_SPOOL_TIMEOUT = 3.0  # seconds a scrape waits for the spool before reporting it down
STATES = tuple(RecordState)  # declared once, in the shared vocabulary


@dataclass(frozen=True)
class SpoolReading:
    """What a scrape shows of the spool (spool-wide: the same from every replica)."""

    records: Mapping[str, int]  # by state
    outcome_unknown: int  # FAILED records AWS may hold
    oldest_pending_age: float  # seconds since the oldest PENDING record's hour began; 0 when none
    unassigned_events: int
    size_bytes: int


class ScrapeCollector(Collector):
    """``metering_gateway_build_info`` and, when given ``read``, the spool's gauges.

    ``read`` runs on a thread of its own and a scrape waits ``timeout`` seconds at most:
    a spool that does not answer (or raises) shows ``metering_gateway_spool_up 0`` and
    no other spool gauge. While one read is still stuck, later scrapes do not start
    another: they report the spool down at once.
    """

    def __init__(
        self, read: Callable[[], SpoolReading] | None = None, *, timeout: float = SCRAPE_SPOOL_TIMEOUT
    ) -> None:
        self._read = read
        self._timeout = timeout
        self._busy = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families vary with the spool's state; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(BUILD_INFO, "The gateway's version; always 1.", labels=["version"])
        info.add_metric([gateway.__version__], 1)
        yield info
        if self._read is None:
            return
        reading = self._bounded_read()
        yield GaugeMetricFamily(SPOOL_UP, "1 when this scrape could read the spool, else 0.", value=1 if reading else 0)
        if reading is None:
            return
        records = GaugeMetricFamily(RECORDS, "Hourly records in the spool, by state (spool-wide).", labels=["state"])
        for state in STATES:
            records.add_metric([state], reading.records.get(state, 0))
        yield records
        yield GaugeMetricFamily(
            RECORDS_OUTCOME_UNKNOWN,
            "FAILED records whose outcome is unknown: AWS may hold them.",
            value=reading.outcome_unknown,
        )
        yield GaugeMetricFamily(
            OLDEST_PENDING_AGE,
            "Seconds since the start of the oldest PENDING record's hour; 0 when none is pending.",
            value=reading.oldest_pending_age,
        )
        yield GaugeMetricFamily(
            UNASSIGNED_EVENTS, "Recorded events not yet placed into an hourly record.", value=reading.unassigned_events
        )
        yield GaugeMetricFamily(SPOOL_SIZE, "Bytes the spool's data takes in its database.", value=reading.size_bytes)

    def _bounded_read(self) -> SpoolReading | None:
        assert self._read is not None
        if not self._busy.acquire(blocking=False):
            return None  # the last read is still stuck
        box: list[SpoolReading] = []
        read = self._read

        def run() -> None:
            try:
                box.append(read())
            except Exception as exc:  # noqa: BLE001 - any failure to read is "down" (SpoolError, a driver's own errors)
                log.warning("metrics_spool_unreadable", error=f"{type(exc).__name__}: {exc}")
            finally:
                self._busy.release()

        worker = threading.Thread(target=run, name="metrics-spool-read", daemon=True)
        worker.start()
        worker.join(self._timeout)
        if worker.is_alive():
            log.warning("metrics_spool_unreadable", error=f"no answer within {self._timeout:g}s")
            return None
        return box[0] if box else None
