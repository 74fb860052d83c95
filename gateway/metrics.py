"""Prometheus metrics: every family, once, and the small functions that record them.

A leaf module (prometheus_client, grpc and the standard library only), so that both
paths may record what they learn: the interceptor's observer (gRPC server metrics,
named and labelled as go-grpc-prometheus names them, so existing dashboards and
alerts work), the backend (AWS calls), the recorder and the sender (recorded usage).

Off by default: until the assembly calls :func:`install` (``--metrics-listen``),
every recording function returns at once and nothing is kept. ``install`` also
chooses where values live, explicitly rather than from the environment at import:
in memory for one process, or in prometheus_client's per-process files in
``PROMETHEUS_MULTIPROC_DIR`` for a worker of ``--processes N``, whose parent sums
every worker's files at scrape time. A single process therefore ignores a stray
``PROMETHEUS_MULTIPROC_DIR``.

What is read from the spool at scrape time (records by state, the oldest pending
record's age, the spool's size) is not kept here: :class:`ScrapeCollector` asks a
``read`` function for a :class:`SpoolReading` on every scrape, bounded in time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import grpc
import structlog
from google.protobuf import descriptor_pool
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

import gateway

log = structlog.get_logger("gateway.metrics")

# Where a MeterUsage call to AWS comes from (the ``source`` label).
METER_USAGE, SENDER = "meter_usage", "sender"
OK, DRY_RUN = "OK", "DRY_RUN"  # the ``reason`` of an AWS answer that is not an error
ACCEPTED, DUPLICATE = "accepted", "duplicate"
# The Go names of the codes (google.golang.org/grpc/codes, Code.String()), which
# go-grpc-prometheus writes in ``grpc_code``.
GO_CODE_NAMES: Mapping[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
# Prometheus's DefBuckets (client_golang), which go-grpc-prometheus's histogram uses;
# prometheus_client's own default has more buckets.
DEF_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCRAPE_SPOOL_TIMEOUT = 3.0  # seconds a scrape waits for the spool before reporting it down

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
AWS_LABELS = ("operation", "source", "reason")
STATES = ("PENDING", "SENT", "FAILED")

# Families read from the spool (or known) at scrape time, by ScrapeCollector.
BUILD_INFO = "metering_gateway_build_info"
RECORDS = "metering_gateway_records"
RECORDS_OUTCOME_UNKNOWN = "metering_gateway_records_failed_outcome_unknown"
OLDEST_PENDING_AGE = "metering_gateway_oldest_pending_record_age_seconds"
UNASSIGNED_EVENTS = "metering_gateway_spool_unassigned_events"
SPOOL_SIZE = "metering_gateway_spool_size_bytes"
SPOOL_UP = "metering_gateway_spool_up"
_SCRAPE_TIME = (BUILD_INFO, RECORDS, RECORDS_OUTCOME_UNKNOWN, OLDEST_PENDING_AGE, UNASSIGNED_EVENTS, SPOOL_SIZE, SPOOL_UP)


@dataclass(frozen=True)
class _Spec:
    """One recorded family: its attribute on :class:`_Families`, kind, name (counters
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

_SPECS = (
    # gRPC server metrics, named, labelled and described as go-grpc-prometheus does.
    _Spec("started", Counter, "grpc_server_started_total", "Total number of RPCs started on the server.", GRPC_LABELS),
    _Spec("handled", Counter, "grpc_server_handled_total",
          "Total number of RPCs completed on the server, regardless of success or failure.", (*GRPC_LABELS, "grpc_code")),
    _Spec("received", Counter, "grpc_server_msg_received_total",
          "Total number of RPC stream messages received on the server.", GRPC_LABELS),
    _Spec("sent", Counter, "grpc_server_msg_sent_total", "Total number of gRPC stream messages sent by the server.",
          GRPC_LABELS),
    _Spec("handling", Histogram, "grpc_server_handling_seconds",
          "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
          GRPC_LABELS, {"buckets": DEF_BUCKETS}),
    # AWS.
    _Spec("aws_calls", Counter, "metering_gateway_aws_calls_total",
          "AWS calls, after the gateway's own retries, by their final outcome.", AWS_LABELS),
    _Spec("aws_attempts", Counter, "metering_gateway_aws_attempts_total",
          "HTTP attempts of AWS calls, by the outcome of each.", AWS_LABELS),
    _Spec("aws_retries", Counter, "metering_gateway_aws_retries_total",
          "AWS attempts made again after a retryable failure, by that failure's reason.", AWS_LABELS),
    _Spec("aws_duration", Histogram, "metering_gateway_aws_attempt_duration_seconds",
          "Latency of one HTTP attempt of an AWS call.", ("operation", "source"), {"buckets": DEF_BUCKETS}),
    # Recorded usage.
    _Spec("events", Counter, "metering_gateway_usage_events_total",
          "RecordUsage events, accepted or recognised as duplicates.", ("result",)),
    _Spec("recorded", Counter, "metering_gateway_usage_recorded_quantity_total",
          "Quantity of newly accepted RecordUsage events.", ("product_code", "usage_dimension")),
    _Spec("metered", Counter, "metering_gateway_usage_metered_quantity_total",
          "Quantity of hourly records AWS accepted (SENT).", ("product_code", "usage_dimension")),
    _Spec("records_sent", Counter, "metering_gateway_records_sent_total", "Hourly records AWS accepted."),
    _Spec("records_retried", Counter, "metering_gateway_records_retried_total",
          "Hourly records kept PENDING to be resent later, by the reason.", ("reason",)),
    _Spec("records_failed", Counter, "metering_gateway_records_failed_total",
          "Hourly records that became FAILED, by the reason.", ("reason",)),
    _Spec("outcome_unknown", Counter, "metering_gateway_records_outcome_unknown_total",
          "Hourly records that became FAILED while AWS may hold them (outcome unknown)."),
    _Spec("carried", Counter, "metering_gateway_usage_carried_total",
          "Usage carried to another hour than its own (each usage_carried log line), by reason.", ("reason",)),
    _Spec("series_overflow", Counter, "metering_gateway_usage_series_overflow_total",
          "Quantities counted under product_code and usage_dimension \"other\" because this process "
          "already has its --metrics-max-series of them, by family (recorded or metered).", ("family",)),
    # Gauges: what one worker says; the parent of --processes combines the live workers'.
    _Spec("leader", Gauge, "metering_gateway_sender_leader",
          "1 while this process is the spool's one sender (at its last pass).", (), {"multiprocess_mode": "livesum"}),
    _Spec("serving", Gauge, "metering_gateway_serving", "1 while the named gRPC health service is SERVING, else 0.",
          ("service",), {"multiprocess_mode": "livemin"}),
)


class _Families:
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
        ``max_series`` pairs (callers choose them, so they must be bounded), else ("other", "other")."""
        key = (product_code, usage_dimension)
        if key in self._keys:
            return key
        with self._keys_lock:
            if len(self._keys) < self._max_series:
                self._keys.add(key)
                return key
        self.series_overflow.labels(family).inc()
        return OTHER, OTHER


_families: _Families | None = None
_install_lock = threading.Lock()


def install(*, multiprocess: bool = False, max_series: int = MAX_SERIES) -> CollectorRegistry:
    """Start recording; returns the registry of this process's families.

    ``multiprocess``: this is a worker of ``--processes N``; its values go to files in
    ``PROMETHEUS_MULTIPROC_DIR`` (its parent made it, and serves the sum). Otherwise
    values stay in memory, whatever the environment says. Installing again starts
    from zero (tests).
    """
    global _families
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
        _families = _Families(registry, max_series)
        return registry


def uninstall() -> None:
    """Stop recording (tests)."""
    global _families
    _families = None


def installed() -> bool:
    return _families is not None


# -- gRPC server metrics --------------------------------------------------------------


def service_methods(service: str) -> list[str]:
    """Every method of a service known to the protobuf runtime, as ``/pkg.Service/Method``."""
    try:
        found = descriptor_pool.Default().FindServiceByName(service)
    except KeyError:
        return []
    return [f"/{service}/{m.name}" for m in found.methods]


@dataclass(frozen=True)
class _MethodSeries:
    """One method's labelled series, looked up once: ``.labels()`` costs about as much as
    the increments themselves, on every call."""

    started: Any
    received: Any
    sent: Any
    handling: Any
    handled: Mapping[str, Any]  # by Go code name


class GrpcMetrics:
    """The interceptor's :class:`gateway.interceptors.Observer`: go-grpc-prometheus's
    server metrics. Every method of ``services`` starts at 0 (started, and handled for
    every code), as its InitializeMetrics does, so that rate() works from the first
    scrape. For a unary method one message is received per call and one sent per OK.
    ``grpc_type`` is always ``unary``: the interceptor observes no other kind (the
    server refuses to start with one, :func:`gateway.server.check_unary`)."""

    def __init__(self, services: Iterable[str]) -> None:
        self._families: _Families | None = None
        self._series: dict[str, _MethodSeries] = {}
        for service in services:
            for method in service_methods(service):
                self._of(method)

    def _of(self, method: str) -> _MethodSeries | None:
        m = _families
        if m is None:
            return None
        if m is not self._families:  # installed anew (tests): the series of the new families
            self._families, self._series = m, {}
        series = self._series.get(method)
        if series is None:
            _, service, name = method.split("/", 2)
            key = ("unary", service, name)
            series = self._series[method] = _MethodSeries(
                m.started.labels(*key), m.received.labels(*key), m.sent.labels(*key), m.handling.labels(*key),
                {code: m.handled.labels(*key, code) for code in GO_CODE_NAMES.values()},
            )
        return series

    def started(self, method: str) -> None:
        series = self._of(method)
        if series is not None:
            series.started.inc()
            series.received.inc()

    def handled(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        series = self._of(method)
        if series is None:
            return
        series.handled[GO_CODE_NAMES.get(code, "Unknown")].inc()
        series.handling.observe(seconds)
        if code == grpc.StatusCode.OK:
            series.sent.inc()


def set_serving(service: str, serving: bool) -> None:
    """A named gRPC health service turned SERVING (True) or NOT_SERVING."""
    m = _families
    if m is not None:
        m.serving.labels(service).set(1 if serving else 0)


# -- AWS ------------------------------------------------------------------------------


def aws_attempt(source: str, reason: str, seconds: float, operation: str = "MeterUsage") -> None:
    """One HTTP attempt ended with ``reason`` (OK, DRY_RUN or an error's reason)."""
    m = _families
    if m is not None:
        m.aws_attempts.labels(operation, source, reason).inc()
        m.aws_duration.labels(operation, source).observe(seconds)


def aws_retry(source: str, reason: str, operation: str = "MeterUsage") -> None:
    """The gateway tries again after a retryable failure with ``reason``."""
    m = _families
    if m is not None:
        m.aws_retries.labels(operation, source, reason).inc()


def aws_call(source: str, reason: str, operation: str = "MeterUsage") -> None:
    """One logical call (all its attempts) ended with ``reason``."""
    m = _families
    if m is not None:
        m.aws_calls.labels(operation, source, reason).inc()


# -- recorded usage -------------------------------------------------------------------


def usage_recorded(accepted: Iterable[tuple[str, str, str]], accepted_count: int, duplicates: int) -> None:
    """A RecordUsage batch: the newly accepted events as (product, dimension, decimal
    quantity), their number, and the duplicates; quantities summed exactly per key first."""
    m = _families
    if m is None:
        return
    m.events.labels(ACCEPTED).inc(accepted_count)
    m.events.labels(DUPLICATE).inc(duplicates)
    sums: dict[tuple[str, str], Decimal] = {}
    for product, dimension, quantity in accepted:
        sums[(product, dimension)] = sums.get((product, dimension), Decimal(0)) + Decimal(quantity)
    for (product, dimension), total in sums.items():
        m.recorded.labels(*m.usage_labels(RECORDED, product, dimension)).inc(float(total))


def record_sent(product_code: str, usage_dimension: str, quantity: str) -> None:
    m = _families
    if m is not None:
        m.records_sent.inc()
        m.metered.labels(*m.usage_labels(METERED, product_code, usage_dimension)).inc(float(Decimal(quantity)))


def record_retried(reason: str) -> None:
    m = _families
    if m is not None:
        m.records_retried.labels(reason).inc()


def record_failed(reason: str, *, outcome_unknown: bool) -> None:
    m = _families
    if m is not None:
        m.records_failed.labels(reason).inc()
        if outcome_unknown:
            m.outcome_unknown.inc()


def usage_carried(reason: str) -> None:
    m = _families
    if m is not None:
        m.carried.labels(reason).inc()


def set_leader(leading: bool) -> None:
    m = _families
    if m is not None:
        m.leader.set(1 if leading else 0)


# -- read at scrape time --------------------------------------------------------------


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

    def __init__(self, read: Callable[[], SpoolReading] | None = None, *, timeout: float = SCRAPE_SPOOL_TIMEOUT) -> None:
        self._read = read
        self._timeout = timeout
        self._busy = threading.Lock()

    def describe(self) -> Iterator[Any]:
        return iter(())  # families vary with the spool's state; nothing to check at registration

    def collect(self) -> Iterator[Any]:
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
        yield GaugeMetricFamily(RECORDS_OUTCOME_UNKNOWN, "FAILED records whose outcome is unknown: AWS may hold them.",
                                value=reading.outcome_unknown)
        yield GaugeMetricFamily(OLDEST_PENDING_AGE, "Seconds since the start of the oldest PENDING record's hour; "
                                "0 when none is pending.", value=reading.oldest_pending_age)
        yield GaugeMetricFamily(UNASSIGNED_EVENTS, "Recorded events not yet placed into an hourly record.",
                                value=reading.unassigned_events)
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
            except Exception as exc:  # any failure to read is "down" (SpoolError, a driver's own errors)
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


def metric_names() -> frozenset[str]:
    """Every family name as /metrics writes it in its HELP and TYPE lines (counters with
    ``_total``), for checks of alert rules and dashboards against it."""
    return frozenset((*_SCRAPE_TIME, *(spec.name for spec in _SPECS)))
