"""Signed records: what a node says about itself in the DHT.

A record is published by one key and carries a body of one *kind*:

* ``capability`` -- what the node is (arch, OS, CPUs, memory, disk, VM or bare metal, pools,
  build types, HTTPS endpoint and TLS certificate fingerprint). Changes rarely.
* ``status`` -- how the node is doing (load, free slots, running builds, uptime, draining).
  Short-lived; its owner republishes it every few minutes.

Wire form (canonical msgpack, at most :data:`MAX_RECORD_SIZE` bytes), an 8-element array::

    [1, kind, publisher(32 bytes), seq, issued_at, expires_at, body(array), signature(64 bytes)]

A body is the array of its class's fields in declared order (``Capability._FIELDS``), not a
map: a record is a fixed schema with no unknown fields, so names on the wire would only add
bytes (a quarter of a capability record) and decoding work. The on-demand fields are the one
exception, added without a new format version: a capability's ``wake_s`` and ``wake_url``
and a status's ``standby`` are trailing fields written only when not at their defaults
(``_EXTRA_FIELDS``), so every record of a node that is not on demand is byte for byte what
older versions write and read; an older reader refuses the longer form as malformed (an
on-demand node is invisible to it rather than misread).

The signature is ed25519 by ``publisher`` over ``Domain.RECORD_<KIND> || encode(first seven
elements as an array)``. Times are integer Unix seconds. See ``docs/records.md``.

:meth:`SignedRecord.from_bytes` checks size, encoding, shape and signature: a value of this
class is always well-formed and authentic. Whether it is *acceptable now* (not expired, not
from the future, lifetime in bounds, ``seq`` newer than what is held) is :meth:`check`'s job,
because it depends on ``now`` and on the caller's state.

Why the parsing code looks the way it does
------------------------------------------
Every DHT node verifies every record it is offered, so :func:`decode_record` is a hot path
whose cost should be the ed25519 check and little else (the goal, measured by
``bench/records.py``, is decoding plus checks under 10% of the signature check). Nothing is
skipped to get there; the work is arranged so that each check happens once:

* The typed parser checks the exact type and bound of every field and the length of every
  array. That subsumes the generic canonical walk of :func:`._codec.decode` (no floats, no
  extension types, bounded nesting), so only the byte-exact re-encoding remains
  (:func:`._codec.require_canonical_encoding`: shortest forms).
* Each body class has one reference validation, a table of per-field checks that also
  names the failing field in the error; bodies built in code go through it (from
  ``__attrs_post_init__``). The wire path first tries one boolean expression over all fields
  that accepts a subset of what the reference accepts, and falls back to the reference
  otherwise; a property test checks that the two agree. It then builds the frozen instance
  in one step (setting its ``__dict__`` to one dict literal of the decoded values) instead
  of through ``__init__``, which is why the value classes are ``slots=False``. The record's
  own attribute map is built the same way.
* Token fields (arch, OS, pools, build types) are checked against a bounded cache of strings
  and lists already known valid: the same few values arrive in every record, and a regular
  expression match costs more than the rest of the field checks together. For decoded
  values, membership in those caches also proves the exact type (a decoded value equal to a
  ``str`` is a ``str``), so the fast test skips those type checks; values built in code
  always get the reference checks (:meth:`Capability.from_wire`).
* The signature is checked last, so garbage is rejected before the expensive step, with
  libsodium's ``crypto_sign_open`` called without output buffers (see
  :func:`._identity.verify_prefixed`) on ``signature || domain || header || bytes`` built in
  one expression.
* :func:`decode_record` evaluates the time checks of :meth:`SignedRecord.check` inline, on
  local values, and calls ``check`` only to raise the precise error (after a signature
  error, as before). The record and those conditions are worked out before the signature
  check, so that as little Python as possible runs after it on cold CPU caches.
"""

from __future__ import annotations

import enum
import itertools
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeAlias

import attrs

from ._codec import encode, require_canonical_encoding, unpack_unchecked
from ._errors import (
    BadSignatureError,
    ExpiredError,
    LifetimeError,
    MalformedError,
    NotYetValidError,
    StaleSeqError,
    UnknownKindError,
)
from ._identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Domain,
    Identity,
    PublicKey,
    _known_keys,
    verify_joined,
)

