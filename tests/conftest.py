from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from support import FIXED_NOW, Clock, running_gateway, using_clock

from gateway.local_aws import LocalAws
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc


@pytest.fixture
def clock() -> Iterator[Clock]:
    """The time of this test's gateway and local AWS: fixed at FIXED_NOW; moves only by ``clock.advance``.

    While the test runs it is also the default clock of ``running_gateway()`` and
    ``request()``, and metering_client's default timestamp (see ``using_clock``).
    """
    with using_clock(Clock(FIXED_NOW)) as fresh:
        yield fresh


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
