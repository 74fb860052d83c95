"""``--processes N``: N gateway processes serving one port (SO_REUSEPORT).

A Python process serves about one core of MeterUsage calls (the GIL), so the way
to use more cores is more processes, as in grpc's examples/python/multiprocessing.
The parent reserves the port, spawns the workers (spawn, not fork: gRPC must not
be initialised before a fork), says SERVING once every worker is, forwards
SIGTERM so that each drains as a single process would, and fails when a worker
dies, so the platform restarts the whole.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from gateway.assembly import app, metrics_server
from gateway.config import ConfigError, Settings, format_listen
from gateway.observability import logs

log = structlog.get_logger("gateway.workers")
READY_TIMEOUT = 60.0


@contextmanager
def reserve_port(host: str, port: int) -> Iterator[int]:
    """Hold ``host:port`` (a free one for port 0) with SO_REUSEPORT while workers bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc} (is the port in use?)") from None
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def _worker(settings: Settings, endpoint: str | None, index: int, ready: Any) -> None:
    """A worker process: one gateway on the shared port; tells the parent when it serves."""
    logs.configure(settings.log_level, worker=index)
    code = 1
    try:
        code = app.run(
            settings,
            endpoint,
            share_port=True,
            on_ready=lambda port: ready.put((index, port, "")),
            metrics_worker=bool(settings.metrics_listen),
        )
    except ConfigError as exc:
        ready.put((index, 0, str(exc)))
    except Exception as exc:  # the parent must hear of it, not wait for READY_TIMEOUT
        log.exception("worker_failed")
        ready.put((index, 0, f"worker {index} failed: {exc}"))
    finally:
        os._exit(code)  # don't join RPC threads a drain has given up on


def supervise(settings: Settings, endpoint: str | None) -> int:
    app.authorizer(settings)  # refuse a bad --authz-policy once too; each worker loads its own
    session = app.aws_session(settings, os.environ)  # refuse bad AWS settings once, before any worker starts
    app.warn_about_credentials(settings, session)
    host, port = settings.listen_host_port
    # The metrics directory and environment exist before the first worker is spawned.
    with reserve_port(host, port) as bound, metrics_server.for_workers(settings) as exported:
        conf = dataclasses.replace(settings, listen=format_listen(host, bound))
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(conf, endpoint, i, ready), name=f"gateway-worker-{i}")
            for i in range(settings.processes)
        ]
        for proc in procs:
            proc.start()
        stop = app.stop_on_signals()
        try:
            _await_ready(procs, ready, stop)
        except ConfigError:
            _terminate(procs, grace=0)
            raise
        if stop.is_set():
            stop.announce()
            return _terminate(procs, conf.grace)
        app.log_serving(
            conf,
            bound,
            endpoint,
            session.region_name,
            processes=settings.processes,
            pids=[p.pid for p in procs],
            **({"metrics": exported.address} if exported else {}),
        )
        while not stop.wait(0.5):
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                log.error("worker_died", worker=dead[0].name, exitcode=dead[0].exitcode)
                if exported:  # its last word (SERVING, leading) no longer counts while the others drain
                    for proc in dead:
                        exported.process_exited(proc.pid)
                _terminate(procs, conf.grace)
                return 1
        stop.announce()
        return _terminate(procs, conf.grace)


def _await_ready(procs: list[Any], ready: Any, stop: Any) -> None:
    waiting = set(range(len(procs)))
    deadline = READY_TIMEOUT
    while waiting and not stop.is_set():
        try:
            index, _, error = ready.get(timeout=0.2)
        except queue.Empty:
            deadline -= 0.2
            if deadline <= 0 or any(not procs[i].is_alive() for i in waiting):
                raise ConfigError("a worker process did not start; see its log") from None
            continue
        if error:
            raise ConfigError(error)
        waiting.discard(index)


def _terminate(procs: list[Any], grace: float) -> int:
    """SIGTERM every worker; 0 when all exit 0.

    Each worker ends within ``grace`` + app.SHUTDOWN_MARGIN; one that does not is
    killed then, so the whole stops within the same budget as a single process (a
    killed worker is a crash, which the spool is built to survive).
    """
    deadline = time.monotonic() + grace + app.SHUTDOWN_MARGIN
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.error("worker_killed", worker=proc.name, after_s=round(grace + app.SHUTDOWN_MARGIN, 3))
            proc.kill()
            proc.join()
    return 0 if all(p.exitcode == 0 for p in procs) else 1
