"""The recording path's parts, opened, watched and closed together.

:func:`open_recording` opens ``--spool`` (SQLite or PostgreSQL) and builds the
servicer and the sender; :class:`Recording` reports the spool's writability to
health and stops the sender before the spool closes. The assembly
(:mod:`gateway.assembly.app`) calls these; nothing here imports the assembly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from gateway.aws.backend import BUYER_CREDENTIALS, SELLER_CREDENTIALS, Backend, RetryPolicy
from gateway.config import Settings, config_error_from
from gateway.domain.clock import HOUR
from gateway.observability import metrics
from gateway.recording.placer import Placer
from gateway.recording.sender import Sender
from gateway.recording.servicer import RecorderServicer
from gateway.recording.spool import Spool, SpoolError, open_spool

PROBE_EVERY = 1.0  # seconds between write probes while the spool cannot write

log = structlog.get_logger("gateway.recorder")


@dataclass
class Recording:
    """The recorded-usage parts of a running gateway: spool, servicer, sender.

    While the spool cannot write, a watcher probes it every PROBE_EVERY seconds,
    so that health comes back by itself once it can (a pod taken out of service
    gets no RecordUsage calls that would show it); while it can, the watcher checks
    that it is still the spool opened (an SQLite file deleted or replaced).
    """

    spool: Spool
    servicer: RecorderServicer
    sender: Sender
    placer: Placer | None = None  # None when the sender is driven by hand (tests on a simulated clock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None
    now: Callable[[], float] = time.time  # the recording's clock (epoch seconds), as open_recording got it

    def watch_health(self, set_serving: Callable[[bool], None]) -> None:
        """Report the spool's writability through ``set_serving`` from now on."""
        self.spool.on_writable(set_serving)
        set_serving(self.spool.writable)
        self._watcher = threading.Thread(target=self._watch, name="spool-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(PROBE_EVERY):
            try:
                if self.spool.writable:
                    self.spool.verify()  # a spool file deleted or replaced turns it unwritable, with no call needed
                elif self.spool.probe():
                    log.info("spool_writable_again", location=self.spool.location)
            except Exception:  # the watcher must outlive any surprise, or health never comes back
                log.exception("spool_watch_failed")

    def begin_close(self) -> None:
        """At SIGTERM, while the server drains: the sender and the watcher start winding down."""
        self._stop.set()
        self.sender.request_stop()
        if self.placer is not None:
            self.placer.stop(timeout=0)

    def close(self, *, flush: bool, budget: float) -> None:
        """After the server drained its calls: stop the sender (flushing the open
        hour if asked), then close the spool, which is consistent at every commit.

        Takes ``budget`` seconds at most, whatever AWS does: a call still in
        flight then is abandoned (the sender says why that is safe).
        """
        deadline = time.monotonic() + budget
        self.begin_close()
        if self._watcher is not None:
            self._watcher.join(max(0.0, deadline - time.monotonic()))
        if self.placer is not None:
            self.placer.stop(max(0.0, deadline - time.monotonic()))
        try:
            self.sender.stop(flush=flush, budget=max(0.0, deadline - time.monotonic()))
        finally:
            self.spool.close()


def record_span(settings: Settings) -> int:
    """Seconds one record covers: an hour, or in AgentCore Runtime mode one flush
    interval (whole seconds, at least one), so that usage goes out every interval."""
    return max(1, round(settings.flush_interval)) if settings.agentcore else HOUR


def open_recording(
    settings: Settings,
    client: Any,
    *,
    now: Callable[[], float] | None = None,
    start: bool = True,
    place: bool | None = None,
) -> Recording:
    """Open ``--spool`` and build the servicer and the (started) sender.

    The sender gets its own Backend with one attempt per call: it retries on its
    own schedule, so every call it makes passes its rate limiter. ``now`` (epoch
    seconds) replaces the wall clock, and ``start=False`` leaves the sender to be
    driven by ``sender.tick()`` (and places only then, with no placer of its own):
    both for tests on a simulated clock. ``place`` runs the prompt placer or not,
    whatever ``start`` says (a benchmark's comparison).
    """
    try:
        spool = open_spool(
            settings.spool,
            pool_size=settings.spool_connections,
            create=settings.spool_create,
            span=record_span(settings),
        )
    except SpoolError as exc:
        raise config_error_from(exc, "spool") from None
    skew = timedelta(seconds=settings.timestamp_skew)
    clock = now or time.time
    placer = Placer(spool, now=clock).start() if (start if place is None else place) else None
    servicer = RecorderServicer(
        spool,
        future_skew=skew,
        max_age=timedelta(seconds=settings.event_retention),
        now=lambda: datetime.fromtimestamp(clock(), UTC),
        products=settings.product_list,
        agentcore=settings.agentcore,
        saas=settings.saas,
        placer=placer.wake if placer else None,
    )
    backend = Backend(
        client,
        RetryPolicy(1, settings.aws_backoff_base, settings.aws_backoff_max),
        source=metrics.SENDER,
        credentials_hint=SELLER_CREDENTIALS if settings.saas else BUYER_CREDENTIALS,
    )
    sender = Sender(
        spool,
        backend,
        interval=settings.flush_interval,
        grace=settings.flush_grace,
        max_rps=settings.aws_max_rps,
        future_skew=skew,
        call_timeout=settings.aws_read_timeout * 2,
        event_retention=settings.event_retention,
        record_retention=settings.record_retention,
        zero_hours=settings.zero_hours,
        agentcore=settings.agentcore,
        now=clock,
    )
    return Recording(spool, servicer, sender.start() if start else sender, placer, now=clock)
