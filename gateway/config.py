"""Flags and ``METERING_GATEWAY_*`` variables, read into one frozen Settings.

Each setting is declared once, as a field of :class:`Settings`; the command-line
flag (``--flush-grace``), the environment variable
(``METERING_GATEWAY_FLUSH_GRACE``), the ``--help`` text and the allowed range
(:class:`Bounds`, checked at start) are derived from it, so they cannot disagree.
A flag beats the variable, which beats the default.
AWS settings (credentials, region, endpoint) are deliberately *not* here: they
come from boto3's own conventions (``AWS_REGION``,
``AWS_ENDPOINT_URL_MARKETPLACE_METERING``, the default credential chain).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import math
import os
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from gateway import validation

ENV_PREFIX = "METERING_GATEWAY_"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")  # a --spool that names a PostgreSQL database
SPOOL_POOL_WAIT = 2.0  # seconds a call waits for a free PostgreSQL connection before SPOOL_UNAVAILABLE


class ConfigError(ValueError):
    """A setting is unusable; the message is one line meant for a person."""


# ASCII digits only: Python's int() and re's \d also take ٥ or १, which nobody means in a setting.
_DURATION = re.compile(r"^(?:([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d))+$")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf(?:inity)?)", re.IGNORECASE)
_SIZE = re.compile(r"([0-9]+)\s*(B|KiB|MiB|GiB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0


def parse_duration(text: str) -> float:
    """``"5m"`` → 300.0 seconds. Accepts ms, s, m, h, d and sums like ``1m30s``."""
    text = text.strip()
    if not _DURATION.match(text):
        raise ConfigError(f"{text!r} is not a duration (examples: 500ms, 30s, 5m, 1h, 7d)")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def format_duration(seconds: float) -> str:
    """Seconds as a person would write them (``5h``, ``7d``, ``1500ms``): parse_duration's inverse."""
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds and seconds == int(seconds):
        whole = int(seconds)
        for unit in ("d", "h", "m"):
            size = int(_UNIT_SECONDS[unit])
            if whole % size == 0:
                return f"{whole // size}{unit}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000, 6):g}ms"


def parse_int(text: str) -> int:
    """A whole number in ASCII digits."""
    if not _INTEGER.fullmatch(text.strip()):
        raise ConfigError(f"{text!r} is not a whole number")
    return int(text.strip())


def parse_number(text: str) -> float:
    """A decimal number in ASCII digits (``0.5``, ``10``, ``2e3``); nan and inf parse, for
    check() to refuse as not finite."""
    if not _NUMBER.fullmatch(text.strip()):
        raise ConfigError(f"{text!r} is not a number")
    return float(text.strip())


