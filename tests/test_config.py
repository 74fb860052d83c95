"""Settings keep their invariants: every number has bounds, checked at start, in one line."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest

from gateway import validation
from gateway.recording import placement
from gateway.cli import _parser
from gateway.config import (
    FLUSH_GRACE_MAX,
    SETTINGS_FIELDS,
    ConfigError,
    Settings,
    env_name,
    flag_name,
    format_duration,
    parse_duration,
    settings_from,
)

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
    bounded = {flag_name(f.name) for f in SETTINGS_FIELDS if f.metadata.get("bounds")}
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
    assert getattr(conf, name) == pytest.approx(field.metadata["parse"](inside))


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
    assert refusal(env={env_name("aws_max_rps"): "inf"}).startswith("METERING_GATEWAY_AWS_MAX_RPS (--aws-max-rps): inf ")
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
    assert refusal("--max-workers=8", "--max-concurrent-rpcs=7").startswith("--max-concurrent-rpcs: 7 is below --max-workers 8")
    assert settings("--max-workers=8", "--max-concurrent-rpcs=8").concurrent_rpc_limit == 8
    assert refusal("--aws-backoff-max=50ms") == "--aws-backoff-max: 50ms is below --aws-backoff-base 100ms"
    assert refusal("--aws-backoff-base=6s") == "--aws-backoff-base: 6s is above --aws-backoff-max 5s"
    assert refusal("--event-retention=401d") == "--event-retention: 401d is above --record-retention 400d"
    assert refusal("--record-retention=6d") == "--record-retention: 6d is below --event-retention 7d"
    assert refusal("--record-retention=1d", "--event-retention=2d") == "--record-retention: 1d is below --event-retention 2d"
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
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--flush-grace", "5h"],
                            capture_output=True, text=True, timeout=30, env=dict(os.environ))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metering-gateway: error:"), result.stderr
    assert lines[0] == "metering-gateway: error: --flush-grace: 5h is out of range (allowed: 0s..3h)"


# -- what the hostile-callers review found -----------------------------------------------------------


@pytest.mark.parametrize("spool", [":memory:", "file:spool.db?mode=memory", "file::memory:?cache=shared",
                                   "host=db user=alice password=s3cr3tpw dbname=m", "dbname=m password=s3cr3tpw",
                                   "mysql://alice:s3cr3tpw@db/m"])
def test_a_spool_that_is_not_a_durable_file_or_url_is_refused_without_its_password(spool: str) -> None:
    message = refusal("--spool", spool)
    assert message.startswith("--spool: ") and "s3cr3tpw" not in message and spool not in message


@pytest.mark.parametrize(("flag", "value"), [("--grace", "٥s"), ("--max-workers", "١٢"), ("--aws-max-rps", "١٠"),
                                             ("--listen", "127.0.0.1:٥٠٠٥١"), ("--max-message-size", "١MiB")])
def test_digits_are_ascii_digits(flag: str, value: str) -> None:
    assert flag[2:].replace("-", " ") in refusal(f"{flag}={value}").replace("-", " ")


def test_sizes_are_written_as_people_write_them() -> None:
    assert settings("--max-message-size=512KiB").max_message_size == 512 * 1024
    assert refusal("--max-message-size=4MB") == "--max-message-size: '4MB' is not a size (examples: 65536, 512KiB, 4MiB)"
    assert refusal("--max-message-size=128MiB") == "--max-message-size: 128MiB is out of range (allowed: 64KiB..64MiB)"


def test_max_aws_calls_leaves_threads_for_the_rest() -> None:
    assert settings().aws_call_limit == 24  # 3/4 of the default 32 workers
    assert settings("--max-workers=1").aws_call_limit == 1
    assert refusal("--max-workers=8", "--max-aws-calls=8").startswith("--max-aws-calls: 8 leaves no thread")


def test_spool_create_takes_yes_no_or_if_mounted() -> None:
    assert settings().spool_create == "yes"
    assert settings("--spool-create=if-mounted").spool_create == "if-mounted"
    assert refusal("--spool-create=maybe").startswith("--spool-create: 'maybe' is not one of yes, no, if-mounted")
