"""The trust list: which keys a deployment trusts, for what, and who runs them.

In the spirit of TUF root metadata. A trust list has a ``version``, an expiry, a threshold
``k`` and entries ``{key, role, operator, pools, arches}``. The entries with role
``maintainer`` are the ``n`` maintainers; a list is valid when at least ``k`` of them signed
it and it has not expired.

Rotation: version ``N+1`` is accepted over version ``N`` only if it is valid on its own *and*
at least ``k_N`` of version ``N``'s maintainers signed it. Versions are applied one at a time,
so a client never skips a rotation, and a lower or equal version is a rollback. Removing an
entry revokes its key from that version on.

Wire form (canonical msgpack, at most :data:`MAX_TRUST_LIST_SIZE` bytes)::

    [1, version, expires_at, threshold, [entry, ...], [[key, signature], ...]]
    entry = {"arches": [...], "key": bytes32, "operator": str, "pools": [...], "role": str}

Entries are sorted by key and signatures by key, one each. A signature covers
``Domain.TRUST_LIST || encode([1, version, expires_at, threshold, entries])``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from ._codec import decode, encode
from ._errors import (
    BadSignatureError,
    ExpiredError,
    LocalError,
    MalformedError,
    P2PBuildError,
    RollbackError,
    RotationError,
    ThresholdError,
    TrustSignatureError,
    UntrustedKeyError,
)
from ._identity import SIGNATURE_SIZE, Domain, Identity, PublicKey, Role
from ._records import _MAX_LIST, _TOKEN, Capability

__all__ = [
    "MAX_TRUST_LIST_SIZE",
    "TrustEntry",
    "TrustList",
    "accept_update",
    "read_trust_list",
    "trusted_node",
]

MAX_TRUST_LIST_SIZE = 1024 * 1024
_MAX_ENTRIES = 10_000
# Signatures are by this version's and the previous version's maintainers; far fewer.
_MAX_SIGNATURES = 256
_FORMAT_VERSION = 1
_OPERATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


def _check_tokens(name: str, values: object) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or len(values) > _MAX_LIST:
        raise MalformedError(f"{name} must be a list of at most {_MAX_LIST} items")
    for value in values:
        if not isinstance(value, str) or not _TOKEN.fullmatch(value):
            raise MalformedError(f"{name}: {value!r:.40} must match [a-z0-9][a-z0-9._+-]*")
    if list(values) != sorted(set(values)):
        raise MalformedError(f"{name} must be sorted and without duplicates")
    return tuple(values)


def _to_role(value: Any) -> Role:
    try:
        return Role(value)
    except ValueError:
        roles = [role.value for role in Role]
        raise MalformedError(f"role must be one of {roles}, got {value!r:.40}") from None


def _to_pools(value: object) -> tuple[str, ...]:
    return _check_tokens("pools", value)


def _to_arches(value: object) -> tuple[str, ...]:
    return _check_tokens("arches", value)


def _check_key(instance: object, attribute: object, value: Any) -> None:
    if not isinstance(value, PublicKey):
        raise MalformedError("a trust entry's key is a PublicKey")


@attrs.frozen
class TrustEntry:
    """One trusted key. ``pools`` and ``arches`` restrict a node; empty means unrestricted.

    Raises :class:`MalformedError` for an unknown role, a bad operator name, or pools and
    arches that are not sorted lists of distinct tokens.
    """

    key: PublicKey = attrs.field(validator=_check_key)
    role: Role = attrs.field(converter=_to_role)
    operator: str = attrs.field()
    pools: tuple[str, ...] = attrs.field(default=(), converter=_to_pools)
    arches: tuple[str, ...] = attrs.field(default=(), converter=_to_arches)

    @operator.validator
    def _check_operator(self, attribute: attrs.Attribute[str], value: object) -> None:
        if not isinstance(value, str) or not _OPERATOR.fullmatch(value):
            raise MalformedError(
                f"operator must match [A-Za-z0-9][A-Za-z0-9._@+-]{{0,63}}, got {value!r:.40}"
            )

    def to_wire(self) -> dict[str, Any]:
        return {
            "arches": list(self.arches),
            "key": self.key.raw,
            "operator": self.operator,
            "pools": list(self.pools),
            "role": self.role.value,
        }

    @classmethod
    def from_wire(cls, value: object) -> TrustEntry:
        if type(value) is not dict or len(value) != 5:
            raise MalformedError("a trust entry is a map of 5 fields")
        try:
            key = value["key"]
            if type(key) is not bytes:
                raise MalformedError("entry key must be bytes")
            return cls(
                PublicKey(key), value["role"], value["operator"], value["pools"], value["arches"]
            )
        except KeyError as exc:
            raise MalformedError(f"trust entry lacks field {exc}") from None


@attrs.frozen
class TrustList:
    """A trust list version with the signatures collected so far. Values are immutable:
    the editing methods return a new list."""

    version: int
    expires_at: int
    threshold: int
    entries: tuple[TrustEntry, ...]
    #: ``(maintainer key, signature)`` pairs, sorted by key, one per key.
    signatures: tuple[tuple[PublicKey, bytes], ...] = ()

    def __attrs_post_init__(self) -> None:
        for name in ("version", "expires_at", "threshold"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 2**63:
                raise MalformedError(f"{name} must be a non-negative integer")
        if self.version < 1:
            raise MalformedError("version starts at 1")
        if len(self.entries) > _MAX_ENTRIES:
            raise MalformedError(f"at most {_MAX_ENTRIES} entries")
        if type(self.entries) is not tuple or not all(
            isinstance(entry, TrustEntry) for entry in self.entries
        ):
            raise MalformedError("entries must be a tuple of TrustEntry")
        keys = [entry.key for entry in self.entries]
        if keys != sorted(set(keys)):
            raise MalformedError("entries must be sorted by key, one per key")
        maintainers = len(self.maintainers)
        if not 1 <= self.threshold <= maintainers:
            raise MalformedError(
                f"threshold {self.threshold} must be between 1 and the {maintainers} maintainers"
            )
        if type(self.signatures) is not tuple or not all(
            type(pair) is tuple and len(pair) == 2 and isinstance(pair[0], PublicKey)
            for pair in self.signatures
        ):
            raise MalformedError("signatures must be a tuple of (PublicKey, bytes) pairs")
        if len(self.signatures) > _MAX_SIGNATURES:
            raise MalformedError(f"at most {_MAX_SIGNATURES} signatures")
        signers = [key for key, _ in self.signatures]
        if signers != sorted(set(signers)):
            raise MalformedError("signatures must be sorted by key, one per key")
        for _, signature in self.signatures:
            if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
                raise MalformedError(f"a signature is {SIGNATURE_SIZE} bytes")

    # -- queries ------------------------------------------------------------------------------

    @property
    def maintainers(self) -> list[PublicKey]:
        return [entry.key for entry in self.entries if entry.role is Role.MAINTAINER]

    def entry(self, key: PublicKey) -> TrustEntry | None:
        """The entry for ``key``, or None if the list does not name it."""
        for entry in self.entries:
            if entry.key == key:
                return entry
        return None

    def require(self, key: PublicKey, role: Role) -> TrustEntry:
        """The entry for ``key`` if it is trusted in ``role``.

        Raises :class:`UntrustedKeyError` if the key is absent (never listed, or revoked)
        or listed with another role.
        """
        entry = self.entry(key)
        if entry is None:
            raise UntrustedKeyError(f"key {key.fingerprint} is not on trust list v{self.version}")
        if entry.role is not role:
            raise UntrustedKeyError(
                f"key {key.fingerprint} is a {entry.role.value}, not a {role.value}"
            )
        return entry

    # -- encoding -----------------------------------------------------------------------------

    def _unsigned(self) -> list[Any]:
        return [
            _FORMAT_VERSION,
            self.version,
            self.expires_at,
            self.threshold,
            [entry.to_wire() for entry in self.entries],
        ]

    def signed_bytes(self) -> bytes:
        """The bytes maintainers sign (after the domain prefix)."""
        return encode(self._unsigned())

    def to_bytes(self) -> bytes:
        signatures = [[key.raw, signature] for key, signature in self.signatures]
        return encode([*self._unsigned(), signatures], max_size=MAX_TRUST_LIST_SIZE)

    @classmethod
    def from_bytes(cls, data: bytes) -> TrustList:
        """Parse a trust list. Checks shape only; call :meth:`verify` before trusting it.

        Raises :class:`OversizeError` or :class:`MalformedError`.
        """
        value = decode(data, max_size=MAX_TRUST_LIST_SIZE)
        if type(value) is not list or len(value) != 6:
            raise MalformedError("a trust list is an array of 6 elements")
        version_tag, version, expires_at, threshold, entries, signatures = value
        # type() too: True == 1, and a list must have one encoding.
        if type(version_tag) is not int or version_tag != _FORMAT_VERSION:
            raise MalformedError(f"unsupported trust list format {version_tag!r:.20}")
        if type(entries) is not list or type(signatures) is not list:
            raise MalformedError("entries and signatures must be arrays")
        if len(entries) > _MAX_ENTRIES or len(signatures) > _MAX_SIGNATURES:
            raise MalformedError(
                f"at most {_MAX_ENTRIES} entries and {_MAX_SIGNATURES} signatures"
            )
        parsed_signatures = []
        for item in signatures:
            if type(item) is not list or len(item) != 2 or type(item[0]) is not bytes:
                raise MalformedError("a signature is [key, signature]")
            parsed_signatures.append((PublicKey(item[0]), item[1]))
        return cls(
            version,
            expires_at,
            threshold,
            tuple(TrustEntry.from_wire(entry) for entry in entries),
            tuple(parsed_signatures),
        )

    # -- signatures ---------------------------------------------------------------------------

    def sign(self, identity: Identity) -> TrustList:
        """Return this list with ``identity``'s signature added (or replaced)."""
        signature = identity.sign(Domain.TRUST_LIST, self.signed_bytes())
        key = identity.public_key
        others = [pair for pair in self.signatures if pair[0] != key]
        return attrs.evolve(self, signatures=tuple(sorted([*others, (key, signature)])))

    def valid_signers(self, maintainers: Iterable[PublicKey]) -> set[PublicKey]:
        """The keys among ``maintainers`` whose signature on this list verifies. Signatures
        by other keys, and signatures that do not verify, are ignored (as in TUF)."""
        wanted = set(maintainers)
        message = self.signed_bytes()
        valid = set()
        for key, signature in self.signatures:
            if key not in wanted:
                continue
            try:
                key.verify(Domain.TRUST_LIST, message, signature)
            except BadSignatureError:
                continue
            valid.add(key)
        return valid

    def _require_genuine_signatures(self) -> None:
        # Every signature carried must verify for the key it names, whoever that is; only
        # then are they counted (and those by non-maintainers ignored). So damage anywhere in
        # a list, signatures included, makes it invalid rather than silently shorter.
        message = self.signed_bytes()
        for key, signature in self.signatures:
            try:
                key.verify(Domain.TRUST_LIST, message, signature)
            except BadSignatureError:
                raise TrustSignatureError(
                    f"trust list v{self.version} carries a signature by {key.fingerprint} "
                    "that does not verify"
                ) from None

    def verify(self, now: float) -> None:
        """Check that this list is signed by its own threshold and has not expired.

        Every signature it carries must verify; signatures by keys that are not among its
        maintainers are then ignored. Raises :class:`TrustSignatureError`,
        :class:`ThresholdError` or :class:`ExpiredError`.
        """
        self._require_genuine_signatures()
        signers = self.valid_signers(self.maintainers)
        if len(signers) < self.threshold:
            raise ThresholdError(
                f"trust list v{self.version} has {len(signers)} valid maintainer signature(s), "
                f"needs {self.threshold}"
            )
        if now >= self.expires_at:
            raise ExpiredError(f"trust list v{self.version} has expired")

    def verify_successor(self, new: TrustList, now: float) -> None:
        """Check that ``new`` may replace this (trusted) list.

        ``new`` must be exactly the next version, valid on its own, and signed by this list's
        threshold of this list's maintainers. This list itself may have expired: an expired
        list can still be rotated. Raises :class:`RollbackError`, :class:`RotationError`,
        :class:`TrustSignatureError`, :class:`ThresholdError` or :class:`ExpiredError`.
        """
        if new.version <= self.version:
            raise RollbackError(
                f"trust list v{new.version} is not newer than the trusted v{self.version}"
            )
        if new.version != self.version + 1:
            raise RotationError(
                f"trust list v{new.version} does not follow v{self.version}; "
                f"apply v{self.version + 1} first"
            )
        new.verify(now)
        signers = new.valid_signers(self.maintainers)
        if len(signers) < self.threshold:
            raise RotationError(
                f"trust list v{new.version} is signed by {len(signers)} of the "
                f"v{self.version} maintainers, needs {self.threshold}"
            )

    # -- editing (maintainers' tools) ---------------------------------------------------------

    def next_version(self) -> TrustList:
        """The unsigned draft of the next version, with the same entries."""
        return attrs.evolve(self, version=self.version + 1, signatures=())

    def with_entry(self, entry: TrustEntry) -> TrustList:
        """This list with ``entry`` added, or replacing the entry for the same key.
        Signatures are dropped: they no longer cover the content."""
        others = [e for e in self.entries if e.key != entry.key]
        return attrs.evolve(
            self, entries=tuple(sorted([*others, entry], key=lambda e: e.key)), signatures=()
        )

    def without_entry(self, key: PublicKey) -> TrustList:
        """This list with ``key`` removed (revoked). Raises :class:`LocalError` if absent."""
        if self.entry(key) is None:
            raise LocalError(f"key {key.fingerprint} is not on the list")
        entries = tuple(e for e in self.entries if e.key != key)
        return attrs.evolve(self, entries=entries, signatures=())


