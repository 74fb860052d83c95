"""Who is calling: the identity in a verified mTLS client certificate.

grpcio's auth context already holds the certificate's subject alternative names,
sorted by kind (``peer_uri``, ``peer_dns``, in certificate order) once the handshake
has verified the chain against ``--tls-client-ca``; nothing here parses a certificate.
The rule is SPIFFE's and Istio's: a workload's one URI SAN is its ID, so the first URI
SAN wins, then the first DNS SAN (cert-manager certificates for a Kubernetes service).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

URI_SANS = "peer_uri"
DNS_SANS = "peer_dns"


def caller_identity(auth_context: Mapping[str, Any]) -> str | None:
    """The certificate's first URI SAN, else its first DNS SAN; None without either (or without mTLS).

    ``auth_context`` is ``ServicerContext.auth_context()``: lists of bytes (grpc-stubs say bytes).
    """
    for key in (URI_SANS, DNS_SANS):
        values: Sequence[bytes] = auth_context.get(key, ())
        for value in values:
            if value:
                return value.decode("utf-8", "replace")
    return None
