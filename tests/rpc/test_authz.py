"""--authz-policy end to end: a real gateway with mTLS, client certificates made here, real channels."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from marketplace.metering.v1 import metering_pb2 as pb
from marketplace.metering.v1 import metering_pb2_grpc as pb_grpc
from support import ROOT, Details, details
from support.pki import Authority, Pair, dns, uri
from support.processes import SERVE, GatewayProcess, gateway_process, tool_env

pytestmark = pytest.mark.slow

REPORTER = "spiffe://example.org/ns/billing/sa/reporter"
OPS = "ops.billing.svc.cluster.local"
STRANGER = "spiffe://example.org/ns/other/sa/stranger"
METER = "marketplace.metering.v1.MeteringService/MeterUsage"
RECORD = "marketplace.metering.v1.UsageRecorderService/RecordUsage"
LIST = "marketplace.metering.v1.UsageRecorderService/ListMeteringRecords"
PRODUCT = "prod-abc123"

POLICY = f"""
callers:
  - identity: {REPORTER}
    methods: [{METER}, {RECORD}]
    products:
      {PRODUCT}: [authz, requests]
  - identity: {OPS}
    methods: ["marketplace.metering.v1.UsageRecorderService/*"]
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    directory = tmp_path_factory.mktemp("authz-pki")
    ca = Authority(directory, "ca")
    return {
        "ca": ca,
        "server": ca.issue("gateway", server=True),
        "reporter": ca.issue("reporter", server=False, sans=[uri(REPORTER)]),
        "ops": ca.issue("ops", server=False, sans=[dns(OPS), dns("second.example.org")]),
        # A DNS SAN listed first, then the URI: the URI SAN is the identity.
        "both": ca.issue("both", server=False, sans=[dns(OPS), uri(REPORTER)]),
        "stranger": ca.issue("stranger", server=False, sans=[uri(STRANGER)]),
        "nameless": ca.issue(REPORTER.replace("/", "_"), server=False),  # no SAN at all; the CN is not an identity
    }