__all__ = [
    "DETECTED_FIELDS",
    "NodeTraits",
    "MAX_CPUS",
    "MAX_CPU_MODEL",
    "MAX_MB",
    "MAX_RECORD_SIZE",
    "Capability",
    "Kind",
    "MachineType",
    "RecordPolicy",
    "SignedRecord",
    "Status",
    "facet",
    "platform_facet",
]

#: Hard bound on a record's wire size (BitTorrent BEP 44 uses the same for signed items).
MAX_RECORD_SIZE = 1000
_FORMAT_VERSION = 1
_U32 = 2**32
_U63 = 2**63

# Facet values (arch, OS, pool, build type) become parts of DHT keys such as
# "arch=s390x/os=fedora-41", so they may not contain "=" or "/".
_TOKEN = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}")
_TOKEN_RULE = "[a-z0-9][a-z0-9._+-]{0,63}"
_MAX_LIST = 16
_MAX_CPUS = 4096
_MAX_SLOTS = 4096
_MAX_CPU_MODEL = 96
_MAX_ENDPOINT = 200
_TLS_SHA256_SIZE = 32
_MAX_WAKE_S = 3600


class Kind(enum.StrEnum):
    CAPABILITY = "capability"
    STATUS = "status"


class MachineType(enum.StrEnum):
    VM = "vm"
    METAL = "metal"


# -- field checks -----------------------------------------------------------------------------

# Strings and token lists already seen to be valid. Bounded: when full it is simply emptied,
# so a peer sending ever new values costs at most the regular expression it would cost
# without the cache. Only exact ``str`` and ``tuple`` are cached (what the decoder produces).
_CACHE_LIMIT = 4096
_known_tokens: dict[str, None] = {}
_known_token_lists: dict[tuple[str, ...], None] = {}


def _is_token(value: object) -> bool:
    """A facet token: ``[a-z0-9][a-z0-9._+-]{0,63}``, exactly of type ``str``."""
    if type(value) is not str:
        return False
    if value in _known_tokens:
        return True
    if _TOKEN.fullmatch(value) is None:
        return False
    if len(_known_tokens) >= _CACHE_LIMIT:
        _known_tokens.clear()
    _known_tokens[value] = None
    return True


def _is_token_list(value: object) -> bool:
    """A tuple of at most 16 tokens, sorted and without duplicates."""
    if type(value) is not tuple:
        return False
    try:
        if value in _known_token_lists:
            return True
    except TypeError:  # an unhashable element (a map): certainly not a token
        return False
    if len(value) > _MAX_LIST or not all(_is_token(item) for item in value):
        return False
    if any(a >= b for a, b in itertools.pairwise(value)):
        return False
    if len(_known_token_lists) >= _CACHE_LIMIT:
        _known_token_lists.clear()
    _known_token_lists[value] = None
    return True


def _is_count(value: object, limit: int) -> bool:
    return type(value) is int and 0 <= value < limit


def _is_text(value: object, max_len: int) -> bool:
    return type(value) is str and len(value) <= max_len and value.isprintable()


def _is_endpoint(value: object) -> bool:
    return _is_text(value, _MAX_ENDPOINT) and (
        value == "" or str(value).startswith("https://")
    )


def _as_tuple(items: Any) -> Any:
    # Lists from code or from the generic decoder become tuples; anything else is left for
    # validation to refuse.
    return tuple(items) if type(items) is list else items


_MACHINES: dict[str, MachineType] = {member.value: member for member in MachineType}


def _to_machine(value: Any) -> Any:
    # A dict lookup rather than MachineType(value): the enum call costs ~10x more. Unknown
    # values are left as they are for validation to refuse with a clear message.
    if isinstance(value, str):
        return _MACHINES.get(value, value)
    return value


# The reference validation of a body: (field, check of the field map, rule for the message),
# in order; a check may rely on the ones before it having passed. Bodies built in code go
# through it; the wire path tries a faster, stricter-or-equal test first (see _build).
_FieldChecks: TypeAlias = tuple[tuple[str, Callable[[Mapping[str, Any]], bool], str], ...]


