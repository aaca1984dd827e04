"""Signed records: what a node says about itself in the DHT.

A record is published by one key and carries a body of one *kind*:

* ``capability`` -- what the node is (arch, OS, CPUs, memory, disk, VM or bare metal, pools,
  build types, HTTPS endpoint and TLS certificate fingerprint). Changes rarely.
* ``status`` -- how the node is doing (load, free slots, running builds, uptime, draining).
  Short-lived; its owner republishes it every few minutes.

Wire form (canonical msgpack, at most :data:`MAX_RECORD_SIZE` bytes), an 8-element array::

    [1, kind, publisher(32 bytes), seq, issued_at, expires_at, body(map), signature(64 bytes)]

The signature is ed25519 by ``publisher`` over ``Domain.RECORD_<KIND> || encode(first seven
elements as an array)``. Times are integer Unix seconds. See ``docs/records.md``.

:meth:`SignedRecord.from_bytes` checks size, encoding, shape and signature: a value of this
class is always well-formed and authentic. Whether it is *acceptable now* (not expired, not
from the future, lifetime in bounds, ``seq`` newer than what is held) is :meth:`check`'s job,
because it depends on ``now`` and on the caller's state.
"""

from __future__ import annotations

import enum
import re
from typing import Any, ClassVar, TypeAlias

import attrs

from ._codec import decode, encode
from ._errors import (
    ExpiredError,
    LifetimeError,
    MalformedError,
    NotYetValidError,
    StaleSeqError,
    UnknownKindError,
)
from ._identity import SIGNATURE_SIZE, Domain, Identity, PublicKey

__all__ = [
    "MAX_RECORD_SIZE",
    "Capability",
    "Kind",
    "MachineType",
    "RecordPolicy",
    "SignedRecord",
    "Status",
]

#: Hard bound on a record's wire size (BitTorrent BEP 44 uses the same for signed items).
MAX_RECORD_SIZE = 1000
_FORMAT_VERSION = 1
_U32 = 2**32
_U63 = 2**63

# Facet values (arch, OS, pool, build type) become parts of DHT keys such as
# "arch=s390x/os=fedora-41", so they may not contain "=" or "/".
_TOKEN = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}")
_MAX_LIST = 16


class Kind(enum.StrEnum):
    CAPABILITY = "capability"
    STATUS = "status"


class MachineType(enum.StrEnum):
    VM = "vm"
    METAL = "metal"


def _token(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise MalformedError(
            f"{attribute.name} must match [a-z0-9][a-z0-9._+-]{{0,63}}, got {value!r:.80}"
        )


def _tokens(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, tuple) or len(value) > _MAX_LIST:
        raise MalformedError(f"{attribute.name} must be a list of at most {_MAX_LIST} items")
    for item in value:
        _token(instance, attribute, item)
    if list(value) != sorted(set(value)):
        raise MalformedError(f"{attribute.name} must be sorted and without duplicates")


def _count(limit: int) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if type(value) is not int or not 0 <= value < limit:
            raise MalformedError(f"{attribute.name} must be an integer in [0, {limit})")

    return check


def _text(max_len: int) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, str) or len(value) > max_len or not value.isprintable():
            raise MalformedError(f"{attribute.name} must be printable text of <= {max_len} chars")

    return check


def _as_tuple(items: Any) -> Any:
    # Lists from the wire become tuples; anything else is left for the validator to refuse.
    return tuple(items) if isinstance(items, list) else items


def _facet_key(name: str, value: str) -> str:
    return f"{name}={value}"


