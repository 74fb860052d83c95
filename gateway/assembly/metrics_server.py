"""Assembly: the ``--metrics-listen`` endpoint, for one process or for ``--processes N``.

One process serves its own registry (:func:`gateway.observability.metrics.install`) plus what is
read at scrape time. With ``--processes N`` the parent serves, as prometheus_client's
multiprocess mode has it: it makes a private directory and sets
``PROMETHEUS_MULTIPROC_DIR`` before it spawns the workers, each worker writes its
values to files there, and a scrape of the parent sums them (so one scrape shows the
total of every process). The parent reads the spool's gauges from a spool of its
own (a scrape probes it while it cannot write: the parent has no health watcher to
reopen it after an outage), removes the gauges of a worker that exited, and the
directory at exit.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from gateway.config import ConfigError, Settings, config_error_from, format_listen, parse_listen
from gateway.observability.collector import ScrapeCollector, SpoolReading
from gateway.recording import gauges
from gateway.recording.spool import SpoolError, open_spool

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PARENT_SPOOL_CONNECTIONS = 2  # the parent only reads the spool's gauges, once per scrape


@dataclass
class Endpoint:
    """A running /metrics endpoint (prometheus_client's HTTP server on a thread)."""

    server: WSGIServer
    thread: threading.Thread
    address: str  # HOST:PORT as bound (a port 0 resolved)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start(listen: str, registry: CollectorRegistry) -> Endpoint:
    """Serve ``registry`` on ``listen`` (HOST:PORT); a ConfigError (one line) if it cannot bind."""
    host, port = parse_listen(listen)
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        hint = " (is the port in use?)" if exc.errno == errno.EADDRINUSE else ""
        raise ConfigError(f"cannot serve metrics on {listen}: {exc.strerror or exc}{hint}") from None
    return Endpoint(server, thread, format_listen(host, server.server_port))


def scrape_registry(registry: CollectorRegistry, read: Callable[[], SpoolReading] | None) -> CollectorRegistry:
    """``registry`` plus what is read at scrape time: build info, and the spool's gauges with ``read``."""
    registry.register(ScrapeCollector(read))
    return registry


@dataclass
class WorkersEndpoint:
    """The parent's endpoint for ``--processes N``."""

    endpoint: Endpoint
    directory: str

    @property
    def address(self) -> str:
        return self.endpoint.address

    def process_exited(self, pid: int | None) -> None:
        """A worker is gone: its live gauges (serving, sender leader) no longer count."""
        if pid is not None:
            multiprocess.mark_process_dead(pid, self.directory)


@contextmanager
def for_workers(settings: Settings) -> Iterator[WorkersEndpoint | None]:
    """Before the workers spawn: the directory, the environment they inherit, the
    parent's own spool and its /metrics; all undone on leaving. None without
    ``--metrics-listen``."""
    if not settings.metrics_listen:
        yield None
        return
    directory = tempfile.mkdtemp(prefix="metering-gateway-metrics-")  # private (0700), empty
    os.environ[MULTIPROC_ENV] = directory  # spawned workers inherit it, before they import prometheus_client
    spool = None
    endpoint = None
    try:
        if settings.spool:
            try:
                spool = open_spool(settings.spool, pool_size=PARENT_SPOOL_CONNECTIONS)
            except SpoolError as exc:
                raise config_error_from(exc, "spool") from None
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        endpoint = start(
            settings.metrics_listen,
            scrape_registry(registry, gauges.reader(spool, time.time, probe=True) if spool is not None else None),
        )
        yield WorkersEndpoint(endpoint, directory)
    finally:
        if endpoint is not None:
            endpoint.stop()
        if spool is not None:
            spool.close()
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)
