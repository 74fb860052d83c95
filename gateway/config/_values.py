"""How a setting's text becomes a value, and back: durations, numbers, sizes, booleans,
listen addresses, the product list, and the ranges numbers must fall in.

Generic on purpose (no setting is named here), so that the CLI's own flags parse
durations and addresses exactly as the settings do.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config._errors import ConfigError
from gateway.domain import validation

# ASCII digits only: Python's int() and re's \d also take ٥ or १, which nobody means in a setting.
_DURATION = re.compile(r"^(?:([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d))+$")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf(?:inity)?)", re.IGNORECASE)
_SIZE = re.compile(r"([0-9]+)\s*(B|KiB|MiB|GiB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``"5m"`` → 300.0 seconds. Accepts ms, s, m, h, d and sums like ``1m30s``."""
    text = text.strip()
    if not _DURATION.match(text):
        raise ConfigError(f"{text!r} is not a duration (examples: 500ms, 30s, 5m, 1h, 7d)")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def format_duration(seconds: float) -> str:
    """Seconds as a person would write them (``5h``, ``7d``, ``1500ms``): parse_duration's inverse."""
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds and seconds == int(seconds):
        whole = int(seconds)
        for unit in ("d", "h", "m"):
            size = int(_UNIT_SECONDS[unit])
            if whole % size == 0:
                return f"{whole // size}{unit}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000, 6):g}ms"


def parse_int(text: str) -> int:
    """A whole number in ASCII digits."""
    if not _INTEGER.fullmatch(text.strip()):
        raise ConfigError(f"{text!r} is not a whole number")
    return int(text.strip())


def parse_number(text: str) -> float:
    """A decimal number in ASCII digits (``0.5``, ``10``, ``2e3``); nan and inf parse, for
    check() to refuse as not finite."""
    if not _NUMBER.fullmatch(text.strip()):
        raise ConfigError(f"{text!r} is not a number")
    return float(text.strip())


def parse_size(text: str) -> int:
    """``4MiB`` → 4194304 bytes; B, KiB, MiB, GiB, or a plain number of bytes."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"{text!r} is not a size (examples: 65536, 512KiB, 4MiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def format_size(size: float) -> str:
    """Bytes as a person would write them (``4MiB``): parse_size's inverse."""
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{int(size) // _SIZE_UNITS[unit]}{unit}"
    return str(int(size))


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{text!r} is not a boolean (use true or false)")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) → (host, port), checked."""
    match = re.fullmatch(r"\[([^\]]+)\]:([0-9]+)|([^:\[\]]+):([0-9]+)", text.strip())
    if not match:
        raise ConfigError(f"listen address {text!r} is not HOST:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen port {port} is outside 0-65535")
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError(f"listen address {text!r}: {exc}") from None
    return host, port


def format_listen(host: str, port: int) -> str:
    """(host, port) → ``HOST:PORT``, with IPv6 hosts in brackets: parse_listen's inverse."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_products(text: str) -> dict[str, frozenset[str]]:
    """``prod-abc123=requests,storage-gb;prod-def456=cpu-hours`` → each product's dimensions.

    Entries are separated by ``;`` (or new lines); each code and dimension must be
    one AWS would take (the same rules as a request's).
    """
    products: dict[str, frozenset[str]] = {}
    for entry in re.split(r"[;\n]", text):
        if not entry.strip():
            continue
        product, sep, listed = (part.strip() for part in entry.partition("="))
        dimensions = [d.strip() for d in listed.split(",") if d.strip()]
        if not sep or not dimensions:
            raise ConfigError(
                f"{entry!r} names no dimensions: write PRODUCT=DIMENSION[,DIMENSION...], "
                "entries separated by ';' (example: prod-abc123=requests,storage-gb)"
            )
        problems = validation.check_product_code(product, f"product code {product!r}")
        problems += [
            v for d in dimensions for v in validation.check_usage_dimension(d, f"dimension {d[:40]!r} of {product}")
        ]
        if problems:
            raise ConfigError(f"{problems[0].field} {problems[0].description}")
        if product in products:
            raise ConfigError(f"product {product!r} is listed twice: give all its dimensions in one entry")
        products[product] = frozenset(dimensions)
    if not products:
        raise ConfigError("lists no product: write PRODUCT=DIMENSION[,DIMENSION...] (or leave it unset to allow any)")
    return products


@dataclass(frozen=True)
class Bounds:
    """The values a number setting may take: ``lo``..``hi``, or above ``lo`` when ``open_lo``."""

    lo: float
    hi: float
    open_lo: bool = False

    def allows(self, value: float) -> bool:
        above = value > self.lo if self.open_lo else value >= self.lo
        return above and value <= self.hi

    def describe(self, show: Callable[[float], str]) -> str:
        if self.open_lo:
            return f"above {show(self.lo)}, at most {show(self.hi)}"
        return f"{show(self.lo)}..{show(self.hi)}"
