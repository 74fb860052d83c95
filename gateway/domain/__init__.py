"""The rules both paths share, as pure functions: what a valid request is (:mod:`.validation`)
and what each condition answers (:mod:`.errors`, the one status table).

Imports nothing of the gateway but itself: no I/O, no gRPC server, no AWS client.
"""