def _check_fields(fields: Mapping[str, Any], checks: _FieldChecks, what: str) -> None:
    """Raise :class:`MalformedError` naming the first field that fails its check."""
    for name, check, rule in checks:
        if not check(fields):
            raise MalformedError(f"{what}: {name} {rule}, got {fields[name]!r:.80}")


def _body_fields(
    body: object, names: tuple[str, ...], what: str, *, optional: int = 0
) -> dict[str, Any]:
    """The field map of a body array: exactly one value per name in ``names``, in order;
    or, with ``optional``, without that many trailing names (then absent from the map).

    Raises :class:`MalformedError` for anything else.
    """
    if type(body) not in (tuple, list):
        raise MalformedError(f"a {what} is an array of {len(names)} fields")
    assert isinstance(body, (tuple, list))
    if len(body) != len(names) and len(body) != len(names) - optional:
        raise MalformedError(
            f"a {what} has {len(names)} fields ({', '.join(names)}), got {len(body)}"
        )
    return dict(zip(names, body, strict=False))


def facet(name: str, value: str) -> str:
    """The text of one facet (``arch=s390x``): the one place facet texts are built, for
    publishing (:meth:`Capability.facets`) and for looking up (``dht.Query.facets``)."""
    return f"{name}={value}"


def platform_facet(arch: str, os: str) -> str:
    """The combined facet of a platform (``arch=s390x/os=fedora-41``)."""
    return f"{facet('arch', arch)}/{facet('os', os)}"


#: Their bounds, as the record checks them: cpus below MAX_CPUS, memory and disk (MiB) below
#: MAX_MB, a CPU model of at most MAX_CPU_MODEL characters.
MAX_CPUS = _MAX_CPUS
MAX_MB = _U32
MAX_CPU_MODEL = _MAX_CPU_MODEL


# -- bodies -----------------------------------------------------------------------------------


@attrs.frozen(slots=False)
class NodeTraits:
    """What a node is made of and what it builds: the fields of a :class:`Capability` a node
    detects about itself (its configuration may override them), in wire order. The first
    fields of a capability record, and what the node's detection finds
    (``p2pbuild.node.Detected``). Checked only as part of a :class:`Capability`.
    """

    arch: str
    os: str
    cpus: int
    cpu_model: str
    memory_mb: int
    disk_mb: int
    machine: MachineType = attrs.field(converter=_to_machine)
    build_types: tuple[str, ...] = attrs.field(converter=_as_tuple)


#: The names of the :class:`NodeTraits` fields: the one list detection, configuration and
#: the node's record share.
DETECTED_FIELDS = tuple(field.name for field in attrs.fields(NodeTraits))


