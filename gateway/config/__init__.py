"""Flags and ``METERING_GATEWAY_*`` variables, read into one frozen Settings.

Each setting is declared once, as a field of :class:`Settings`; the command-line
flag (``--flush-grace``), the environment variable
(``METERING_GATEWAY_FLUSH_GRACE``), the ``--help`` text and the allowed range
(:class:`Bounds`, checked at start) are derived from it, so they cannot disagree.
A flag beats the variable, which beats the default.
AWS settings (credentials, region, endpoint) are deliberately *not* here: they
come from boto3's own conventions (``AWS_REGION``,
``AWS_ENDPOINT_URL_MARKETPLACE_METERING``, the default credential chain).

The package: :mod:`.settings` (the fields and the rules between them); private
modules for value parsing (``_values``), a field's declaration and how it is shown
(``_spec``), flags and variables (``_sources``), the start-up checks of what a setting
names (``_files``) and :class:`ConfigError` (``_errors``). Import from here only.
It imports nothing of the gateway but :mod:`gateway.domain`.
"""

from gateway.config._errors import ConfigError, config_error_from
from gateway.config._files import POSTGRES_SCHEMES
from gateway.config._sources import add_settings_arguments, check_variables, settings_from
from gateway.config._spec import ENV_PREFIX, Spec, env_name, flag_name, shown_default, shown_range, spec
from gateway.config._values import Bounds, format_duration, format_listen, parse_duration, parse_listen
from gateway.config.settings import FLUSH_GRACE_MAX, SETTINGS_FIELDS, SPOOL_POOL_WAIT, Settings

__all__ = [
    "ENV_PREFIX",
    "FLUSH_GRACE_MAX",
    "POSTGRES_SCHEMES",
    "SETTINGS_FIELDS",
    "SPOOL_POOL_WAIT",
    "Bounds",
    "ConfigError",
    "Settings",
    "Spec",
    "add_settings_arguments",
    "check_variables",
    "config_error_from",
    "env_name",
    "flag_name",
    "format_duration",
    "format_listen",
    "parse_duration",
    "parse_listen",
    "settings_from",
    "shown_default",
    "shown_range",
    "spec",
]
