"""A token bucket: the sender's calls stay within AWS's rate (``--aws-max-rps``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    """A token bucket: ``rate`` calls a second with a burst of ``rate`` (at least 1)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self._clock = rate, clock
        self._burst = max(1.0, rate)
        self._tokens, self._last = self._burst, clock()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Take a token if one is there; never waits."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False

    def acquire(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Wait until a token is there, then take it."""
        while not self.allow():
            sleep(1.0 / self.rate)