@attrs.frozen(slots=False)
class Capability(NodeTraits):
    """What a node is: its :class:`NodeTraits`, then where and how it is reached. Every field
    is validated when built; see ``docs/records.md``.

    Raises :class:`MalformedError` for any field out of bounds.
    """

    kind: ClassVar[Kind] = Kind.CAPABILITY
    #: The field names, in the order of the wire array (the traits, then those below).
    _FIELDS: ClassVar[tuple[str, ...]]

    pools: tuple[str, ...] = attrs.field(converter=_as_tuple)
    #: ``https://host:port`` for push jobs, or ``""`` for a pull-only node behind NAT.
    endpoint: str = ""
    #: SHA-256 of the node's TLS certificate (DER); empty exactly when ``endpoint`` is.
    tls_sha256: bytes = b""
    #: On-demand nodes: the longest a wake-up takes, in seconds (0: always on).
    wake_s: int = 0
    #: Where a dispatcher sends a signed wake request (``https://``, run by the operator),
    #: or ``""``: a pull node's long-poll is its wake-up (it answers at once).
    wake_url: str = ""

    def __attrs_post_init__(self) -> None:
        _check_fields(self.__dict__, _CAPABILITY_CHECKS, "capability")

    @property
    def on_demand(self) -> bool:
        """The node may be in standby and is woken before it builds."""
        return self.wake_s > 0

    @property
    def pull_only(self) -> bool:
        """A node without an endpoint takes jobs only by polling a dispatcher."""
        return not self.endpoint

    def facets(self) -> list[str]:
        """The DHT index keys this capability is published under (design item 5)."""
        keys = [
            facet("arch", self.arch),
            facet("os", self.os),
            platform_facet(self.arch, self.os),
            facet("machine", self.machine.value),
        ]
        keys += [facet("pool", pool) for pool in self.pools]
        return keys

    def to_wire(self) -> list[Any]:
        """The wire array: the fields in declared order (``docs/records.md``)."""
        return [
            self.arch,
            self.os,
            self.cpus,
            self.cpu_model,
            self.memory_mb,
            self.disk_mb,
            self.machine.value,
            list(self.build_types),
            list(self.pools),
            self.endpoint,
            self.tls_sha256,
        ] + ([self.wake_s, self.wake_url] if self.wake_s else [])

    def to_dict(self) -> dict[str, Any]:
        """The fields by name, as on the wire (plain values; the on-demand ones always)."""
        wire = self.to_wire()
        if len(wire) < len(self._FIELDS):
            wire += [self.wake_s, self.wake_url]
        return dict(zip(self._FIELDS, wire, strict=True))

    @classmethod
    def from_wire(cls, body: object) -> Capability:
        """Build from a decoded array of exactly the fields of :meth:`to_wire`, in order.

        Raises :class:`MalformedError`.
        """
        fields = _body_fields(body, cls._FIELDS, "capability", optional=2)
        fields = {name: _as_tuple(value) for name, value in fields.items()}
        values = tuple(fields.values())
        # Values from code may be of any type (str subclasses too): the reference checks
        # them; _build's fast test is for decoded values only.
        _check_fields({"wake_s": 0, "wake_url": "", **fields}, _CAPABILITY_CHECKS, "capability")
        return cls._build(values)

    @classmethod
    def _build(cls, values: tuple[Any, ...]) -> Capability:
        """Validate and build from the wire array's values as the decoder produces them:
        exactly the fields, in order, of the exact built-in types msgpack decodes to
        (arrays as tuples, ``machine`` as text).

        Raises :class:`MalformedError`.
        """
        if len(values) != 11:
            return cls._build_on_demand(values)
        (arch, os, cpus, cpu_model, memory_mb, disk_mb, machine, build_types, pools, endpoint,
         tls_sha256) = values  # fmt: skip
        # The fast test accepts only what the reference checks accept, and tokens only when
        # already known (cached by an earlier reference check): one boolean expression,
        # no calls but a few C methods. Whatever it does not accept gets the reference.
        # Membership in the caches of known tokens (exact str) and token lists (exact
        # tuples of them) implies the exact type for decoded values: a decoded value equal
        # to a str is a str, one equal to a tuple is a tuple, and a map is unhashable
        # (TypeError). So is membership in _MACHINES.
        try:
            fast = (
                arch in _known_tokens
                and os in _known_tokens
                and build_types in _known_token_lists
                and pools in _known_token_lists
                and (machine_value := _MACHINES.get(machine)) is not None
                and type(cpus) is int
                and 0 <= cpus < _MAX_CPUS
                and type(memory_mb) is int
                and 0 <= memory_mb < _U32
                and type(disk_mb) is int
                and 0 <= disk_mb < _U32
                and type(cpu_model) is str
                and len(cpu_model) <= _MAX_CPU_MODEL
                and cpu_model.isprintable()
                and type(endpoint) is str
                and type(tls_sha256) is bytes
                and (
                    (endpoint == "" and tls_sha256 == b"")
                    or (
                        len(endpoint) <= _MAX_ENDPOINT
                        and endpoint.startswith("https://")
                        and endpoint.isprintable()
                        and len(tls_sha256) == _TLS_SHA256_SIZE
                    )
                )
            )
        except TypeError:  # a map where a token or token list belongs (unhashable)
            fast = False
        if not fast:
            fields = dict(zip(cls._FIELDS[:11], values, strict=True))
            _check_fields({**fields, "wake_s": 0, "wake_url": ""}, _CAPABILITY_CHECKS,
                          "capability")
            machine_value = _MACHINES[machine]
        # Every field is checked: the frozen instance gets its attribute map in one step
        # (module docstring).
        value = _new(cls)
        _setattr(value, "__dict__", {
            "arch": arch,
            "os": os,
            "cpus": cpus,
            "cpu_model": cpu_model,
            "memory_mb": memory_mb,
            "disk_mb": disk_mb,
            "machine": machine_value,
            "build_types": build_types,
            "pools": pools,
            "endpoint": endpoint,
            "tls_sha256": tls_sha256,
            "wake_s": 0,
            "wake_url": "",
        })  # fmt: skip
        return value

    @classmethod
    def _build_on_demand(cls, values: tuple[Any, ...]) -> Capability:
        """The longer form (with ``wake_s`` and ``wake_url``): reference checks only (rare)."""
        fields = dict(zip(cls._FIELDS, values, strict=True))
        if fields["wake_s"] == 0:
            # Written only when not the default: one record, one encoding.
            raise MalformedError("capability: wake_s 0 is written as the shorter form")
        _check_fields(fields, _CAPABILITY_CHECKS, "capability")
        fields["machine"] = _MACHINES[fields["machine"]]
        value = _new(cls)
        _setattr(value, "__dict__", fields)
        return value