@attrs.frozen
class Capability:
    """What a node is. Every field is validated when built; see ``docs/records.md``."""

    kind: ClassVar[Kind] = Kind.CAPABILITY

    arch: str = attrs.field(validator=_token)
    os: str = attrs.field(validator=_token)
    cpus: int = attrs.field(validator=_count(4096))
    cpu_model: str = attrs.field(validator=_text(96))
    memory_mb: int = attrs.field(validator=_count(_U32))
    disk_mb: int = attrs.field(validator=_count(_U32))
    machine: MachineType = attrs.field(converter=MachineType)
    build_types: tuple[str, ...] = attrs.field(converter=_as_tuple, validator=_tokens)
    pools: tuple[str, ...] = attrs.field(converter=_as_tuple, validator=_tokens)
    #: ``https://host:port`` for push jobs, or ``""`` for a pull-only node behind NAT.
    endpoint: str = attrs.field(default="", validator=_text(200))
    #: SHA-256 of the node's TLS certificate (DER); empty exactly when ``endpoint`` is.
    tls_sha256: bytes = attrs.field(default=b"")

    @endpoint.validator
    def _check_endpoint(self, attribute: attrs.Attribute[str], value: str) -> None:
        if value and not value.startswith("https://"):
            raise MalformedError("endpoint must be empty or an https:// URL")

    @tls_sha256.validator
    def _check_fingerprint(self, attribute: attrs.Attribute[bytes], value: bytes) -> None:
        if not isinstance(value, bytes):
            raise MalformedError("tls_sha256 must be bytes")
        expected = 32 if self.endpoint else 0
        if len(value) != expected:
            raise MalformedError(
                "tls_sha256 must be a 32-byte SHA-256 when an endpoint is set, else empty"
            )

    @property
    def pull_only(self) -> bool:
        """A node without an endpoint takes jobs only by polling a dispatcher."""
        return not self.endpoint

    def facets(self) -> list[str]:
        """The DHT index keys this capability is published under (design item 5)."""
        keys = [
            _facet_key("arch", self.arch),
            _facet_key("os", self.os),
            f"arch={self.arch}/os={self.os}",
            _facet_key("machine", self.machine.value),
        ]
        keys += [_facet_key("pool", pool) for pool in self.pools]
        return keys

    def to_wire(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "os": self.os,
            "cpus": self.cpus,
            "cpu_model": self.cpu_model,
            "memory_mb": self.memory_mb,
            "disk_mb": self.disk_mb,
            "machine": self.machine.value,
            "build_types": list(self.build_types),
            "pools": list(self.pools),
            "endpoint": self.endpoint,
            "tls_sha256": self.tls_sha256,
        }

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Capability:
        try:
            value = cls(
                arch=body["arch"],
                os=body["os"],
                cpus=body["cpus"],
                cpu_model=body["cpu_model"],
                memory_mb=body["memory_mb"],
                disk_mb=body["disk_mb"],
                machine=body["machine"],
                build_types=body["build_types"],
                pools=body["pools"],
                endpoint=body["endpoint"],
                tls_sha256=body["tls_sha256"],
            )
        except KeyError as exc:
            raise MalformedError(f"capability lacks field {exc}") from None
        except ValueError as exc:  # MachineType(...) of an unknown value
            raise MalformedError(f"capability: {exc}") from None
        if len(body) != 11:
            raise MalformedError("capability has unknown fields")
        return value


@attrs.frozen
class Status:
    """How a node is doing right now."""

    kind: ClassVar[Kind] = Kind.STATUS

    #: One-minute load average times 1000 (integers only on the wire).
    load_milli: int = attrs.field(validator=_count(_U32))
    slots_total: int = attrs.field(validator=_count(4096))
    slots_free: int = attrs.field(validator=_count(4096))
    running: int = attrs.field(validator=_count(4096))
    uptime_s: int = attrs.field(validator=_count(_U63))
    draining: bool = attrs.field(default=False)

    @draining.validator
    def _check_draining(self, attribute: attrs.Attribute[bool], value: bool) -> None:
        if type(value) is not bool:
            raise MalformedError("draining must be a boolean")
        if self.slots_free > self.slots_total:
            raise MalformedError("slots_free cannot exceed slots_total")

    def to_wire(self) -> dict[str, Any]:
        return {
            "load_milli": self.load_milli,
            "slots_total": self.slots_total,
            "slots_free": self.slots_free,
            "running": self.running,
            "uptime_s": self.uptime_s,
            "draining": self.draining,
        }

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Status:
        try:
            value = cls(
                load_milli=body["load_milli"],
                slots_total=body["slots_total"],
                slots_free=body["slots_free"],
                running=body["running"],
                uptime_s=body["uptime_s"],
                draining=body["draining"],
            )
        except KeyError as exc:
            raise MalformedError(f"status lacks field {exc}") from None
        if len(body) != 6:
            raise MalformedError("status has unknown fields")
        return value


Body: TypeAlias = Capability | Status

_BODY_TYPES: dict[str, type[Capability] | type[Status]] = {
    Kind.CAPABILITY: Capability,
    Kind.STATUS: Status,
}
_DOMAINS = {Kind.CAPABILITY: Domain.RECORD_CAPABILITY, Kind.STATUS: Domain.RECORD_STATUS}


@attrs.frozen
class RecordPolicy:
    """The acceptance bounds for records; every bound is a parameter (seconds)."""

    #: Longest allowed lifetime (``expires_at - issued_at``) per kind.
    max_lifetime: dict[Kind, int] = attrs.field(
        factory=lambda: {Kind.CAPABILITY: 24 * 3600, Kind.STATUS: 30 * 60}
    )
    #: How far in the future ``issued_at`` may be, for clocks that disagree.
    max_clock_skew: int = 300


DEFAULT_POLICY = RecordPolicy()


def _check_time(value: object, name: str) -> int:
    if type(value) is not int or not 0 <= value < _U63:
        raise MalformedError(f"{name} must be a non-negative integer")
    return value


