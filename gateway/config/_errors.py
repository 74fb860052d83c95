"""The one error of the package: a setting, or what it names, is unusable."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting is unusable; the message is one line meant for a person."""


def config_error_from(exc: Exception, what: str) -> ConfigError:
    """``what: exc`` as a ConfigError, for a lower layer's error met while opening what a
    setting names (``raise config_error_from(exc, "spool") from None``), so that start-up
    says it in one line, as it says every other unusable setting."""
    return ConfigError(f"{what}: {exc}")
