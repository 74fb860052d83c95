"""Flags and ``METERING_GATEWAY_*`` variables, read into one frozen Settings.

Each setting is declared once, as a field of :class:`Settings`; the command-line
flag (``--flush-grace``), the environment variable
(``METERING_GATEWAY_FLUSH_GRACE``) and the ``--help`` text are derived from it, so
the three cannot disagree. A flag beats the variable, which beats the default.
AWS settings (credentials, region, endpoint) are deliberately *not* here: they
come from boto3's own conventions (``AWS_REGION``,
``AWS_ENDPOINT_URL_MARKETPLACE_METERING``, the default credential chain).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "METERING_GATEWAY_"


class ConfigError(ValueError):
    """A setting is unusable; the message is one line meant for a person."""


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``"5m"`` → 300.0 seconds. Accepts ms, s, m, h and sums like ``1m30s``."""
    text = text.strip()
    if not _DURATION.match(text):
        raise ConfigError(f"{text!r} is not a duration (examples: 500ms, 30s, 5m, 1h)")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def format_duration(seconds: float) -> str:
    if seconds and seconds == int(seconds) and int(seconds) % 3600 == 0:
        return f"{int(seconds) // 3600}h"
    if seconds and seconds == int(seconds) and int(seconds) % 60 == 0:
        return f"{int(seconds) // 60}m"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{text!r} is not a boolean (use true or false)")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) → (host, port), checked."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
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


def _setting(
    help: str,
    *,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
) -> dict[str, Any]:
    return {"help": help, "parse": parse, "metavar": metavar, "choices": choices}


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
        metadata=_setting("Port of the embedded local backend with --local (0 picks a free one).", parse=int),
    )
    max_workers: int = field(
        default=32,
        metadata=_setting(
            "Threads serving RPCs; also the size of the AWS connection pool.", parse=int
        ),
    )
    processes: int = field(
        default=1,
        metadata=_setting(
            "Server processes sharing the listen port (SO_REUSEPORT). One Python process "
            "serves about one core of MeterUsage calls; use one per core the pod may use. "
            "--spool needs 1 (one sender per spool).",
            parse=int,
        ),
    )
    grace: float = field(
        default=10.0,
        metadata=_setting(
            "On SIGTERM, how long calls in flight may take to finish.", parse=parse_duration
        ),
    )
    aws_max_attempts: int = field(
        default=4,
        metadata=_setting(
            "Attempts per AWS call for retryable errors (throttling, AWS unreachable), "
            "always within the caller's deadline.",
            parse=int,
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
        metadata=_setting("First retry delay; it doubles per attempt, with full jitter.", parse=parse_duration),
    )
    aws_backoff_max: float = field(
        default=5.0, metadata=_setting("Longest retry delay.", parse=parse_duration)
    )
    aws_connect_timeout: float = field(
        default=2.0, metadata=_setting("Timeout to connect to AWS.", parse=parse_duration)
    )
    aws_read_timeout: float = field(
        default=5.0,
        metadata=_setting("Timeout for one AWS attempt to answer.", parse=parse_duration),
    )
    timestamp_skew: float = field(
        default=300.0,
        metadata=_setting(
            "How far in the future a usage timestamp may be (clock skew between hosts).",
            parse=parse_duration,
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
    spool: str = field(
        default="",
        metadata=_setting(
            "SQLite file where RecordUsage keeps events and hourly records. "
            "Empty disables the UsageRecorderService.",
            metavar="PATH",
        ),
    )
    flush_grace: float = field(
        default=300.0,
        metadata=_setting(
            "How long after an hour closes its record is sent (late events still count).",
            parse=parse_duration,
        ),
    )
    flush_interval: float = field(
        default=30.0,
        metadata=_setting("How often the sender looks for records to send.", parse=parse_duration),
    )
    aws_max_rps: float = field(
        default=10.0,
        metadata=_setting("Most MeterUsage calls a second the sender makes.", parse=float),
    )
    flush_on_shutdown: bool = field(
        default=False,
        metadata=_setting(
            "On SIGTERM, also send the current, still open hour. Use it for pods that will "
            "not come back; usage recorded later in that hour is carried to the next hour.",
            parse=parse_bool,
        ),
    )

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    def check(self) -> Settings:
        """Raise ConfigError on the first unusable value; return self."""
        parse_listen(self.listen)
        if self.processes < 1:
            raise ConfigError("processes must be at least 1")
        if self.processes > 1 and self.spool:
            raise ConfigError("spool needs processes 1: one process sends a spool's records")
        if self.max_workers < 1:
            raise ConfigError("max-workers must be at least 1")
        if self.aws_max_attempts < 1:
            raise ConfigError("aws-max-attempts must be at least 1")
        if self.aws_max_rps <= 0:
            raise ConfigError("aws-max-rps must be above 0")
        if not 0 <= self.local_port <= 65535:
            raise ConfigError(f"local-port {self.local_port} is outside 0-65535")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls-cert and tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls-client-ca needs tls-cert and tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{name.replace('_', '-')}: no such file {path!r}")
        return self


SETTINGS_FIELDS = tuple(dataclasses.fields(Settings))


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
    return str(default) if default != "" else "unset"


def _metavar(f: dataclasses.Field[Any]) -> str | None:
    if f.metadata.get("metavar"):
        return str(f.metadata["metavar"])
    if f.metadata.get("choices"):
        return "{" + ",".join(f.metadata["choices"]) + "}"
    parse = f.metadata.get("parse")
    return {parse_duration: "DURATION", int: "N", float: "NUMBER"}.get(parse)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; the value is parsed later, with the env fallback."""
    for f in SETTINGS_FIELDS:
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {shown_default(f)}]"
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
    values: dict[str, Any] = {}
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
    return Settings(**values).check()
