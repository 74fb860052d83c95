"""Settings keep their invariants: every number has bounds, checked at start, in one line."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest

from gateway.cli import _parser
from gateway.config import (
    FLUSH_GRACE_MAX,
    SETTINGS_FIELDS,
    ConfigError,
    Settings,
    check_variables,
    env_name,
    flag_name,
    format_duration,
    parse_duration,
    settings_from,
    spec,
)
from gateway.domain import validation
from gateway.recording import placement

# (flag, values just inside, values just outside). Written out, not derived from the
# metadata, so this is the specification the declarations are held to.
BOUNDS = [
    ("--local-port", ["0", "65535"], ["-1", "65536"]),
    ("--max-workers", ["1", "1024"], ["0", "1025"]),
    ("--max-concurrent-rpcs", ["0", "100000"], ["-1", "100001"]),
    ("--processes", ["1", "64"], ["0", "65"]),
    ("--grace", ["0s", "1h"], ["1h1ms"]),
    ("--aws-max-attempts", ["1", "10"], ["0", "11"]),
    ("--aws-backoff-base", ["1ms"], ["0s", "0.5ms", "5m1ms"]),
    ("--aws-backoff-max", ["1ms", "5m"], ["0s", "5m1ms"]),
    ("--aws-connect-timeout", ["1ms", "5m"], ["0s", "0.5ms", "5m1ms"]),
    ("--aws-read-timeout", ["1ms", "5m"], ["0s", "5m1ms"]),
    ("--timestamp-skew", ["0s", "1h"], ["1h1ms"]),
    ("--flush-grace", ["0s", "3h"], ["3h1ms", "5h"]),
    ("--flush-interval", ["100ms", "15m"], ["99ms", "0s", "15m1ms"]),
    ("--aws-max-rps", ["0.1", "1000"], ["0.099", "1e-300", "0", "-1", "1000.001", "nan", "inf", "-inf"]),
    ("--max-aws-calls", ["0", "1023"], ["-1", "1024"]),
    ("--max-message-size", ["64KiB", "65536", "64MiB"], ["65535", "67108865"]),
    ("--max-connections", ["1", "100000"], ["0", "100001"]),
    ("--max-streams-per-connection", ["1", "10000"], ["0", "10001"]),
    ("--max-connection-idle", ["1s", "7d"], ["999ms", "7d1ms"]),
    ("--max-connection-age", ["1s", "7d"], ["999ms", "7d1ms"]),
    ("--max-connection-age-grace", ["0s", "1d"], ["1d1ms"]),
    ("--keepalive-min-time", ["1s", "1d"], ["999ms", "1d1ms"]),
    ("--metrics-max-series", ["1", "100000"], ["0", "100001"]),
    ("--event-retention", ["1h", "400d"], ["59m59s", "3650d1ms"]),
    ("--record-retention", ["7d", "3650d"], ["3650d1ms"]),
    ("--spool-connections", ["2", "1000"], ["1", "1001"]),
    ("--register-usage-key-version", ["0", "2147483647"], ["-1", "2147483648"]),
]


def settings(*argv: str, env: dict[str, str] | None = None) -> Settings:
    return settings_from(_parser().parse_args(["serve", *argv]), env=env or {})


def refusal(*argv: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        settings(*argv, env=env)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_every_number_is_bounded_and_specified_here() -> None:
    numbers = {flag_name(f.name) for f in SETTINGS_FIELDS if f.type in ("int", "float")}
    bounded = {flag_name(f.name) for f in SETTINGS_FIELDS if spec(f).bounds}
    assert numbers == bounded, "a number setting without bounds"
    assert bounded == {flag for flag, _, _ in BOUNDS}, "a bounded setting missing from BOUNDS"


@pytest.mark.parametrize(("flag", "inside"), [(flag, v) for flag, ins, _ in BOUNDS for v in ins])
def test_just_inside_is_accepted(flag: str, inside: str) -> None:
    extra = {
        # The other side of a cross-field rule, moved out of the way.
        "--aws-backoff-base": ["--aws-backoff-max", "5m"],
        "--aws-backoff-max": ["--aws-backoff-base", "1ms"],
        "--max-concurrent-rpcs": ["--max-workers", "1"],
        "--max-aws-calls": ["--max-workers", "1024"],
        "--event-retention": ["--record-retention", "3650d"],
    }.get(flag, [])
    conf = settings(f"{flag}={inside}", *extra)
    name = flag[2:].replace("-", "_")
    [field] = [f for f in SETTINGS_FIELDS if f.name == name]
    assert getattr(conf, name) == pytest.approx(spec(field).parse(inside))


@pytest.mark.parametrize(("flag", "outside"), [(flag, v) for flag, _, outs in BOUNDS for v in outs])
def test_just_outside_names_the_flag_and_the_value_as_written(flag: str, outside: str) -> None:
    message = refusal(f"{flag}={outside}")
    assert message.startswith(f"{flag}: {outside} "), message


def test_message_gives_the_range() -> None:
    assert refusal("--flush-grace=300m") == "--flush-grace: 300m is out of range (allowed: 0s..3h)"
    assert refusal("--aws-max-rps=0") == "--aws-max-rps: 0 is out of range (allowed: 0.1..1000)"
    assert refusal("--aws-max-rps=nan") == "--aws-max-rps: nan is not a finite number"


def test_a_variable_out_of_range_names_the_variable_and_the_flag() -> None:
    message = refusal(env={env_name("flush_grace"): "5h"})
    assert message == "METERING_GATEWAY_FLUSH_GRACE (--flush-grace): 5h is out of range (allowed: 0s..3h)"
    assert refusal(env={env_name("aws_max_rps"): "inf"}).startswith(
        "METERING_GATEWAY_AWS_MAX_RPS (--aws-max-rps): inf "
    )
    assert settings(env={env_name("flush_grace"): "3h"}).flush_grace == 3 * 3600


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_refuses_nan_and_infinity(bad: float) -> None:
    """Also when set in code (durations cannot be written as nan, but can be built so)."""
    floats = [f for f in SETTINGS_FIELDS if f.type == "float"]
    assert len(floats) >= 10
    for f in floats:
        with pytest.raises(ConfigError, match=f"^{flag_name(f.name)}: .* is not a finite number$"):
            dataclasses.replace(Settings(), **{f.name: bad}).check()


def test_values_set_in_code_are_shown_as_a_person_writes_them() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(flush_grace=18000.0).check()
    assert str(caught.value) == "--flush-grace: 5h is out of range (allowed: 0s..3h)"


def test_cross_field_rules_blame_the_setting_given() -> None:
    assert refusal("--max-workers=8", "--max-concurrent-rpcs=7").startswith(
        "--max-concurrent-rpcs: 7 is below --max-workers 8"
    )
    assert settings("--max-workers=8", "--max-concurrent-rpcs=8").concurrent_rpc_limit == 8
    assert refusal("--aws-backoff-max=50ms") == "--aws-backoff-max: 50ms is below --aws-backoff-base 100ms"
    assert refusal("--aws-backoff-base=6s") == "--aws-backoff-base: 6s is above --aws-backoff-max 5s"
    assert refusal("--event-retention=401d") == "--event-retention: 401d is above --record-retention 400d"
    assert refusal("--record-retention=6d") == "--record-retention: 6d is below --event-retention 7d"
    assert (
        refusal("--record-retention=1d", "--event-retention=2d")
        == "--record-retention: 1d is below --event-retention 2d"
    )
    assert settings("--record-retention=1d", "--event-retention=1d").record_retention == 86400
    assert "needs a PostgreSQL spool" in refusal("--processes=2", "--spool=/tmp/s.db")


def test_concurrent_rpc_limit_defaults_to_four_per_worker() -> None:
    assert Settings().concurrent_rpc_limit == 4 * 32
    assert Settings(max_workers=2).concurrent_rpc_limit == 8
    assert Settings(max_workers=2, max_concurrent_rpcs=50).concurrent_rpc_limit == 50


def test_the_defaults_pass() -> None:
    conf = Settings().check()
    assert (conf.event_retention, conf.record_retention) == (7 * 86400, 400 * 86400)


def test_flush_grace_leaves_time_to_send() -> None:
    """An hour's record is due at its end plus the grace and carried once the hour is
    MAX_AGE − SAFETY_MARGIN old: the largest grace must leave 1h30m to send and retry."""
    carried_at = validation.MAX_AGE.total_seconds() - placement.SAFETY_MARGIN
    assert carried_at - 3600 - FLUSH_GRACE_MAX == 90 * 60


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 7 * 86400), ("1d12h", 36 * 3600), ("400d", 400 * 86400), ("90m", 5400), ("0.5ms", 0.0005), ("0s", 0)],
)
def test_durations_with_days(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_durations_are_shown_in_the_largest_whole_unit() -> None:
    shown = [format_duration(s) for s in (604800, 86400 * 3650, 3600 * 5, 5400, 90, 1.5, 0.1, 0.0005, 0)]
    assert shown == ["7d", "3650d", "5h", "90m", "90s", "1500ms", "100ms", "0.5ms", "0s"]


def test_an_unusable_flush_grace_stops_the_real_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--flush-grace", "5h"],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metering-gateway: error:"), result.stderr
    assert lines[0] == "metering-gateway: error: --flush-grace: 5h is out of range (allowed: 0s..3h)"


# -- what the hostile-callers review found -----------------------------------------------------------


@pytest.mark.parametrize(
    "spool",
    [
        ":memory:",
        "file:spool.db?mode=memory",
        "file::memory:?cache=shared",
        "host=db user=alice password=s3cr3tpw dbname=m",
        "dbname=m password=s3cr3tpw",
        "mysql://alice:s3cr3tpw@db/m",
    ],
)
def test_a_spool_that_is_not_a_durable_file_or_url_is_refused_without_its_password(spool: str) -> None:
    message = refusal("--spool", spool)
    assert message.startswith("--spool: ") and "s3cr3tpw" not in message and spool not in message


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--grace", "٥s"),
        ("--max-workers", "١٢"),
        ("--aws-max-rps", "١٠"),
        ("--listen", "127.0.0.1:٥٠٠٥١"),
        ("--max-message-size", "١MiB"),
    ],
)
def test_digits_are_ascii_digits(flag: str, value: str) -> None:
    assert flag[2:].replace("-", " ") in refusal(f"{flag}={value}").replace("-", " ")


def test_sizes_are_written_as_people_write_them() -> None:
    assert settings("--max-message-size=512KiB").max_message_size == 512 * 1024
    assert (
        refusal("--max-message-size=4MB") == "--max-message-size: '4MB' is not a size (examples: 65536, 512KiB, 4MiB)"
    )
    assert refusal("--max-message-size=128MiB") == "--max-message-size: 128MiB is out of range (allowed: 64KiB..64MiB)"


def test_max_aws_calls_leaves_threads_for_the_rest() -> None:
    assert settings().aws_call_limit == 24  # 3/4 of the default 32 workers
    assert settings("--max-workers=1").aws_call_limit == 1
    assert refusal("--max-workers=8", "--max-aws-calls=8").startswith("--max-aws-calls: 8 leaves no thread")


def test_spool_create_takes_yes_no_or_if_mounted() -> None:
    assert settings().spool_create == "yes"
    assert settings("--spool-create=if-mounted").spool_create == "if-mounted"
    assert refusal("--spool-create=maybe").startswith("--spool-create: 'maybe' is not one of yes, no, if-mounted")


# -- --products --------------------------------------------------------------------


def test_products_name_each_product_and_its_dimensions() -> None:
    got = settings_from(env={"METERING_GATEWAY_PRODUCTS": " prod-abc123=requests, storage-gb ;\nprod-def=cpu"})
    assert got.product_list == validation.Products(
        {"prod-abc123": frozenset({"requests", "storage-gb"}), "prod-def": frozenset({"cpu"})}
    )
    assert settings_from(env={}).product_list is None  # unset: any product and dimension


@pytest.mark.parametrize(
    "text, said",
    [
        ("prod-abc123", "'prod-abc123' names no dimensions: write PRODUCT=DIMENSION[,DIMENSION...]"),
        ("prod-abc123=", "'prod-abc123=' names no dimensions"),
        ("bad code!=x", "product code 'bad code!' may contain only letters, digits"),
        ("p=x;p=y", "product 'p' is listed twice"),
        (" ; ", "lists no product"),
    ],
)
def test_a_bad_product_list_stops_start_up_in_one_line(text: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from(env={"METERING_GATEWAY_PRODUCTS": text})
    assert str(caught.value).startswith(f"METERING_GATEWAY_PRODUCTS: {said}") and "\n" not in str(caught.value)


# -- METERING_GATEWAY_* variables --------------------------------------------------


def test_a_misspelt_variable_stops_start_up_with_the_closest_name() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from(env={"METERING_GATEWAY_SPOLL": "/data/spool.db"})
    assert str(caught.value) == (
        "METERING_GATEWAY_SPOLL is set, but no setting has that name: did you mean METERING_GATEWAY_SPOOL?"
    )
    with pytest.raises(ConfigError, match="no setting has that name: see `metering-gateway serve --help`"):
        settings_from(env={"METERING_GATEWAY_XYZZY": "1"})


def test_kubernetes_service_links_and_the_health_commands_variables_are_no_mistake() -> None:
    """Kubernetes sets these in every pod for a Service named metering-gateway (or
    metering-gateway-*), unless the pod turns enableServiceLinks off."""
    links = {
        "METERING_GATEWAY_SERVICE_HOST": "10.0.0.7",
        "METERING_GATEWAY_SERVICE_PORT": "50051",
        "METERING_GATEWAY_SERVICE_PORT_GRPC": "50051",
        "METERING_GATEWAY_PORT": "tcp://10.0.0.7:50051",
        "METERING_GATEWAY_PORT_50051_TCP": "tcp://10.0.0.7:50051",
        "METERING_GATEWAY_PORT_50051_TCP_PROTO": "tcp",
        "METERING_GATEWAY_PORT_50051_TCP_PORT": "50051",
        "METERING_GATEWAY_PORT_50051_TCP_ADDR": "10.0.0.7",
        "METERING_GATEWAY_HEADLESS_SERVICE_HOST": "10.0.0.8",
        "METERING_GATEWAY_METRICS_PORT_9090_TCP_ADDR": "10.0.0.9",
        "METERING_GATEWAY_HEALTH_TARGET": "127.0.0.1:50051",
        "METERING_GATEWAY_HEALTH_TLS_CA": "/ca.pem",
    }
    assert settings_from(env=links) == Settings()


def test_every_variable_the_project_sets_is_a_setting() -> None:
    """The manifests, the Dockerfile and the docs' examples (their fenced blocks; the
    prose may name a misspelt one) set only variables start-up accepts."""
    from support import ROOT

    texts = [
        f.read_text() for f in (*ROOT.glob("deploy/**/*.yaml"), *ROOT.glob("deploy/**/*.tpl"), ROOT / "Dockerfile")
    ]
    texts += [
        block
        for f in (ROOT / "README.md", *ROOT.glob("docs/*.md"))
        for block in re.findall(r"^```.*?^```", f.read_text(), re.MULTILINE | re.DOTALL)
    ]
    named = {m for text in texts for m in re.findall(r"\bMETERING_GATEWAY_[A-Z0-9_]*[A-Z0-9]\b", text)}
    assert len(named) >= 5  # the scan finds them
    for name in sorted(named):
        check_variables({name: "x"})


# -- TLS files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from support.pki import Authority

    ca = Authority(tmp_path_factory.mktemp("pki"), "config")
    return ca, ca.issue("server", server=True), ca.issue("other", server=True)


def tls(**files: object) -> Settings:
    return settings_from(env={f"METERING_GATEWAY_{k.upper()}": str(v) for k, v in files.items()})


def test_good_tls_files_pass(pair: tuple) -> None:
    ca, server, _ = pair
    assert tls(tls_cert=server.cert, tls_key=server.key, tls_client_ca=ca.pem).tls_cert == str(server.cert)


def test_each_bad_tls_file_is_named(pair: tuple, tmp_path) -> None:
    ca, server, other = pair
    text = tmp_path / "hostname"
    text.write_text("gateway-7f9c\n")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n")
    cases = [
        (dict(tls_cert=text, tls_key=server.key), f"tls-cert: '{text}' holds no PEM certificate"),
        (dict(tls_cert=server.cert, tls_key=text), f"tls-key: '{text}' holds no PEM private key"),
        (dict(tls_cert=server.key, tls_key=server.key), f"tls-cert: '{server.key}' holds no PEM certificate"),
        (dict(tls_cert=server.cert, tls_key=encrypted), f"tls-key: '{encrypted}' is an encrypted key"),
        (
            dict(tls_cert=server.cert, tls_key=other.key),
            f"tls-key: '{other.key}' is not the private key of the certificate in '{server.cert}'",
        ),
        (dict(tls_cert=server.cert, tls_key=server.key, tls_client_ca=text), f"tls-client-ca: '{text}' holds no PEM"),
    ]
    for files, said in cases:
        with pytest.raises(ConfigError) as caught:
            tls(**files)
        assert str(caught.value).startswith(said), (files, str(caught.value))


# -- Container sellers: --register-usage, --zero-usage-hours, --agentcore ------------------


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--register-usage", "prod-abc123"], "--register-usage: RegisterUsage needs the public key version"),
        (["--register-usage", "bad code!", "--register-usage-key-version", "1"], "product code 'bad code!'"),
        (["--register-usage-public-key", "/nonexistent.pem"], "--register-usage-public-key: needs --register-usage"),
        (["--zero-usage-hours", "prod-abc123=requests"], "--zero-usage-hours: zero-usage hours are recorded usage"),
        (
            ["--spool", "x.db", "--products", "prod-abc123=requests", "--zero-usage-hours", "prod-abc123=cpu"],
            "--zero-usage-hours: prod-abc123=cpu is not in --products",
        ),
        (
            ["--spool", "x.db", "--agentcore", "--zero-usage-hours", "prod-abc123=requests"],
            "--zero-usage-hours: AgentCore Runtime mode meters per --flush-interval",
        ),
        (["--saas", "--agentcore"], "--agentcore: it is for software in the buyer's account, and --saas runs"),
        (
            ["--saas", "--register-usage", "prod-abc123", "--register-usage-key-version", "1"],
            "--register-usage: it is for software in the buyer's account",
        ),
        (
            ["--saas", "--spool", "x.db", "--zero-usage-hours", "prod-abc123=requests"],
            "--zero-usage-hours: it is for software in the buyer's account",
        ),
    ],
)
def test_container_seller_settings_that_cannot_work_stop_start_up_in_one_line(argv: list[str], said: str) -> None:
    assert said in refusal(*argv)


def test_container_seller_settings_that_work() -> None:
    got = settings(
        "--spool", "x.db", "--products", "prod-abc123=requests,storage-gb", "--zero-usage-hours",
        "prod-abc123=requests", "--register-usage", " prod-abc123 ", "--register-usage-key-version", "1",
    )  # fmt: skip
    assert got.zero_hours == {"prod-abc123": frozenset({"requests"})} and got.register_usage == "prod-abc123"
    assert settings("--agentcore", env={"METERING_GATEWAY_FLUSH_INTERVAL": "1m"}).agentcore is True
    assert settings(env={"METERING_GATEWAY_SAAS": "true"}).saas is True and settings().saas is False
