"""--authz-policy's parser and decider, and the identity rule, without a server (tests/rpc/test_authz.py has one)."""

from __future__ import annotations

import re

import grpc
import pytest
from google.rpc import error_details_pb2

from gateway.config import ConfigError
from gateway.domain.errors import GatewayError
from gateway.rpc.authz import Policy, parse_policy
from gateway.rpc.identity import caller_identity
from marketplace.metering.v1 import metering_pb2 as pb
from support import ROOT

METER = "/marketplace.metering.v1.MeteringService/MeterUsage"
RECORD = "/marketplace.metering.v1.UsageRecorderService/RecordUsage"
LIST = "/marketplace.metering.v1.UsageRecorderService/ListMeteringRecords"
RETRY = "/marketplace.metering.v1.UsageRecorderService/RetryMeteringRecord"
REPORTER = "spiffe://example.org/ns/billing/sa/reporter"
OPS = "ops.billing.svc.cluster.local"

POLICY = f"""
callers:
  - identity: {REPORTER}
    methods:
      - marketplace.metering.v1.MeteringService/MeterUsage
      - marketplace.metering.v1.UsageRecorderService/RecordUsage
    products:
      prod-1234: [requests, storage_gb]
      prod-any-dimension: "*"
  - identity: {OPS}
    methods: ["marketplace.metering.v1.UsageRecorderService/*"]
"""


def meter(product: str = "prod-1234", dimension: str = "requests") -> pb.MeterUsageRequest:
    return pb.MeterUsageRequest(product_code=product, usage_dimension=dimension)


def batch(*pairs: tuple[str, str]) -> pb.RecordUsageRequest:
    return pb.RecordUsageRequest(
        events=[pb.UsageEvent(event_id=f"e{i}", product_code=p, usage_dimension=d) for i, (p, d) in enumerate(pairs)]
    )


def refusal(policy: Policy, identity: str | None, method: str, request: object) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        policy.check(identity, method, request)
    err = caught.value
    assert (err.reason, err.code, err.domain) == (
        "CALLER_NOT_ALLOWED",
        grpc.StatusCode.PERMISSION_DENIED,
        "metering-gateway",
    )
    return err


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(POLICY, "policy.yaml")


def test_a_granted_method_and_product_pass(policy: Policy) -> None:
    policy.check(REPORTER, METER, meter("prod-1234", "storage_gb"))
    policy.check(REPORTER, METER, meter("prod-any-dimension", "whatever"))
    policy.check(REPORTER, RECORD, batch(("prod-1234", "requests"), ("prod-any-dimension", "x")))
    policy.check(
        OPS, LIST, pb.ListMeteringRecordsRequest(product_code="prod-not-granted-to-ops")
    )  # listing: the method alone
    policy.check(OPS, RETRY, pb.RetryMeteringRecordRequest())  # Service/* includes the admin RPC


def test_a_method_not_granted_names_the_caller_and_the_method(policy: Policy) -> None:
    err = refusal(policy, REPORTER, LIST, pb.ListMeteringRecordsRequest())
    assert err.metadata() == {"callerIdentity": REPORTER, "method": LIST.lstrip("/")}
    assert (
        str(err) == f"caller {REPORTER} may not call marketplace.metering.v1.UsageRecorderService/ListMeteringRecords"
    )
    assert refusal(policy, OPS, METER, meter()).metadata()["callerIdentity"] == OPS


def test_a_caller_not_in_the_policy_is_refused_everything(policy: Policy) -> None:
    err = refusal(policy, "spiffe://example.org/ns/other/sa/x", METER, meter())
    assert "does not list it" in str(err)
    # Identities match exactly: no prefixes, no case folding.
    refusal(policy, REPORTER + "/x", METER, meter())
    refusal(policy, OPS.upper(), LIST, pb.ListMeteringRecordsRequest())


def test_a_certificate_without_identity_is_refused(policy: Policy) -> None:
    err = refusal(policy, None, METER, meter())
    assert err.metadata() == {"callerIdentity": "", "method": METER.lstrip("/")}


def test_a_product_not_granted_names_only_the_product(policy: Policy) -> None:
    err = refusal(policy, REPORTER, METER, meter("prod-9999", "requests"))
    assert err.metadata() == {
        "callerIdentity": REPORTER,
        "method": METER.lstrip("/"),
        "productCode": "prod-9999",
        "field": "product_code",
    }
    assert str(err) == f"caller {REPORTER} may not meter product prod-9999"


