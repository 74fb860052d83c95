"""Metrics off again after a test that installed them: production never uninstalls
(``install`` is once per process), so this reaches into the families' state."""

from __future__ import annotations

from gateway.observability import families


def uninstall() -> None:
    """Stop recording, as before the first ``metrics.install()``."""
    families._active = None
