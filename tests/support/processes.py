"""The one launcher of the tests' processes: gateways (and LocalAws) as real processes.

Every test that runs ``metering-gateway``/``python -m gateway serve`` as a
process starts it through :class:`GatewayProcess`: the caller, container,
TLS, shutdown and CLI tests with its output collected from a pipe
(:func:`gateway_process`), the crash tests with it written to a log file that
outlives the process (:func:`spooled_gateway`), so a test can SIGKILL one and
start the next on the same spool. LocalAws runs as its own process too (it
outlives every gateway, like AWS); its ``local_aws_url`` fixture is registered
in conftest.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from marketplace.metering.v1 import metering_pb2 as pb
from support import ROOT
from support.recording import CRASH_BATCH, make_batch, send, wait_for

BIN = Path(sys.executable).parent  # the dev venv's bin: metering-gateway lives here
SERVE = [sys.executable, "-m", "gateway", "serve"]

# What every gateway of the crash tests runs with: a fast sender, no grace after
# an hour closes, and the open hour metered at SIGTERM.
SERVE_ARGS = (
    "--listen",
    "127.0.0.1:0",
    "--flush-interval",
    "200ms",
    "--flush-grace",
    "0s",
    "--aws-max-rps",
    "100",
    "--flush-on-shutdown",
    "--grace",
    "5s",
)


def free_port() -> int:
    """A port nothing listens on right now, for commands that cannot take port 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool_env(**extra: str) -> dict[str, str]:
    """The environment with the dev venv first on PATH and no METERING_GATEWAY_* leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_GATEWAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class GatewayProcess:
    """A gateway command run as a process, returned once its "serving" log line is out.

    ``argv`` and ``env`` (default: this process's environment) are run from the
    repository root, stdout and stderr together. With ``log`` that output goes to
    the file (read whenever asked, kept after the test); without, it is collected
    from a pipe as it comes. A gateway that does not serve within ``timeout`` (or
    exits first) is killed before the failure is raised, so it never outlives the
    test. As a context manager it is stopped with SIGTERM on leaving.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        log: Path | None = None,
        name: str = "gateway",
        timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.log = log
        self._collected: list[str] = []
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        self.proc: subprocess.Popen[Any]  # bytes to a log file, text from a pipe
        environment = dict(env) if env is not None else None
        if log is not None:
            with open(log, "wb") as out:
                self.proc = subprocess.Popen(
                    list(argv), env=environment, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
                )
        else:
            self.proc = subprocess.Popen(
                list(argv),
                env=environment,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        try:
            self.serving = self.wait_for(lambda e: e.get("event") == "serving", timeout)
        except BaseException:
            self.kill()  # no test holds it yet: it would outlive the test
            raise
        self.target = str(self.serving["listen"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self._collected.append(line)
                self._changed.notify_all()
        self.proc.stdout.close()
        with self._changed:
            self._changed.notify_all()

    def _ended(self) -> bool:
        """Exited, with all of its output there to read."""
        return self.proc.poll() is not None and (self._reader is None or not self._reader.is_alive())

    def output(self) -> str:
        """Everything it has printed so far."""
        if self.log is not None:
            return self.log.read_text(errors="replace")
        with self._changed:
            return "".join(self._collected)

    def tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]

    def lines(self, mention: str | None = None) -> list[dict[str, Any]]:
        """Its JSON log lines, or those that mention ``"mention"`` (an event name, a field
        name, a value); a line still being written is left for later."""
        complete = self.output().split("\n")[:-1] if self.log is not None else self.output().splitlines()
        found = []
        for line in complete:
            if mention is not None and f'"{mention}"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                found.append(entry)
        return found

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        """The first log line matching ``pred``; fails if the process ends or time runs out first."""
        end = time.monotonic() + timeout
        poll = 0.05 if self.log is not None else 0.5  # a pipe's reader wakes the wait; a file is polled
        with self._changed:
            while True:
                ended = self._ended()
                for entry in self.lines():
                    if pred(entry):
                        return entry
                left = end - time.monotonic()
                if ended or left <= 0:
                    why = f"exited with {self.proc.returncode}" if ended else f"still running after {timeout}s"
                    raise AssertionError(f"{self.name}: no matching log line, {why}; output:\n{self.tail()}")
                self._changed.wait(min(left, poll))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _drain(self) -> None:
        """After exit: wait for the last of its output."""
        if self._reader is not None:
            self._reader.join(5)

    def wait(self, timeout: float = 30.0) -> int:
        """Its exit status once it exits by itself (all of its output read)."""
        code = self.proc.wait(timeout)
        self._drain()
        return code

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and its exit status; SIGKILL (and the timeout raised) if it takes longer than ``timeout``."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """For a test's teardown: SIGKILL if still running."""
        if self.alive:
            self.proc.kill()
        self.wait(10)

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.alive:
            self.terminate()
        else:
            self._drain()


def gateway_process(
    *flags: str, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> GatewayProcess:
    """``python -m gateway serve --local --listen 127.0.0.1:0 FLAGS`` (or ``argv``), in :func:`tool_env`
    unless ``env`` is given, output collected; use it in a ``with``."""
    command = list(argv) if argv is not None else [*SERVE, "--local", "--listen", "127.0.0.1:0", *flags]
    return GatewayProcess(command, env if env is not None else tool_env())


def spooled_gateway(
    directory: Path, name: str, aws_url: str, spool: str | Path, *extra: str, args: Sequence[str] = SERVE_ARGS
) -> GatewayProcess:
    """``python -m gateway serve SERVE_ARGS`` (or ``args``) on ``spool`` (a file or a postgresql://
    DSN) calling the local AWS at ``aws_url``, logging to ``directory/name.log``."""
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL_MARKETPLACE_METERING": aws_url,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "AKIDCRASHTEST",
        "AWS_SECRET_ACCESS_KEY": "crash-test-secret",
    }
    return GatewayProcess([*SERVE, *args, "--spool", str(spool), *extra], env, log=directory / f"{name}.log", name=name)


def http_json(url: str, method: str = "GET", body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return json.loads(reply.read())


@pytest.fixture
def local_aws_url(tmp_path: Path) -> Iterator[str]:
    """``python -m gateway local-aws`` on a free port; its log is tmp_path/local-aws.log."""
    port = free_port()
    with open(tmp_path / "local-aws.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "local-aws", "--port", str(port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _reachable(url + "/_local/records"), what="local-aws to listen")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _reachable(url: str) -> bool:
    try:
        http_json(url)
        return True
    except OSError:
        return False


def local_aws_records(url: str) -> list[dict[str, Any]]:
    """What the local AWS process holds (``/_local/records``)."""
    records = http_json(url + "/_local/records")
    assert isinstance(records, list)
    return records


def sums_of_local_records(records: list[dict[str, Any]]) -> dict[tuple[str, str], Decimal]:
    """Metered quantity per (product, dimension), exact."""
    metered: dict[tuple[str, str], Decimal] = {}
    for r in records:
        key = (r["ProductCode"], r["UsageDimension"])
        metered[key] = metered.get(key, Decimal(0)) + Decimal(r["Quantity"])
    return metered


def last_batches_then_sigterm(gateway: GatewayProcess, rng: random.Random) -> list[list[pb.UsageEvent]]:
    """The crash tests' ending: three more batches, all accepted, then SIGTERM, which
    (with --flush-on-shutdown) meters the open hour too; a clean exit."""
    more = [make_batch(rng, 99, n) for n in range(3)]
    for batch in more:
        assert send(gateway.target, batch) == pb.RecordUsageResponse(accepted=CRASH_BATCH)
    gateway.proc.send_signal(signal.SIGTERM)
    assert gateway.proc.wait(30) == 0, gateway.tail()
    return more
