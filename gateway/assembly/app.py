"""One gateway process: from settings to a serving server, until SIGTERM drains it.

Used as it is for a single process, and by :mod:`gateway.assembly.workers` in each worker
process of ``--processes N``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta

import boto3
import structlog

from gateway import __version__
from gateway.assembly import metrics_server
from gateway.assembly.sidecar import Sidecar
from gateway.aws import credentials
from gateway.aws.backend import BUYER_CREDENTIALS, SELLER_CREDENTIALS, SERVICE, Backend, RetryPolicy, make_client
from gateway.config import ConfigError, Settings
from gateway.metering.service import CallSlots, MeteringServicer
from gateway.observability import metrics
from gateway.recording import gauges
from gateway.recording.lifecycle import Recording, open_recording
from gateway.recording.servicer import RecordingNotEnabled
from gateway.rpc import authz
from gateway.rpc.interceptors import Authorize
from gateway.rpc.server import METERING_SERVICE, RECORDER_SERVICE, Gateway, Servicer
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc

log = structlog.get_logger("gateway")
LOCAL_REGION = "us-east-1"
# Everything a SIGTERM sets off (the drain, stopping the sender, the optional flush,
# closing the spool, a parent's wait for its workers) ends within --grace plus this,
# whatever AWS does, so that --grace below the platform's stop timeout (docker stop:
# 10 s) by this much never gets the process killed.
SHUTDOWN_MARGIN = 1.0
# Of that margin, what the sender always gets to stop cleanly after a drain that took
# the whole grace (it may be idle between ticks; a call in flight is abandoned).
CLOSE_FLOOR = 0.5


def aws_session(settings: Settings, env: Mapping[str, str]) -> boto3.session.Session:
    """The boto3 session: the default chain, or fixed dummy keys for --local."""
    if settings.local:
        return boto3.session.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name=LOCAL_REGION)
    # boto3 reads AWS_DEFAULT_REGION; AWS_REGION is what the other SDKs and ECS/Lambda set.
    session = boto3.session.Session(region_name=env.get("AWS_REGION") or None)
    region = session.region_name
    if not region:
        raise ConfigError("no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION) to the Region the software runs in")
    known = {r for p in session.get_available_partitions() for r in session.get_available_regions(SERVICE, p)}
    if known and region not in known:
        raise ConfigError(f"unknown AWS region {region!r} for AWS Marketplace Metering (AWS_REGION)")
    return session


def authorizer(settings: Settings) -> Authorize | None:
    """The --authz-policy check of every call, or None (every caller the CA admits may call anything).

    Raises ConfigError (one line) for a policy with any error.
    """
    return authz.load_policy(settings.authz_policy).check if settings.authz_policy else None


def warn_about_credentials(settings: Settings, session: boto3.session.Session) -> None:
    if not settings.local:
        for warning in credentials.diagnose(
            session.get_credentials(), os.environ, agentcore=settings.agentcore, saas=settings.saas
        ):
            log.warning("aws_credentials", problem=warning)


class Stop(threading.Event):
    """Set by SIGTERM or SIGINT; the main thread waits on it, then announces it (:meth:`announce`).

    The handler only sets it: a handler runs in the main thread between two of its
    bytecodes, possibly in the middle of writing a log line, holding the log's lock;
    logging from the handler would wait for that lock for ever.
    """

    signal_name = ""

    def announce(self) -> None:
        """The ``shutdown_requested`` line, written by the main thread once it has woken."""
        log.info("shutdown_requested", signal=self.signal_name, pid=os.getpid())


def stop_on_signals() -> Stop:
    """A :class:`Stop` set by SIGTERM or SIGINT."""
    stop = Stop()

    def on_signal(signum: int, _frame: object) -> None:
        stop.signal_name = signal.Signals(signum).name
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def run(
    settings: Settings,
    endpoint: str | None,
    *,
    share_port: bool = False,
    on_ready: Callable[[int], None] | None = None,
    metrics_worker: bool = False,
) -> int:
    """Serve until SIGTERM, then drain; ``endpoint`` overrides AWS's (the local backend).

    ``on_ready(port)`` replaces the ``serving`` log line (a worker tells its parent).
    ``metrics_worker``: a worker of ``--processes N``, whose metrics go to its parent's
    PROMETHEUS_MULTIPROC_DIR; the parent serves them (:mod:`gateway.assembly.metrics_server`).
    """
    stop = stop_on_signals()  # a SIGTERM during start-up must drain, not kill
    authorize = authorizer(settings)  # a bad policy stops start-up before anything else
    session = aws_session(settings, os.environ)
    registry = (
        metrics.install(multiprocess=metrics_worker, max_series=settings.metrics_max_series)
        if settings.metrics_listen
        else None
    )
    # Bound before anything starts, so that a port in use stops start-up with one line.
    exporter = metrics_server.start(settings.metrics_listen, registry) if registry and not metrics_worker else None
    client = make_client(settings, endpoint_url=endpoint, session=session)
    if on_ready is None:  # workers leave it to their parent, which says it once
        warn_about_credentials(settings, session)
    backend = Backend(
        client,
        RetryPolicy(settings.aws_max_attempts, settings.aws_backoff_base, settings.aws_backoff_max),
        credentials_hint=SELLER_CREDENTIALS if settings.saas else BUYER_CREDENTIALS,
    )
    servicers = [
        Servicer(
            METERING_SERVICE,
            MeteringServicer(
                backend,
                future_skew=timedelta(seconds=settings.timestamp_skew),
                slots=CallSlots(settings.aws_call_limit),
                products=settings.product_list,
                agentcore=settings.agentcore,
            ),
            pb_grpc.add_MeteringServiceServicer_to_server,
        ),
    ]
    # --register-usage: the key file is read here, before anything serves (a bad one stops start-up).
    sidecar = Sidecar(settings, client, stop=stop) if settings.register_usage else None
    recording = open_recording(settings, client) if settings.spool else None
    if recording:
        servicers.append(recording_servicer(recording))
    else:  # RecordUsage says how to turn it on, instead of gRPC's bare UNIMPLEMENTED
        servicers.append(
            Servicer(
                RECORDER_SERVICE,
                RecordingNotEnabled(),
                pb_grpc.add_UsageRecorderServiceServicer_to_server,
                serving=False,
            )
        )
    observer = metrics.GrpcMetrics(s.name for s in servicers) if registry else None
    gateway = Gateway(settings, servicers, share_port=share_port, authorize=authorize, observer=observer)
    if exporter is not None:
        assert registry is not None
        metrics_server.scrape_registry(registry, gauges.reader(recording.spool, recording.now) if recording else None)
    port = gateway.start(ready=sidecar is None)  # a sidecar is ready once registered
    if recording:
        recording.watch_health(
            sidecar.recorder_health if sidecar else lambda ok: gateway.set_serving(RECORDER_SERVICE, ok)
        )
    if on_ready is not None:
        on_ready(port)
    else:
        log_serving(
            settings,
            port,
            endpoint,
            session.region_name,
            status="NOT_SERVING" if sidecar else "SERVING",
            **({"metrics": exporter.address} if exporter is not None else {}),
        )
    if sidecar:
        sidecar.start(gateway)
    while not stop.wait(3600):
        pass
    stop.announce()
    deadline = time.monotonic() + settings.grace
    if recording:  # the sender winds down while the server drains, not after
        recording.begin_close()
    gateway.stop(settings.grace)
    if recording:  # after the server drained RecordUsage calls: the flush gets what is left of the grace
        recording.close(flush=settings.flush_on_shutdown, budget=max(deadline - time.monotonic(), CLOSE_FLOOR))
    if exporter is not None:
        exporter.stop()
    return 0


def recording_servicer(recording: Recording) -> Servicer:
    """The UsageRecorderService as the server registers it."""
    return Servicer(RECORDER_SERVICE, recording.servicer, pb_grpc.add_UsageRecorderServiceServicer_to_server)


def log_serving(
    settings: Settings,
    port: int,
    endpoint: str | None,
    region: str | None,
    status: str = "SERVING",
    **extra: object,
) -> None:
    host, _ = settings.listen_host_port
    log.info(
        "serving",
        version=__version__,
        listen=f"{host}:{port}",
        status=status,
        backend=endpoint or "aws",
        region=region,
        tls=bool(settings.tls_cert),
        mtls=bool(settings.tls_client_ca),
        **extra,
    )