_TOKEN_LIST_RULE = f"must be a sorted list of at most {_MAX_LIST} distinct tokens ({_TOKEN_RULE})"
_CAPABILITY_CHECKS: _FieldChecks = (
    ("arch", lambda f: _is_token(f["arch"]), f"must match {_TOKEN_RULE}"),
    ("os", lambda f: _is_token(f["os"]), f"must match {_TOKEN_RULE}"),
    ("cpus", lambda f: _is_count(f["cpus"], _MAX_CPUS), f"must be an integer in [0, {_MAX_CPUS})"),
    (
        "cpu_model",
        lambda f: _is_text(f["cpu_model"], _MAX_CPU_MODEL),
        f"must be printable text of at most {_MAX_CPU_MODEL} characters",
    ),
    ("memory_mb", lambda f: _is_count(f["memory_mb"], _U32), "must be an integer in [0, 2**32)"),
    ("disk_mb", lambda f: _is_count(f["disk_mb"], _U32), "must be an integer in [0, 2**32)"),
    (
        "machine",
        lambda f: isinstance(f["machine"], str) and f["machine"] in _MACHINES,
        "must be 'vm' or 'metal'",
    ),
    ("build_types", lambda f: _is_token_list(f["build_types"]), _TOKEN_LIST_RULE),
    ("pools", lambda f: _is_token_list(f["pools"]), _TOKEN_LIST_RULE),
    (
        "endpoint",
        lambda f: _is_endpoint(f["endpoint"]),
        f"must be empty or a printable https:// URL of at most {_MAX_ENDPOINT} characters",
    ),
    (
        "tls_sha256",
        lambda f: type(f["tls_sha256"]) is bytes
        and len(f["tls_sha256"]) == (_TLS_SHA256_SIZE if f["endpoint"] else 0),
        "must be a 32-byte SHA-256 when an endpoint is set, else empty",
    ),
    (
        "wake_s",
        lambda f: _is_count(f["wake_s"], _MAX_WAKE_S + 1),
        f"must be an integer in [0, {_MAX_WAKE_S}]",
    ),
    (
        "wake_url",
        lambda f: _is_endpoint(f["wake_url"]) and (f["wake_s"] > 0 or f["wake_url"] == ""),
        f"must be empty or a printable https:// URL of at most {_MAX_ENDPOINT} characters, "
        "and empty unless wake_s is set",
    ),
)
Capability._FIELDS = tuple(field.name for field in attrs.fields(Capability))


