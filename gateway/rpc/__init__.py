"""The RPC layer: the gRPC server (health, reflection, limits), the interceptor that turns
errors into statuses and writes the access log, the caller's identity and the
authorization policy.

Knows services only by name and servicer objects; imports neither path nor the assembly.
"""
