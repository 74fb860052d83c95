"""The ``metering-gateway`` command: serve, health, local-aws."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import app, logs, workers
from gateway.config import ConfigError, Settings, add_settings_arguments, format_listen, parse_listen, settings_from
from gateway.local_aws import LocalAws

log = structlog.get_logger("gateway")


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metering-gateway",
        description="A gRPC gateway that meters usage to AWS Marketplace (MeterUsage).",
    )
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
    check.add_argument("--target", default=health_target(os.environ),
                       help="HOST:PORT of the gateway [env METERING_GATEWAY_HEALTH_TARGET; default the local end of "
                       "METERING_GATEWAY_LISTEN, else 127.0.0.1:50051]")
    check.add_argument("--service", default="", help="service name to check; default the whole server")
    check.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer [default 3]")
    check.add_argument("--tls-ca", default=os.environ.get("METERING_GATEWAY_HEALTH_TLS_CA", ""),
                       help="PEM CA to trust: check over TLS [env METERING_GATEWAY_HEALTH_TLS_CA]")
    check.add_argument("--tls-cert", default=os.environ.get("METERING_GATEWAY_HEALTH_TLS_CERT", ""),
                       help="PEM client certificate for mTLS [env METERING_GATEWAY_HEALTH_TLS_CERT]")
    check.add_argument("--tls-key", default=os.environ.get("METERING_GATEWAY_HEALTH_TLS_KEY", ""),
                       help="PEM client key for mTLS [env METERING_GATEWAY_HEALTH_TLS_KEY]")
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
            local = LocalAws(port=settings.local_port).start()
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


def health_check(args: argparse.Namespace) -> int:
    try:
        with _channel(args) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"{args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.target}: {exc}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


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
        return local_aws(args)
    except ConfigError as exc:
        print(f"metering-gateway: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
