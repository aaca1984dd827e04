"""The DHT wire format: rpcudp framing and every RPC's arguments and reply, as symmetric pairs.

Framing (the PyPI ``rpcudp`` package, used by ``kademlia``)::

    request:  0x00 || msg_id(20 bytes) || msgpack([method, [arg, ...]])
    response: 0x01 || msg_id(20 bytes) || msgpack(reply)

The payload is plain msgpack, not p2pbuild's canonical subset, because stock ``kademlia``
nodes encode with ``u-msgpack-python``. Signed records travel inside it as opaque ``bin``
values and are decoded canonically on their own (``SignedRecord.from_bytes``).

Methods (``docs/protocol.md`` has the full table):

=============  ====================================  ======================================
method         arguments                             reply
=============  ====================================  ======================================
ping           [sender_id]                           node_id
store          [sender_id, key, value]               bool
find_node      [sender_id, key]                      [[id, host, port], ...]
find_value     [sender_id, key]                      {"value": bundle} or contacts
p2p_store      [sender_id, key, [record, ...]]       [code, ...] (one per record)
p2p_find       [sender_id, key, cursor]              [contacts, [record, ...], next_cursor]
=============  ====================================  ======================================

Every ``parse_*`` function raises only :class:`MalformedError` or :class:`OversizeError`;
every ``encode_*`` function returns bytes no longer than the bound it is given, trimming
contacts or records to fit, so no datagram we send exceeds ``max_datagram``.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import attrs
import msgpack

from .._codec import decode as canonical_decode
from .._codec import encode as canonical_encode
from .._errors import MalformedError, OversizeError
from ._ids import ID_SIZE, Address

__all__ = [
    "HEADER_SIZE",
    "MSG_ID_SIZE",
    "Request",
    "Response",
    "decode_bundle",
    "decode_datagram",
    "encode_bundle",
    "encode_request",
    "encode_response",
]

REQUEST = 0x00
RESPONSE = 0x01
MSG_ID_SIZE = 20
HEADER_SIZE = 1 + MSG_ID_SIZE

PING = "ping"
STORE = "store"
FIND_NODE = "find_node"
FIND_VALUE = "find_value"
P2P_STORE = "p2p_store"
P2P_FIND = "p2p_find"
METHODS = frozenset({PING, STORE, FIND_NODE, FIND_VALUE, P2P_STORE, P2P_FIND})

#: The byte after a request's payload that marks its sender a DHT *client* (behind NAT: it
#: is never added to routing tables); zero bytes of padding may follow it.
CLIENT_FLAG = b"\x01"
#: The byte after a request's payload (and client flag) that says an *address cookie*
#: follows (``COOKIE_SIZE`` bytes): the server gave it in a ``p2p_find`` reply to this
#: address, which proves the sender receives there, so the request needs no padding.
COOKIE_FLAG = b"\x02"
COOKIE_SIZE = 8
#: The byte after a response's payload that says one more byte follows, a *probe factor*
#: ``f`` (2 to 255): the responder is pinged by many more nodes than a routing table lists
#: and asks the requester to let it stay silent ``f`` times longer before a liveness ping
#: (``docs/protocol.md``, *Liveness*). A stock requester ignores it (``umsgpack`` reads one
#: object and stops).
PROBE_FLAG = b"\x03"
MAX_PROBE_FACTOR = 255
#: First byte of a *sample cursor*: ``SAMPLE_CURSOR || seed (8) || parts (1) || part (1)``.
SAMPLE_CURSOR = 0x01
SAMPLE_CURSOR_SIZE = 11

#: A cursor is the last slot a page held: publisher key (32 bytes) and kind (<= 16 chars).
MAX_CURSOR = 48
#: Record bundle format version (the value a stock ``find_value`` receives).
BUNDLE_VERSION = 1
#: Bound on a received reply's contact list (stock nodes send up to their k).
MAX_CONTACTS_IN = 64
#: Bound on records in one request or reply (a datagram cannot hold more anyway).
MAX_RECORDS_IN = 64
#: Largest publisher count a reply or a hand-off may state.
MAX_PUBLISHER_COUNT = 1 << 20


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MalformedError(f"msgpack extension type {code} is not allowed")


def _unpack_padded(payload: bytes) -> tuple[Any, bool, bytes]:
    """A request's payload, which may be followed by the client flag (one byte
    ``CLIENT_FLAG``), an address cookie (``COOKIE_FLAG`` and ``COOKIE_SIZE`` bytes) and zero
    bytes of padding (see :func:`encode_request`); other trailing bytes are refused.
    Returns ``(value, client, cookie)``."""
    try:
        return (
            msgpack.unpackb(
                payload, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext
            ),
            False,
            b"",
        )
    except msgpack.ExtraData as extra:
        rest = extra.extra
        client = rest[:1] == CLIENT_FLAG
        at = int(client)
        cookie = b""
        if rest[at : at + 1] == COOKIE_FLAG:
            cookie = rest[at + 1 : at + 1 + COOKIE_SIZE]
            if len(cookie) != COOKIE_SIZE:
                raise MalformedError("an address cookie is 8 bytes") from None
            at += 1 + COOKIE_SIZE
        if rest.count(0, at) != len(rest) - at:
            raise MalformedError("not valid msgpack: ExtraData") from None
        return extra.unpacked, client, cookie
    except MalformedError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MalformedError(f"not valid msgpack: {exc.__class__.__name__}") from None


def _unpack_response(msg_id: bytes, payload: bytes) -> Response:
    """A response, whose payload may be followed by ``PROBE_FLAG`` and a probe factor;
    other trailing bytes are refused."""
    try:
        return Response(
            msg_id,
            msgpack.unpackb(
                payload, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext
            ),
        )
    except msgpack.ExtraData as extra:
        rest = extra.extra
        if len(rest) == 2 and rest[:1] == PROBE_FLAG and rest[1] >= 2:
            return Response(msg_id, extra.unpacked, rest[1])
        raise MalformedError("not valid msgpack: ExtraData") from None
    except MalformedError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # Truncation, bad UTF-8, non-text keys, deep nesting: all the library's own errors;
        # translated here, at the wire boundary, into ours.
        raise MalformedError(f"not valid msgpack: {exc.__class__.__name__}") from None


# One packer for the process (``packb`` builds one per call); ``pack`` runs without releasing
# the GIL and resets the packer's buffer after each value.
_PACKER = msgpack.Packer(use_bin_type=True)


def _pack(value: Any) -> bytes:
    data: bytes = _PACKER.pack(value)
    return data


# -- framing ------------------------------------------------------------------------------------


@attrs.frozen
class Request:
    """A decoded request: method name and its raw argument list (checked per method)."""

    msg_id: bytes
    method: str
    args: list[Any]
    #: The sender marked itself a DHT client (``CLIENT_FLAG``): never a routing contact.
    client: bool = False
    #: The address cookie the request carried (``COOKIE_FLAG``), ``b""`` if none.
    cookie: bytes = b""


@attrs.frozen
class Response:
    """A decoded response; ``value`` is checked against the method that was called."""

    msg_id: bytes
    value: Any
    #: The responder's probe factor (``PROBE_FLAG``), 1 if it sent none.
    probe_factor: int = 1


def decode_datagram(data: bytes, *, max_size: int) -> Request | Response:
    """Split one datagram into its frame.

    Raises :class:`OversizeError` before any decoding if ``data`` is longer than
    ``max_size``, and :class:`MalformedError` for a short datagram, an unknown marker, a
    payload that is not msgpack, or a request that is not ``[text, array]``.
    """
    if len(data) > max_size:
        raise OversizeError(f"datagram is {len(data)} bytes, the limit is {max_size}")
    if len(data) < HEADER_SIZE + 1:
        raise MalformedError("datagram shorter than the rpcudp header")
    marker = data[0]
    msg_id = data[1:HEADER_SIZE]
    if marker == RESPONSE:
        return _unpack_response(msg_id, data[HEADER_SIZE:])
    if marker != REQUEST:
        raise MalformedError(f"unknown rpcudp marker {marker:#04x}")
    value, client, cookie = _unpack_padded(data[HEADER_SIZE:])
    if type(value) is not list or len(value) != 2:
        raise MalformedError("a request is [method, args]")
    method, args = value
    if type(method) is not str or type(args) is not list:
        raise MalformedError("a request is [text, array]")
    return Request(msg_id, method, args, client, cookie)


def encode_request(
    msg_id: bytes,
    method: str,
    args: Sequence[Any],
    *,
    pad_to: int = 0,
    client: bool = False,
    cookie: bytes = b"",
) -> bytes:
    """Frame a request (``args`` already in wire form), followed by ``CLIENT_FLAG`` if
    ``client``, then ``COOKIE_FLAG`` and the address ``cookie`` if given, then zero bytes up
    to ``pad_to`` bytes in all. Padding (or a cookie the server gave this address) lets a
    server answer a request from an address it has not verified in full within its
    anti-amplification bound; a stock server ignores what follows the payload (``umsgpack``
    reads one object and stops)."""
    data = bytes([REQUEST]) + msg_id + _pack([method, list(args)])
    if client:
        data += CLIENT_FLAG
    if cookie:
        if len(cookie) != COOKIE_SIZE:
            raise ValueError("an address cookie is 8 bytes")
        data += COOKIE_FLAG + cookie
    if len(data) < pad_to:
        data += bytes(pad_to - len(data))
    return data


def encode_response(msg_id: bytes, value: Any, *, probe_factor: int = 1) -> bytes:
    """Frame a response (``value`` already in wire form), followed by ``PROBE_FLAG`` and
    ``probe_factor`` if that is above 1 (at most ``MAX_PROBE_FACTOR``)."""
    data = bytes([RESPONSE]) + msg_id + _pack(value)
    if probe_factor > 1:
        data += PROBE_FLAG + bytes([min(probe_factor, MAX_PROBE_FACTOR)])
    return data


# -- field checks -------------------------------------------------------------------------------


def _id(value: object, name: str) -> bytes:
    if type(value) is not bytes or len(value) != ID_SIZE:
        raise MalformedError(f"{name} must be {ID_SIZE} bytes")
    return value


def _args(request: Request, count: int) -> list[Any]:
    if len(request.args) != count:
        raise MalformedError(f"{request.method} takes {count} arguments")
    return request.args


# Hosts already checked: contacts repeat a handful of hosts (one on loopback) many times.
_KNOWN_HOSTS: set[str] = set()
_MAX_KNOWN_HOSTS = 4096


def _is_ip(host: str) -> bool:
    if len(host) > 45 or not host.isascii():
        return False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):  # ValueError: an embedded NUL (found by fuzzing)
            continue
        # Only the canonical text form, so one address has one spelling.
        if socket.inet_ntop(family, socket.inet_pton(family, host)) != host:
            return False
        if len(_KNOWN_HOSTS) < _MAX_KNOWN_HOSTS:
            _KNOWN_HOSTS.add(host)
        return True
    return False


def parse_address(host: object, port: object) -> Address:
    """Check a contact's address: an IP literal (never a name to resolve) and a port."""
    if type(host) is not str or (host not in _KNOWN_HOSTS and not _is_ip(host)):
        raise MalformedError("a contact host must be an IP address")
    if type(port) is not int or not 0 < port < 65536:
        raise MalformedError("a contact port must be in 1..65535")
    return (host, port)


