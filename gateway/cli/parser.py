"""The command line's grammar: every command, flag and value type, and the ``--help``
they print. Values are checked here, so that a mistyped one is a usage error (exit 2)
before anything connects or starts."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from gateway import __version__
from gateway.cli import records_output
from gateway.cli.admin import RECORD_STATES
from gateway.config import (
    ConfigError,
    add_settings_arguments,
    format_duration,
    format_listen,
    parse_duration,
    parse_listen,
)

_MONTH = re.compile(r"(\d{4})-(\d{2})")


def health_target(env: Mapping[str, str]) -> str:
    """Where ``health`` looks by default: METERING_GATEWAY_HEALTH_TARGET, else the
    loopback end of METERING_GATEWAY_LISTEN, so that one variable moves both the
    server and the container's HEALTHCHECK."""
    if env.get("METERING_GATEWAY_HEALTH_TARGET"):
        return env["METERING_GATEWAY_HEALTH_TARGET"]
    try:
        host, port = parse_listen(env.get("METERING_GATEWAY_LISTEN", "127.0.0.1:50051"))
    except ConfigError:
        return "127.0.0.1:50051"
    if host in ("0.0.0.0", "::"):  # every address: this host's loopback is one of them
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return format_listen(host, port)


def _seconds(text: str) -> float:
    """``--timeout``: a duration (``30s``, ``2m``) or bare seconds (``3``, as health always took)."""
    try:
        value = float(text)
    except ValueError:
        try:
            value = parse_duration(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0s and 1h")
    return value


def add_target_arguments(parser: argparse.ArgumentParser, *, timeout: float = 3.0) -> None:
    """How a command reaches a running gateway: the same for health and the admin commands,
    so one set of METERING_GATEWAY_HEALTH_* variables serves both inside the container."""
    parser.add_argument(
        "--target",
        default=health_target(os.environ),
        metavar="HOST:PORT",
        help="the gateway [env METERING_GATEWAY_HEALTH_TARGET; default the local end of "
        "METERING_GATEWAY_LISTEN, else 127.0.0.1:50051]",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=timeout,
        metavar="DURATION",
        help=f"how long to wait for each answer, e.g. 3s [default {format_duration(timeout)}]",
    )
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("METERING_GATEWAY_HEALTH_TLS_CA", ""),
        help="PEM CA to trust: connect over TLS [env METERING_GATEWAY_HEALTH_TLS_CA]",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get("METERING_GATEWAY_HEALTH_TLS_CERT", ""),
        help="PEM client certificate for mTLS [env METERING_GATEWAY_HEALTH_TLS_CERT]",
    )
    parser.add_argument(
        "--tls-key",
        default=os.environ.get("METERING_GATEWAY_HEALTH_TLS_KEY", ""),
        help="PEM client key for mTLS [env METERING_GATEWAY_HEALTH_TLS_KEY]",
    )


def _since(text: str) -> datetime:
    """``--since``: a duration back from now (``6h``) or an RFC 3339 time with its offset."""
    try:
        seconds = parse_duration(text)
    except ConfigError:
        pass
    else:
        try:
            return datetime.now(UTC) - timedelta(seconds=seconds)
        except OverflowError:
            raise argparse.ArgumentTypeError(f"{text!r} reaches back before the year 1") from None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (6h, 30m, 7d) nor an RFC 3339 time (2026-11-03T14:00:00Z)"
        ) from None
    return _utc(when, text)


def _timestamp(text: str) -> datetime:
    """``meter --timestamp``: an RFC 3339 time with its offset."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time (2026-11-03T14:00:00Z)") from None
    return _utc(when, text)


def _utc(when: datetime, text: str) -> datetime:
    """``when`` in UTC; a time without an offset is refused, since a person's local zone is a guess."""
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset (add Z, or +02:00)")
    try:
        return when.astimezone(UTC)  # a protobuf Timestamp holds UTC years 1 to 9999 only
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (years 1 to 9999, in UTC)") from None


def _month(text: str) -> tuple[datetime, datetime]:
    """``--month 2026-11`` → the UTC month's first instant and the next month's."""
    match = _MONTH.fullmatch(text)
    if not match or not 1 <= int(match[2]) <= 12 or int(match[1]) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a month like 2026-11")
    year, month = int(match[1]), int(match[2])
    if (year, month) == (9999, 12):  # the next month's first instant, its end, is past datetime's range
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (0001-01 to 9999-11)")
    start = datetime(year, month, 1, tzinfo=UTC)
    return start, datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


