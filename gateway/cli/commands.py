"""What each command does once its arguments parsed: serve, health, meter, records
list/retry/export and local-aws. Each returns the exit code; what it prints is here,
what it asks a running gateway is in :mod:`.admin`."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import NoReturn

import grpc
import structlog
from grpc_health.v1 import health_pb2

from gateway.assembly import app, workers
from gateway.cli import admin, records_output
from gateway.config import ConfigError, Settings
from gateway.local_aws import BANNER, LocalAws
from gateway.observability import logs
from marketplace.metering.v1 import metering_pb2 as pb

# After a month's end, usage may still be carried into its last hours for this long (AWS's six-hour window, margin).
MONTH_SETTLES = timedelta(hours=7)

log = structlog.get_logger("gateway")


def serve(settings: Settings) -> int:
    """Run until SIGTERM: one server process, or ``--processes`` sharing the port."""
    logs.configure(settings.log_level)
    local: LocalAws | None = None
    if settings.local:
        try:
            # Seeded from --products: the local backend knows what the gateway allows, as AWS knows the listing.
            known = settings.product_list.dimensions if settings.product_list else None
            # --agentcore: the backend keeps AgentCore Runtime's rules, as AWS does for an agent there.
            # --register-usage-key-version: it knows the key version the seller was given, as AWS does.
            local = LocalAws(
                port=settings.local_port,
                products=known,
                agentcore=settings.agentcore,
                public_key_version=settings.register_usage_key_version or 1,
            ).start()
        except OSError as exc:
            raise ConfigError(f"cannot start the local backend on port {settings.local_port}: {exc}") from None
        log.warning("local_backend", notice=BANNER)  # said by whoever starts it: nothing is billed
    endpoint = local.endpoint_url if local else None
    try:
        if settings.processes == 1:
            return app.run(settings, endpoint)
        return workers.supervise(settings, endpoint)
    finally:
        if local:
            local.stop()
        log.info("stopped")


def _with_gateway(args: argparse.Namespace, work: Callable[[grpc.Channel], int]) -> int:
    """Run ``work`` on a channel to ``--target``; a failure is one line on stderr (and one per
    field violation) and exit 1."""
    try:
        with admin.channel(args.target, args.tls_ca, args.tls_cert, args.tls_key) as channel:
            return work(channel)
    except grpc.RpcError as exc:
        print(f"{args.target}: {admin.failure(exc)}", file=sys.stderr)
    except OSError as exc:
        print(f"{args.target}: {exc}", file=sys.stderr)
    return 1


def health_check(args: argparse.Namespace) -> int:
    def check(channel: grpc.Channel) -> int:
        try:
            reply = admin.health(channel, args.service, args.timeout)
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
    when = args.timestamp or datetime.now(UTC).replace(microsecond=0)
    stamp = when.isoformat().replace("+00:00", "Z")
    request = admin.meter_request(
        args.product, args.dimension, args.quantity, when, dry_run=args.dry_run, token=token, tags=args.tag
    )

    def send(channel: grpc.Channel) -> int:
        reply = admin.meter_usage(channel, request, args.timeout)
        if reply.dry_run:
            print(f"dry_run: AWS would accept this record (client_token={token})")
        else:
            print(f"metering_record_id={reply.metering_record_id} client_token={token} timestamp={stamp}")
        return 0

    code = _with_gateway(args, send)
    if code:  # the outcome may be unknown (a deadline, a lost connection): the token makes a retry safe
        print(
            f"client_token={token} timestamp={stamp} (to try again without metering twice, resend with "
            f"--client-token {token} --timestamp {stamp})",
            file=sys.stderr,
        )
    return code


def records_list(args: argparse.Namespace) -> int:
    state = admin.RECORD_STATES.get(args.state or "", pb.MeteringRecord.STATE_UNSPECIFIED)
    request = pb.ListMeteringRecordsRequest(state=state, product_code=args.product)
    if args.since is not None:
        request.start_time.FromDatetime(args.since)

    def show(channel: grpc.Channel) -> int:
        records = admin.every_record(channel, request, args.timeout, args.limit)
        sys.stdout.write(records_output.FORMATS[args.output](records))
        return 0

    return _with_gateway(args, show)


def records_export(args: argparse.Namespace) -> int:
    start, end = args.month

    def export(channel: grpc.Channel) -> int:
        records = admin.month_records(channel, start, end, args.timeout)
        if records is None:
            print(
                f"{args.target}: records changed during the export ({admin.EXPORT_READS} reads disagreed); "
                "retry, or export a closed month",
                file=sys.stderr,
            )
            return 1
        if datetime.now(UTC) < end + MONTH_SETTLES:
            print(
                f"note: {start:%Y-%m} is not closed yet (until {end + MONTH_SETTLES:%Y-%m-%dT%H:%M}Z): "
                "usage may still be recorded or carried into it; export it again after that for the final "
                "figures",
                file=sys.stderr,
            )
        sys.stdout.write(records_output.FORMATS[args.output](reversed(records)))  # oldest first
        return 0

    return _with_gateway(args, export)


def records_retry(args: argparse.Namespace) -> int:
    def retry(channel: grpc.Channel) -> int:
        r = admin.retry_record(channel, args.record_id, args.reconciled, args.timeout)
        print(
            f"{args.target}: record {r.record_id} is {records_output.state_name(r.state)} again: {r.product_code} / "
            f"{r.usage_dimension}, hour {records_output.iso(r.hour)}, quantity {r.quantity}, ClientToken "
            f"{r.client_token}; the gateway resends it when due (records list shows how it went)"
        )
        return 0

    return _with_gateway(args, retry)


RECORDS_COMMANDS = {"list": records_list, "retry": records_retry, "export": records_export}


def local_aws(args: argparse.Namespace) -> int:
    """Run only the local backend until SIGTERM or SIGINT (the gateway's own signal handling)."""
    logs.configure("info")
    products = None
    if args.product:
        products = {}
        for spec in args.product:
            code, _, dims = spec.partition("=")
            products[code] = [d for d in dims.split(",") if d]
    try:
        backend = LocalAws(
            args.host,
            args.port,
            products=products,
            max_rps=args.max_rps or None,
            agentcore=args.agentcore,
            public_key_version=args.public_key_version,
        )
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    if args.public_key_out:  # for a gateway's --register-usage-public-key
        try:
            with open(args.public_key_out, "w") as out:
                out.write(backend.registrar.public_key_pem())
        except OSError as exc:
            backend.stop()
            raise ConfigError(f"cannot write --public-key-out {args.public_key_out!r}: {exc}") from None
    stop = app.stop_on_signals()
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
