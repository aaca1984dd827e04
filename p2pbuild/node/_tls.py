"""Moved to :mod:`p2pbuild.https`; these names stay importable from here for a while."""

from ..https import (
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
