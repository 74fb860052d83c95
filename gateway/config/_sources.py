"""Where settings come from: a flag per setting (argparse), then its ``METERING_GATEWAY_*``
variable, then its default. A flag beats the variable, which beats the default; a
variable with the prefix that names no setting stops start-up (a typo would otherwise
start the gateway without what it meant to set).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from gateway.config._errors import ConfigError
from gateway.config._spec import ENV_PREFIX, env_name, flag_name, shown_default, shown_range, spec
from gateway.config._values import parse_duration, parse_int, parse_number, parse_size
from gateway.config.settings import SETTINGS_FIELDS, Given, Settings

# Variables with the prefix that are not settings, and are no mistake: those of the
# `health` command, and those Kubernetes adds to every pod for a Service named
# metering-gateway (or metering-gateway-*) unless enableServiceLinks is false.
OTHER_VARIABLES = frozenset(
    ENV_PREFIX + name for name in ("HEALTH_TARGET", "HEALTH_TLS_CA", "HEALTH_TLS_CERT", "HEALTH_TLS_KEY")
)
_SERVICE_LINK = re.compile(
    ENV_PREFIX + r"(?:[A-Z0-9_]+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|"
    r"PORT(?:_[0-9]+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)?)"
)


def check_variables(env: Mapping[str, str]) -> None:
    """ConfigError for a ``METERING_GATEWAY_*`` variable that is no setting: a typo
    (``..._SPOLL``) would otherwise start the gateway without what it meant to set."""
    known = {env_name(f.name) for f in SETTINGS_FIELDS} | OTHER_VARIABLES
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known and not _SERVICE_LINK.fullmatch(name):
            # Compared without the prefix, which every name shares and would make anything look close.
            close = difflib.get_close_matches(name[len(ENV_PREFIX) :], sorted(k[len(ENV_PREFIX) :] for k in known), n=1)
            hint = (
                f"did you mean {ENV_PREFIX}{close[0]}?"
                if close
                else "see `metering-gateway serve --help` for the settings"
            )
            raise ConfigError(f"{name} is set, but no setting has that name: {hint}")


def _parser_for(f: dataclasses.Field[object]) -> Callable[[str], object]:
    parse = spec(f).parse
    if parse is not None:
        return parse
    choices = spec(f).choices

    def as_choice(text: str) -> str:
        if choices and text not in choices:
            raise ConfigError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return as_choice


_METAVARS: Mapping[Callable[[str], object], str] = {
    parse_duration: "DURATION",
    parse_int: "N",
    parse_number: "NUMBER",
    parse_size: "SIZE",
}


def _metavar(f: dataclasses.Field[object]) -> str | None:
    declared = spec(f)
    if declared.metavar:
        return declared.metavar
    if declared.choices:
        return "{" + ",".join(declared.choices) + "}"
    return _METAVARS.get(declared.parse) if declared.parse is not None else None


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; the value is parsed later, with the env fallback."""
    for f in SETTINGS_FIELDS:
        allowed = f"; range {shown_range(f)}" if shown_range(f) else ""
        help_text = f"{spec(f).help} [env {env_name(f.name)}; default {shown_default(f)}{allowed}]"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if f.type in ("bool", bool):
            kwargs["nargs"] = "?"
            kwargs["const"] = "true"
            kwargs["metavar"] = "BOOL"
        elif _metavar(f):
            kwargs["metavar"] = _metavar(f)
        parser.add_argument(flag_name(f.name), **kwargs)


def settings_from(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Flags, then ``METERING_GATEWAY_*`` variables, then defaults; checked."""
    env = os.environ if env is None else env
    check_variables(env)
    values: dict[str, Any] = {}
    given: dict[str, Given] = {}
    for f in SETTINGS_FIELDS:
        raw = getattr(args, f.name, None) if args is not None else None
        source = flag_name(f.name)
        if raw is None and env_name(f.name) in env:
            raw, source = env[env_name(f.name)], env_name(f.name)
        if raw is None:
            continue
        try:
            values[f.name] = _parser_for(f)(raw)
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
        given[f.name] = Given(source, raw)
    return Settings(**values).check(given)
