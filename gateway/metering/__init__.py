"""The MeterUsage path: request → validate → call AWS → map result → response.

:mod:`.service` is the MeteringService servicer. It imports the shared rules
(:mod:`gateway.domain`) and the AWS adapter (:mod:`gateway.aws`), never the recording
side, the RPC layer or the assembly.
"""
