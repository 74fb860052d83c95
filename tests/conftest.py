from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from support import running_gateway

from gateway.local_aws import LocalAws
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc


@pytest.fixture
def local_aws() -> Iterator[LocalAws]:
    backend = LocalAws(quiet=True).start()
    try:
        yield backend
    finally:
        backend.stop()


@pytest.fixture
def gateway_target(local_aws: LocalAws) -> Iterator[str]:
    with running_gateway(local_aws.endpoint_url) as target:
        yield target


@pytest.fixture
def channel(gateway_target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway_target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.MeteringServiceStub:
    return pb_grpc.MeteringServiceStub(channel)