def _limit(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of records (0: all)")
    return int(text)


def _record_id(text: str) -> str:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a record id (the digits in the ID column of records list)")
    return text


def _tag(text: str) -> tuple[str, str]:
    """``--tag key=value``; the gateway checks the key and value themselves."""
    key, equals, value = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key, value


def _meter_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    meter = sub.add_parser(
        "meter",
        help="meter one record through a running gateway (MeterUsage), e.g. to test a listing",
        description="Send one MeterUsage call to a running gateway, which validates it and forwards it to AWS. "
        "Print its metering record id and ClientToken; on failure, the status and every field to fix.",
    )
    meter.add_argument("--product", required=True, help="the product code of the AWS Marketplace listing")
    meter.add_argument("--dimension", required=True, help="the usage dimension")
    meter.add_argument(
        "--quantity", required=True, help="the decimal quantity, sent as typed (usage_quantity_as_decimal), e.g. 17.42"
    )
    meter.add_argument(
        "--timestamp",
        type=_timestamp,
        metavar="TIME",
        help="when the usage happened, RFC 3339 with offset, e.g. 2026-11-03T14:00:00Z [default now]",
    )
    meter.add_argument(
        "--dry-run",
        action="store_true",
        help="only check that AWS would accept it (the gateway's credentials, the product); record nothing",
    )
    meter.add_argument(
        "--client-token",
        metavar="TOKEN",
        help="idempotency token: resend a printed one to retry the same record without metering it "
        "twice [default a new UUID]",
    )
    meter.add_argument(
        "--tag",
        type=_tag,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="allocate the whole quantity to a bucket with this tag; repeat for more tags",
    )
    add_target_arguments(meter, timeout=10.0)


def _records_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    records = sub.add_parser(
        "records",
        help="list, retry and export a running gateway's hourly records",
        description="Admin commands for recorded usage (UsageRecorderService), over gRPC.",
    )
    commands = records.add_subparsers(dest="records_command", required=True)
    listing = commands.add_parser("list", help="the hourly records, newest hour first")
    listing.add_argument("--state", type=str.lower, choices=list(RECORD_STATES), help="only records in this state")
    listing.add_argument("--product", default="", help="only records of this product code")
    listing.add_argument(
        "--since",
        type=_since,
        metavar="DURATION|TIME",
        help="only hours starting at or after now minus a duration (6h) or an RFC 3339 time",
    )
    listing.add_argument("--limit", type=_limit, default=0, help="at most this many records [default 0: all]")
    listing.add_argument(
        "--output",
        choices=list(records_output.FORMATS),
        default="table",
        help="table for a person, json (one array) or csv for machines [default table]",
    )
    add_target_arguments(listing, timeout=10.0)
    retry = commands.add_parser("retry", help="put a FAILED record back in the queue, once its cause is fixed")
    retry.add_argument("record_id", type=_record_id, metavar="ID", help="the record's ID, as records list shows it")
    retry.add_argument(
        "--reconciled",
        action="store_true",
        help="AWS's seller reports hold no record of it: needed when its outcome is unknown",
    )
    add_target_arguments(retry, timeout=10.0)
    export = commands.add_parser("export", help="every record of a UTC month, oldest first, for reconciliation")
    export.add_argument("--month", type=_month, required=True, metavar="YYYY-MM", help="the UTC month, e.g. 2026-11")
    export.add_argument("--output", choices=["csv", "json"], default="csv", help="[default csv]")
    add_target_arguments(export, timeout=10.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metering-gateway",
        description="A gRPC gateway that meters usage to AWS Marketplace (MeterUsage).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Serve MeteringService (and UsageRecorderService with --spool), gRPC health and "
        "reflection. AWS credentials, region and endpoint come from boto3's conventions: the default "
        "credential chain, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_MARKETPLACE_METERING.",
    )
    add_settings_arguments(serve)
    check = sub.add_parser("health", help="exit 0 only when a gateway reports SERVING")
    add_target_arguments(check)
    check.add_argument("--service", default="", help="service name to check; default the whole server")
    _meter_parser(sub)
    _records_parser(sub)
    local = sub.add_parser("local-aws", help="run only the local AWS Metering stand-in (nothing is billed)")
    local.add_argument("--host", default="127.0.0.1", help="address to listen on [default 127.0.0.1]")
    local.add_argument("--port", type=int, default=4599, help="port to listen on [default 4599]")
    local.add_argument(
        "--product",
        action="append",
        default=[],
        metavar="CODE=DIM[,DIM...]",
        help="a known product and its dimensions; repeat. Without any, every product exists",
    )
    local.add_argument("--max-rps", type=float, default=0.0, help="throttle above this many calls a second (0: never)")
    local.add_argument(
        "--public-key-version",
        type=int,
        default=1,
        help="the RegisterUsage public key version it knows [default 1]; any other is InvalidPublicKeyVersionException",
    )
    local.add_argument(
        "--public-key-out",
        default="",
        metavar="PATH",
        help="write its RegisterUsage signing key's public half (PEM) here, for --register-usage-public-key",
    )
    local.add_argument(
        "--agentcore",
        action="store_true",
        help="Amazon Bedrock AgentCore Runtime's rules: a ClientToken required, many records an hour, no allocations",
    )
    return parser