@attrs.frozen(slots=False)
class Status:
    """How a node is doing right now. Raises :class:`MalformedError` for a field out of
    bounds, including more free slots than slots."""

    kind: ClassVar[Kind] = Kind.STATUS
    _FIELDS: ClassVar[tuple[str, ...]]

    #: One-minute load average times 1000 (integers only on the wire).
    load_milli: int
    slots_total: int
    slots_free: int
    running: int
    uptime_s: int
    draining: bool = False
    #: An on-demand node asleep (idle for its set time): it builds once woken.
    standby: bool = False

    def __attrs_post_init__(self) -> None:
        _check_fields(self.__dict__, _STATUS_CHECKS, "status")

    def to_wire(self) -> list[Any]:
        """The wire array: the fields in declared order, ``standby`` only when set
        (``docs/records.md``)."""
        return [*_status_wire(self), *([True] if self.standby else [])]

    def to_dict(self) -> dict[str, Any]:
        """The fields by name, as on the wire (plain values; ``standby`` always)."""
        return {**dict(zip(self._FIELDS, self.to_wire(), strict=False)),
                "standby": self.standby}

    @classmethod
    def from_wire(cls, body: object) -> Status:
        """Build from a decoded array of exactly the fields of :meth:`to_wire`, in order.

        Raises :class:`MalformedError`.
        """
        return cls._build(
            tuple(_body_fields(body, cls._FIELDS, "status", optional=1).values())
        )

    @classmethod
    def _build(cls, values: tuple[Any, ...]) -> Status:
        """As :meth:`Capability._build`."""
        standby = False
        if len(values) == 7:
            # The longer form is written only for a node in standby: one record, one
            # encoding.
            *rest, standby = values
            if standby is not True:
                raise MalformedError("status: standby is written only when true")
            values = tuple(rest)
        load_milli, slots_total, slots_free, running, uptime_s, draining = values
        if not (
            type(draining) is bool
            and type(load_milli) is int
            and 0 <= load_milli < _U32
            and type(running) is int
            and 0 <= running < _MAX_SLOTS
            and type(slots_free) is int
            and type(slots_total) is int
            and 0 <= slots_free <= slots_total < _MAX_SLOTS
            and type(uptime_s) is int
            and 0 <= uptime_s < _U63
        ):
            _check_fields(dict(zip(cls._FIELDS[:6], values, strict=True)), _STATUS_CHECKS,
                          "status")
        value = _new(cls)
        _setattr(value, "__dict__", {
            "load_milli": load_milli,
            "slots_total": slots_total,
            "slots_free": slots_free,
            "running": running,
            "uptime_s": uptime_s,
            "draining": draining,
            "standby": standby,
        })  # fmt: skip
        return value


_SLOTS_RULE = f"must be an integer in [0, {_MAX_SLOTS})"
_STATUS_CHECKS: _FieldChecks = (
    ("load_milli", lambda f: _is_count(f["load_milli"], _U32), "must be an integer in [0, 2**32)"),
    ("slots_total", lambda f: _is_count(f["slots_total"], _MAX_SLOTS), _SLOTS_RULE),
    ("slots_free", lambda f: _is_count(f["slots_free"], _MAX_SLOTS), _SLOTS_RULE),
    ("running", lambda f: _is_count(f["running"], _MAX_SLOTS), _SLOTS_RULE),
    ("uptime_s", lambda f: _is_count(f["uptime_s"], _U63), "must be an integer in [0, 2**63)"),
    ("draining", lambda f: type(f["draining"]) is bool, "must be a boolean"),
    ("standby", lambda f: type(f.get("standby", False)) is bool, "must be a boolean"),
    ("slots_free", lambda f: f["slots_free"] <= f["slots_total"], "cannot exceed slots_total"),
)
Status._FIELDS = tuple(field.name for field in attrs.fields(Status))
#: The values of every field but ``standby``, in order.
_status_wire = operator.attrgetter(*Status._FIELDS[:-1])


Body: TypeAlias = Capability | Status

#: Trailing fields written only when not at their defaults (module doc): on-demand nodes.
_EXTRA_FIELDS = {Kind.CAPABILITY: 2, Kind.STATUS: 1}

_BODY_TYPES: dict[str, type[Capability] | type[Status]] = {
    Kind.CAPABILITY: Capability,
    Kind.STATUS: Status,
}
_DOMAINS = {Kind.CAPABILITY: Domain.RECORD_CAPABILITY, Kind.STATUS: Domain.RECORD_STATUS}

