"""Usage that went to another hour than its own leaves a trace: one log line and a count."""

from __future__ import annotations

import structlog

from gateway.observability import metrics
from gateway.recording import placement
from gateway.recording.spool.base import LATE, Carry, Spool, customer_fields

log = structlog.get_logger("gateway.spool")


def log_carry(carry: Carry, reason: str) -> None:
    """Every carry leaves one line (and a count): where usage went, and why; whose, for
    SaaS usage (the customer is in the line, never in the count's labels: unbounded)."""
    metrics.usage_carried(reason)
    log.warning(
        "usage_carried",
        reason=reason,
        product_code=carry.product_code,
        usage_dimension=carry.usage_dimension,
        from_hour=placement.timestamp_of(carry.from_hour).isoformat(),
        to_hour=placement.timestamp_of(carry.to_hour).isoformat(),
        quantity=carry.quantity,
        **customer_fields(carry.customer),
    )


def place_new_events(spool: Spool, now: float, margin: float) -> None:
    """Place the events not yet in a record (:meth:`Spool.assign`), each carry it makes
    traced: the one placing pass of the sender and of the prompt placer."""
    for carry in spool.assign(now, margin):
        log_carry(carry, LATE)
