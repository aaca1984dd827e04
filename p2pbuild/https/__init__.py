"""HTTPS below the node and the dispatcher: TLS material and its pin, the pinned client,
and the ASGI app server with its connection bounds.

Design item 7: nodes and dispatchers serve HTTPS with self-signed certificates, and clients
pin the certificate's SHA-256 instead of trusting a CA. Everything above (``node``,
``dispatcher``, ``koji``, the CLI) imports HTTPS from here; this package imports only the
core.
"""

from ._tls import (
    CERT_FILE,
    KEY_FILE,
    BodyTooLongError,
    CertificatePinError,
    FetchedFile,
    TlsMaterial,
    TransferError,
    certificate_sha256,
    fetch_pinned_file,
    generate_tls_material,
    load_tls_material,
    pinned_client,
    pinned_ssl_context,
)

__all__ = [
    "CERT_FILE",
    "KEY_FILE",
    "BodyTooLongError",
    "CertificatePinError",
    "FetchedFile",
    "TlsMaterial",
    "TransferError",
    "certificate_sha256",
    "fetch_pinned_file",
    "generate_tls_material",
    "load_tls_material",
    "pinned_client",
    "pinned_ssl_context",
]
