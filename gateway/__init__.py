"""metering-gateway: meter usage to AWS Marketplace over gRPC."""

__version__ = "0.1.0"
