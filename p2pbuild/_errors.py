"""The one error tree of p2pbuild.

Every error we raise derives from :class:`P2PBuildError`. Below it the tree splits in two:

* :class:`RemoteError`: the *input* is bad. It came from a peer, a file or a command line
  argument and failed a check. Daemons catch this family at one boundary, count it by its
  ``code`` and drop the input; it never kills a daemon.
* :class:`LocalError`: *we* misused something (a bad call, a key file with open permissions,
  a record too big to encode). These point at a bug or a misconfiguration and propagate.

Each class carries a short, stable ``code`` (``"bad-signature"``, ``"stale-seq"``, ...) used
as the key of rejection counters and in machine-readable output, and next to it the
``http_status`` with which an HTTPS API refuses a request for that reason (500 for anything
not meant to reach a client, 400 for bad input unless a subclass says better).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BadSignatureError",
    "CodecError",
    "ExpiredError",
    "ForbiddenError",
    "KeyFileError",
    "LifetimeError",
    "LocalError",
    "MalformedError",
    "NotYetValidError",
    "OversizeError",
    "P2PBuildError",
    "RecordError",
    "RemoteError",
    "ReplayError",
    "RollbackError",
    "RotationError",
    "StaleSeqError",
    "ThresholdError",
    "TrustError",
    "TrustSignatureError",
    "UnknownKindError",
    "UntrustedKeyError",
    "WrongNodeError",
]


class P2PBuildError(Exception):
    """Root of every error p2pbuild raises on purpose."""

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500


class LocalError(P2PBuildError):
    """We misused an API or our own configuration is wrong; not the fault of a peer."""

    code = "local"


class RemoteError(P2PBuildError):
    """Untrusted input (from the network, a file or an argument) failed a check."""

    code = "invalid"
    http_status = 400


# -- codec ------------------------------------------------------------------------------------


class CodecError(RemoteError):
    """Bytes that are not a well-formed, canonical p2pbuild encoding."""

    code = "malformed"


class OversizeError(CodecError):
    """Input larger than the bound for its type; rejected before any decoding."""

    code = "oversize"
    http_status = 413


class MalformedError(CodecError):
    """Input that does not decode, is not canonical, or has the wrong shape or field types."""

    code = "malformed"


# -- signed objects ---------------------------------------------------------------------------


class RecordError(RemoteError):
    """A signed object that decoded but is not acceptable."""

    code = "invalid-record"


class UnknownKindError(RecordError):
    """A record kind this implementation does not know."""

    code = "unknown-kind"


class BadSignatureError(RecordError):
    """The signature does not verify for the claimed key and object type."""

    code = "bad-signature"
    http_status = 401


class StaleSeqError(RecordError):
    """A ``seq`` not newer than the one already held for that publisher: a replay or reorder."""

    code = "stale-seq"


class ExpiredError(RecordError):
    """The object's expiry time has passed."""

    code = "expired"
    http_status = 410


class NotYetValidError(RecordError):
    """The object claims to be issued in the future, beyond the allowed clock skew."""

    code = "not-yet-valid"


class LifetimeError(RecordError):
    """The object's lifetime (expiry minus issue time) is outside the bounds for its kind."""

    code = "lifetime-out-of-bounds"


class ReplayError(RecordError):
    """A job or pull token already seen (same job id or nonce) while it could still be valid."""

    code = "replayed"
    http_status = 409


class WrongNodeError(RecordError):
    """A job addressed to another node, or a pull token meant for another dispatcher."""

    code = "wrong-node"
    http_status = 421


class ForbiddenError(RemoteError):
    """An authentic request from a key or user that may not do this (another dispatcher's
    job, another user's build)."""

    code = "forbidden"
    http_status = 403


# -- trust list -------------------------------------------------------------------------------


class TrustError(RemoteError):
    """A trust list that must not be accepted."""

    code = "untrusted"
    http_status = 401


class ThresholdError(TrustError):
    """Fewer valid maintainer signatures than the threshold requires."""

    code = "under-signed"


class TrustSignatureError(TrustError):
    """A signature on a trust list that does not verify for the key it names.

    Signatures by keys that are not maintainers are ignored when counting, but every
    signature a list carries must be genuine: a list with a damaged one is rejected whole,
    so that no byte of a trust list can change without the list becoming invalid.
    """

    code = "bad-trust-signature"


class RollbackError(TrustError):
    """A trust list whose version is not newer than the one already trusted."""

    code = "rollback"


class RotationError(TrustError):
    """A new trust list that does not follow from the trusted one (skipped version, or not
    signed by the threshold of the previous maintainers)."""

    code = "bad-rotation"


class UntrustedKeyError(TrustError):
    """A key the trust list does not name, or names with another role."""

    code = "untrusted-key"


# -- local ------------------------------------------------------------------------------------


class KeyFileError(LocalError):
    """A key file that cannot be used: missing, unreadable, malformed or readable by others."""

    code = "key-file"
