"""Field checks shared by the signed objects of the core (jobs, results, orders, wake
requests, holds): each raises :class:`MalformedError` naming the field, and the helpers that
split a signed canonical array from its signature."""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from typing import Any, TypeVar

from ._codec import decode, encode
from ._errors import ExpiredError, ForbiddenError, MalformedError, NotYetValidError
from ._identity import SIGNATURE_SIZE, Domain, Identity, PublicKey, Role
from ._records import _TOKEN
from ._trust import TrustList

__all__ = ["NONCE_SIZE", "check_relative_name"]

_E = TypeVar("_E", bound=enum.Enum)

#: The format version every signed array starts with.
_FORMAT_VERSION = 1
_MAX_NAME = 255
_U63 = 2**63
NONCE_SIZE = 16


def _require_time(value: object, name: str) -> int:
    if type(value) is not int or not 0 <= value < _U63:
        raise MalformedError(f"{name} must be a non-negative integer")
    return value


def _require_bytes(value: object, size: int, name: str) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise MalformedError(f"{name} must be {size} bytes")
    return value


def _require_map(value: object, fields: Iterable[str], name: str) -> dict[str, Any]:
    if type(value) is not dict or set(value) != set(fields):
        raise MalformedError(f"{name} must be a map with exactly the fields {sorted(fields)}")
    return value


def _member(kind: type[_E], value: object, what: str) -> _E:
    """The member of ``kind`` whose value is ``value``, or :class:`MalformedError` saying it
    is an unknown ``what``."""
    try:
        return kind(value)
    except ValueError:
        raise MalformedError(f"unknown {what} {value!r:.40}") from None


def _printable(value: object, max_len: int, name: str) -> str:
    if type(value) is not str or len(value) > max_len or not value.isprintable():
        raise MalformedError(f"{name} must be printable text of at most {max_len} characters")
    return value


def check_relative_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a safe relative path, else raise :class:`MalformedError`.

    Safe: 1 to 255 printable characters (no NUL or other control characters), not
    absolute, no backslash, and ``/``-separated components that are neither empty, ``.``
    nor ``..``. Such a name joined to a directory stays inside it.
    """
    if type(name) is not str or not 0 < len(name) <= _MAX_NAME or not name.isprintable():
        raise MalformedError(f"{what} must be 1 to {_MAX_NAME} printable characters")
    if "\\" in name:
        raise MalformedError(f"{what} {name!r:.80} contains a backslash")
    if name.startswith("/"):
        raise MalformedError(f"{what} {name!r:.80} is absolute")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise MalformedError(f"{what} {name!r:.80} has an empty, '.' or '..' component")
    return name


def _check_token(value: object, name: str) -> str:
    if type(value) is not str or not _TOKEN.fullmatch(value):
        raise MalformedError(f"{name} must match [a-z0-9][a-z0-9._+-]{{0,63}}, got {value!r:.40}")
    return value


def _signed_part(data: bytes, elements: int) -> bytes:
    """The canonical encoding of the first ``elements - 1`` items of the array ``data``.

    Valid only for canonical ``data`` of a fixarray (fewer than 16 elements) whose last
    element is a 64-byte ``bin8``: then dropping that element is shortening the array header
    by one and removing the final 66 bytes, no re-encoding needed.
    """
    assert elements < 16
    return bytes([0x90 | (elements - 1)]) + data[1 : -(2 + SIGNATURE_SIZE)]


def _split_signed(data: bytes, max_size: int, elements: int, what: str) -> list[Any]:
    value = decode(data, max_size=max_size)
    if type(value) is not list or len(value) != elements:
        raise MalformedError(f"a {what} is an array of {elements} elements")
    version = value[0]
    if type(version) is not int or version != _FORMAT_VERSION:
        raise MalformedError(f"unsupported {what} format version {version!r:.20}")
    _require_bytes(value[-1], SIGNATURE_SIZE, "signature")
    return value


# -- short signed orders (pull tokens, job control, wake requests, lease holds) ----------------


def fresh_nonce(nonce: bytes | None, issued_at: int) -> bytes:
    """``nonce`` (random when None), checked with ``issued_at`` for a new signed order."""
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    _require_bytes(nonce, NONCE_SIZE, "nonce")
    _require_time(issued_at, "issued_at")
    return nonce


def sign_array(
    identity: Identity, domain: Domain, elements: list[Any], max_size: int
) -> tuple[bytes, bytes]:
    """Sign ``[format version, *elements]`` in ``domain``; returns (signature, encoding of
    the signed array) (:class:`OversizeError` past ``max_size``)."""
    unsigned = [_FORMAT_VERSION, *elements]
    signature = identity.sign(domain, encode(unsigned))
    return signature, encode([*unsigned, signature], max_size=max_size)


def check_window(now: float, issued_at: int, window: float, what: str) -> None:
    """An order is fresh within ``window`` seconds either side of its ``issued_at``. Raises
    :class:`ExpiredError` or :class:`NotYetValidError` naming ``what``."""
    if now > issued_at + window:
        raise ExpiredError(f"{what} is {now - issued_at:.0f}s old")
    if issued_at > now + window:
        raise NotYetValidError(f"{what} issued {issued_at - now:.0f}s ahead")


def require_dispatcher(trust_list: TrustList, key: PublicKey, what: str) -> None:
    """Raise :class:`ForbiddenError` unless ``key`` is a dispatcher on ``trust_list``."""
    entry = trust_list.entry(key)
    if entry is None or entry.role is not Role.DISPATCHER:
        raise ForbiddenError(f"{what} signed by {key.fingerprint}, not a trusted dispatcher")