def test_a_dimension_not_granted_names_only_the_dimension(policy: Policy) -> None:
    err = refusal(policy, REPORTER, METER, meter("prod-1234", "gpu_hours"))
    assert err.metadata() == {
        "callerIdentity": REPORTER,
        "method": METER.lstrip("/"),
        "usageDimension": "gpu_hours",
        "field": "usage_dimension",
    }
    assert str(err) == f"caller {REPORTER} may not meter dimension gpu_hours of product prod-1234"


def test_a_batch_is_refused_whole_by_its_first_refused_event(policy: Policy) -> None:
    err = refusal(
        policy, REPORTER, RECORD, batch(("prod-1234", "requests"), ("prod-1234", "gpu_hours"), ("prod-9", "x"))
    )
    assert err.metadata()["field"] == "events[1].usage_dimension"
    assert err.metadata()["usageDimension"] == "gpu_hours" and "productCode" not in err.metadata()
    assert "(events[1]); nothing in the batch was recorded" in str(err)
    assert refusal(policy, REPORTER, RECORD, batch(("prod-9", "x"))).metadata()["field"] == "events[0].product_code"
    # Granted RecordUsage with no products (OPS, through Service/*): any event is refused, an empty batch is not.
    refusal(policy, OPS, RECORD, batch(("prod-1234", "requests")))
    policy.check(OPS, RECORD, batch())


def test_any_identity_adds_to_every_caller() -> None:
    policy = parse_policy(
        f"""
callers:
  - identity: "*"
    methods:
      - marketplace.metering.v1.UsageRecorderService/ListMeteringRecords
      - marketplace.metering.v1.MeteringService/MeterUsage
    products: {{prod-shared: [requests]}}
  - identity: {REPORTER}
    methods: [marketplace.metering.v1.MeteringService/MeterUsage]
    products: {{prod-1234: "*", prod-shared: [storage_gb], "*": [heartbeat]}}
""",
        "p.yaml",
    )
    policy.check("anyone.example.org", LIST, pb.ListMeteringRecordsRequest())
    policy.check("anyone.example.org", METER, meter("prod-shared", "requests"))
    refusal(policy, "anyone.example.org", METER, meter("prod-shared", "storage_gb"))
    # REPORTER: its own entry and the "*" entry's rights together.
    policy.check(REPORTER, LIST, pb.ListMeteringRecordsRequest())
    for product, dimension in [
        ("prod-shared", "requests"),
        ("prod-shared", "storage_gb"),
        ("prod-1234", "x"),
        ("prod-else", "heartbeat"),
    ]:
        policy.check(REPORTER, METER, meter(product, dimension))
    assert "usageDimension" in refusal(policy, REPORTER, METER, meter("prod-else", "requests")).metadata()
    refusal(policy, None, LIST, pb.ListMeteringRecordsRequest())  # "*" is any identity, never none


@pytest.mark.parametrize("doc", ["docs/authorization.md"])
def test_the_examples_in_the_docs_are_valid_policies(doc: str) -> None:
    text = (ROOT / doc).read_text()
    examples = [e for e in re.findall(r"```yaml\n(.*?)```", text, re.S) if e.lstrip().startswith(("callers:", "#"))]
    assert examples
    for example in examples:
        parse_policy(example, doc)


