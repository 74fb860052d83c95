"""MeteringClient: a channel, a default deadline, gRPC's own retries, typed errors."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc

from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from metering_client import convert
from metering_client.convert import (
    Allocation,
    BatchMeterResult,
    Customer,
    Quantity,
    UsageEvent,
    UsageRecord,
)
from metering_client.errors import from_rpc_error

METERING_SERVICE = pb.DESCRIPTOR.services_by_name["MeteringService"].full_name
RECORDER_SERVICE = pb.DESCRIPTOR.services_by_name["UsageRecorderService"].full_name
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")

Pem = bytes | str | os.PathLike[str]
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy (gRFC A6) for UNAVAILABLE and RESOURCE_EXHAUSTED.

    gRPC itself retries, with exponential backoff and jitter, inside the call's
    deadline. Retrying is safe because every MeterUsage call carries a ClientToken
    (this client makes one when the caller gives none), every recorded event an
    event_id, and a BatchMeterUsage retry sends the identical records (AWS answers them
    with the records it kept): a retried request is the same request. gRPC caps
    attempts at 5.

    gRPC also honours the gateway's ``grpc-retry-pushback-ms`` trailer (server
    pushback): negative once the gateway has called AWS, which it already retried
    ``--aws-max-attempts`` times, so no retry here multiplies those calls; otherwise
    the delay before the next attempt.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    backoff_multiplier: float = 2.0

    def service_config(self) -> str:
        """The channel's ``grpc.service_config`` JSON."""
        policy = {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff}s",
            "maxBackoff": f"{self.max_backoff}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(RETRYABLE_CODES),
        }
        names = [{"service": METERING_SERVICE}, {"service": RECORDER_SERVICE}]
        return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


@dataclass(frozen=True)
class MeterResult:
    """What MeterUsage returned, and the ClientToken it was sent with."""

    metering_record_id: str
    dry_run: bool
    client_token: str


@dataclass(frozen=True)
class RecordResult:
    """What RecordUsage did: events newly ``accepted``, ``duplicates`` of events accepted
    before (they add nothing), and of the accepted, those ``carried``: too old for AWS
    to take in their own hour, so metered in the next hour that can."""

    accepted: int
    duplicates: int
    carried: int = 0


def _pem(value: Pem | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def channel_options(retry: RetryPolicy | None, extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    if retry is None:
        return [("grpc.enable_retries", 0), *extra]
    return [("grpc.enable_retries", 1), ("grpc.service_config", retry.service_config()), *extra]


class MeteringClient:
    """A client of the gateway's MeteringService and UsageRecorderService.

    ``MeteringClient("gateway:50051")`` talks plaintext; ``tls=True`` uses the
    system's roots, ``root_certificates`` a private CA, and ``certificate_chain`` with
    ``private_key`` present a client certificate (mTLS). PEMs are bytes or paths.
    Every call has ``default_timeout`` seconds unless given its own ``timeout``;
    failures raise a :class:`metering_client.MeteringError` subclass.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        root_certificates: Pem | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
        default_timeout: float = 10.0,
        retry: RetryPolicy | None = RetryPolicy(),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        opts = channel_options(retry, options)
        if tls or root_certificates is not None or certificate_chain is not None:
            if (certificate_chain is None) != (private_key is None):
                raise ValueError("certificate_chain and private_key go together")
            creds = grpc.ssl_channel_credentials(_pem(root_certificates), _pem(private_key), _pem(certificate_chain))
            self._channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self.default_timeout = default_timeout
        self._metering = pb_grpc.MeteringServiceStub(self._channel)
        self._recorder = pb_grpc.UsageRecorderServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MeteringClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        try:
            return method(request, timeout=self.default_timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def meter_usage(
        self,
        *,
        product_code: str,
        usage_dimension: str,
        quantity: Quantity,
        timestamp: datetime | None = None,
        allocations: Iterable[Allocation | pb.UsageAllocation] = (),
        dry_run: bool = False,
        client_token: str | None = None,
        timeout: float | None = None,
    ) -> MeterResult:
        """Meter one record. ``quantity``: int, Decimal or str, sent as a decimal string.

        ``quantity`` is required (0 is a quantity too): AWS keeps only the first record
        of a dimension's hour, so a forgotten one would bill 0 and refuse the real one.

        ``timestamp`` (aware; default now) is when the usage happened. Without a
        ``client_token`` a fresh UUID is used for this call and all its retries;
        pass your own to make retries across calls (or restarts) safe too.
        """
        token = client_token if client_token is not None else str(uuid.uuid4())
        request = convert.meter_usage_request(
            product_code=product_code,
            usage_dimension=usage_dimension,
            quantity=quantity,
            timestamp_=timestamp,
            allocations=allocations,
            dry_run=dry_run,
            client_token=token,
        )
        reply = self._call(self._metering.MeterUsage, request, timeout)
        return MeterResult(reply.metering_record_id, reply.dry_run, token)

    def batch_meter_usage(
        self,
        records: Iterable[UsageRecord | pb.UsageRecord],
        *,
        product_code: str = "",
        timeout: float | None = None,
    ) -> BatchMeterResult:
        """Meter SaaS usage: 1-25 records of one product, each naming its customer (BatchMeterUsage).

        Leave ``product_code`` empty when the records carry ``license_arn`` (the license
        names the product); give it with the legacy ``customer_identifier``. Records
        without a ``timestamp`` are stamped with the time of this call, all alike.

        A call AWS answered returns normally, whatever each record's status: check
        ``result.results`` (SUCCESS, CUSTOMER_NOT_SUBSCRIBED, DUPLICATE_RECORD). The
        gateway resends records AWS left unprocessed within the deadline; those still
        unprocessed are in ``result.unprocessed``, with their timestamps: send them again
        as they are (the identical record is the same record to AWS, never a second one).
        """
        request = convert.batch_meter_usage_request(records, product_code)
        reply = self._call(self._metering.BatchMeterUsage, request, timeout)
        return convert.batch_meter_result(reply)

    def resolve_customer(self, registration_token: str, *, timeout: float | None = None) -> Customer:
        """The customer a buyer's registration token (the ``x-amzn-marketplace-token`` form field
        of the sign-up page) names (ResolveCustomer). Refused with :class:`InvalidToken`, or
        :class:`ExpiredRegistrationToken` when the buyer took too long."""
        request = pb.ResolveCustomerRequest(registration_token=registration_token)
        return convert.customer(self._call(self._metering.ResolveCustomer, request, timeout))

    def record_usage(
        self, events: Iterable[UsageEvent | pb.UsageEvent], *, timeout: float | None = None
    ) -> RecordResult:
        """Record events durably (UsageRecorderService); the gateway meters them hourly.

        An event without a ``timestamp`` is stamped by the gateway when it first
        accepts it, so building the same events again and resending them after a
        lost reply counts them as duplicates, never as new usage.
        """
        request = pb.RecordUsageRequest(events=[convert.usage_event(e) for e in events])
        reply = self._call(self._recorder.RecordUsage, request, timeout)
        return RecordResult(reply.accepted, reply.duplicates, reply.carried)

    def list_metering_records(
        self,
        *,
        state: pb.MeteringRecord.State.ValueType = pb.MeteringRecord.STATE_UNSPECIFIED,
        product_code: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListMeteringRecordsResponse:
        """One page of hourly records, newest first; pass ``next_page_token`` on."""
        request = pb.ListMeteringRecordsRequest(
            state=state, product_code=product_code, page_size=page_size, page_token=page_token
        )
        return self._call(self._recorder.ListMeteringRecords, request, timeout)
