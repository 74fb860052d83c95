"""Prometheus metrics: the face of :mod:`gateway.observability`'s metric modules, so that
callers write ``metrics.usage_recorded(...)`` and need not know where each part lives.

A leaf (prometheus_client, grpc and the standard library only), so that both paths may
record what they learn: the interceptor's observer (:mod:`.grpc_metrics`), the backend
(AWS calls), the recorder and the sender (recorded usage), through :mod:`.record`. The
families themselves, and :func:`install`, are in :mod:`.families`; what is read from the
spool at scrape time, in :mod:`.collector`.
"""

from gateway.observability.collector import SCRAPE_SPOOL_TIMEOUT, STATES, ScrapeCollector, SpoolReading
from gateway.observability.families import MAX_SERIES, install, installed, metric_names
from gateway.observability.grpc_metrics import GO_CODE_NAMES, GrpcMetrics, service_methods
from gateway.observability.record import (
    ACCEPTED,
    DRY_RUN,
    DUPLICATE,
    METER_USAGE,
    OK,
    SENDER,
    aws_attempt,
    aws_call,
    aws_retry,
    record_failed,
    record_retried,
    record_sent,
    set_leader,
    set_serving,
    usage_carried,
    usage_recorded,
)

__all__ = [
    "ACCEPTED",
    "DRY_RUN",
    "DUPLICATE",
    "GO_CODE_NAMES",
    "MAX_SERIES",
    "METER_USAGE",
    "OK",
    "SCRAPE_SPOOL_TIMEOUT",
    "SENDER",
    "STATES",
    "GrpcMetrics",
    "ScrapeCollector",
    "SpoolReading",
    "aws_attempt",
    "aws_call",
    "aws_retry",
    "install",
    "installed",
    "metric_names",
    "record_failed",
    "record_retried",
    "record_sent",
    "service_methods",
    "set_leader",
    "set_serving",
    "usage_carried",
    "usage_recorded",
]