# -- ping ---------------------------------------------------------------------------------------


def encode_ping_args(sender_id: bytes) -> list[Any]:
    return [sender_id]


def parse_ping_args(request: Request) -> bytes:
    (sender,) = _args(request, 1)
    return _id(sender, "sender id")


def encode_ping_reply(node_id: bytes) -> bytes:
    return node_id


def parse_ping_reply(value: object) -> bytes:
    return _id(value, "ping reply")


# -- store (stock) ------------------------------------------------------------------------------


def encode_store_args(sender_id: bytes, key: bytes, value: bytes) -> list[Any]:
    return [sender_id, key, value]


def parse_store_args(request: Request) -> tuple[bytes, bytes, object]:
    """``(sender_id, key, value)``; the value is left for the store to judge."""
    sender, key, value = _args(request, 3)
    return _id(sender, "sender id"), _id(key, "key"), value


def parse_store_reply(value: object) -> bool:
    if type(value) is not bool:
        raise MalformedError("a store reply is a boolean")
    return value


# -- contacts (find_node, and inside find_value and p2p_find) ----------------------------------


ContactTriple = tuple[bytes, str, int]


def _contact_size(contact: ContactTriple) -> int:
    # fixarray(3) + bin8 header(2) + 20 + str header(1 or 2) + host + port (1, 3 or 5).
    port = contact[2]
    return (
        1
        + 2
        + ID_SIZE
        + (1 if len(contact[1]) < 32 else 2)
        + len(contact[1])
        + (1 if port < 128 else 3)
    )