def parse_size(text: str) -> int:
    """``4MiB`` → 4194304 bytes; B, KiB, MiB, GiB, or a plain number of bytes."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"{text!r} is not a size (examples: 65536, 512KiB, 4MiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def format_size(size: float) -> str:
    """Bytes as a person would write them (``4MiB``): parse_size's inverse."""
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{int(size) // _SIZE_UNITS[unit]}{unit}"
    return str(int(size))


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{text!r} is not a boolean (use true or false)")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) → (host, port), checked."""
    match = re.fullmatch(r"\[([^\]]+)\]:([0-9]+)|([^:\[\]]+):([0-9]+)", text.strip())
    if not match:
        raise ConfigError(f"listen address {text!r} is not HOST:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen port {port} is outside 0-65535")
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError(f"listen address {text!r}: {exc}") from None
    return host, port


def format_listen(host: str, port: int) -> str:
    """(host, port) → ``HOST:PORT``, with IPv6 hosts in brackets: parse_listen's inverse."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_KEYWORD_DSN = re.compile(r"(?:^|\s)(?:host|hostaddr|port|dbname|user|password|passfile|sslmode|service|options)\s*=",
                          re.IGNORECASE)


def check_spool_location(location: str, who: str = "--spool") -> None:
    """ConfigError unless ``location`` is a durable spool: an SQLite file path or a postgresql:// URL.

    The message never repeats the value: a DSN in the wrong form may hold a password.
    """
    if location.startswith(POSTGRES_SCHEMES):
        return
    if location.strip() == ":memory:" or location.startswith("file:"):
        raise ConfigError(f"{who}: an in-memory or URI-form SQLite spool is refused: an acknowledged event must "
                          "outlive the process; give a file path, or a postgresql:// URL")
    if _KEYWORD_DSN.search(location):
        raise ConfigError(f"{who}: this looks like a PostgreSQL keyword DSN (host=... dbname=...), which would become "
                          "an SQLite file of that name; give it as a URL: postgresql://USER@HOST:PORT/DBNAME")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", location):
        raise ConfigError(f"{who}: only postgresql:// URLs and SQLite file paths are spools")


def parse_products(text: str) -> dict[str, frozenset[str]]:
    """``prod-abc123=requests,storage-gb;prod-def456=cpu-hours`` → each product's dimensions.

    Entries are separated by ``;`` (or new lines); each code and dimension must be
    one AWS would take (the same rules as a request's).
    """
    products: dict[str, frozenset[str]] = {}
    for entry in re.split(r"[;\n]", text):
        if not entry.strip():
            continue
        product, sep, listed = (part.strip() for part in entry.partition("="))
        dimensions = [d.strip() for d in listed.split(",") if d.strip()]
        if not sep or not dimensions:
            raise ConfigError(f"{entry!r} names no dimensions: write PRODUCT=DIMENSION[,DIMENSION...], "
                              "entries separated by ';' (example: prod-abc123=requests,storage-gb)")
        problems = validation.check_product_code(product, f"product code {product!r}")
        problems += [v for d in dimensions for v in validation.check_usage_dimension(d, f"dimension {d[:40]!r} of {product}")]
        if problems:
            raise ConfigError(f"{problems[0].field} {problems[0].description}")
        if product in products:
            raise ConfigError(f"product {product!r} is listed twice: give all its dimensions in one entry")
        products[product] = frozenset(dimensions)
    if not products:
        raise ConfigError("lists no product: write PRODUCT=DIMENSION[,DIMENSION...] (or leave it unset to allow any)")
    return products


def _products_text(text: str) -> str:
    """--products as given, once parse_products found it well formed."""
    parse_products(text)
    return text.strip()


def check_tls_files(cert: str, key: str, client_ca: str) -> None:
    """ConfigError naming the file unless the certificate, key and CA bundle are PEM files
    that fit together. Checked at start-up: gRPC only says "Failed to bind" for any of it."""
    for name, path, marker in (("tls-cert", cert, "CERTIFICATE"), ("tls-key", key, "PRIVATE KEY"),
                               ("tls-client-ca", client_ca, "CERTIFICATE")):
        if not path:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path!r}: {exc.strerror}") from None
        if f"-----BEGIN {marker}-----".encode() not in data and not (
                marker == "PRIVATE KEY" and re.search(rb"-----BEGIN [A-Z]+ PRIVATE KEY-----", data)):
            raise ConfigError(f"{name}: {path!r} holds no PEM {marker.lower()} (no '-----BEGIN {marker}-----' line)")
        if marker == "PRIVATE KEY" and (b"ENCRYPTED" in data):
            raise ConfigError(f"{name}: {path!r} is an encrypted key; gRPC needs it unencrypted (protect the file instead)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if cert:
        try:
            context.load_cert_chain(cert, key, password=lambda: b"")
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
                raise ConfigError(f"tls-key: {key!r} is not the private key of the certificate in {cert!r}") from None
            raise ConfigError(f"tls-cert/tls-key: {cert!r} and {key!r} are not a usable certificate and key "
                              f"({exc.reason or exc})") from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise ConfigError(f"tls-client-ca: {client_ca!r} is not a usable PEM CA bundle ({exc.reason or exc})") from None


# Variables with the prefix that are not settings, and are no mistake: those of the
# `health` command, and those Kubernetes adds to every pod for a Service named
# metering-gateway (or metering-gateway-*) unless enableServiceLinks is false.
OTHER_VARIABLES = frozenset(ENV_PREFIX + name for name in ("HEALTH_TARGET", "HEALTH_TLS_CA", "HEALTH_TLS_CERT", "HEALTH_TLS_KEY"))
_SERVICE_LINK = re.compile(ENV_PREFIX + r"(?:[A-Z0-9_]+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|"
                           r"PORT(?:_[0-9]+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)?)")


def check_variables(env: Mapping[str, str]) -> None:
    """ConfigError for a ``METERING_GATEWAY_*`` variable that is no setting: a typo
    (``..._SPOLL``) would otherwise start the gateway without what it meant to set."""
    known = {env_name(f.name) for f in SETTINGS_FIELDS} | OTHER_VARIABLES
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known and not _SERVICE_LINK.fullmatch(name):
            # Compared without the prefix, which every name shares and would make anything look close.
            close = difflib.get_close_matches(name[len(ENV_PREFIX):], sorted(k[len(ENV_PREFIX):] for k in known), n=1)
            hint = f"did you mean {ENV_PREFIX}{close[0]}?" if close else "see `metering-gateway serve --help` for the settings"
            raise ConfigError(f"{name} is set, but no setting has that name: {hint}")


@dataclass(frozen=True)
class Bounds:
    """The values a number setting may take: ``lo``..``hi``, or above ``lo`` when ``open_lo``."""

    lo: float
    hi: float
    open_lo: bool = False

    def allows(self, value: float) -> bool:
        above = value > self.lo if self.open_lo else value >= self.lo
        return above and value <= self.hi

    def describe(self, show: Callable[[float], str]) -> str:
        if self.open_lo:
            return f"above {show(self.lo)}, at most {show(self.hi)}"
        return f"{show(self.lo)}..{show(self.hi)}"


def _setting(
    help: str,
    *,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
    bounds: Bounds | None = None,
) -> dict[str, Any]:
    return {"help": help, "parse": parse, "metavar": metavar, "choices": choices, "bounds": bounds}


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
        metadata=_setting("Address to serve gRPC on, HOST:PORT.", metavar="HOST:PORT"),
    )
    local: bool = field(
        default=False,
        metadata=_setting(
            "Run the embedded local AWS backend instead of AWS. Nothing is billed.",
            parse=parse_bool,
        ),
    )
    local_port: int = field(
        default=0,
        metadata=_setting(
            "Port of the embedded local backend with --local (0 picks a free one).", parse=parse_int, bounds=Bounds(0, 65535)
        ),
    )
    max_workers: int = field(
        default=32,
        metadata=_setting(
            "Threads serving RPCs; also the size of the AWS connection pool.", parse=parse_int, bounds=Bounds(1, 1024)
        ),
    )
    max_concurrent_rpcs: int = field(
        default=0,
        metadata=_setting(
            "Most RPCs one server process holds at once, running or waiting for a thread; calls beyond it "
            "fail at once with RESOURCE_EXHAUSTED instead of queueing while AWS is slow. "
            "0 means 4 × --max-workers; otherwise at least --max-workers.",
            parse=parse_int,
            bounds=Bounds(0, 100_000),
        ),
    )
    max_aws_calls: int = field(
        default=0,
        metadata=_setting(
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
        metadata=_setting(
            "Largest request a caller may send (bytes; KiB and MiB suffixes); a larger one gets "
            "RESOURCE_EXHAUSTED. 1MiB holds a batch of 1000 events of up to 1 KiB each; decoding a "
            "hostile request may take 25 times its size in memory, for a moment.",
            parse=parse_size,
            bounds=Bounds(64 * 1024, 64 * 1024 * 1024),
        ),
    )
    max_connections: int = field(
        default=1000,
        metadata=_setting(
            "Most client connections one server process keeps open; more are refused until some close.",
            parse=parse_int,
            bounds=Bounds(1, 100_000),
        ),
    )
    max_streams_per_connection: int = field(
        default=100,
        metadata=_setting(
            "Most calls and streams one client connection may have open at once (HTTP/2 "
            "SETTINGS_MAX_CONCURRENT_STREAMS).",
            parse=parse_int,
            bounds=Bounds(1, 10_000),
        ),
    )
    max_connection_idle: float = field(
        default=5 * MINUTE,
        metadata=_setting(
            "A client connection with no call for this long is closed (GOAWAY); clients reconnect on "
            "their next call.",
            parse=parse_duration,
            bounds=Bounds(1, 7 * DAY),
        ),
    )
    max_connection_age: float = field(
        default=30 * MINUTE,
        metadata=_setting(
            "A client connection is asked to go away after this long (with jitter), so that load "
            "spreads again over replicas and no connection lives forever.",
            parse=parse_duration,
            bounds=Bounds(1, 7 * DAY),
        ),
    )
    max_connection_age_grace: float = field(
        default=MINUTE,
        metadata=_setting(
            "How long calls in flight on a connection past --max-connection-age may still take.",
            parse=parse_duration,
            bounds=Bounds(0, DAY),
        ),
    )
    keepalive_min_time: float = field(
        default=MINUTE,
        metadata=_setting(
            "Least time between a client's keepalive pings; a client pinging more often (or "
            "pinging with no call open) is told to go away after two such pings.",
            parse=parse_duration,
            bounds=Bounds(1, DAY),
        ),
    )
    reflection: bool = field(
        default=True,
        metadata=_setting(
            "Serve gRPC server reflection (grpcurl, Postman). Its streams run on a few threads of "
            "their own and last a minute at most; turn it off where nobody explores the API.",
            parse=parse_bool,
        ),
    )
    processes: int = field(
        default=1,
        metadata=_setting(
            "Server processes sharing the listen port (SO_REUSEPORT). One Python process "
            "serves about one core of MeterUsage calls; use one per core the pod may use. "
            "An SQLite --spool needs 1; a PostgreSQL one takes any number.",
            parse=parse_int,
            bounds=Bounds(1, 64),
        ),
    )
    grace: float = field(
        # 8 s: with the second of shutdown margin (gateway.app.SHUTDOWN_MARGIN) and the
        # interpreter's exit, a SIGTERM ends well inside docker/podman stop's default 10 s.
        default=8.0,
        metadata=_setting(
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
        metadata=_setting(
            "Attempts per AWS call for retryable errors (throttling, AWS unreachable), "
            "always within the caller's deadline.",
            parse=parse_int,
            # A caller without a deadline holds a thread for every attempt and pause.
            bounds=Bounds(1, 10),
        ),
    )
    aws_retry_mode: str = field(
        default="standard",
        metadata=_setting(
            "botocore retry mode; adaptive adds botocore's client-side rate limiter.",
            choices=("standard", "adaptive"),
        ),
    )
    aws_backoff_base: float = field(
        default=0.1,
        metadata=_setting(
            "First retry delay; it doubles per attempt, with full jitter.",
            parse=parse_duration,
            bounds=Bounds(0.001, 5 * MINUTE),
        ),
    )
    aws_backoff_max: float = field(
        default=5.0,
        metadata=_setting(
            "Longest retry delay; at least --aws-backoff-base.", parse=parse_duration, bounds=Bounds(0.001, 5 * MINUTE)
        ),
    )
    aws_connect_timeout: float = field(
        default=2.0,
        metadata=_setting("Timeout to connect to AWS.", parse=parse_duration, bounds=Bounds(0.001, 5 * MINUTE)),
    )
    aws_read_timeout: float = field(
        default=5.0,
        metadata=_setting(
            "Timeout for one AWS attempt to answer.", parse=parse_duration, bounds=Bounds(0.001, 5 * MINUTE)
        ),
    )
    timestamp_skew: float = field(
        default=300.0,
        metadata=_setting(
            "How far in the future a usage timestamp may be (clock skew between hosts).",
            parse=parse_duration,
            bounds=Bounds(0, HOUR),  # a clock an hour off is broken, not skewed
        ),
    )
    log_level: str = field(
        default="info",
        metadata=_setting("Lowest log level written.", choices=("debug", "info", "warning", "error")),
    )
    tls_cert: str = field(
        default="", metadata=_setting("PEM certificate chain to serve TLS with.", metavar="PATH")
    )
    tls_key: str = field(
        default="", metadata=_setting("PEM private key for --tls-cert.", metavar="PATH")
    )
    tls_client_ca: str = field(
        default="",
        metadata=_setting(
            "PEM CA bundle; when set, clients must present a certificate it signed (mTLS).",
            metavar="PATH",
        ),
    )
    metrics_listen: str = field(
        default="",
        metadata=_setting(
            "Address to serve Prometheus metrics on, HOST:PORT (path /metrics); one scrape shows the "
            "total of all --processes. Empty: no metrics endpoint.",
            metavar="HOST:PORT",
        ),
    )
    metrics_max_series: int = field(
        default=1000,
        metadata=_setting(
            "Most product and dimension pairs one process labels its quantity metrics with; the "
            "quantities of any more are counted under \"other\" (metering_gateway_usage_series_overflow_total "
            "says how often), so callers cannot grow the scrape without bound.",
            parse=parse_int,
            bounds=Bounds(1, 100_000),
        ),
    )
    authz_policy: str = field(
        default="",
        metadata=_setting(
            "YAML policy of which mTLS callers (client certificate SAN: a URI such as a SPIFFE ID, or a "
            "DNS name) may call which methods, and meter which products and dimensions. Needs "
            "--tls-client-ca. Empty: every caller the CA admits may call every method.",
            metavar="PATH",
        ),
    )
    spool: str = field(
        default="",
        metadata=_setting(
            "Where RecordUsage keeps events and hourly records: an SQLite file (one pod), or a "
            "postgresql:// URL shared by any number of replicas (libpq's PG* variables and "
            "password file apply; the password is never logged). "
            "Empty disables the UsageRecorderService.",
            metavar="PATH|URL",
        ),
    )
    products: str = field(
        default="",
        metadata=_setting(
            "The products, and their dimensions, this gateway meters: PRODUCT=DIMENSION[,DIMENSION...], "
            "entries separated by ';' (prod-abc123=requests,storage-gb;prod-def456=cpu-hours). Any other "
            "product or dimension is refused before AWS (INVALID_ARGUMENT naming the field), and with --local "
            "the local backend knows these only. Empty: any product and dimension.",
            parse=_products_text,
            metavar="LIST",
        ),
    )
    spool_create: str = field(
        default="yes",
        metadata=_setting(
            "Whether a --spool that does not exist yet may be created: yes; no (start-up fails, "
            "for a spool that must already be there); if-mounted (an SQLite file only when its "
            "directory is a mount point, so a pod whose volume did not mount never starts over "
            "with an empty spool). A new spool is always logged as a warning.",
            choices=("yes", "no", "if-mounted"),
        ),
    )
    spool_connections: int = field(
        default=8,
        metadata=_setting(
            "Most connections one server process opens to a PostgreSQL spool (calls beyond them wait "
            f"up to {SPOOL_POOL_WAIT:g}s, then get SPOOL_UNAVAILABLE); one more holds the sender's lock.",
            parse=parse_int,
            bounds=Bounds(2, 1000),
        ),
    )
    flush_grace: float = field(
        default=300.0,
        metadata=_setting(
            "How long after an hour closes its record is sent (late events still count).",
            parse=parse_duration,
            bounds=Bounds(0, FLUSH_GRACE_MAX),
        ),
    )
    flush_interval: float = field(
        default=30.0,
        metadata=_setting(
            "How often the sender looks for records to send.",
            parse=parse_duration,
            # 0 busy-loops the sender; a long pause eats the time left to send (FLUSH_GRACE_MAX).
            bounds=Bounds(0.1, 15 * MINUTE),
        ),
    )
    aws_max_rps: float = field(
        default=10.0,
        metadata=_setting(
            "Most MeterUsage calls a second the sender makes.",
            parse=parse_number,
            # At least one call every 10 s (360 an hour); far above any MeterUsage quota above: more is a typo.
            bounds=Bounds(0.1, 1000),
        ),
    )
    flush_on_shutdown: bool = field(
        default=False,
        metadata=_setting(
            "On SIGTERM, also send the current, still open hour. Use it for pods that will "
            "not come back; usage recorded later in that hour is carried to the next hour.",
            parse=parse_bool,
        ),
    )
    event_retention: float = field(
        default=7 * DAY,
        metadata=_setting(
            "How long a repeated event_id is still recognised (the deduplication window): events of "
            "sent records are pruned this long after the record was sent.",
            parse=parse_duration,
            bounds=Bounds(HOUR, 3650 * DAY),  # at least a caller's retries; ten years is plenty
        ),
    )
    record_retention: float = field(
        default=400 * DAY,
        metadata=_setting(
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
            bounds: Bounds | None = f.metadata.get("bounds")
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
            raise ConfigError(f"{who('authz_policy')}: a policy names callers by their client certificate, "
                              "so it needs mTLS (--tls-client-ca, with --tls-cert and --tls-key)")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "authz_policy"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{name.replace('_', '-')}: no such file {path!r}")
        check_tls_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        return self

    @cached_property
    def product_list(self) -> validation.Products | None:
        """--products, parsed; None when unset (any product and dimension)."""
        return validation.Products(parse_products(self.products)) if self.products else None


SETTINGS_FIELDS = tuple(dataclasses.fields(Settings))
_FIELDS = {f.name: f for f in SETTINGS_FIELDS}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _parser_for(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    parse = f.metadata.get("parse")
    if parse is not None:
        return parse
    choices = f.metadata.get("choices")

    def as_choice(text: str) -> str:
        if choices and text not in choices:
            raise ConfigError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return as_choice


def shown_default(f: dataclasses.Field[Any]) -> str:
    """A setting's default as a person would type it (``5m``, ``true``, ``unset``)."""
    default = f.default
    if isinstance(default, bool):
        return "true" if default else "false"
    if f.metadata.get("parse") is parse_duration:
        return format_duration(float(default))  # type: ignore[arg-type]
    if f.metadata.get("parse") is parse_size:
        return format_size(default)  # type: ignore[arg-type]
    return str(default) if default != "" else "unset"


def shown_value(f: dataclasses.Field[Any], value: Any) -> str:
    """A value of setting ``f`` as a person would type it: ``5h``, not 18000.0."""
    if f.metadata.get("parse") is parse_duration and isinstance(value, (int, float)):
        return format_duration(float(value))
    if f.metadata.get("parse") is parse_size and isinstance(value, (int, float)):
        return format_size(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def shown_range(f: dataclasses.Field[Any]) -> str:
    """The values setting ``f`` allows, as in --help and docs/settings.md ("" when unbounded)."""
    bounds: Bounds | None = f.metadata.get("bounds")
    return bounds.describe(lambda v: shown_value(f, v)) if bounds else ""


def _metavar(f: dataclasses.Field[Any]) -> str | None:
    if f.metadata.get("metavar"):
        return str(f.metadata["metavar"])
    if f.metadata.get("choices"):
        return "{" + ",".join(f.metadata["choices"]) + "}"
    names: dict[Any, str] = {parse_duration: "DURATION", parse_int: "N", parse_number: "NUMBER", parse_size: "SIZE"}
    return names.get(f.metadata.get("parse"))


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; the value is parsed later, with the env fallback."""
    for f in SETTINGS_FIELDS:
        allowed = f"; range {shown_range(f)}" if shown_range(f) else ""
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {shown_default(f)}{allowed}]"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if f.type in ("bool", bool):
            kwargs["nargs"] = "?"
            kwargs["const"] = "true"
            kwargs["metavar"] = "BOOL"
        elif _metavar(f):
            kwargs["metavar"] = _metavar(f)
        parser.add_argument(flag_name(f.name), **kwargs)


def settings_from(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Flags, then ``METERING_GATEWAY_*`` variables, then defaults; checked."""
    env = os.environ if env is None else env
    check_variables(env)
    values: dict[str, Any] = {}
    given: dict[str, Given] = {}
    for f in SETTINGS_FIELDS:
        raw = getattr(args, f.name, None) if args is not None else None
        source = flag_name(f.name)
        if raw is None and env_name(f.name) in env:
            raw, source = env[env_name(f.name)], env_name(f.name)
        if raw is None:
            continue
        try:
            values[f.name] = _parser_for(f)(raw)
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
        given[f.name] = Given(source, raw)
    return Settings(**values).check(given)
