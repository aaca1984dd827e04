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
not meant to reach a client, 400 for bad input unless a subclass says better). Both are
class keywords, so that an error class is its name, its place in the tree and its docstring.
"""

from __future__ import annotations

from typing import Any, ClassVar

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
    """Root of every error p2pbuild raises on purpose.

    A subclass names its ``code`` and, where it is not its base's, its ``http_status`` as
    class keywords: ``class OversizeError(CodecError, code="oversize", status=413)``.
    """

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500

    def __init_subclass__(
        cls, *, code: str | None = None, status: int | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if status is not None:
            cls.http_status = status


class LocalError(P2PBuildError, code="local"):
    """We misused an API or our own configuration is wrong; not the fault of a peer."""


class RemoteError(P2PBuildError, code="invalid", status=400):
    """Untrusted input (from the network, a file or an argument) failed a check."""


# -- codec ------------------------------------------------------------------------------------


class CodecError(RemoteError, code="malformed"):
    """Bytes that are not a well-formed, canonical p2pbuild encoding."""


class OversizeError(CodecError, code="oversize", status=413):
    """Input larger than the bound for its type; rejected before any decoding."""


class MalformedError(CodecError):
    """Input that does not decode, is not canonical, or has the wrong shape or field types
    (its code is its base's, ``malformed``)."""


# -- signed objects ---------------------------------------------------------------------------


class RecordError(RemoteError, code="invalid-record"):
    """A signed object that decoded but is not acceptable."""


class UnknownKindError(RecordError, code="unknown-kind"):
    """A record kind this implementation does not know."""


class BadSignatureError(RecordError, code="bad-signature", status=401):
    """The signature does not verify for the claimed key and object type."""


class StaleSeqError(RecordError, code="stale-seq"):
    """A ``seq`` not newer than the one already held for that publisher: a replay or reorder."""


class ExpiredError(RecordError, code="expired", status=410):
    """The object's expiry time has passed."""


class NotYetValidError(RecordError, code="not-yet-valid"):
    """The object claims to be issued in the future, beyond the allowed clock skew."""


class LifetimeError(RecordError, code="lifetime-out-of-bounds"):
    """The object's lifetime (expiry minus issue time) is outside the bounds for its kind."""


class ReplayError(RecordError, code="replayed", status=409):
    """A job or pull token already seen (same job id or nonce) while it could still be valid."""


class WrongNodeError(RecordError, code="wrong-node", status=421):
    """A job addressed to another node, or a pull token meant for another dispatcher."""


class ForbiddenError(RemoteError, code="forbidden", status=403):
    """An authentic request from a key or user that may not do this (another dispatcher's
    job, another user's build)."""


# -- trust list -------------------------------------------------------------------------------


class TrustError(RemoteError, code="untrusted", status=401):
    """A trust list that must not be accepted."""


class ThresholdError(TrustError, code="under-signed"):
    """Fewer valid maintainer signatures than the threshold requires."""


class TrustSignatureError(TrustError, code="bad-trust-signature"):
    """A signature on a trust list that does not verify for the key it names.

    Signatures by keys that are not maintainers are ignored when counting, but every
    signature a list carries must be genuine: a list with a damaged one is rejected whole,
    so that no byte of a trust list can change without the list becoming invalid.
    """


class RollbackError(TrustError, code="rollback"):
    """A trust list whose version is not newer than the one already trusted."""


class RotationError(TrustError, code="bad-rotation"):
    """A new trust list that does not follow from the trusted one (skipped version, or not
    signed by the threshold of the previous maintainers)."""


class UntrustedKeyError(TrustError, code="untrusted-key"):
    """A key the trust list does not name, or names with another role."""


# -- local ------------------------------------------------------------------------------------


class KeyFileError(LocalError, code="key-file"):
    """A key file that cannot be used: missing, unreadable, malformed or readable by others."""
