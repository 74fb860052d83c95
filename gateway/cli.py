"""The ``metering-gateway`` command: serve, health, meter, records (admin), local-aws."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import NoReturn

import grpc
import structlog
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gateway import app, logs, records_output, workers
from gateway.config import (
    ConfigError,
    Settings,
    add_settings_arguments,
    format_duration,
    format_listen,
    parse_duration,
    parse_listen,
    settings_from,
)
from gateway.local_aws import LocalAws
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc

PAGE_SIZE = 1000  # records per ListMeteringRecords call (the server's most)
EXPORT_READS = 3  # full reads of a month at most, for two in a row that agree
# After a month's end, usage may still be carried into its last hours for this long (AWS's six-hour window, margin).
MONTH_SETTLES = timedelta(hours=7)

log = structlog.get_logger("gateway")
DISTRIBUTION = "metering-gateway"  # pyproject.toml's [project] name


def version() -> str:
    """The installed distribution's version, as pip and the image know it: what --version
    and the start-up log line report, so a deployment can be matched to its release."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown"


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
    parser.add_argument("--target", default=health_target(os.environ), metavar="HOST:PORT",
                        help="the gateway [env METERING_GATEWAY_HEALTH_TARGET; default the local end of "
                        "METERING_GATEWAY_LISTEN, else 127.0.0.1:50051]")
    parser.add_argument("--timeout", type=_seconds, default=timeout, metavar="DURATION",
                        help=f"how long to wait for each answer, e.g. 3s [default {format_duration(timeout)}]")
    parser.add_argument("--tls-ca", default=os.environ.get("METERING_GATEWAY_HEALTH_TLS_CA", ""),
                        help="PEM CA to trust: connect over TLS [env METERING_GATEWAY_HEALTH_TLS_CA]")
    parser.add_argument("--tls-cert", default=os.environ.get("METERING_GATEWAY_HEALTH_TLS_CERT", ""),
                        help="PEM client certificate for mTLS [env METERING_GATEWAY_HEALTH_TLS_CERT]")
    parser.add_argument("--tls-key", default=os.environ.get("METERING_GATEWAY_HEALTH_TLS_KEY", ""),
                        help="PEM client key for mTLS [env METERING_GATEWAY_HEALTH_TLS_KEY]")


_STATES = {"pending": pb.MeteringRecord.STATE_PENDING, "sent": pb.MeteringRecord.STATE_SENT,
           "failed": pb.MeteringRecord.STATE_FAILED}
_MONTH = re.compile(r"(\d{4})-(\d{2})")


def _since(text: str) -> datetime:
    """``--since``: a duration back from now (``6h``) or an RFC 3339 time with its offset."""
    try:
        seconds = parse_duration(text)
    except ConfigError:
        pass
    else:
        try:
            return datetime.now(timezone.utc) - timedelta(seconds=seconds)
        except OverflowError:
            raise argparse.ArgumentTypeError(f"{text!r} reaches back before the year 1") from None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (6h, 30m, 7d) nor an RFC 3339 time (2026-11-03T14:00:00Z)") from None
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
        return when.astimezone(timezone.utc)  # a protobuf Timestamp holds UTC years 1 to 9999 only
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
    start = datetime(year, month, 1, tzinfo=timezone.utc)
    return start, datetime(year + month // 12, month % 12 + 1, 1, tzinfo=timezone.utc)


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
        "meter", help="meter one record through a running gateway (MeterUsage), e.g. to test a listing",
        description="Send one MeterUsage call to a running gateway, which validates it and forwards it to AWS. "
        "Print its metering record id and ClientToken; on failure, the status and every field to fix.")
    meter.add_argument("--product", required=True, help="the product code of the AWS Marketplace listing")
    meter.add_argument("--dimension", required=True, help="the usage dimension")
    meter.add_argument("--quantity", required=True,
                       help="the decimal quantity, sent as typed (usage_quantity_as_decimal), e.g. 17.42")
    meter.add_argument("--timestamp", type=_timestamp, metavar="TIME",
                       help="when the usage happened, RFC 3339 with offset, e.g. 2026-11-03T14:00:00Z [default now]")
    meter.add_argument("--dry-run", action="store_true",
                       help="only check that AWS would accept it (the gateway's credentials, the product); record nothing")
    meter.add_argument("--client-token", metavar="TOKEN",
                       help="idempotency token: resend a printed one to retry the same record without metering it "
                       "twice [default a new UUID]")
    meter.add_argument("--tag", type=_tag, action="append", default=[], metavar="KEY=VALUE",
                       help="allocate the whole quantity to a bucket with this tag; repeat for more tags")
    add_target_arguments(meter, timeout=10.0)


