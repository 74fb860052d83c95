"""metering-gateway: meter usage to AWS Marketplace over gRPC."""

from importlib import metadata


def _installed_version() -> str:
    """The installed distribution's version, as pip and the image know it: what --version,
    the start-up log line and metering_gateway_build_info report, so that a deployment
    can be matched to its release."""
    try:
        return metadata.version("metering-gateway")  # pyproject.toml's [project] name
    except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown"


__version__ = _installed_version()