def accept_update(current: TrustList, new: TrustList, now: float) -> TrustList:
    """Return the list to trust after being offered ``new`` while trusting ``current``.

    The same list again is a no-op. Raises as :meth:`TrustList.verify_successor`.
    """
    if new.version == current.version and new.signed_bytes() == current.signed_bytes():
        return current
    current.verify_successor(new, now)
    return new


def read_trust_list(path: Path, *, error: type[Exception] = LocalError) -> TrustList:
    """Read and parse the trust list file at ``path``, reading at most
    :data:`MAX_TRUST_LIST_SIZE` + 1 bytes (so a huge file costs no memory before it is
    refused). Checks shape only: call :meth:`TrustList.verify` before trusting it.

    Raises ``error`` (the caller's local error) if the file cannot be read, and the parse
    errors (:class:`OversizeError`, :class:`MalformedError`) with the path in the message.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_TRUST_LIST_SIZE + 1)
    except OSError as exc:
        raise error(f"cannot read trust list {path}: {exc.strerror or exc}") from None
    try:
        return TrustList.from_bytes(data)
    except P2PBuildError as exc:
        raise type(exc)(f"trust list {path}: {exc}") from None


def trusted_node(entry: TrustEntry | None, capability: Capability) -> bool:
    """The one rule for "is this key trusted as a node for this capability": listed with
    the node role, and the capability within the entry's arches and pools (an empty
    restriction allows any). The directory filters lookups with it, selection re-checks."""
    if entry is None or entry.role is not Role.NODE:
        return False
    if entry.arches and capability.arch not in entry.arches:
        return False
    return not entry.pools or set(capability.pools) <= set(entry.pools)