def _records_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    records = sub.add_parser("records", help="list, retry and export a running gateway's hourly records",
                             description="Admin commands for recorded usage (UsageRecorderService), over gRPC.")
    commands = records.add_subparsers(dest="records_command", required=True)
    listing = commands.add_parser("list", help="the hourly records, newest hour first")
    listing.add_argument("--state", type=str.lower, choices=list(_STATES), help="only records in this state")
    listing.add_argument("--product", default="", help="only records of this product code")
    listing.add_argument("--since", type=_since, metavar="DURATION|TIME",
                         help="only hours starting at or after now minus a duration (6h) or an RFC 3339 time")
    listing.add_argument("--limit", type=_limit, default=0, help="at most this many records [default 0: all]")
    listing.add_argument("--output", choices=list(records_output.FORMATS), default="table",
                         help="table for a person, json (one array) or csv for machines [default table]")
    add_target_arguments(listing, timeout=10.0)
    retry = commands.add_parser("retry", help="put a FAILED record back in the queue, once its cause is fixed")
    retry.add_argument("record_id", type=_record_id, metavar="ID", help="the record's ID, as records list shows it")
    retry.add_argument("--reconciled", action="store_true",
                       help="AWS's seller reports hold no record of it: needed when its outcome is unknown")
    add_target_arguments(retry, timeout=10.0)
    export = commands.add_parser("export", help="every record of a UTC month, oldest first, for reconciliation")
    export.add_argument("--month", type=_month, required=True, metavar="YYYY-MM", help="the UTC month, e.g. 2026-11")
    export.add_argument("--output", choices=["csv", "json"], default="csv", help="[default csv]")
    add_target_arguments(export, timeout=10.0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metering-gateway",
        description="A gRPC gateway that meters usage to AWS Marketplace (MeterUsage).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
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
    local.add_argument("--product", action="append", default=[], metavar="CODE=DIM[,DIM...]",
                       help="a known product and its dimensions; repeat. Without any, every product exists")
    local.add_argument("--max-rps", type=float, default=0.0, help="throttle above this many calls a second (0: never)")
    return parser


def serve(settings: Settings) -> int:
    """Run until SIGTERM: one server process, or ``--processes`` sharing the port."""
    logs.configure(settings.log_level)
    local: LocalAws | None = None
    if settings.local:
        try:
            # Seeded from --products: the local backend knows what the gateway allows, as AWS knows the listing.
            known = settings.product_list.dimensions if settings.product_list else None
            local = LocalAws(port=settings.local_port, products=known).start()
        except OSError as exc:
            raise ConfigError(f"cannot start the local backend on port {settings.local_port}: {exc}") from None
    endpoint = local.endpoint_url if local else None
    try:
        if settings.processes == 1:
            return app.run(settings, endpoint)
        return workers.supervise(settings, endpoint)
    finally:
        if local:
            local.stop()
        log.info("stopped")


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(args.target)
    key = Path(args.tls_key).read_bytes() if args.tls_key else None
    cert = Path(args.tls_cert).read_bytes() if args.tls_cert else None
    creds = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes(), key, cert)
    return grpc.secure_channel(args.target, creds)


