"""Every setting of the gateway, declared once as a field of :class:`Settings`, and the
rules between them (:meth:`Settings.check`).

A field's :class:`~gateway.config._spec.Spec` gives its help, parser and range; the
flag, the variable and ``--help`` derive from it (:mod:`gateway.config._sources`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

from gateway.config._errors import ConfigError
from gateway.config._files import POSTGRES_SCHEMES, check_spool_location, check_tls_files
from gateway.config._spec import flag_name, setting, shown_range, shown_value, spec
from gateway.config._values import (
    Bounds,
    parse_bool,
    parse_duration,
    parse_int,
    parse_listen,
    parse_number,
    parse_products,
    parse_size,
)
from gateway.domain import validation
from gateway.domain.clock import DAY, HOUR, MINUTE
from gateway.domain.states import SpoolCreate

SPOOL_POOL_WAIT = 2.0  # seconds a call waits for a free PostgreSQL connection before SPOOL_UNAVAILABLE


def _product_code_text(text: str) -> str:
    """A product code AWS would take (the same rule as a request's), stripped."""
    code = text.strip()
    problems = validation.check_product_code(code, f"product code {code!r}")
    if problems:
        raise ConfigError(f"{problems[0].field} {problems[0].description}")
    return code


def _products_text(text: str) -> str:
    """--products as given, once parse_products found it well formed."""
    parse_products(text)
    return text.strip()


# A record for hour H is due at H + 1h + flush-grace and must reach AWS before H is
# six hours old (validation.MAX_AGE); the sender already carries it once H is
# 5h30m old (placement.SAFETY_MARGIN). 3h leaves 1h30m to send and retry; 4h30m
# or more would leave none, and nothing would ever be sent under its own hour.
FLUSH_GRACE_MAX = 3 * HOUR


class Given(NamedTuple):
    """Where a setting's value came from (a flag or a variable) and its text as written."""

    source: str
    text: str


@dataclass(frozen=True)
class Settings:
    """Every setting of the gateway, after flags, environment and defaults."""

    listen: str = field(
        default="0.0.0.0:50051",
        metadata=setting("Address to serve gRPC on, HOST:PORT.", metavar="HOST:PORT"),
    )
    local: bool = field(
        default=False,
        metadata=setting(
            "Run the embedded local AWS backend instead of AWS. Nothing is billed.",
            parse=parse_bool,
        ),
    )
    local_port: int = field(
        default=0,
        metadata=setting(
            "Port of the embedded local backend with --local (0 picks a free one).",
            parse=parse_int,
            bounds=Bounds(0, 65535),
        ),
    )
    max_workers: int = field(
        default=32,
        metadata=setting(
            "Threads serving RPCs; also the size of the AWS connection pool.", parse=parse_int, bounds=Bounds(1, 1024)
        ),
    )
    max_concurrent_rpcs: int = field(
        default=0,
        metadata=setting(
            "Most RPCs one server process holds at once, running or waiting for a thread; calls beyond it "
            "fail at once with RESOURCE_EXHAUSTED instead of queueing while AWS is slow. "
            "0 means 4 × --max-workers; otherwise at least --max-workers.",
            parse=parse_int,
            bounds=Bounds(0, 100_000),
        ),
    )
    max_aws_calls: int = field(
        default=0,
        metadata=setting(
            "Most MeterUsage calls one server process has waiting on AWS at once; more fail at once "
            "with RESOURCE_EXHAUSTED (CONCURRENCY_LIMIT_EXCEEDED), so a slow AWS never takes the "
            "threads that health, RecordUsage and the rest need. 0 means 3/4 of --max-workers; "
            "otherwise below --max-workers.",
            parse=parse_int,
            bounds=Bounds(0, 1023),
        ),
    )
    max_message_size: int = field(
        default=1024 * 1024,
        metadata=setting(
            "Largest request a caller may send (bytes; KiB and MiB suffixes); a larger one gets "
            "RESOURCE_EXHAUSTED. 1MiB holds a batch of 1000 events of up to 1 KiB each; decoding a "
            "hostile request may take 25 times its size in memory, for a moment.",
            parse=parse_size,
            bounds=Bounds(64 * 1024, 64 * 1024 * 1024),
        ),
    )
    max_connections: int = field(
        default=1000,
        metadata=setting(
            "Most client connections one server process keeps open; more are refused until some close.",
            parse=parse_int,
            bounds=Bounds(1, 100_000),
        ),
    )
    max_streams_per_connection: int = field(
        default=100,
        metadata=setting(
            "Most calls and streams one client connection may have open at once (HTTP/2 "
            "SETTINGS_MAX_CONCURRENT_STREAMS).",
            parse=parse_int,
            bounds=Bounds(1, 10_000),
        ),
    )
    max_connection_idle: float = field(
        default=5 * MINUTE,
        metadata=setting(
            "A client connection with no call for this long is closed (GOAWAY); clients reconnect on their next call.",
            parse=parse_duration,
            bounds=Bounds(1, 7 * DAY),
        ),
    )
    max_connection_age: float = field(
        default=30 * MINUTE,
        metadata=setting(
            "A client connection is asked to go away after this long (with jitter), so that load "
            "spreads again over replicas and no connection lives forever.",
            parse=parse_duration,
            bounds=Bounds(1, 7 * DAY),
        ),
    )
    max_connection_age_grace: float = field(
        default=MINUTE,
        metadata=setting(
            "How long calls in flight on a connection past --max-connection-age may still take.",
            parse=parse_duration,
            bounds=Bounds(0, DAY),
        ),
    )
    keepalive_min_time: float = field(
        default=MINUTE,
        metadata=setting(
            "Least time between a client's keepalive pings; a client pinging more often (or "
            "pinging with no call open) is told to go away after two such pings.",
            parse=parse_duration,
            bounds=Bounds(1, DAY),
        ),
    )
    reflection: bool = field(
        default=True,
        metadata=setting(
            "Serve gRPC server reflection (grpcurl, Postman). Its streams run on a few threads of "
            "their own and last a minute at most; turn it off where nobody explores the API.",
            parse=parse_bool,
        ),
    )
    processes: int = field(
        default=1,
        metadata=setting(
            "Server processes sharing the listen port (SO_REUSEPORT). One Python process "
            "serves about one core of MeterUsage calls; use one per core the pod may use. "
            "An SQLite --spool needs 1; a PostgreSQL one takes any number.",
            parse=parse_int,
            bounds=Bounds(1, 64),
        ),
    )
    grace: float = field(
        # 8 s: with the second of shutdown margin (gateway.assembly.app.SHUTDOWN_MARGIN) and the
        # interpreter's exit, a SIGTERM ends well inside docker/podman stop's default 10 s.
        default=8.0,
        metadata=setting(
            "On SIGTERM, how long calls in flight may take to finish; --flush-on-shutdown gets what "
            "is left, and the process exits within a second after it, whatever AWS does. Keep it 2s "
            "below the platform's stop timeout (docker stop: 10s, see --stop-timeout; Kubernetes: "
            "terminationGracePeriodSeconds).",
            parse=parse_duration,
            bounds=Bounds(0, HOUR),  # platforms kill far sooner; more is a typo
        ),
    )
    aws_max_attempts: int = field(
        default=4,
        metadata=setting(
            "Attempts per AWS call for retryable errors (throttling, AWS unreachable), "
            "always within the caller's deadline.",
            parse=parse_int,
            # A caller without a deadline holds a thread for every attempt and pause.
            bounds=Bounds(1, 10),
        ),
    )
    aws_retry_mode: str = field(
        default="standard",
        metadata=setting(
            "botocore retry mode; adaptive adds botocore's client-side rate limiter.",
            choices=("standard", "adaptive"),
        ),
    )
    aws_backoff_base: float = field(
        default=0.1,
        metadata=setting(
            "First retry delay; it doubles per attempt, with full jitter.",
            parse=parse_duration,
            bounds=Bounds(0.001, 5 * MINUTE),
        ),
    )
    aws_backoff_max: float = field(
        default=5.0,
        metadata=setting(
            "Longest retry delay; at least --aws-backoff-base.", parse=parse_duration, bounds=Bounds(0.001, 5 * MINUTE)
        ),
    )
    aws_connect_timeout: float = field(
        default=2.0,
        metadata=setting("Timeout to connect to AWS.", parse=parse_duration, bounds=Bounds(0.001, 5 * MINUTE)),
    )
    aws_read_timeout: float = field(
        default=5.0,
        metadata=setting(
            "Timeout for one AWS attempt to answer.", parse=parse_duration, bounds=Bounds(0.001, 5 * MINUTE)
        ),
    )
    timestamp_skew: float = field(
        default=300.0,
        metadata=setting(
            "How far in the future a usage timestamp may be (clock skew between hosts).",
            parse=parse_duration,
            bounds=Bounds(0, HOUR),  # a clock an hour off is broken, not skewed
        ),
    )
    log_level: str = field(
        default="info",
        metadata=setting("Lowest log level written.", choices=("debug", "info", "warning", "error")),
    )
    tls_cert: str = field(default="", metadata=setting("PEM certificate chain to serve TLS with.", metavar="PATH"))
    tls_key: str = field(default="", metadata=setting("PEM private key for --tls-cert.", metavar="PATH"))
    tls_client_ca: str = field(
        default="",
        metadata=setting(
            "PEM CA bundle; when set, clients must present a certificate it signed (mTLS).",
            metavar="PATH",
        ),
    )
    metrics_listen: str = field(
        default="",
        metadata=setting(
            "Address to serve Prometheus metrics on, HOST:PORT (path /metrics); one scrape shows the "
            "total of all --processes. Empty: no metrics endpoint.",
            metavar="HOST:PORT",
        ),
    )
    metrics_max_series: int = field(
        default=1000,
        metadata=setting(
            "Most product and dimension pairs one process labels its quantity metrics with; the "
            'quantities of any more are counted under "other" (metering_gateway_usage_series_overflow_total '
            "says how often), so callers cannot grow the scrape without bound.",
            parse=parse_int,
            bounds=Bounds(1, 100_000),
        ),
    )
    authz_policy: str = field(
        default="",
        metadata=setting(
            "YAML policy of which mTLS callers (client certificate SAN: a URI such as a SPIFFE ID, or a "
            "DNS name) may call which methods, and meter which products and dimensions. Needs "
            "--tls-client-ca. Empty: every caller the CA admits may call every method.",
            metavar="PATH",
        ),
    )
    spool: str = field(
        default="",
        metadata=setting(
            "Where RecordUsage keeps events and hourly records: an SQLite file (one pod), or a "
            "postgresql:// URL shared by any number of replicas (libpq's PG* variables and "
            "password file apply; the password is never logged). "
            "Empty disables the UsageRecorderService.",
            metavar="PATH|URL",
        ),
    )
    products: str = field(
        default="",
        metadata=setting(
            "The products, and their dimensions, this gateway meters: PRODUCT=DIMENSION[,DIMENSION...], "
            "entries separated by ';' (prod-abc123=requests,storage-gb;prod-def456=cpu-hours). Any other "
            "product or dimension is refused before AWS (INVALID_ARGUMENT naming the field), and with --local "
            "the local backend knows these only. Empty: any product and dimension.",
            parse=_products_text,
            metavar="LIST",
        ),
    )
    register_usage: str = field(
        default="",
        metadata=setting(
            "Sidecar mode for a paid container: call AWS Marketplace RegisterUsage for this product code "
            "at start-up (needs --register-usage-key-version). Readiness is NOT_SERVING until it succeeds; "
            "a buyer who is not subscribed, an unsupported platform or an invalid Region stops the "
            "process with one line. Empty: no registration.",
            parse=_product_code_text,
            metavar="PRODUCT_CODE",
        ),
    )
    register_usage_key_version: int = field(
        default=0,
        metadata=setting(
            "The public key version AWS Marketplace gave the seller for --register-usage.",
            parse=parse_int,
            bounds=Bounds(0, 2**31 - 1),
        ),
    )
    register_usage_public_key: str = field(
        default="",
        metadata=setting(
            "PEM public key (from AWS Marketplace) that RegisterUsage's signed answer must verify "
            "against (PS256/RS256 JWT; product code, key version and nonce are checked). Empty: the "
            "signature is not verified (a warning says so).",
            metavar="PATH",
        ),
    )
    zero_usage_hours: str = field(
        default="",
        metadata=setting(
            "Products and dimensions that get a zero record for every closed hour without usage, "
            "exactly once (never the open hour): PRODUCT=DIMENSION[,DIMENSION...], entries separated "
            "by ';'. Needs --spool. Empty: only hours with usage are metered.",
            parse=_products_text,
            metavar="LIST",
        ),
    )
    agentcore: bool = field(
        default=False,
        metadata=setting(
            "Amazon Bedrock AgentCore Runtime mode: recorded usage goes out every --flush-interval "
            "(records of one interval, not one hour, each with its own ClientToken); MeterUsage needs "
            "a client_token and refuses usage allocations (tags).",
            parse=parse_bool,
        ),
    )
    saas: bool = field(
        default=False,
        metadata=setting(
            "SaaS mode: the gateway runs in the seller's account and signs with the seller's "
            "credentials (BatchMeterUsage, ResolveCustomer, recorded usage that names a customer). "
            "The start-up checks of the credentials follow (the buyer-role rules of MeterUsage do not "
            "apply), and RecordUsage refuses events that name no customer. Not with --register-usage, "
            "--zero-usage-hours or --agentcore, which are for software in the buyer's account.",
            parse=parse_bool,
        ),
    )
    spool_create: str = field(
        default="yes",
        metadata=setting(
            "Whether a --spool that does not exist yet may be created: yes; no (start-up fails, "
            "for a spool that must already be there); if-mounted (an SQLite file only when its "
            "directory is a mount point, so a pod whose volume did not mount never starts over "
            "with an empty spool). A new spool is always logged as a warning.",
            choices=tuple(SpoolCreate),
        ),
    )
    spool_connections: int = field(
        default=8,
        metadata=setting(
            "Most connections one server process opens to a PostgreSQL spool (calls beyond them wait "
            f"up to {SPOOL_POOL_WAIT:g}s, then get SPOOL_UNAVAILABLE); one more holds the sender's lock.",
            parse=parse_int,
            bounds=Bounds(2, 1000),
        ),
    )
    flush_grace: float = field(
        default=300.0,
        metadata=setting(
            "How long after an hour closes its record is sent (late events still count).",
            parse=parse_duration,
            bounds=Bounds(0, FLUSH_GRACE_MAX),
        ),
    )
    flush_interval: float = field(
        default=30.0,
        metadata=setting(
            "How often the sender looks for records to send.",
            parse=parse_duration,
            # 0 busy-loops the sender; a long pause eats the time left to send (FLUSH_GRACE_MAX).
            bounds=Bounds(0.1, 15 * MINUTE),
        ),
    )
    aws_max_rps: float = field(
        default=10.0,
        metadata=setting(
            "Most MeterUsage calls a second the sender makes.",
            parse=parse_number,
            # At least one call every 10 s (360 an hour); far above any MeterUsage quota above: more is a typo.
            bounds=Bounds(0.1, 1000),
        ),
    )
    flush_on_shutdown: bool = field(
        default=False,
        metadata=setting(
            "On SIGTERM, also send the current, still open hour. Use it for pods that will "
            "not come back; usage recorded later in that hour is carried to the next hour.",
            parse=parse_bool,
        ),
    )
    event_retention: float = field(
        default=7 * DAY,
        metadata=setting(
            "How long a repeated event_id is still recognised (the deduplication window): events of "
            "sent records are pruned this long after the record was sent.",
            parse=parse_duration,
            bounds=Bounds(HOUR, 3650 * DAY),  # at least a caller's retries; ten years is plenty
        ),
    )
    record_retention: float = field(
        default=400 * DAY,
        metadata=setting(
            "How long sent and failed hourly records are kept for reconciliation with AWS's seller "
            "reports; at least --event-retention.",
            parse=parse_duration,
            bounds=Bounds(DAY, 3650 * DAY),
        ),
    )

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @property
    def concurrent_rpc_limit(self) -> int:
        """The effective --max-concurrent-rpcs: 0 stands for 4 × --max-workers."""
        return self.max_concurrent_rpcs or 4 * self.max_workers

    @property
    def aws_call_limit(self) -> int:
        """The effective --max-aws-calls: 0 stands for 3/4 of --max-workers (at least 1)."""
        return self.max_aws_calls or max(1, self.max_workers * 3 // 4)

    def check(self, given: Mapping[str, Given] | None = None) -> Settings:
        """Raise ConfigError on the first unusable value; return self.

        ``given`` (from settings_from) names where each value came from and how it
        was written, so that a message quotes the person's own words.
        """
        given = given or {}

        def who(name: str) -> str:
            source = given[name].source if name in given else flag_name(name)
            return source if source == flag_name(name) else f"{source} ({flag_name(name)})"

        def shown(name: str) -> str:
            return given[name].text.strip() if name in given else shown_value(_FIELDS[name], getattr(self, name))

        parse_listen(self.listen)
        if self.metrics_listen:
            try:
                parse_listen(self.metrics_listen)
            except ConfigError as exc:
                raise ConfigError(f"{who('metrics_listen')}: {exc}") from None
        for f in _FIELDS.values():
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{who(f.name)}: {shown(f.name)} is not a finite number")
            bounds = spec(f).bounds
            if bounds is not None and not bounds.allows(value):
                raise ConfigError(f"{who(f.name)}: {shown(f.name)} is out of range (allowed: {shown_range(f)})")
        if self.processes > 1 and self.spool and not self.spool.startswith(POSTGRES_SCHEMES):
            raise ConfigError(
                f"{who('processes')}: {shown('processes')} needs a PostgreSQL spool: an SQLite spool is one "
                "process's (use --processes 1, or --spool postgresql://…)"
            )
        # Fewer slots than threads would leave threads idle while calls are refused.
        if self.max_concurrent_rpcs and self.max_concurrent_rpcs < self.max_workers:
            raise ConfigError(
                f"{who('max_concurrent_rpcs')}: {shown('max_concurrent_rpcs')} is below --max-workers "
                f"{self.max_workers} (0 means 4 × --max-workers)"
            )
        if self.max_aws_calls and self.max_aws_calls >= self.max_workers and self.max_workers > 1:
            raise ConfigError(
                f"{who('max_aws_calls')}: {shown('max_aws_calls')} leaves no thread of --max-workers "
                f"{self.max_workers} for health and RecordUsage (0 means 3/4 of --max-workers)"
            )
        if self.spool:
            check_spool_location(self.spool, who("spool"))

        def at_most(low: str, high: str) -> None:
            """``low`` <= ``high``; the message blames the one the person set, the high one if both."""
            if getattr(self, low) <= getattr(self, high):
                return
            if low in given and high not in given:
                raise ConfigError(f"{who(low)}: {shown(low)} is above {flag_name(high)} {shown(high)}")
            raise ConfigError(f"{who(high)}: {shown(high)} is below {flag_name(low)} {shown(low)}")

        at_most("aws_backoff_base", "aws_backoff_max")
        # Events are pruned through their record (its state and send time): it must outlive them.
        at_most("event_retention", "record_retention")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls-cert and tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls-client-ca needs tls-cert and tls-key")
        if self.authz_policy and not self.tls_client_ca:
            raise ConfigError(
                f"{who('authz_policy')}: a policy names callers by their client certificate, "
                "so it needs mTLS (--tls-client-ca, with --tls-cert and --tls-key)"
            )
        if self.register_usage and not self.register_usage_key_version:
            raise ConfigError(
                f"{who('register_usage')}: RegisterUsage needs the public key version AWS Marketplace gave "
                "you: set --register-usage-key-version (METERING_GATEWAY_REGISTER_USAGE_KEY_VERSION)"
            )
        if self.register_usage_public_key and not self.register_usage:
            raise ConfigError(f"{who('register_usage_public_key')}: needs --register-usage PRODUCT_CODE")
        # RegisterUsage registers the pod once, at start-up: one server process does it and holds readiness.
        if self.register_usage and self.processes > 1:
            raise ConfigError(
                f"{who('register_usage')}: a RegisterUsage sidecar registers its pod once and serves it alone: "
                "it needs --processes 1"
            )
        if self.zero_usage_hours and not self.spool:
            raise ConfigError(
                f"{who('zero_usage_hours')}: zero-usage hours are recorded usage: they need --spool PATH|URL"
            )
        if self.zero_usage_hours and self.products:
            known = parse_products(self.products)
            for product, dimensions in parse_products(self.zero_usage_hours).items():
                unknown = sorted(dimensions - known.get(product, frozenset()))
                if unknown:
                    raise ConfigError(
                        f"{who('zero_usage_hours')}: {product}={','.join(unknown)} is not in --products, "
                        "so it could never be metered"
                    )
        if self.zero_usage_hours and self.agentcore:
            raise ConfigError(
                f"{who('zero_usage_hours')}: AgentCore Runtime mode meters per --flush-interval, not per hour: "
                "zero-usage hours do not apply (unset one of them)"
            )
        for name in ("register_usage", "zero_usage_hours", "agentcore"):
            if self.saas and getattr(self, name):
                raise ConfigError(
                    f"{who(name)}: it is for software in the buyer's account, and --saas runs in the seller's: "
                    "unset one of them (two products of the two kinds need two gateways)"
                )
        for name in ("tls_cert", "tls_key", "tls_client_ca", "authz_policy", "register_usage_public_key"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{name.replace('_', '-')}: no such file {path!r}")
        check_tls_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        return self

    @cached_property
    def product_list(self) -> validation.Products | None:
        """--products, parsed; None when unset (any product and dimension)."""
        return validation.Products(parse_products(self.products)) if self.products else None

    @cached_property
    def zero_hours(self) -> dict[str, frozenset[str]]:
        """--zero-usage-hours, parsed: each product's dimensions that get zero records."""
        return parse_products(self.zero_usage_hours) if self.zero_usage_hours else {}


SETTINGS_FIELDS = tuple(dataclasses.fields(Settings))
_FIELDS = {f.name: f for f in SETTINGS_FIELDS}