M = "marketplace.metering.v1.MeteringService/MeterUsage"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "authz-policy p.yaml: the file is empty"),
        ("# only a comment\n", "authz-policy p.yaml: the file is empty"),
        ("callers: [\n  {identity: a\n", "authz-policy p.yaml:3: not valid YAML"),
        ("callers:\n- identity: a\n   methods: [x]\n", "authz-policy p.yaml:3: not valid YAML"),
        (
            "callers:\n  - identity: a\n    methods: [marketplace.metering.v1.MeteringService/MeterUsge]\n",
            "p.yaml:3: callers[0].methods[0]: no method 'marketplace.metering.v1.MeteringService/MeterUsge' "
            "in the proto; "
            f"did you mean '{M}'?",
        ),
        (
            "callers:\n  - identity: a\n    methods: [/marketplace.metering.v1.MeteringService/MeterUsage]\n",
            f"p.yaml:3: callers[0].methods[0]: no method '/{M}' in the proto; did you mean '{M}'?",
        ),
        ("callers:\n  - identity: a\n    methods: [grpc.health.v1.Health/Check]\n", "callers[0].methods[0]: no method"),
        ("callers:\n  - identity: a\n    methods: [Nope/*]\n", "callers[0].methods[0]: no method 'Nope/*'"),
        (
            "callers:\n  - identity: a\n    method: [x]\n",
            "p.yaml:3: callers[0]: unknown key 'method' (allowed: identity, methods, products)",
        ),
        ("caller:\n  - identity: a\n", "p.yaml:1: the file: unknown key 'caller' (allowed: callers)"),
        ("callers: []\n", "p.yaml:1: callers: is an empty list"),
        ("callers:\n", "p.yaml:1: callers: is empty, not a list"),
        ("callers: {identity: a}\n", "callers: is a mapping, not a list"),
        ("- a\n", "p.yaml:1: the file: is a list, not a mapping"),
        ("callers:\n  - identity: a\n", "p.yaml:2: callers[0]: 'methods' is missing"),
        ("callers:\n  - methods: [x]\n", "callers[0]: 'identity' is missing"),
        (
            "callers:\n  - identity: [a]\n    methods: [x]\n",
            "p.yaml:2: callers[0].identity: is a list, not a single value",
        ),
        ("callers:\n  - identity:\n    methods: [x]\n", "callers[0].identity: is empty"),
        ("callers:\n  - identity: a b\n    methods: [x]\n", "callers[0].identity: 'a b' contains whitespace"),
        (
            f"callers:\n  - identity: a\n    methods: [{M}]\n  - identity: a\n    methods: [{M}]\n",
            "p.yaml:4: callers[1].identity: a is listed twice (also at line 2)",
        ),
        (
            f"callers:\n  - identity: a\n    identity: b\n    methods: [{M}]\n",
            "p.yaml:3: callers[0]: 'identity' appears twice",
        ),
        (f"callers:\n  - identity: a\n    methods: [{M}, {M}]\n", f"callers[0].methods[1]: '{M}' is listed twice"),
        (f"callers:\n  - identity: a\n    methods: {M}\n", "callers[0].methods: is the value"),
        (
            f"callers:\n  - identity: a\n    methods: [{M}]\n    products: [p]\n",
            "p.yaml:4: callers[0].products: is a list, not a mapping",
        ),
        (
            f"callers:\n  - identity: a\n    methods: [{M}]\n    products:\n      p: requests\n",
            "p.yaml:5: callers[0].products.p: is the value 'requests'; give a list of dimensions, or \"*\" "
            "for any dimension",
        ),
        (
            f"callers:\n  - identity: a\n    methods: [{M}]\n    products:\n      p: []\n",
            "callers[0].products.p: is an empty list",
        ),
        (
            f"callers:\n  - identity: a\n    methods: [{M}]\n    products:\n      p: [x, x]\n",
            "callers[0].products.p[1]: 'x' is listed twice",
        ),
        (f"callers:\n  - identity: a\n    methods: [{M}]\n    products:\n      p: ['*', x]\n", 'write "*" alone'),
        (
            f"callers:\n  - identity: a\n    methods: [{M}]\n    products:\n      p: [x]\n      p: [y]\n",
            "p.yaml:6: callers[0].products: 'p' appears twice",
        ),
        (
            f"callers:\n  - identity: a\n    methods: [{M}]\n    products:\n      p: [{{a: b}}]\n",
            "callers[0].products.p[0]: is a mapping",
        ),
        ("callers: *x\n", "p.yaml:1: not valid YAML"),
        ("a: 1\n---\nb: 2\n", "not valid YAML"),
        ("[" * 5000, "authz-policy p.yaml: not valid YAML: nested too deeply"),
        ("callers:\n  - identity: " + "{a: " * 5000 + "\n", "not valid YAML: nested too deeply"),
    ],
)
def test_a_bad_policy_is_one_line_naming_the_file_and_the_place(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy(text, "p.yaml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("authz-policy p.yaml"), message
    assert expected in message


def test_text_is_taken_as_written() -> None:
    # YAML would read these as numbers and booleans; a product code or dimension is the text as written.
    policy = parse_policy(
        f"callers:\n  - identity: a\n    methods: [{M}]\n    products:\n      0123: [yes, 1.50]\n", "p"
    )
    policy.check("a", METER, meter("0123", "yes"))
    policy.check("a", METER, meter("0123", "1.50"))
    refusal(policy, "a", METER, meter("123", "yes"))


# What grpcio's auth_context() holds after a verified mTLS handshake (measured with grpcio 1.85: the SANs
# by kind, in certificate order; other keys left out here).
BOTH = {
    "x509_subject_alternative_name": [b"a.example.org", b"spiffe://example.org/ns/x/sa/y", b"spiffe://example.org/b"],
    "peer_dns": [b"a.example.org"],
    "peer_uri": [b"spiffe://example.org/ns/x/sa/y", b"spiffe://example.org/b"],
    "x509_common_name": [b"both"],
}


@pytest.mark.parametrize(
    ("auth_context", "identity"),
    [
        (BOTH, "spiffe://example.org/ns/x/sa/y"),  # the first URI SAN, though a DNS SAN comes first
        ({"peer_dns": [b"ops.svc", b"ops2.svc"], "x509_common_name": [b"dns"]}, "ops.svc"),
        ({"x509_common_name": [b"no-sans"], "x509_subject": [b"CN=no-sans"]}, None),  # the CN is never an identity
        ({"peer_email": [b"a@b.c"], "peer_ip": [b"10.0.0.1"]}, None),
        ({"transport_security_type": [b"insecure"]}, None),  # no TLS
        ({}, None),
    ],
)
def test_the_identity_is_the_first_uri_san_else_the_first_dns_san(auth_context: dict, identity: str | None) -> None:
    assert caller_identity(auth_context) == identity


def test_refusal_metadata_joins_the_error_info() -> None:
    err = refusal(parse_policy(POLICY, "p"), REPORTER, METER, meter("prod-9"))
    [info_any] = err.to_status_proto().details
    info = error_details_pb2.ErrorInfo()
    assert info_any.Unpack(info)
    assert dict(info.metadata) == err.metadata() and info.reason == "CALLER_NOT_ALLOWED"
    # AWS's keys come from AWS's fields, whatever else is given.
    aws = GatewayError(
        "ACCESS_DENIED", "m", aws_code="AccessDeniedException", extra_metadata={"awsErrorCode": "x", "k": "v"}
    )
    assert aws.metadata() == {"awsErrorCode": "AccessDeniedException", "k": "v"}


SAAS_POLICY = f"""
callers:
  - identity: {REPORTER}
    methods:
      - marketplace.metering.v1.MeteringService/*
      - marketplace.metering.v1.UsageRecorderService/RecordUsage
    products:
      prod-1234: [requests]
  - identity: {OPS}
    methods: ["marketplace.metering.v1.MeteringService/*", "marketplace.metering.v1.UsageRecorderService/*"]
    products: {{"*": "*"}}
"""
BATCH = "/marketplace.metering.v1.MeteringService/BatchMeterUsage"
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef0"


def test_saas_usage_is_held_to_the_products_a_caller_may_meter() -> None:
    """A legacy record names its product (the request's); usage of a license names none the
    gateway can check, whatever product an event says, so only a grant of every product
    covers it."""
    policy = parse_policy(SAAS_POLICY, "policy.yaml")
    legacy = pb.BatchMeterUsageRequest(
        product_code="prod-1234", usage_records=[pb.UsageRecord(dimension="requests", customer_identifier="c")]
    )
    policy.check(REPORTER, BATCH, legacy)
    other = pb.BatchMeterUsageRequest(
        product_code="prod-else", usage_records=[pb.UsageRecord(dimension="requests", customer_identifier="c")]
    )
    assert refusal(policy, REPORTER, BATCH, other).extra_metadata["productCode"] == "prod-else"
    by_license = pb.BatchMeterUsageRequest(
        usage_records=[pb.UsageRecord(dimension="requests", customer_aws_account_id="1", license_arn=LICENSE)]
    )
    refused = refusal(policy, REPORTER, BATCH, by_license)
    assert refused.extra_metadata["field"] == "usage_records[0].license_arn" and "license" in refused.message
    event = pb.UsageEvent(
        event_id="e",
        product_code="prod-1234",
        usage_dimension="requests",
        customer_aws_account_id="1",
        license_arn=LICENSE,
    )
    refused = refusal(policy, REPORTER, RECORD, pb.RecordUsageRequest(events=[event]))
    assert refused.extra_metadata["field"] == "events[0].license_arn"  # the product it names is no grant
    policy.check(OPS, BATCH, by_license)  # every product
    policy.check(OPS, RECORD, pb.RecordUsageRequest(events=[event]))