def contacts_size(contacts: Sequence[ContactTriple]) -> int:
    """Encoded size of ``contacts`` as elements of an array (without its header)."""
    return sum(_contact_size(contact) for contact in contacts)


def fit_contacts(contacts: Sequence[ContactTriple], budget: int) -> list[ContactTriple]:
    """The longest prefix of ``contacts`` whose encoding as an array fits in ``budget``."""
    # Fast path: an upper bound (2-byte str header, 3-byte port) per contact.
    if 3 + sum(28 + len(contact[1]) for contact in contacts) <= budget:
        return list(contacts)
    used = 3  # array header (fixarray or array16)
    fitted: list[ContactTriple] = []
    for contact in contacts:
        used += _contact_size(contact)
        if used > budget:
            break
        fitted.append(contact)
    return fitted


def encode_find_args(sender_id: bytes, key: bytes) -> list[Any]:
    return [sender_id, key]


def parse_find_args(request: Request) -> tuple[bytes, bytes]:
    """``(sender_id, key)`` of ``find_node`` or ``find_value``."""
    sender, key = _args(request, 2)
    return _id(sender, "sender id"), _id(key, "key")


def encode_contacts(contacts: Sequence[ContactTriple]) -> list[Any]:
    return [list(contact) for contact in contacts]