# Per kind, for the decoder: the body's builder, its number of fields, and the bytes that
# precede the signed part of a record when it is verified: the domain prefix and the header
# of a 7-element array.
_WIRE_KINDS: dict[str, tuple[Callable[[tuple[Any, ...]], Body], int, bytes, int]] = {
    kind.value: (
        body_type._build, len(body_type._FIELDS), _DOMAINS[kind].value + b"\x97",
        len(body_type._FIELDS) - _EXTRA_FIELDS[kind],
    )
    for kind, body_type in ((Kind.CAPABILITY, Capability), (Kind.STATUS, Status))
}
# A canonical record ends with its signature as msgpack bin 8: 0xc4, length 64, 64 bytes.
_SIGNATURE_TAIL = 2 + SIGNATURE_SIZE

# Building a frozen value whose fields are all checked: a bare instance, then its attribute
# map set in one step (frozen attrs classes refuse ``value.__dict__ = ...``).
_new = object.__new__
_setattr = object.__setattr__


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


def _is_time(value: object) -> bool:
    return type(value) is int and 0 <= value < _U63


def _check_time(value: object, name: str) -> int:
    if not _is_time(value):
        raise MalformedError(f"{name} must be an integer in [0, 2**63)")
    assert isinstance(value, int)
    return value


def _envelope_error(value: tuple[Any, ...]) -> MalformedError | UnknownKindError:
    """The precise error for a decoded record array whose envelope fields are wrong."""
    version, kind, publisher, seq, issued_at, expires_at, body, signature = value
    if type(version) is not int or version != _FORMAT_VERSION:
        return MalformedError(f"unsupported record format version {version!r:.20}")
    if type(kind) is not str:
        return MalformedError("record kind must be text")
    if kind not in _WIRE_KINDS:
        return UnknownKindError(f"unknown record kind {kind!r:.40}")
    if type(publisher) is not bytes or len(publisher) != PUBLIC_KEY_SIZE:
        return MalformedError(f"publisher must be {PUBLIC_KEY_SIZE} bytes")
    for name, item in (("seq", seq), ("issued_at", issued_at), ("expires_at", expires_at)):
        if not _is_time(item):
            return MalformedError(f"{name} must be an integer in [0, 2**63)")
    if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
        return MalformedError(f"signature must be {SIGNATURE_SIZE} bytes")
    names = _BODY_TYPES[kind]._FIELDS
    try:
        _body_fields(body, names, kind, optional=_EXTRA_FIELDS[Kind(kind)])
    except MalformedError as exc:
        return exc
    raise AssertionError("a well-formed envelope has no envelope error")