def _failure(exc: grpc.RpcError) -> str:
    """``CODE: details [REASON]``: the status, and the ErrorInfo reason when the gateway sent one;
    then a line ``  field: description`` per BadRequest field violation, every field to fix."""
    text = f"{exc.code().name}: {exc.details() or ''}"
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:  # details that contradict the status: show the status alone
        status = None
    reason, violations = "", []
    for detail in status.details if status is not None else ():
        if not reason and detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [f"\n  {v.field}: {v.description}" for v in bad.field_violations]
    return (f"{text} [{reason}]" if reason else text) + "".join(violations)


def _with_gateway(args: argparse.Namespace, work: Callable[[grpc.Channel], int]) -> int:
    """Run ``work`` on a channel to ``--target``; a failure is one line on stderr (and one per
    field violation) and exit 1."""
    try:
        with _channel(args) as channel:
            return work(channel)
    except grpc.RpcError as exc:
        print(f"{args.target}: {_failure(exc)}", file=sys.stderr)
    except OSError as exc:
        print(f"{args.target}: {exc}", file=sys.stderr)
    return 1


def health_check(args: argparse.Namespace) -> int:
    def check(channel: grpc.Channel) -> int:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or exc.details():
                raise
            # grpcio's own health servicer says nothing more: say what NOT_FOUND means here.
            print(f"{args.target}: NOT_FOUND: no health status for service {args.service!r}", file=sys.stderr)
            return 1
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"{args.target}: {status}")
        return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1

    return _with_gateway(args, check)


def meter(args: argparse.Namespace) -> int:
    """One MeterUsage call, stamped now unless told otherwise: a person typing means now.

    The token and the timestamp are printed because AWS takes a ClientToken again only
    with the same fields, the timestamp among them: a resend with both meters nothing twice.
    """
    token = args.client_token or str(uuid.uuid4())
    when = args.timestamp or datetime.now(timezone.utc).replace(microsecond=0)
    stamp = when.isoformat().replace("+00:00", "Z")
    request = pb.MeterUsageRequest(product_code=args.product, usage_dimension=args.dimension,
                                   usage_quantity_as_decimal=args.quantity, dry_run=args.dry_run, client_token=token)
    request.timestamp.FromDatetime(when)
    if args.tag:
        request.usage_allocations.add(allocated_usage_quantity_as_decimal=args.quantity,
                                      tags=[pb.Tag(key=key, value=value) for key, value in args.tag])

    def send(channel: grpc.Channel) -> int:
        reply = pb_grpc.MeteringServiceStub(channel).MeterUsage(request, timeout=args.timeout)
        if reply.dry_run:
            print(f"dry_run: AWS would accept this record (client_token={token})")
        else:
            print(f"metering_record_id={reply.metering_record_id} client_token={token} timestamp={stamp}")
        return 0

    code = _with_gateway(args, send)
    if code:  # the outcome may be unknown (a deadline, a lost connection): the token makes a retry safe
        print(f"client_token={token} timestamp={stamp} (to try again without metering twice, resend with "
              f"--client-token {token} --timestamp {stamp})", file=sys.stderr)
    return code


def _every_record(channel: grpc.Channel, request: pb.ListMeteringRecordsRequest, timeout: float,
                  limit: int = 0) -> list[pb.MeteringRecord]:
    """Every page of a listing, newest hour first (at most ``limit`` records when set)."""
    stub = pb_grpc.UsageRecorderServiceStub(channel)
    found: list[pb.MeteringRecord] = []
    request.page_size = min(limit, PAGE_SIZE) if limit else PAGE_SIZE
    while True:
        reply = stub.ListMeteringRecords(request, timeout=timeout)
        found.extend(reply.records)
        if not reply.next_page_token or (limit and len(found) >= limit):
            return found[:limit] if limit else found
        request.page_token = reply.next_page_token


