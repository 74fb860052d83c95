"""Logs and metrics: what every layer records through.

:mod:`.logs` (structured logs); :mod:`.metrics`, the face of the metric modules:
:mod:`.families` (each family once, and ``install``), :mod:`.record` (the recording
functions), :mod:`.grpc_metrics` (the interceptor's observer) and :mod:`.collector`
(what a scrape reads from the spool, through a reader it is given). The endpoint that
serves them (``--metrics-listen``) is wiring, and lives in :mod:`gateway.assembly`.

Imported by every layer, so it imports nothing of the gateway's but the shared
vocabulary (:mod:`gateway.domain`) and settings (:mod:`gateway.config`).
"""
