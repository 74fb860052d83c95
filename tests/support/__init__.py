"""Helpers shared by the tests: a live gateway on loopback, status details, the Dockerfile read.

Gateways as separate processes are started by processes.py."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, NoReturn

import boto3
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.aws.backend import Backend, RetryPolicy, make_client
from gateway.config import Settings
from gateway.metering.service import CallSlots, MeteringServicer
from gateway.rpc.server import METERING_SERVICE, Gateway, Servicer
from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from metering_client import convert as client_convert

ROOT = Path(__file__).resolve().parents[2]  # the repository

LOCAL_CREDS = {"aws_access_key_id": "AKIDLOCALTEST", "aws_secret_access_key": "local-secret-never-logged"}


def local_session(**overrides: Any) -> boto3.session.Session:
    return boto3.session.Session(region_name="us-east-1", **{**LOCAL_CREDS, **overrides})


# The instant every time-dependent test starts at. 2 min 30 s past the hour is an
# awkward minute on purpose: "the start of this hour + 10 minutes" is beyond the
# 5-minute skew there, so a test that passes only late in an hour fails every run
# instead of between hh:00 and hh:05 on the wall clock.
FIXED_NOW = datetime(2026, 11, 23, 10, 2, 30, tzinfo=UTC)
Datetime = datetime  # Clock.datetime() shadows the name inside the class


class Clock:
    """Settable time shared by a gateway and the local AWS backend.

    ``clock()`` is epoch seconds (``LocalAws(clock=clock)``), ``clock.datetime()``
    an aware UTC datetime (``MeteringServicer(now=clock.datetime)``). It moves when
    a test calls ``advance``; with ``running`` it also moves with real time from its
    start, for tests whose gateway waits out backoffs for real (they last seconds,
    so the minute barely changes).
    """

    def __init__(self, start: datetime | float = FIXED_NOW, *, running: bool = False) -> None:
        self.now = start.timestamp() if isinstance(start, Datetime) else float(start)
        self._since = time.monotonic() if running else None

    def __call__(self) -> float:
        return self.now if self._since is None else self.now + time.monotonic() - self._since

    def datetime(self) -> Datetime:
        return Datetime.fromtimestamp(self(), UTC)

    def advance(self, seconds: float) -> None:
        self.now += seconds


_clock = Clock(FIXED_NOW)  # the default of running_gateway() and request(); a test's `clock` fixture replaces it


def default_clock() -> Clock:
    """The clock running_gateway() and request() use when given none: fixed, never the wall clock."""
    return _clock


class _ClientDatetime(datetime):
    """metering_client's ``datetime`` under using_clock(): its default timestamp, ``now()``, reads the test's clock."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
        when = default_clock().datetime()
        return when.astimezone(tz) if tz is not None else when.astimezone().replace(tzinfo=None)


@contextmanager
def using_clock(clock: Clock) -> Iterator[Clock]:
    """Make ``clock`` the time of everything in this process while inside.

    It becomes the default of running_gateway() and request(), and the "now" that
    metering_client stamps a call with when given no timestamp, so a caller in the
    test agrees with the gateway and the local backend.
    """
    global _clock
    before, _clock = _clock, clock
    client_datetime, client_convert.datetime = client_convert.datetime, _ClientDatetime  # type: ignore[misc]
    try:
        yield clock
    finally:
        client_convert.datetime = client_datetime  # type: ignore[misc]
        _clock = before


@contextmanager
def running_gateway(
    endpoint_url: str,
    *,
    session: boto3.session.Session | None = None,
    clock: Clock | None = None,
    **settings: Any,
) -> Iterator[str]:
    """A real gateway on 127.0.0.1:<free port> calling ``endpoint_url``; yields the target.

    The gateway's time is ``clock`` (default: :func:`default_clock`), never the wall clock.
    """
    base = {"listen": "127.0.0.1:0", "max_workers": 8, "aws_backoff_base": 0.01, "aws_backoff_max": 0.05, "grace": 1.0}
    conf = dataclasses.replace(Settings(), **{**base, **settings}).check()
    client = make_client(conf, endpoint_url=endpoint_url, session=session or local_session())
    backend = Backend(client, RetryPolicy(conf.aws_max_attempts, conf.aws_backoff_base, conf.aws_backoff_max))
    now = (clock if clock is not None else default_clock()).datetime
    servicer = MeteringServicer(
        backend,
        future_skew=timedelta(seconds=conf.timestamp_skew),
        now=now,
        slots=CallSlots(conf.aws_call_limit),
        products=conf.product_list,
    )
    gateway = Gateway(conf, [Servicer(METERING_SERVICE, servicer, pb_grpc.add_MeteringServiceServicer_to_server)])
    port = gateway.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        gateway.stop(0.5)


def request(**fields: Any) -> pb.MeterUsageRequest:
    """A valid request (now on :func:`default_clock`, 1 unit) with fields overridden."""
    when = fields.pop("when", None) or default_clock().datetime()
    req = pb.MeterUsageRequest(
        product_code=fields.pop("product_code", "prod-abc123"),
        usage_dimension=fields.pop("usage_dimension", "requests"),
    )
    req.timestamp.FromDatetime(when)
    if "usage_quantity" not in fields and "usage_quantity_as_decimal" not in fields:
        fields["usage_quantity"] = 1
    for name, value in fields.items():
        if name == "usage_allocations":
            req.usage_allocations.extend(value)
        else:
            setattr(req, name, value)
    return req