@attrs.frozen
class SignedRecord:
    """A record, authentic and well-formed. Build with :meth:`create` or :meth:`from_bytes`."""

    publisher: PublicKey
    seq: int
    issued_at: int
    expires_at: int
    body: Body
    signature: bytes = attrs.field(repr=False)
    #: The exact wire bytes; kept so re-sending never re-encodes.
    raw: bytes = attrs.field(repr=False, eq=False)

    @property
    def kind(self) -> Kind:
        return self.body.kind

    @classmethod
    def create(
        cls,
        identity: Identity,
        body: Body,
        *,
        seq: int,
        issued_at: int,
        lifetime: int,
    ) -> SignedRecord:
        """Sign ``body`` as ``identity``.

        Raises :class:`OversizeError` if the record would exceed :data:`MAX_RECORD_SIZE`
        and :class:`MalformedError` for a negative ``seq``, time or lifetime.
        """
        _check_time(seq, "seq")
        _check_time(issued_at, "issued_at")
        if lifetime <= 0:
            raise MalformedError("lifetime must be positive")
        expires_at = _check_time(issued_at + lifetime, "expires_at")
        unsigned = [
            _FORMAT_VERSION,
            body.kind.value,
            identity.public_key.raw,
            seq,
            issued_at,
            expires_at,
            body.to_wire(),
        ]
        signature = identity.sign(_DOMAINS[body.kind], encode(unsigned))
        raw = encode([*unsigned, signature], max_size=MAX_RECORD_SIZE)
        return cls(identity.public_key, seq, issued_at, expires_at, body, signature, raw)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = MAX_RECORD_SIZE) -> SignedRecord:
        """Parse and authenticate one record.

        Raises :class:`OversizeError` (before decoding), :class:`MalformedError`,
        :class:`UnknownKindError` or :class:`BadSignatureError`.
        """
        value = decode(data, max_size=max_size)
        if type(value) is not list or len(value) != 8:
            raise MalformedError("a record is an array of 8 elements")
        version, kind, publisher, seq, issued_at, expires_at, body, signature = value
        if version != _FORMAT_VERSION or type(version) is not int:
            raise MalformedError(f"unsupported record format version {version!r:.20}")
        if kind not in _BODY_TYPES:
            raise UnknownKindError(f"unknown record kind {kind!r:.40}")
        if type(publisher) is not bytes:
            raise MalformedError("publisher must be bytes")
        key = PublicKey(publisher)
        _check_time(seq, "seq")
        _check_time(issued_at, "issued_at")
        _check_time(expires_at, "expires_at")
        if type(body) is not dict:
            raise MalformedError("body must be a map")
        if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
            raise MalformedError(f"signature must be {SIGNATURE_SIZE} bytes")
        # The signed bytes are the canonical encoding of the first seven elements. In a
        # canonical array that is the input with the header one shorter and the trailing
        # bin8 signature (2 + 64 bytes) removed: no re-encoding needed.
        signed = b"\x97" + data[1 : -(2 + SIGNATURE_SIZE)]
        key.verify(_DOMAINS[Kind(kind)], signed, signature)
        parsed = _BODY_TYPES[kind].from_wire(body)
        return cls(key, seq, issued_at, expires_at, parsed, signature, data)

    def to_bytes(self) -> bytes:
        return self.raw

    def check(
        self,
        now: float,
        *,
        policy: RecordPolicy = DEFAULT_POLICY,
        held_seq: int | None = None,
    ) -> None:
        """Check that this record is acceptable at time ``now`` (Unix seconds).

        ``held_seq`` is the ``seq`` already held for this publisher and key, if any.
        Raises :class:`ExpiredError`, :class:`NotYetValidError`, :class:`LifetimeError`
        or :class:`StaleSeqError`.
        """
        if self.expires_at <= self.issued_at:
            raise LifetimeError("expires_at is not after issued_at")
        lifetime = self.expires_at - self.issued_at
        limit = policy.max_lifetime[self.kind]
        if lifetime > limit:
            raise LifetimeError(f"lifetime {lifetime}s exceeds {limit}s for {self.kind.value}")
        if now >= self.expires_at:
            raise ExpiredError(f"{self.kind.value} record expired {now - self.expires_at:.0f}s ago")
        if self.issued_at > now + policy.max_clock_skew:
            raise NotYetValidError(
                f"{self.kind.value} record issued {self.issued_at - now:.0f}s in the future"
            )
        if held_seq is not None and self.seq <= held_seq:
            raise StaleSeqError(f"seq {self.seq} is not newer than held seq {held_seq}")


def decode_record(
    data: bytes,
    now: float,
    *,
    policy: RecordPolicy = DEFAULT_POLICY,
    held_seq: int | None = None,
) -> SignedRecord:
    """The full acceptance path: parse, authenticate and :meth:`SignedRecord.check`.

    Raises any :class:`RemoteError` subclass described there.
    """
    record = SignedRecord.from_bytes(data)
    record.check(now, policy=policy, held_seq=held_seq)
    return record
