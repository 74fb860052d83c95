"""What a setting names outside the process, checked at start-up: the spool's location
and the TLS files. Checked here because what uses them later says too little (gRPC
only says "Failed to bind"; a keyword DSN would quietly become an SQLite file).
"""

from __future__ import annotations

import re
import ssl

from gateway.config._errors import ConfigError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")  # a --spool that names a PostgreSQL database

_KEYWORD_DSN = re.compile(
    r"(?:^|\s)(?:host|hostaddr|port|dbname|user|password|passfile|sslmode|service|options)\s*=", re.IGNORECASE
)


def check_spool_location(location: str, who: str = "--spool") -> None:
    """ConfigError unless ``location`` is a durable spool: an SQLite file path or a postgresql:// URL.

    The message never repeats the value: a DSN in the wrong form may hold a password.
    """
    if location.startswith(POSTGRES_SCHEMES):
        return
    if location.strip() == ":memory:" or location.startswith("file:"):
        raise ConfigError(
            f"{who}: an in-memory or URI-form SQLite spool is refused: an acknowledged event must "
            "outlive the process; give a file path, or a postgresql:// URL"
        )
    if _KEYWORD_DSN.search(location):
        raise ConfigError(
            f"{who}: this looks like a PostgreSQL keyword DSN (host=... dbname=...), which would become "
            "an SQLite file of that name; give it as a URL: postgresql://USER@HOST:PORT/DBNAME"
        )
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", location):
        raise ConfigError(f"{who}: only postgresql:// URLs and SQLite file paths are spools")


def check_tls_files(cert: str, key: str, client_ca: str) -> None:
    """ConfigError naming the file unless the certificate, key and CA bundle are PEM files
    that fit together. Checked at start-up: gRPC only says "Failed to bind" for any of it."""
    for name, path, marker in (
        ("tls-cert", cert, "CERTIFICATE"),
        ("tls-key", key, "PRIVATE KEY"),
        ("tls-client-ca", client_ca, "CERTIFICATE"),
    ):
        if not path:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path!r}: {exc.strerror}") from None
        if f"-----BEGIN {marker}-----".encode() not in data and not (
            marker == "PRIVATE KEY" and re.search(rb"-----BEGIN [A-Z]+ PRIVATE KEY-----", data)
        ):
            raise ConfigError(f"{name}: {path!r} holds no PEM {marker.lower()} (no '-----BEGIN {marker}-----' line)")
        if marker == "PRIVATE KEY" and (b"ENCRYPTED" in data):
            raise ConfigError(
                f"{name}: {path!r} is an encrypted key; gRPC needs it unencrypted (protect the file instead)"
            )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if cert:
        try:
            context.load_cert_chain(cert, key, password=lambda: b"")
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
                raise ConfigError(f"tls-key: {key!r} is not the private key of the certificate in {cert!r}") from None
            raise ConfigError(
                f"tls-cert/tls-key: {cert!r} and {key!r} are not a usable certificate and key ({exc.reason or exc})"
            ) from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"tls-client-ca: {client_ca!r} is not a usable PEM CA bundle ({exc.reason or exc})"
            ) from None
