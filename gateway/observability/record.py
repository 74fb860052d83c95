"""The small functions the paths call to record what they learn: the health status,
AWS calls (the backend), recorded usage and hourly records (the recorder and the
sender). Each does nothing until :func:`gateway.observability.families.install`."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from gateway.observability.families import METERED, RECORDED, Families, when_installed

# Where a MeterUsage call to AWS comes from (the ``source`` label).
METER_USAGE, SENDER = "meter_usage", "sender"
OK, DRY_RUN = "OK", "DRY_RUN"  # the ``reason`` of an AWS answer that is not an error
ACCEPTED, DUPLICATE = "accepted", "duplicate"


@when_installed
def set_serving(m: Families, service: str, serving: bool) -> None:
    """A named gRPC health service turned SERVING (True) or NOT_SERVING."""
    m.serving.labels(service).set(1 if serving else 0)


# -- AWS ------------------------------------------------------------------------------


@when_installed
def aws_attempt(m: Families, source: str, reason: str, seconds: float, operation: str = "MeterUsage") -> None:
    """One HTTP attempt ended with ``reason`` (OK, DRY_RUN or an error's reason)."""
    m.aws_attempts.labels(operation, source, reason).inc()
    m.aws_duration.labels(operation, source).observe(seconds)


@when_installed
def aws_retry(m: Families, source: str, reason: str, operation: str = "MeterUsage") -> None:
    """The gateway tries again after a retryable failure with ``reason``."""
    m.aws_retries.labels(operation, source, reason).inc()


@when_installed
def aws_call(m: Families, source: str, reason: str, operation: str = "MeterUsage") -> None:
    """One logical call (all its attempts) ended with ``reason``."""
    m.aws_calls.labels(operation, source, reason).inc()


# -- recorded usage -------------------------------------------------------------------


@when_installed
def usage_recorded(m: Families, accepted: Iterable[tuple[str, str, str]], accepted_count: int, duplicates: int) -> None:
    """A RecordUsage batch: the newly accepted events as (product, dimension, decimal
    quantity), their number, and the duplicates; quantities summed exactly per key first."""
    m.events.labels(ACCEPTED).inc(accepted_count)
    m.events.labels(DUPLICATE).inc(duplicates)
    sums: dict[tuple[str, str], Decimal] = {}
    for product, dimension, quantity in accepted:
        sums[(product, dimension)] = sums.get((product, dimension), Decimal(0)) + Decimal(quantity)
    for (product, dimension), total in sums.items():
        m.recorded.labels(*m.usage_labels(RECORDED, product, dimension)).inc(float(total))


@when_installed
def record_sent(m: Families, product_code: str, usage_dimension: str, quantity: str) -> None:
    m.records_sent.inc()
    m.metered.labels(*m.usage_labels(METERED, product_code, usage_dimension)).inc(float(Decimal(quantity)))


@when_installed
def record_retried(m: Families, reason: str) -> None:
    m.records_retried.labels(reason).inc()


@when_installed
def record_failed(m: Families, reason: str, *, outcome_unknown: bool) -> None:
    m.records_failed.labels(reason).inc()
    if outcome_unknown:
        m.outcome_unknown.inc()


@when_installed
def usage_carried(m: Families, reason: str) -> None:
    m.carried.labels(reason).inc()


@when_installed
def set_leader(m: Families, leading: bool) -> None:
    m.leader.set(1 if leading else 0)