def parse_contacts(value: object) -> list[ContactTriple]:
    """A contact list; each entry is ``[id, ip, port]``."""
    if type(value) is not list or len(value) > MAX_CONTACTS_IN:
        raise MalformedError(f"contacts must be an array of at most {MAX_CONTACTS_IN}")
    contacts = []
    known = _KNOWN_HOSTS
    for item in value:
        if type(item) is not list or len(item) != 3:
            raise MalformedError("a contact is [id, host, port]")
        node_id, host, port = item
        if type(node_id) is not bytes or len(node_id) != ID_SIZE:
            raise MalformedError(f"a contact id is {ID_SIZE} bytes")
        if type(host) is not str or (host not in known and not _is_ip(host)):
            raise MalformedError("a contact host must be an IP address")
        if type(port) is not int or not 0 < port < 65536:
            raise MalformedError("a contact port must be in 1..65535")
        contacts.append((node_id, host, port))
    return contacts


def parse_find_value_reply(value: object) -> bytes | list[ContactTriple]:
    """Either the bundle bytes of ``{"value": bundle}`` or a contact list."""
    if type(value) is dict:
        if list(value) != ["value"] or type(value["value"]) is not bytes:
            raise MalformedError('a find_value hit is {"value": bytes}')
        data: bytes = value["value"]
        return data
    return parse_contacts(value)


# -- record bundles (what a stock find_value receives) -----------------------------------------


def encode_bundle(records: Sequence[bytes], total: int, *, max_size: int) -> bytes:
    """A canonical ``[1, total, [record, ...]]`` holding as many of ``records`` as fit.

    ``total`` is how many records the sender holds under the key; a reader that sees fewer
    records than ``total`` knows the bundle is a first page (use ``p2p_find`` for the rest).
    """
    chosen: list[bytes] = []
    used = 1 + 1 + 9 + 3  # outer array, version, total (<= uint64), inner array header
    for raw in records:
        cost = len(raw) + (2 if len(raw) < 256 else 3)
        if used + cost > max_size:
            break
        chosen.append(raw)
        used += cost
    return canonical_encode([BUNDLE_VERSION, total, chosen], max_size=max_size)


