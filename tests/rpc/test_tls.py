"""TLS (--tls-cert/--tls-key) and mTLS (--tls-client-ca), with certificates made here."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import grpc
import pytest

from metering_client import MeteringClient, MeteringError
from support.pki import Authority, Pair
from support.processes import GatewayProcess, gateway_process, tool_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(directory, "good"), Authority(directory, "rogue")
    return {
        "ca": ca,
        "rogue": rogue,
        "server": ca.issue("gateway", server=True),
        "client": ca.issue("billing-service", server=False),
        "rogue_client": rogue.issue("billing-service", server=False),
    }


def meter(target: str, **tls: object) -> str:
    # The gateway runs as a process on the wall clock, so the client's default timestamp (its wall-clock now)
    # is what it sees: never ahead of the server. Every call here is the same ("tls", 1 unit), so a repeat in the
    # same hour replays the record and one in the next hour makes a new one: either way a record id, at any minute.
    with MeteringClient(target, retry=None, default_timeout=10, **tls) as client:  # type: ignore[arg-type]
        return client.meter_usage(product_code="prod-abc123", usage_dimension="tls", quantity=1).metering_record_id


def health(target: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["metering-gateway", "health", "--target", target, *flags],
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def tls_gateway(pki: dict) -> Iterator[GatewayProcess]:
    server: Pair = pki["server"]
    with gateway_process("--tls-cert", str(server.cert), "--tls-key", str(server.key)) as gw:
        yield gw


@pytest.fixture(scope="module")
def mtls_gateway(pki: dict) -> Iterator[GatewayProcess]:
    server: Pair = pki["server"]
    with gateway_process(
        "--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", str(pki["ca"].pem)
    ) as gw:
        yield gw


def test_tls_serves_a_client_that_trusts_the_ca(tls_gateway: GatewayProcess, pki: dict) -> None:
    assert meter(tls_gateway.target, root_certificates=pki["ca"].pem)
    assert meter(tls_gateway.target, root_certificates=pki["ca"].pem.read_bytes())
    serving = next(e for e in tls_gateway.lines() if e.get("event") == "serving")
    assert (serving["tls"], serving["mtls"]) == (True, False)


@pytest.mark.parametrize("tls", [{}, {"root_certificates": "rogue"}], ids=["plaintext", "untrusted-ca"])
def test_tls_refuses_plaintext_and_an_untrusted_server(tls_gateway: GatewayProcess, pki: dict, tls: dict) -> None:
    kwargs = {k: pki[v].pem for k, v in tls.items()}
    with pytest.raises(MeteringError) as caught:
        meter(tls_gateway.target, **kwargs)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_health_over_tls(tls_gateway: GatewayProcess, pki: dict) -> None:
    ok = health(tls_gateway.target, "--tls-ca", str(pki["ca"].pem))
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
    assert health(tls_gateway.target).returncode != 0  # plaintext against TLS


def test_mtls_accepts_a_client_certificate_from_the_ca(mtls_gateway: GatewayProcess, pki: dict) -> None:
    client: Pair = pki["client"]
    assert meter(
        mtls_gateway.target, root_certificates=pki["ca"].pem, certificate_chain=client.cert, private_key=client.key
    )
    ok = health(
        mtls_gateway.target,
        "--tls-ca",
        str(pki["ca"].pem),
        "--tls-cert",
        str(client.cert),
        "--tls-key",
        str(client.key),
    )
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("who", [None, "rogue_client"], ids=["no-certificate", "certificate-from-another-ca"])
def test_mtls_refuses_other_clients(mtls_gateway: GatewayProcess, pki: dict, who: str | None) -> None:
    creds: dict[str, object] = {"root_certificates": pki["ca"].pem}
    flags = ["--tls-ca", str(pki["ca"].pem)]
    if who is not None:
        pair: Pair = pki[who]
        creds.update(certificate_chain=pair.cert, private_key=pair.key)
        flags += ["--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]
    with pytest.raises(MeteringError) as caught:
        meter(mtls_gateway.target, **creds)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert health(mtls_gateway.target, *flags).returncode != 0
