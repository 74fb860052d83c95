"""Python client for the metering gateway."""
