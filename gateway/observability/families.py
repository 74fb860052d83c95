"""Every metric family, once: what each is called and says, and the one set this process
records into, made by :func:`install`.

Off by default: until the assembly calls :func:`install` (``--metrics-listen``), every
function wrapped in :func:`when_installed` returns at once and nothing is kept.
``install`` also chooses where values live, explicitly rather than from the environment
at import: in memory for one process, or in prometheus_client's per-process files in
``PROMETHEUS_MULTIPROC_DIR`` for a worker of ``--processes N``, whose parent sums every
worker's files at scrape time. A single process therefore ignores a stray
``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, values

# Prometheus's DefBuckets (client_golang), which go-grpc-prometheus's histogram uses;
# prometheus_client's own default has more buckets.
DEF_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
AWS_LABELS = ("operation", "source", "reason")

# Families read from the spool (or known) at scrape time, by the ScrapeCollector.
BUILD_INFO = "metering_gateway_build_info"
RECORDS = "metering_gateway_records"
RECORDS_OUTCOME_UNKNOWN = "metering_gateway_records_failed_outcome_unknown"
OLDEST_PENDING_AGE = "metering_gateway_oldest_pending_record_age_seconds"
UNASSIGNED_EVENTS = "metering_gateway_spool_unassigned_events"
SPOOL_SIZE = "metering_gateway_spool_size_bytes"
SPOOL_UP = "metering_gateway_spool_up"
_SCRAPE_TIME = (
    BUILD_INFO,
    RECORDS,
    RECORDS_OUTCOME_UNKNOWN,
    OLDEST_PENDING_AGE,
    UNASSIGNED_EVENTS,
    SPOOL_SIZE,
    SPOOL_UP,
)


@dataclass(frozen=True)
class _Spec:
    """One recorded family: its attribute on :class:`Families`, kind, name (counters
    with ``_total``, as /metrics writes it) and help."""

    attr: str
    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)


# Product and dimension pairs one process labels quantities with; past them, "other".
MAX_SERIES = 1000
OTHER, RECORDED, METERED = "other", "recorded", "metered"
# The product label of SaaS usage named by its license alone (kept under no product).
# Never the license, nor the customer: AWS gives each agreement its own license, so a
# label per license would grow with the customers.
LICENSE_LABEL = "(license)"

_SPECS = (
    # gRPC server metrics, named, labelled and described as go-grpc-prometheus does.
    _Spec("started", Counter, "grpc_server_started_total", "Total number of RPCs started on the server.", GRPC_LABELS),
    _Spec(
        "handled",
        Counter,
        "grpc_server_handled_total",
        "Total number of RPCs completed on the server, regardless of success or failure.",
        (*GRPC_LABELS, "grpc_code"),
    ),
    _Spec(
        "received",
        Counter,
        "grpc_server_msg_received_total",
        "Total number of RPC stream messages received on the server.",
        GRPC_LABELS,
    ),
    _Spec(
        "sent",
        Counter,
        "grpc_server_msg_sent_total",
        "Total number of gRPC stream messages sent by the server.",
        GRPC_LABELS,
    ),
    _Spec(
        "handling",
        Histogram,
        "grpc_server_handling_seconds",
        "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
        GRPC_LABELS,
        {"buckets": DEF_BUCKETS},
    ),
    # AWS.
    _Spec(
        "aws_calls",
        Counter,
        "metering_gateway_aws_calls_total",
        "AWS calls, after the gateway's own retries, by their final outcome.",
        AWS_LABELS,
    ),
    _Spec(
        "aws_attempts",
        Counter,
        "metering_gateway_aws_attempts_total",
        "HTTP attempts of AWS calls, by the outcome of each.",
        AWS_LABELS,
    ),
    _Spec(
        "aws_retries",
        Counter,
        "metering_gateway_aws_retries_total",
        "AWS attempts made again after a retryable failure, by that failure's reason.",
        AWS_LABELS,
    ),
    _Spec(
        "aws_duration",
        Histogram,
        "metering_gateway_aws_attempt_duration_seconds",
        "Latency of one HTTP attempt of an AWS call.",
        ("operation", "source"),
        {"buckets": DEF_BUCKETS},
    ),
    # Recorded usage.
    _Spec(
        "events",
        Counter,
        "metering_gateway_usage_events_total",
        "RecordUsage events, accepted or recognised as duplicates.",
        ("result",),
    ),
    _Spec(
        "recorded",
        Counter,
        "metering_gateway_usage_recorded_quantity_total",
        "Quantity of newly accepted RecordUsage events.",
        ("product_code", "usage_dimension"),
    ),
    _Spec(
        "metered",
        Counter,
        "metering_gateway_usage_metered_quantity_total",
        "Quantity of hourly records AWS accepted (SENT).",
        ("product_code", "usage_dimension"),
    ),
    _Spec("records_sent", Counter, "metering_gateway_records_sent_total", "Hourly records AWS accepted."),
    _Spec(
        "records_retried",
        Counter,
        "metering_gateway_records_retried_total",
        "Hourly records kept PENDING to be resent later, by the reason.",
        ("reason",),
    ),
    _Spec(
        "records_failed",
        Counter,
        "metering_gateway_records_failed_total",
        "Hourly records that became FAILED, by the reason.",
        ("reason",),
    ),
    _Spec(
        "outcome_unknown",
        Counter,
        "metering_gateway_records_outcome_unknown_total",
        "Hourly records that became FAILED while AWS may hold them (outcome unknown).",
    ),
    _Spec(
        "carried",
        Counter,
        "metering_gateway_usage_carried_total",
        "Usage carried to another hour than its own (each usage_carried log line), by reason.",
        ("reason",),
    ),
    _Spec(
        "series_overflow",
        Counter,
        "metering_gateway_usage_series_overflow_total",
        'Quantities counted under product_code and usage_dimension "other" because this process '
        "already has its --metrics-max-series of them, by family (recorded or metered).",
        ("family",),
    ),
    # Gauges: what one worker says; the parent of --processes combines the live workers'.
    _Spec(
        "leader",
        Gauge,
        "metering_gateway_sender_leader",
        "1 while this process is the spool's one sender (at its last pass).",
        (),
        {"multiprocess_mode": "livesum"},
    ),
    _Spec(
        "serving",
        Gauge,
        "metering_gateway_serving",
        "1 while the named gRPC health service is SERVING, else 0.",
        ("service",),
        {"multiprocess_mode": "livemin"},
    ),
)


class Families:
    """The recorded families, registered in ``registry`` (one set per :func:`install`)."""

    started: Counter
    handled: Counter
    received: Counter
    sent: Counter
    handling: Histogram
    aws_calls: Counter
    aws_attempts: Counter
    aws_retries: Counter
    aws_duration: Histogram
    events: Counter
    recorded: Counter
    metered: Counter
    records_sent: Counter
    records_retried: Counter
    records_failed: Counter
    outcome_unknown: Counter
    carried: Counter
    series_overflow: Counter
    leader: Gauge
    serving: Gauge

    def __init__(self, registry: CollectorRegistry, max_series: int) -> None:
        for spec in _SPECS:
            name = spec.name.removesuffix("_total") if spec.kind is Counter else spec.name
            setattr(self, spec.attr, spec.kind(name, spec.doc, spec.labels, registry=registry, **spec.options))
        self._max_series = max_series
        self._keys: set[tuple[str, str]] = set()
        self._keys_lock = threading.Lock()

    def usage_labels(self, family: str, product_code: str, usage_dimension: str) -> tuple[str, str]:
        """The labels of a product and dimension: their own while this process has fewer than
        ``max_series`` pairs (callers choose them, so they must be bounded), else ("other", "other").
        Usage kept under no product (a license's) is LICENSE_LABEL."""
        key = (product_code or LICENSE_LABEL, usage_dimension)
        if key in self._keys:
            return key
        with self._keys_lock:
            if len(self._keys) < self._max_series:
                self._keys.add(key)
                return key
        self.series_overflow.labels(family).inc()
        return OTHER, OTHER


_active: Families | None = None
_install_lock = threading.Lock()


def install(*, multiprocess: bool = False, max_series: int = MAX_SERIES) -> CollectorRegistry:
    """Start recording; returns the registry of this process's families.

    ``multiprocess``: this is a worker of ``--processes N``; its values go to files in
    ``PROMETHEUS_MULTIPROC_DIR`` (its parent made it, and serves the sum). Otherwise
    values stay in memory, whatever the environment says. Installing again starts
    from zero (tests).
    """
    global _active
    with _install_lock:
        if multiprocess:
            directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
            if not os.path.isdir(directory):
                raise ValueError(f"PROMETHEUS_MULTIPROC_DIR is not a directory: {directory!r}")
            values.ValueClass = values.MultiProcessValue()
        else:
            values.ValueClass = values.MutexValue
        # No ``_created`` series: go-grpc-prometheus has none, and multiprocess mode drops
        # them, so one process and N show the same families.
        disable_created_metrics()
        registry = CollectorRegistry()
        _active = Families(registry, max_series)
        return registry


def installed() -> bool:
    return _active is not None


def active() -> Families | None:
    """The families being recorded into; None until :func:`install`."""
    return _active


_P = ParamSpec("_P")


def when_installed(record: Callable[Concatenate[Families, _P], None]) -> Callable[_P, None]:
    """``record(families, ...)`` as ``record(...)``, which does nothing until :func:`install`:
    the one place that asks whether metrics are on, for every recording function."""

    @functools.wraps(record)
    def recording(*args: _P.args, **kwargs: _P.kwargs) -> None:
        m = _active
        if m is not None:
            record(m, *args, **kwargs)

    return recording


def metric_names() -> frozenset[str]:
    """Every family name as /metrics writes it in its HELP and TYPE lines (counters with
    ``_total``), for checks of alert rules and dashboards against it."""
    return frozenset((*_SCRAPE_TIME, *(spec.name for spec in _SPECS)))
