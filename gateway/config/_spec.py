"""How one setting is declared (:class:`Spec`, in its field's metadata) and how a person
sees it: its flag, its variable, its default, a value and its range as they would type them.

Everything here derives from a single field, so that ``--help``, start-up messages and
docs/settings.md (tools/settings_table.py) say the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.config._values import Bounds, format_duration, format_size, parse_duration, parse_size

ENV_PREFIX = "METERING_GATEWAY_"
_SPEC = "gateway.config.spec"  # the one metadata key of a settings field


@dataclass(frozen=True)
class Spec:
    """What a field of Settings says beyond its name, type and default.

    ``parse`` turns the text of a flag or variable into the value (none: the text
    itself, one of ``choices`` when given); ``bounds`` is the range a number must fall
    in; ``metavar`` names the value in ``--help`` when the parser's name will not do.
    """

    help: str
    parse: Callable[[str], object] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    bounds: Bounds | None = None


def setting(
    help_text: str,
    *,
    parse: Callable[[str], object] | None = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    bounds: Bounds | None = None,
) -> Mapping[str, Spec]:
    """A settings field's metadata: ``field(default=..., metadata=setting("...", ...))``."""
    return {_SPEC: Spec(help_text, parse, metavar, choices, bounds)}


def spec(f: dataclasses.Field[object]) -> Spec:
    """The :class:`Spec` a settings field was declared with."""
    found = f.metadata[_SPEC]
    assert isinstance(found, Spec), f.name
    return found


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def shown_default(f: dataclasses.Field[object]) -> str:
    """A setting's default as a person would type it (``5m``, ``true``, ``unset``)."""
    default = f.default
    if isinstance(default, bool):
        return "true" if default else "false"
    if spec(f).parse is parse_duration and isinstance(default, (int, float)):
        return format_duration(float(default))
    if spec(f).parse is parse_size and isinstance(default, (int, float)):
        return format_size(default)
    return str(default) if default != "" else "unset"


def shown_value(f: dataclasses.Field[object], value: object) -> str:
    """A value of setting ``f`` as a person would type it: ``5h``, not 18000.0."""
    if spec(f).parse is parse_duration and isinstance(value, (int, float)):
        return format_duration(float(value))
    if spec(f).parse is parse_size and isinstance(value, (int, float)):
        return format_size(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def shown_range(f: dataclasses.Field[object]) -> str:
    """The values setting ``f`` allows, as in --help and docs/settings.md ("" when unbounded)."""
    bounds = spec(f).bounds
    return bounds.describe(lambda v: shown_value(f, v)) if bounds else ""
