from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator

import grpc
import psycopg
import pytest
from psycopg import sql

from gateway.local_aws import LocalAws
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import FIXED_NOW, Clock, running_gateway, using_clock
from support.postgres import PostgresServer
from support.processes import local_aws_url  # noqa: F401 - the fixture of the process-level tests (test_crash, test_replicas)


@pytest.fixture
def clock() -> Iterator[Clock]:
    """The time of this test's gateway and local AWS: fixed at FIXED_NOW; moves only by ``clock.advance``.

    While the test runs it is also the default clock of ``running_gateway()`` and
    ``request()``, and metering_client's default timestamp (see ``using_clock``).
    """
    with using_clock(Clock(FIXED_NOW)) as fresh:
        yield fresh


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A random generator whose seed is printed (pytest shows it with a failure) and
    replayed by ``TEST_SEED=<seed>``; a new seed each run otherwise."""
    seed = int(os.environ.get("TEST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"random seed {seed}: replay with TEST_SEED={seed} make test PYTEST_ARGS='{request.node.nodeid}'")
    request.node.user_properties.append(("seed", seed))
    return random.Random(seed)


@pytest.fixture
def local_aws(clock: Clock) -> Iterator[LocalAws]:
    backend = LocalAws(quiet=True, clock=clock).start()
    try:
        yield backend
    finally:
        backend.stop()


@pytest.fixture
def gateway_target(local_aws: LocalAws, clock: Clock) -> Iterator[str]:
    with running_gateway(local_aws.endpoint_url, clock=clock) as target:
        yield target


@pytest.fixture
def channel(gateway_target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway_target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.MeteringServiceStub:
    return pb_grpc.MeteringServiceStub(channel)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL 16 for the whole session; tests get their own database from ``postgres_dsn``."""
    with PostgresServer.temporary() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database on the session's server, dropped after the test (even with connections left open)."""
    name = f"test_{uuid.uuid4().hex}"
    dsn = postgres_server.create_database(name)
    yield dsn
    try:
        with psycopg.connect(postgres_server.dsn(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    except psycopg.Error:
        pass  # the server is down; the session's teardown removes its data anyway


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A server of the test's own, for tests that stop, kill or restart it; removed afterwards."""
    with PostgresServer.temporary() as server:
        yield server
