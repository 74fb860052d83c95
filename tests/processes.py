"""The one launcher of the end-to-end tests: LocalAws and gateways as real processes.

LocalAws runs as its own process (it outlives every gateway, like AWS), each
gateway as another (``python -m gateway serve``), so a test can SIGKILL one and
start the next on the same spool. The ``local_aws_url`` fixture is registered
in conftest.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from recording import wait_for

# What every gateway of these tests runs with: a fast sender, no grace after an
# hour closes, and the open hour metered at SIGTERM.
SERVE_ARGS = ("--listen", "127.0.0.1:0", "--flush-interval", "200ms", "--flush-grace", "0s", "--aws-max-rps", "100",
              "--flush-on-shutdown", "--grace", "5s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, method: str = "GET", body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return json.loads(reply.read())


@pytest.fixture
def local_aws_url(tmp_path: Path) -> Iterator[str]:
    """``python -m gateway local-aws`` on a free port; its log is tmp_path/local-aws.log."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "local-aws", "--port", str(port)],
                            stdout=open(tmp_path / "local-aws.log", "wb"), stderr=subprocess.STDOUT)
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


class GatewayProcess:
    """``python -m gateway serve`` on ``spool`` (a file or a postgresql:// DSN), logging
    to ``directory/name.log``; its JSON log says where it listens."""

    def __init__(self, directory: Path, name: str, aws_url: str, spool: str | Path, *extra: str) -> None:
        self.name = name
        self.log = directory / f"{name}.log"
        env = {**os.environ, "AWS_ENDPOINT_URL_MARKETPLACE_METERING": aws_url, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": "AKIDCRASHTEST", "AWS_SECRET_ACCESS_KEY": "crash-test-secret"}
        args = ["serve", *SERVE_ARGS, "--spool", str(spool), *extra]
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", *args], env=env,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        try:
            self.target = wait_for(self._listening, timeout=30, what=f"{name} to serve")
        except BaseException:
            self.stop()  # no test holds it yet: it would outlive the test
            raise

    def _listening(self) -> str | None:
        assert self.proc.poll() is None, self.log.read_text()
        serving = self.lines("serving")
        return str(serving[0]["listen"]) if serving else None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def lines(self, name: str) -> list[dict]:
        """The log's complete JSON lines that mention ``name`` (a line being written is left for later)."""
        complete = self.log.read_text().split("\n")[:-1]
        return [json.loads(x) for x in complete if f'"{name}"' in x]

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text()[-chars:]

    def stop(self) -> None:
        """For a test's teardown: SIGKILL if still running."""
        if self.alive:
            self.proc.kill()
        self.proc.wait(10)


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
