"""HTTPS below the node and the dispatcher: TLS material and its pin, the pinned client,
the ASGI app server with its connection bounds, and what the apps share (refusals,
bounded bodies).

Design item 7: nodes and dispatchers serve HTTPS with self-signed certificates, and clients
pin the certificate's SHA-256 instead of trusting a CA. Everything above (``node``,
``dispatcher``, ``koji``, the CLI) imports HTTPS from here; this package imports only the
core.
"""

from ._app import RETRY_AFTER_S, RequestTimeoutError, read_body, refusal
from ._client import (
    BodyTooLongError,
    FetchedFile,
    TransferError,
    fetch_pinned_file,
    pinned_client,
    pinned_context,
)
from ._server import (
    ByteBudget,
    ConnectionGate,
    ServerConfig,
    ServerStatistics,
    address_key,
    serve_asgi,
)
from ._tls import (
    CERT_FILE,
    KEY_FILE,
    CertificatePinError,
    TlsMaterial,
    certificate_sha256,
    generate_tls_material,
    load_tls_material,
    pinned_ssl_context,
)

__all__ = [
    "CERT_FILE",
    "KEY_FILE",
    "RETRY_AFTER_S",
    "BodyTooLongError",
    "ByteBudget",
    "CertificatePinError",
    "ConnectionGate",
    "FetchedFile",
    "RequestTimeoutError",
    "ServerConfig",
    "ServerStatistics",
    "TlsMaterial",
    "TransferError",
    "address_key",
    "certificate_sha256",
    "fetch_pinned_file",
    "generate_tls_material",
    "load_tls_material",
    "pinned_client",
    "pinned_context",
    "pinned_ssl_context",
    "read_body",
    "refusal",
    "serve_asgi",
]