def decode_bundle(data: bytes, *, max_size: int) -> tuple[int, list[bytes]]:
    """``(total, records)`` of a bundle; records are still unverified bytes.

    Raises :class:`OversizeError` or :class:`MalformedError`.
    """
    value = canonical_decode(data, max_size=max_size)
    if type(value) is not list or len(value) != 3 or value[0] != BUNDLE_VERSION:
        raise MalformedError("a record bundle is [1, total, [record, ...]]")
    total, records = value[1], value[2]
    if type(total) is not int or type(records) is not list or len(records) > MAX_RECORDS_IN:
        raise MalformedError("a record bundle is [1, total, [record, ...]]")
    for raw in records:
        if type(raw) is not bytes:
            raise MalformedError("bundle records are bytes")
    return total, records


# -- p2p_store ----------------------------------------------------------------------------------


def record_cost(raw: bytes) -> int:
    """Encoded size of one record inside an array (bin8 or bin16 header)."""
    return len(raw) + (2 if len(raw) < 256 else 3)


def encode_p2p_store_args(
    sender_id: bytes, key: bytes, records: Sequence[bytes], publishers: int | None = None
) -> list[Any]:
    """A put's store, or with ``publishers`` a hand-off's: how many publishers the key
    holds on its sender (a full key's count includes those it refused)."""
    args: list[Any] = [sender_id, key, list(records)]
    if publishers is not None:
        args.append(publishers)
    return args


def parse_p2p_store_args(request: Request) -> tuple[bytes, bytes, list[bytes], int | None]:
    """Sender id, key, records, and the hand-off's publisher count (None in a put's)."""
    if len(request.args) not in (3, 4):
        raise MalformedError("p2p_store takes 3 or 4 arguments")
    sender, key, records = request.args[:3]
    if type(records) is not list or len(records) > MAX_RECORDS_IN:
        raise MalformedError(f"p2p_store carries an array of at most {MAX_RECORDS_IN} records")
    for raw in records:
        if type(raw) is not bytes:
            raise MalformedError("records are bytes")
    publishers = None
    if len(request.args) == 4:
        publishers = request.args[3]
        if type(publishers) is not int or not 0 <= publishers <= MAX_PUBLISHER_COUNT:
            raise MalformedError(f"a publisher count is 0 to {MAX_PUBLISHER_COUNT}")
    return _id(sender, "sender id"), _id(key, "key"), records, publishers


def encode_p2p_store_reply(codes: Sequence[str]) -> list[str]:
    return list(codes)


def parse_p2p_store_reply(value: object, sent: int) -> list[str]:
    """One short code per record sent: ``"ok"``, ``"held"`` or an error code."""
    if type(value) is not list or len(value) != sent:
        raise MalformedError("a p2p_store reply has one code per record")
    for code in value:
        if type(code) is not str or len(code) > 32:
            raise MalformedError("a p2p_store code is short text")
    return value


# -- p2p_find -----------------------------------------------------------------------------------


def encode_p2p_find_args(sender_id: bytes, key: bytes, cursor: bytes) -> list[Any]:
    return [sender_id, key, cursor]


def parse_p2p_find_args(request: Request) -> tuple[bytes, bytes, bytes]:
    sender, key, cursor = _args(request, 3)
    if type(cursor) is not bytes or len(cursor) > MAX_CURSOR:
        raise MalformedError(f"a cursor is at most {MAX_CURSOR} bytes")
    return _id(sender, "sender id"), _id(key, "key"), cursor


def encode_p2p_find_reply(
    contacts: Sequence[ContactTriple],
    records: Sequence[bytes],
    cursor: bytes,
    publishers: int | None = None,
    cookie: bytes = b"",
) -> list[Any]:
    value: list[Any] = [encode_contacts(contacts), list(records), cursor]
    if publishers is not None or cookie:
        value.append(publishers)
    if cookie:
        value.append(cookie)
    return value


def sample_cursor(seed: bytes, parts: int, part: int) -> bytes:
    """A ``p2p_find`` cursor asking for the records of the publishers in part ``part`` of
    ``parts`` (at most 255) of a random partition keyed by ``seed`` (8 bytes): publisher
    ``p`` is in part ``BLAKE2b-64(p, key=seed) mod parts``. ``parts`` = 0 asks for no
    records: the closest contacts and the publisher count only (a sampling walk)."""
    return bytes([SAMPLE_CURSOR]) + seed + bytes([parts, part])


