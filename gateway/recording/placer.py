"""Prompt placement: accepted events go into their hourly records within a second.

The sender places events too, but only on its pass (``--flush-interval``, 30 s by
default), so a caller who lists records right after RecordUsage would see nothing
of what it just recorded. The servicer wakes the placer after each accepted batch;
it places (:meth:`Spool.assign`) at most once every ``pause`` seconds, so a
steady stream of batches costs one placing pass per pause, not one per batch;
after a long pass it rests as long as the pass took, so under a load faster
than placing it takes the spool half the time at most, and writers the rest.
Listing never writes: it shows records as placed.

Placing early changes nothing of what is billed: a record takes more usage only
while no request has gone out for it, and placers in any number of threads or
processes put each event into exactly one record (the spool's rule).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from gateway.recording import placement
from gateway.recording.carried import place_new_events
from gateway.recording.spool import Spool, SpoolUnavailable

PLACE_PAUSE = 0.5  # seconds between placing passes while batches keep coming

log = structlog.get_logger("gateway.recorder")


class Placer:
    """A thread that places new events soon after they are accepted."""

    def __init__(
        self,
        spool: Spool,
        *,
        margin: float = placement.SAFETY_MARGIN,
        now: Callable[[], float] = time.time,
        pause: float = PLACE_PAUSE,
    ) -> None:
        self.spool = spool
        self.margin = margin
        self.pause = pause
        self._now = now
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """Events were accepted: place them soon (cheap; called on every RecordUsage)."""
        self._wanted.set()

    def start(self) -> Placer:
        self._thread = threading.Thread(target=self._run, name="placer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """End the thread; a pass in progress ends at its next chunk boundary or is left
        (what it committed is placed, the rest waits for the sender's next pass)."""
        self._stop.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._stop.is_set():
                return
            self._wanted.clear()
            started = time.monotonic()
            self.place()
            if self._stop.wait(max(self.pause, time.monotonic() - started)):
                return

    def place(self) -> None:
        """One placing pass; its carries are logged as the sender logs its own."""
        try:
            place_new_events(self.spool, self._now(), self.margin)
        except SpoolUnavailable:
            pass  # logged by the spool; the sender's pass places them once it can
        except Exception:  # the thread must outlive any one bad pass
            log.exception("placing_failed")
