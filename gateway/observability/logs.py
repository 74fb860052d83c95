"""structlog set-up: JSON lines on stdout, context bound per RPC.

Per-RPC fields (request id, method, caller identity and peer, product code, attempts,
aws_request_id) are bound with ``structlog.contextvars`` by whoever learns them, and written once by
the access-log interceptor when the RPC ends. Secrets never enter the context.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", stream: TextIO | None = None, **static: object) -> None:
    """JSON lines at ``level``; ``static`` fields (a worker's index) go on every line."""

    def add_static(_logger: object, _name: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        event.update(static)
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_static,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=True,
    )