def records_list(args: argparse.Namespace) -> int:
    state = _STATES.get(args.state or "", pb.MeteringRecord.STATE_UNSPECIFIED)
    request = pb.ListMeteringRecordsRequest(state=state, product_code=args.product)
    if args.since is not None:
        request.start_time.FromDatetime(args.since)

    def show(channel: grpc.Channel) -> int:
        records = _every_record(channel, request, args.timeout, args.limit)
        sys.stdout.write(records_output.FORMATS[args.output](records))
        return 0

    return _with_gateway(args, show)


def _agreed(read: Callable[[], list[pb.MeteringRecord]], tries: int = EXPORT_READS) -> list[pb.MeteringRecord] | None:
    """``read()`` again until two reads in a row agree; None after ``tries`` reads.

    A listing pages newest hour first over a live table: a carry between two pages can
    move usage from a record not yet read into one already read, and one read would
    miss it. Two identical reads in a row saw no such move.
    """
    last = read()
    for _ in range(tries - 1):
        again = read()
        if again == last:
            return again
        last = again
    return None


def records_export(args: argparse.Namespace) -> int:
    start, end = args.month
    request = pb.ListMeteringRecordsRequest()
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(end)

    def export(channel: grpc.Channel) -> int:
        def read() -> list[pb.MeteringRecord]:
            pages = pb.ListMeteringRecordsRequest()
            pages.CopyFrom(request)  # from the first page each time
            return _every_record(channel, pages, args.timeout)

        records = _agreed(read)
        if records is None:
            print(f"{args.target}: records changed during the export ({EXPORT_READS} reads disagreed); "
                  "retry, or export a closed month", file=sys.stderr)
            return 1
        if datetime.now(timezone.utc) < end + MONTH_SETTLES:
            print(f"note: {start:%Y-%m} is not closed yet (until {end + MONTH_SETTLES:%Y-%m-%dT%H:%M}Z): "
                  "usage may still be recorded or carried into it; export it again after that for the final "
                  "figures", file=sys.stderr)
        sys.stdout.write(records_output.FORMATS[args.output](reversed(records)))  # oldest first
        return 0

    return _with_gateway(args, export)


def records_retry(args: argparse.Namespace) -> int:
    def retry(channel: grpc.Channel) -> int:
        reply = pb_grpc.UsageRecorderServiceStub(channel).RetryMeteringRecord(
            pb.RetryMeteringRecordRequest(record_id=args.record_id, reconciled=args.reconciled), timeout=args.timeout)
        r = reply.record
        print(f"{args.target}: record {r.record_id} is {records_output.state_name(r.state)} again: {r.product_code} / "
              f"{r.usage_dimension}, hour {records_output.iso(r.hour)}, quantity {r.quantity}, ClientToken "
              f"{r.client_token}; the gateway resends it when due (records list shows how it went)")
        return 0

    return _with_gateway(args, retry)


RECORDS_COMMANDS = {"list": records_list, "retry": records_retry, "export": records_export}


def local_aws(args: argparse.Namespace) -> int:
    logs.configure("info")
    products = None
    if args.product:
        products = {}
        for spec in args.product:
            code, _, dims = spec.partition("=")
            products[code] = [d for d in dims.split(",") if d]
    try:
        backend = LocalAws(args.host, args.port, products=products, max_rps=args.max_rps or None)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    backend.start()
    while not stop.wait(3600):
        pass
    backend.stop()
    return 0


def exit_now(code: int) -> NoReturn:
    """End the process once serve() has drained and closed everything.

    A call still blocked on AWS when the grace ran out has already been
    cancelled for its caller; a normal interpreter exit would join its worker
    thread and so outlive the grace, which is the promise the platform relies on
    (terminationGracePeriodSeconds).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            exit_now(serve(settings_from(args)))
        if args.command == "health":
            return health_check(args)
        if args.command == "meter":
            return meter(args)
        if args.command == "records":
            return RECORDS_COMMANDS[args.records_command](args)
        return local_aws(args)
    except ConfigError as exc:
        print(f"metering-gateway: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