@pytest.fixture(scope="module")
def gateway(pki: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("authz")
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    server: Pair = pki["server"]
    with gateway_process(
        "--tls-cert",
        str(server.cert),
        "--tls-key",
        str(server.key),
        "--tls-client-ca",
        str(pki["ca"].pem),
        "--authz-policy",
        str(policy),
        "--spool",
        str(directory / "spool.db"),
    ) as gw:
        yield gw


def channel(gw: GatewayProcess, pki: dict, who: str) -> grpc.Channel:
    pair: Pair = pki[who]
    creds = grpc.ssl_channel_credentials(pki["ca"].pem.read_bytes(), pair.key.read_bytes(), pair.cert.read_bytes())
    return grpc.secure_channel(gw.target, creds)


def now() -> datetime:
    return datetime.now(UTC)  # the gateway process runs on the wall clock


def meter_request(dimension: str = "authz", product: str = PRODUCT) -> pb.MeterUsageRequest:
    # One unit of the same product and dimension each time: a repeat in the same hour replays the record.
    req = pb.MeterUsageRequest(product_code=product, usage_dimension=dimension, usage_quantity_as_decimal="1")
    req.timestamp.FromDatetime(now())
    return req


def event(event_id: str, dimension: str = "authz", product: str = PRODUCT) -> pb.UsageEvent:
    ev = pb.UsageEvent(
        event_id=event_id, product_code=product, usage_dimension=dimension, usage_quantity_as_decimal="1"
    )
    ev.timestamp.FromDatetime(now())
    return ev


def call(gw: GatewayProcess, pki: dict, who: str, method: str, request: object) -> tuple[object, str]:
    """The reply to ``method`` called as ``who``, and the request id it was sent with."""
    request_id = uuid.uuid4().hex
    service, name = method.rsplit("/", 1)
    with channel(gw, pki, who) as ch:
        stub = (
            pb_grpc.MeteringServiceStub if service.endswith("MeteringService") else pb_grpc.UsageRecorderServiceStub
        )(ch)
        return getattr(stub, name)(request, timeout=10, metadata=(("x-request-id", request_id),)), request_id


def refused(gw: GatewayProcess, pki: dict, who: str, method: str, request: object) -> Details:
    with pytest.raises(grpc.RpcError) as caught:
        call(gw, pki, who, method, request)
    found = details(caught.value)  # grpc_status.rpc_status.from_call on grpc-status-details-bin
    assert found.code == grpc.StatusCode.PERMISSION_DENIED, found
    assert (found.info.reason, found.info.domain, found.infos) == ("CALLER_NOT_ALLOWED", "metering-gateway", 1)
    assert found.bad_request is None and found.retry is None
    return found


def rpc_line(gw: GatewayProcess, request_id: str) -> dict:
    return gw.wait_for(lambda e: e.get("event") == "rpc" and e.get("request_id") == request_id, timeout=10)


def test_an_authorized_caller_is_served_and_logged_by_its_identity(gateway: GatewayProcess, pki: dict) -> None:
    reply, request_id = call(gateway, pki, "reporter", METER, meter_request())
    assert reply.metering_record_id  # type: ignore[attr-defined]
    line = rpc_line(gateway, request_id)
    assert (line["code"], line["caller"]) == ("OK", REPORTER)
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    # A DNS SAN before the URI SAN: the URI is still the identity.
    _, request_id = call(gateway, pki, "both", METER, meter_request())
    assert rpc_line(gateway, request_id)["caller"] == REPORTER
    # A DNS-only certificate is named by its first DNS SAN.
    reply, request_id = call(gateway, pki, "ops", LIST, pb.ListMeteringRecordsRequest(product_code=PRODUCT))
    assert rpc_line(gateway, request_id)["caller"] == OPS


def test_a_method_not_granted_is_refused(gateway: GatewayProcess, pki: dict) -> None:
    found = refused(gateway, pki, "reporter", LIST, pb.ListMeteringRecordsRequest())
    assert dict(found.info.metadata) == {"callerIdentity": REPORTER, "method": LIST}
    assert found.message == f"caller {REPORTER} may not call {LIST}"
    found = refused(gateway, pki, "ops", METER, meter_request())
    assert dict(found.info.metadata) == {"callerIdentity": OPS, "method": METER}


def test_a_caller_not_in_the_policy_is_refused_and_logged(gateway: GatewayProcess, pki: dict) -> None:
    found = refused(gateway, pki, "stranger", METER, meter_request())
    assert found.info.metadata["callerIdentity"] == STRANGER
    [line] = [e for e in gateway.lines("rpc") if e.get("caller") == STRANGER]
    assert (line["code"], line["reason"]) == ("PERMISSION_DENIED", "CALLER_NOT_ALLOWED")


def test_a_product_not_allowed_names_the_product(gateway: GatewayProcess, pki: dict) -> None:
    found = refused(gateway, pki, "reporter", METER, meter_request(product="prod-other"))
    assert dict(found.info.metadata) == {
        "callerIdentity": REPORTER,
        "method": METER,
        "productCode": "prod-other",
        "field": "product_code",
    }


def test_a_dimension_not_allowed_names_only_the_dimension(gateway: GatewayProcess, pki: dict) -> None:
    found = refused(gateway, pki, "reporter", METER, meter_request(dimension="storage_gb"))
    assert dict(found.info.metadata) == {
        "callerIdentity": REPORTER,
        "method": METER,
        "usageDimension": "storage_gb",
        "field": "usage_dimension",
    }
    assert found.message == f"caller {REPORTER} may not meter dimension storage_gb of product {PRODUCT}"


def test_a_batch_with_one_refused_event_is_refused_whole(gateway: GatewayProcess, pki: dict) -> None:
    ids = [f"authz-{uuid.uuid4().hex}" for _ in range(3)]
    batch = pb.RecordUsageRequest(events=[event(ids[0]), event(ids[1], "requests"), event(ids[2], "storage_gb")])
    found = refused(gateway, pki, "reporter", RECORD, batch)
    assert dict(found.info.metadata) == {
        "callerIdentity": REPORTER,
        "method": RECORD,
        "usageDimension": "storage_gb",
        "field": "events[2].usage_dimension",
    }
    assert "(events[2]); nothing in the batch was recorded" in found.message
    # Nothing of it was stored: the allowed events, sent alone, are new.
    reply, _ = call(gateway, pki, "reporter", RECORD, pb.RecordUsageRequest(events=list(batch.events)[:2]))
    assert (reply.accepted, reply.duplicates) == (2, 0)  # type: ignore[attr-defined]
    # Granted RecordUsage (through UsageRecorderService/*) but no products: metering anything is refused.
    found = refused(gateway, pki, "ops", RECORD, pb.RecordUsageRequest(events=[event(f"authz-{uuid.uuid4().hex}")]))
    assert found.info.metadata["productCode"] == PRODUCT


def test_a_certificate_without_uri_or_dns_san_is_refused(gateway: GatewayProcess, pki: dict) -> None:
    request_id = uuid.uuid4().hex
    with channel(gateway, pki, "nameless") as ch, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.MeteringServiceStub(ch).MeterUsage(
            meter_request(), timeout=10, metadata=(("x-request-id", request_id),)
        )
    found = details(caught.value)
    assert (found.code, found.info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED")
    assert dict(found.info.metadata) == {"callerIdentity": "", "method": METER}
    line = rpc_line(gateway, request_id)
    assert line["caller"] is None and line["code"] == "PERMISSION_DENIED"


@pytest.mark.parametrize("who", ["nameless", "stranger", "reporter"])
def test_health_stays_open_to_every_caller_the_ca_admits(gateway: GatewayProcess, pki: dict, who: str) -> None:
    with channel(gateway, pki, who) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_every_rpc_line_carries_the_caller(gateway: GatewayProcess, pki: dict) -> None:
    call(gateway, pki, "reporter", METER, meter_request())
    lines = gateway.lines("rpc")
    assert lines and all("caller" in e and "peer" in e for e in lines if e.get("event") == "rpc")
    # Nothing of a certificate in the log.
    assert "BEGIN CERTIFICATE" not in gateway.output() and "CN=" not in gateway.output()


GOOD = f"callers:\n  - identity: {REPORTER}\n    methods: [{METER}]\n    products: {{{PRODUCT}: [authz]}}\n"


@pytest.mark.parametrize(
    ("text", "processes", "mtls", "expected"),
    [
        ("callers:\n  - identity: a\n   methods: [x]\n", 1, True, "policy.yaml:3: not valid YAML"),
        (GOOD.replace("MeterUsage", "MeterUsge"), 1, True, "policy.yaml:3: callers[0].methods[0]: no method"),
        (GOOD.replace("products", "product"), 1, True, "policy.yaml:4: callers[0]: unknown key 'product'"),
        (GOOD + GOOD.removeprefix("callers:\n"), 1, True, "policy.yaml:5: callers[1].identity"),
        ("", 1, True, "the file is empty"),
        (GOOD, 1, False, "a policy names callers by their client certificate, so it needs mTLS"),
        # --processes N: the parent refuses it before any worker starts.
        (GOOD.replace("MeterUsage", "MeterUsge"), 2, True, "callers[0].methods[0]: no method"),
    ],
    ids=["yaml-syntax", "unknown-method", "unknown-key", "duplicate-identity", "empty", "no-mtls", "processes-2"],
)
def test_a_bad_policy_stops_start_up_with_one_line(
    pki: dict, tmp_path: Path, text: str, processes: int, mtls: bool, expected: str
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    server: Pair = pki["server"]
    tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    if mtls:
        tls += ["--tls-client-ca", str(pki["ca"].pem)]
    done = subprocess.run(
        [
            *SERVE,
            "--local",
            "--listen",
            "127.0.0.1:0",
            "--processes",
            str(processes),
            *tls,
            "--authz-policy",
            str(policy),
        ],
        env=tool_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("metering-gateway: error: ") and expected in done.stderr, done.stderr
    assert '"serving"' not in done.stdout