#: Contacts a sampled read's census query asks for: its walk needs the few closest to the
#: key from each answer, not k (each contact is ~40 bytes of the reply).
CENSUS_CONTACTS = 8


def _census_reply_max() -> int:
    contact = (bytes(ID_SIZE), "ffff:" * 7 + "ffff", 65535)  # the longest: IPv6
    value = encode_p2p_find_reply(
        [contact] * CENSUS_CONTACTS, [], b"", MAX_PUBLISHER_COUNT, bytes(COOKIE_SIZE)
    )
    return len(encode_response(bytes(MSG_ID_SIZE), value))


def is_census_cursor(cursor: object) -> bool:
    """Whether ``cursor`` asks for a census of at most ``CENSUS_CONTACTS`` contacts (whose
    answer is small: ``CENSUS_REPLY_MAX``)."""
    return (
        type(cursor) is bytes
        and len(cursor) == SAMPLE_CURSOR_SIZE
        and cursor[0] == SAMPLE_CURSOR
        and cursor[9] == 0
        and 0 < cursor[10] <= CENSUS_CONTACTS
    )


def parse_sample_cursor(cursor: bytes) -> tuple[bytes, int, int] | None:
    """``(seed, parts, part)`` of a sample cursor, None for a page cursor. Raises
    :class:`MalformedError` for a part out of range."""
    if len(cursor) != SAMPLE_CURSOR_SIZE or cursor[0] != SAMPLE_CURSOR:
        return None
    parts, part = cursor[9], cursor[10]
    if parts and part >= parts:
        raise MalformedError("a sample cursor's part is below its parts")
    return cursor[1:9], parts, part


def parse_p2p_find_reply(value: object) -> tuple[list[ContactTriple], list[bytes], bytes]:
    """``(contacts, records, next_cursor)``; an empty cursor means the last page."""
    contacts, records, cursor, _ = parse_p2p_find_reply_counted(value)
    return contacts, records, cursor


def parse_p2p_find_reply_counted(
    value: object,
) -> tuple[list[ContactTriple], list[bytes], bytes, int | None]:
    """``(contacts, records, next_cursor, publishers)``: ``publishers`` is how many
    publishers the holder has under the key (None from a holder that does not say)."""
    if type(value) is not list or len(value) not in (3, 4, 5):
        raise MalformedError(
            "a p2p_find reply is [contacts, records, cursor, publishers?, cookie?]"
        )
    publishers = None
    if len(value) >= 4:
        publishers = value[3]
        if publishers is not None and (
            type(publishers) is not int or not 0 <= publishers <= MAX_PUBLISHER_COUNT
        ):
            raise MalformedError("a p2p_find publisher count is an integer")
    contacts = parse_contacts(value[0])
    records, cursor = value[1], value[2]
    if type(records) is not list or len(records) > MAX_RECORDS_IN:
        raise MalformedError(f"a page holds at most {MAX_RECORDS_IN} records")
    for raw in records:
        if type(raw) is not bytes:
            raise MalformedError("records are bytes")
    if type(cursor) is not bytes or len(cursor) > MAX_CURSOR:
        raise MalformedError(f"a cursor is at most {MAX_CURSOR} bytes")
    return contacts, records, cursor, publishers


def p2p_find_reply_cookie(value: object) -> bytes:
    """The address cookie of a ``p2p_find`` reply (5th element), ``b""`` if it has none.
    Raises :class:`MalformedError` for one that is not ``COOKIE_SIZE`` bytes."""
    if type(value) is not list or len(value) != 5:
        return b""
    cookie = value[4]
    if type(cookie) is not bytes or len(cookie) != COOKIE_SIZE:
        raise MalformedError("an address cookie is 8 bytes")
    return cookie


#: The largest answer to a census query (``CENSUS_CONTACTS`` contacts, a count, a cookie):
#: a census query padded to ``1 / amplification_factor`` of it gets it whole from a node
#: that does not know the asker yet.
CENSUS_REPLY_MAX = _census_reply_max()
