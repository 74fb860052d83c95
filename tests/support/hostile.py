"""What hostile callers send, shared by the unit tests of the limits and the process-level abuse test."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from marketplace.metering.v1 import metering_pb2 as pb

# A SaaS customer named the way AWS takes (Concurrent Agreements): an account id and a license.
ACCOUNT_ID = "123456789012"
LICENSE_ARN = f"arn:aws:license-manager::{ACCOUNT_ID}:license:l-0123456789abcdef"


def tag_bomb(tags: int, record: bool = False, *, batch: bool = False) -> bytes:
    """One allocation (or event) holding ``tags`` empty tags: two bytes each on the wire.

    A MeterUsage request; with ``record``, a RecordUsage of one event; with ``batch``, a
    BatchMeterUsage of one record, its customer named validly, whose one allocation holds them.
    """
    if record:
        return pb.RecordUsageRequest(events=[pb.UsageEvent(event_id="e", tags=[pb.Tag()] * tags)]).SerializeToString()
    if batch:
        bomb = pb.UsageRecord(
            customer_aws_account_id=ACCOUNT_ID,
            license_arn=LICENSE_ARN,
            dimension="d",
            quantity_as_decimal="1",
            usage_allocations=[pb.UsageAllocation(allocated_usage_quantity_as_decimal="1", tags=[pb.Tag()] * tags)],
        )
        return pb.BatchMeterUsageRequest(usage_records=[bomb]).SerializeToString()
    return pb.MeterUsageRequest(
        product_code="prod", usage_allocations=[pb.UsageAllocation(allocated_usage_quantity=1, tags=[pb.Tag()] * tags)]
    ).SerializeToString()


def trailer_bytes(error: grpc.RpcError) -> int:
    """What a refusal's trailers weigh as the caller received them: every name and value of
    its trailing metadata (grpc-status-details-bin, the serialized google.rpc.Status, among
    them), and the message, which grpcio hands apart."""
    message = error.details() or ""
    return (
        len("grpc-message")
        + len(message.encode())
        + sum(len(m.key) + len(m.value) for m in error.trailing_metadata() or ())
    )


REFLECT = reflection_pb2.ServerReflectionRequest(list_services="")


class IdleStream:
    """A reflection stream that asks once, then stays open and silent until released."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._release = threading.Event()
        self.answers: list[Any] = []
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._run, args=(channel,), daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield REFLECT
        self._release.wait(120)

    def _run(self, channel: grpc.Channel) -> None:
        try:
            for answer in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                self._requests(), timeout=120
            ):
                self.answers.append(answer)
        except grpc.RpcError as exc:
            self.error = exc

    def close(self) -> None:
        self._release.set()
        self._thread.join(30)