def allocation(quantity: int | str, **tags: str) -> pb.UsageAllocation:
    alloc = pb.UsageAllocation(tags=[pb.Tag(key=k, value=v) for k, v in tags.items()])
    if isinstance(quantity, str):
        alloc.allocated_usage_quantity_as_decimal = quantity
    else:
        alloc.allocated_usage_quantity = quantity
    return alloc


@dataclass
class Details:
    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo
    bad_request: error_details_pb2.BadRequest | None
    retry: error_details_pb2.RetryInfo | None
    infos: int

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.bad_request.field_violations] if self.bad_request else []

    @property
    def violations(self) -> list[tuple[str, str]]:
        """(field, description) of each BadRequest field violation."""
        return [(v.field, v.description) for v in self.bad_request.field_violations] if self.bad_request else []


def details(exc: grpc.RpcError) -> Details:
    """The google.rpc.Status details of a failed call, unpacked."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, f"no grpc-status-details-bin on {exc.code()}: {exc.details()}"
    found: dict[str, Any] = {"info": [], "bad": None, "retry": None}
    for any_msg in status.details:
        if any_msg.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            m = error_details_pb2.ErrorInfo()
            any_msg.Unpack(m)
            found["info"].append(m)
        elif any_msg.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            found["bad"] = error_details_pb2.BadRequest()
            any_msg.Unpack(found["bad"])
        elif any_msg.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            found["retry"] = error_details_pb2.RetryInfo()
            any_msg.Unpack(found["retry"])
    assert found["info"], "no ErrorInfo in the status details"
    return Details(exc.code(), exc.details(), found["info"][0], found["bad"], found["retry"], len(found["info"]))


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    @property
    def exec_form(self) -> list[str]:
        """The JSON argv of ``CMD [...]``, after any options (``--interval=10s CMD``)."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            _, _, text = text.partition("CMD ")
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{self.keyword} is not exec form"
        return value


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Stages of instructions; joins ``\\`` continuations, drops comments."""
    stages: list[list[Instruction]] = [[]]
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            keyword, _, args = logical.strip().partition(" ")
            instruction = Instruction(keyword.upper(), " ".join(args.split()))
            if instruction.keyword == "FROM":
                stages.append([])
            stages[-1].append(instruction)
        logical = ""
    return stages


def first(stage: list[Instruction], keyword: str) -> Instruction:
    [found] = [i for i in stage if i.keyword == keyword]
    return found


# -- the lock -------------------------------------------------------------------------------------


def normalize(name: str) -> str:
    """A distribution's name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock() -> dict[str, Any]:
    """uv.lock, parsed: every install reads its versions."""
    return tomllib.loads((ROOT / "uv.lock").read_text())


def locked_versions() -> dict[str, str]:
    """``name -> version`` of every package the lock pins from a registry (not the workspace's own)."""
    return {normalize(p["name"]): p["version"] for p in lock()["package"] if "registry" in p["source"]}


def required(text: str) -> dict[str, str]:
    """``name -> version`` pinned by a requirements file exported from the lock (``name==version \\``)."""
    return {normalize(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9][\w.-]*)==([\w.+!-]+)", text, re.MULTILINE)}


# -- tests that need a tool this machine may lack -------------------------------------------------

# .ci/run installs every tool the suite can use and sets this: there, a missing tool fails.
REQUIRE_EVERY_TEST = os.environ.get("REQUIRE_EVERY_TEST") == "1"


def unchecked(why: str) -> NoReturn:
    """Skip a test whose tool is missing here, saying which promise goes unchecked;
    under REQUIRE_EVERY_TEST=1 (CI), fail instead: CI runs every test the suite has."""
    if REQUIRE_EVERY_TEST:
        pytest.fail(f"REQUIRE_EVERY_TEST=1, but this test cannot run here: {why}")
    pytest.skip(why)


# -- raw HTTP/2 connections, as a careless or hostile client opens them ------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 4, 6, 7
ENHANCE_YOUR_CALM = 0xB


def h2_frame(kind: int, payload: bytes = b"", flags: int = 0, stream: int = 0) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def h2_connect(target: str) -> socket.socket:
    """A TCP connection to ``target`` that has said the HTTP/2 preface and nothing more: an idle client."""
    host, port = target.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(H2_PREFACE + h2_frame(SETTINGS))
    return conn


def h2_frames_until_closed(conn: socket.socket, timeout: float) -> tuple[list[tuple[int, bytes]], bool]:
    """The frames the server sends within ``timeout`` seconds (kind, payload), and whether it closed the connection."""
    conn.settimeout(0.2)
    buffer, frames = b"", []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            data = conn.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return frames, True
        if not data:
            return frames, True
        buffer += data
        while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
            size = int.from_bytes(buffer[:3], "big")
            frames.append((buffer[3], buffer[9 : 9 + size]))
            buffer = buffer[9 + size :]
    return frames, False