@attrs.frozen(slots=False)
class SignedRecord:
    """A record, authentic and well-formed. Build with :meth:`create` or :meth:`from_bytes`;
    the plain constructor only checks field types (it cannot check the signature)."""

    publisher: PublicKey
    seq: int
    issued_at: int
    expires_at: int
    body: Body
    signature: bytes = attrs.field(repr=False)
    #: The exact wire bytes; kept so re-sending never re-encodes.
    raw: bytes = attrs.field(repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        # Not on the decoding path (from_bytes builds the instance directly after checking
        # all of this and more).
        if not isinstance(self.publisher, PublicKey):
            raise MalformedError("publisher must be a PublicKey")
        for name in ("seq", "issued_at", "expires_at"):
            _check_time(getattr(self, name), name)
        if not isinstance(self.body, (Capability, Status)):
            raise MalformedError("body must be a Capability or a Status")
        if type(self.signature) is not bytes or len(self.signature) != SIGNATURE_SIZE:
            raise MalformedError(f"signature must be {SIGNATURE_SIZE} bytes")
        if type(self.raw) is not bytes:
            raise MalformedError("raw must be bytes")

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
        if type(lifetime) is not int or lifetime <= 0:
            raise MalformedError("lifetime must be a positive integer")
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

        Raises :class:`OversizeError` (before decoding), :class:`MalformedError` (including
        any non-canonical encoding), :class:`UnknownKindError` or :class:`BadSignatureError`.
        """
        return _parse(data, max_size)

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
        Raises :class:`LifetimeError`, :class:`ExpiredError`, :class:`NotYetValidError` or
        :class:`StaleSeqError`, checked in that order.
        """
        issued_at = self.issued_at
        expires_at = self.expires_at
        lifetime = expires_at - issued_at
        if lifetime <= 0:
            raise LifetimeError("expires_at is not after issued_at")
        kind = self.body.kind
        limit = policy.max_lifetime[kind]
        if lifetime > limit:
            raise LifetimeError(f"lifetime {lifetime}s exceeds {limit}s for {kind.value}")
        if now >= expires_at:
            raise ExpiredError(f"{kind.value} record expired {now - expires_at:.0f}s ago")
        if issued_at > now + policy.max_clock_skew:
            raise NotYetValidError(
                f"{kind.value} record issued {issued_at - now:.0f}s in the future"
            )
        if held_seq is not None and self.seq <= held_seq:
            raise StaleSeqError(f"seq {self.seq} is not newer than held seq {held_seq}")



def _parse(
    data: bytes,
    max_size: int,
    now: float | None = None,
    policy: RecordPolicy = DEFAULT_POLICY,
    held_seq: int | None = None,
) -> SignedRecord:
    """:meth:`SignedRecord.from_bytes`, and with ``now`` also :meth:`SignedRecord.check`
    (for :func:`decode_record`), in that order of errors."""
    if type(data) is not bytes:
        if not isinstance(data, (bytearray, memoryview)):
            raise MalformedError(f"a record is bytes, not {type(data).__name__}")
        if len(data) <= max_size:  # else unpack_unchecked reports it, without a copy
            data = bytes(data)
    value = unpack_unchecked(data, max_size=max_size)
    if type(value) is not tuple or len(value) != 8:
        raise MalformedError("a record is an array of 8 elements")
    version, kind, publisher, seq, issued_at, expires_at, body, signature = value
    wire_kind = _WIRE_KINDS.get(kind) if type(kind) is str else None
    if not (
        type(version) is int
        and version == _FORMAT_VERSION
        and wire_kind is not None
        and type(publisher) is bytes
        and len(publisher) == PUBLIC_KEY_SIZE
        and type(seq) is int
        and 0 <= seq < _U63
        and type(issued_at) is int
        and 0 <= issued_at < _U63
        and type(expires_at) is int
        and 0 <= expires_at < _U63
        and type(signature) is bytes
        and len(signature) == SIGNATURE_SIZE
        and type(body) is tuple
        and (len(body) == wire_kind[3] or len(body) == wire_kind[1])
    ):
        raise _envelope_error(value)
    build, _, signed_prefix, _ = wire_kind
    require_canonical_encoding(value, data)
    parsed = build(body)
    # Every field is checked above; build the frozen value in one step (module docstring).
    # It is built before the signature check, which evicts the interpreter's data from the
    # CPU caches: as little as possible runs after it.
    record = _new(SignedRecord)
    _setattr(record, "__dict__", {
        "publisher": _known_keys.get(publisher) or PublicKey._from_checked(publisher),
        "seq": seq,
        "issued_at": issued_at,
        "expires_at": expires_at,
        "body": parsed,
        "signature": signature,
        "raw": data,
    })  # fmt: skip
    # SignedRecord.check's conditions on the local values, evaluated now and acted on after
    # the signature check (whose errors come first); check itself raises the precise error.
    # (A policy's max_lifetime is keyed by Kind, a StrEnum: the text looks it up.)
    lifetime = expires_at - issued_at
    timely = now is None or not (
        lifetime <= 0
        or lifetime > policy.max_lifetime[kind]
        or now >= expires_at
        or issued_at > now + policy.max_clock_skew
        or (held_seq is not None and seq <= held_seq)
    )
    # The signed bytes are the canonical encoding of the first seven elements: in a
    # canonical 8-array (header 0x98) that is the input with a 7-array header (0x97) and
    # without the trailing bin 8 signature, so nothing is re-encoded.
    if not verify_joined(publisher, signature + signed_prefix + data[1:-_SIGNATURE_TAIL]):
        raise BadSignatureError(
            f"{kind} record signature does not verify for "
            f"{PublicKey._from_checked(publisher).fingerprint}"
        )
    if not timely:
        assert now is not None
        record.check(now, policy=policy, held_seq=held_seq)
    return record


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
    return _parse(data, MAX_RECORD_SIZE, now, policy, held_seq)
