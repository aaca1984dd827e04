"""Canonical msgpack: the one wire and storage encoding of p2pbuild.

Canonical means one value has exactly one encoding, so that a signature over the encoding is
a signature over the value:

* maps have text keys, emitted in sorted order (by their UTF-8 bytes);
* integers use msgpack's shortest form (the packer already does this);
* text is ``str``, opaque bytes are ``bin``; no floats, no extension types, no ``tuple``
  distinction (arrays decode as lists).

:func:`decode` checks the size bound *before* any parsing, decodes with the msgpack library's
own container limits, and then re-encodes and compares: a non-canonical encoding of a valid
value is rejected, which is what makes the signatures in p2pbuild non-malleable.

Typed parsers on a hot path (signed records) use :func:`unpack_unchecked` and
:func:`require_canonical_encoding` instead of :func:`decode`: they check the type of every
field and the order of every map's keys themselves, which makes the generic walk of
:func:`_check_canonical` redundant, and they keep only the part of canonicality a schema
cannot see (the byte-exact re-encoding). See ``_records.py``.

Both directions live here, as a symmetric pair (aioquic ``quic/packet.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, TypeAlias

import msgpack

from ._errors import LocalError, MalformedError, OversizeError

__all__ = ["Value", "decode", "encode", "require_canonical_encoding", "unpack_unchecked"]

#: What the codec carries. ``Any`` because recursive aliases trip msgpack's untyped API.
Value: TypeAlias = Any

# Nesting deeper than this is never produced by p2pbuild; refuse it rather than recurse.
_MAX_DEPTH = 16


def _canonical(value: Value, depth: int = 0) -> Value:
    """Return ``value`` with every map rebuilt in sorted key order; refuse what we never emit."""
    if depth > _MAX_DEPTH:
        raise LocalError("value nested too deeply to encode")
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return value
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise LocalError(f"map keys must be text, got {type(key).__name__}")
        # Code point order of str is the byte order of its UTF-8 encoding.
        return {key: _canonical(value[key], depth + 1) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(item, depth + 1) for item in value]
    raise LocalError(f"cannot encode {type(value).__name__} canonically")


def _check_canonical(value: Value, depth: int = 0) -> None:
    """Raise :class:`MalformedError` unless a decoded ``value`` is in the canonical subset.

    Cheaper than :func:`_canonical` on the hot decode path: it walks without rebuilding.
    """
    if depth > _MAX_DEPTH:
        raise MalformedError("not canonical: nested too deeply")
    kind = type(value)
    if kind is dict:
        keys = list(value)
        # strict_map_key lets bytes keys through; compare types first so that a map with
        # mixed str and bytes keys cannot make sorted() raise TypeError.
        for key in keys:
            if type(key) is not str:
                raise MalformedError(f"not canonical: {type(key).__name__} map key")
        if keys != sorted(keys):
            raise MalformedError("not canonical: map keys are not sorted")
        for item in value.values():
            if type(item) in _CONTAINERS:
                _check_canonical(item, depth + 1)
            elif type(item) not in _SCALARS:
                raise MalformedError(f"not canonical: {type(item).__name__} is not allowed")
    elif kind is list:
        for item in value:
            if type(item) in _CONTAINERS:
                _check_canonical(item, depth + 1)
            elif type(item) not in _SCALARS:
                raise MalformedError(f"not canonical: {type(item).__name__} is not allowed")
    elif kind not in _SCALARS:
        raise MalformedError(f"not canonical: {kind.__name__} is not allowed")


_SCALARS = frozenset({type(None), bool, int, str, bytes})
_CONTAINERS = frozenset({dict, list})


def encode(value: Value, *, max_size: int | None = None) -> bytes:
    """Encode ``value`` canonically.

    Raises :class:`LocalError` for values outside the canonical subset (floats, non-text map
    keys, other types) and :class:`OversizeError` if the result exceeds ``max_size``.
    """
    try:
        data: bytes = msgpack.packb(_canonical(value), use_bin_type=True)
    except (ValueError, OverflowError) as exc:
        # Lone surrogates in text (UnicodeEncodeError) and integers outside [-2**63, 2**64).
        raise LocalError(f"cannot encode: {exc}") from None
    if max_size is not None and len(data) > max_size:
        raise OversizeError(f"encoding is {len(data)} bytes, the limit is {max_size}")
    return data


def _refuse_ext(code: int, data: bytes) -> Value:
    raise MalformedError(f"msgpack extension type {code} is not allowed")


def decode(data: bytes, *, max_size: int) -> Value:
    """Decode one canonical value from ``data``, which must hold exactly that value.

    Raises :class:`OversizeError` if ``data`` is longer than ``max_size`` (checked first, before
    any parsing) and :class:`MalformedError` for anything that is not exactly one canonical
    encoding: truncation, trailing bytes, invalid UTF-8, non-text map keys, duplicate keys,
    floats, extension types, excessive nesting or a non-shortest form.
    """
    if len(data) > max_size:
        raise OversizeError(f"input is {len(data)} bytes, the limit is {max_size}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
        )
    except MalformedError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # FormatError, StackError, ExtraData, UnicodeDecodeError and non-str map keys are all
        # ValueError subclasses; OutOfData (truncation) is an UnpackException.
        raise MalformedError(f"not valid msgpack: {exc.__class__.__name__}") from None
    # Floats and deep nesting decode fine but are outside the canonical subset; sorted keys
    # plus an identical re-encoding then rule out duplicate keys and non-shortest forms.
    _check_canonical(value)
    if _pack(value) != data:
        raise MalformedError("not canonical: the value has a different canonical encoding")
    return value


# -- the hot path for typed parsers -----------------------------------------------------------

# A Packer per thread: reusing one skips building a Packer and its buffer for every record
# (about a third of packb's cost on a record), and a per-thread one stays safe if a caller
# decodes from worker threads. Packers are not safe to share between threads.
_packers = threading.local()


def _pack(value: Value) -> bytes:
    try:
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = msgpack.Packer(use_bin_type=True).pack
    result: bytes = pack(value)
    return result


def unpack_unchecked(data: bytes, *, max_size: int) -> Value:
    """Decode ``data`` into plain values (arrays as tuples) without the canonical checks.

    For typed parsers only: the caller must check the exact type of every element it uses,
    that every map has exactly the expected keys in sorted order, and then call
    :func:`require_canonical_encoding`. Together that is as strict as :func:`decode`: a schema
    that accepts only ``int``, ``bool``, ``str``, ``bytes``, tuples and text-keyed maps of
    known shape rules out floats, extension types, bytes keys and deep nesting, and the
    re-encoding rules out duplicate keys and non-shortest forms.

    Arrays decode as tuples because that is both faster and what frozen values store.
    Raises :class:`OversizeError` (before any parsing) and :class:`MalformedError`.
    """
    if len(data) > max_size:
        raise OversizeError(f"input is {len(data)} bytes, the limit is {max_size}")
    try:
        return msgpack.unpackb(data, use_list=False, ext_hook=_refuse_ext)
    except MalformedError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MalformedError(f"not valid msgpack: {exc.__class__.__name__}") from None


def require_canonical_encoding(value: Value, data: bytes) -> None:
    """Raise :class:`MalformedError` unless ``data`` is the canonical encoding of ``value``.

    ``value`` must have come from :func:`unpack_unchecked` of ``data`` and passed a typed
    check (see there). msgpack re-encodes with shortest forms and keeps each map's order, so
    byte equality catches non-shortest integers and headers and duplicate map keys (which
    decode to a smaller map); sorted key order is the typed check's job.
    """
    try:  # _pack, inlined: this runs once per record on the DHT's hot path
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = msgpack.Packer(use_bin_type=True).pack
    if pack(value) != data:
        raise MalformedError("not canonical: the value has a different canonical encoding")
