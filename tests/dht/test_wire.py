"""The wire codec: symmetric pairs, truncation, trailing garbage, any bytes."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbuild import MalformedError, OversizeError, SignedRecord
from p2pbuild.dht import _wire as wire
from p2pbuild.dht import decode_bundle, encode_bundle
from p2pbuild.testing import example_capability, make_identity

ID = b"\x11" * 20
KEY = b"\x22" * 20


def record(label: str) -> SignedRecord:
    return SignedRecord.create(make_identity(label), example_capability(), seq=1,
                               issued_at=1_700_000_000, lifetime=3600)


def test_a_put_store_has_no_count_and_a_hand_off_count_is_bounded() -> None:
    def parse(args: list[object]) -> object:
        data = wire.encode_request(b"m" * 20, wire.P2P_STORE, args)
        frame = wire.decode_datagram(data, max_size=1200)
        assert isinstance(frame, wire.Request)
        return wire.parse_p2p_store_args(frame)

    assert parse(wire.encode_p2p_store_args(ID, KEY, [b"r"])) == (ID, KEY, [b"r"], None)
    assert parse([ID, KEY, [b"r"], wire.MAX_PUBLISHER_COUNT])[3] == wire.MAX_PUBLISHER_COUNT
    for count in (-1, wire.MAX_PUBLISHER_COUNT + 1, "7", None, 1.5, True):
        with pytest.raises(MalformedError, match="publisher count"):
            parse([ID, KEY, [b"r"], count])
    with pytest.raises(MalformedError, match="3 or 4 arguments"):
        parse([ID, KEY, [b"r"], 1, 2])


@pytest.mark.parametrize(
    ("method", "args", "parse"),
    [
        (wire.PING, wire.encode_ping_args(ID), wire.parse_ping_args),
        (wire.FIND_NODE, wire.encode_find_args(ID, KEY), wire.parse_find_args),
        (wire.STORE, wire.encode_store_args(ID, KEY, b"v"), wire.parse_store_args),
        (wire.P2P_STORE, wire.encode_p2p_store_args(ID, KEY, [b"r1", b"r2"], 7),
         wire.parse_p2p_store_args),
        (wire.P2P_FIND, wire.encode_p2p_find_args(ID, KEY, b"c"), wire.parse_p2p_find_args),
    ],
)
def test_request_round_trip_whole_truncated_and_with_trailing_bytes(method, args, parse) -> None:  # type: ignore[no-untyped-def]
    data = wire.encode_request(b"m" * 20, method, args)
    frame = wire.decode_datagram(data, max_size=1200)
    assert isinstance(frame, wire.Request)
    assert (frame.msg_id, frame.method) == (b"m" * 20, method)
    parsed = parse(frame)
    assert (list(parsed) if isinstance(parsed, tuple) else [parsed]) == args
    for cut in range(len(data)):
        with pytest.raises(MalformedError):
            parse(wire.decode_datagram(data[:cut], max_size=1200))
    with pytest.raises(MalformedError):
        wire.decode_datagram(data + b"\x02", max_size=1200)
    with pytest.raises(MalformedError):
        wire.decode_datagram(data + b"\x01\x01", max_size=1200)
    with pytest.raises(MalformedError):
        wire.decode_datagram(data + b"\x00\x01", max_size=1200)
    with pytest.raises(MalformedError):
        wire.decode_datagram(data + b"\x00\x00\x07", max_size=1200)
    # The client flag (a node behind NAT), alone or before zero padding.
    flagged = wire.encode_request(b"m" * 20, method, args, pad_to=400, client=True)
    assert flagged.startswith(data + wire.CLIENT_FLAG)
    for datagram in (data + wire.CLIENT_FLAG, flagged):
        frame = wire.decode_datagram(datagram, max_size=1200)
        assert isinstance(frame, wire.Request) and frame.client
        assert (frame.msg_id, frame.method) == (b"m" * 20, method)
    # Zero padding (anti-amplification, see encode_request) is read past.
    padded = wire.encode_request(b"m" * 20, method, args, pad_to=400)
    assert len(padded) == max(400, len(data)) and padded.startswith(data)
    frame = wire.decode_datagram(padded, max_size=1200)
    assert isinstance(frame, wire.Request) and not frame.client
    parsed = parse(frame)
    assert (list(parsed) if isinstance(parsed, tuple) else [parsed]) == args
    # An address cookie, after the client flag and before any padding.
    cookie = b"\xc0" * wire.COOKIE_SIZE
    for client in (False, True):
        with_cookie = wire.encode_request(
            b"m" * 20, method, args, pad_to=400, client=client, cookie=cookie
        )
        assert with_cookie.startswith(data + wire.CLIENT_FLAG * client + wire.COOKIE_FLAG + cookie)
        frame = wire.decode_datagram(with_cookie, max_size=1200)
        assert isinstance(frame, wire.Request)
        assert (frame.client, frame.cookie) == (client, cookie)
        parsed = parse(frame)
        assert (list(parsed) if isinstance(parsed, tuple) else [parsed]) == args
    for bad in (wire.COOKIE_FLAG + cookie[:5], wire.COOKIE_FLAG + cookie + b"\x01",
                wire.COOKIE_FLAG + cookie + wire.COOKIE_FLAG + cookie):
        with pytest.raises(MalformedError):
            wire.decode_datagram(data + bad, max_size=1200)
    assert wire.decode_datagram(data, max_size=1200).cookie == b""  # type: ignore[union-attr]
    # A response is never padded.
    response = wire.encode_response(b"m" * 20, [1])
    with pytest.raises(MalformedError):
        wire.decode_datagram(response + b"\x00", max_size=1200)


def test_p2p_find_reply_with_an_address_cookie() -> None:
    cookie = b"\x07" * wire.COOKIE_SIZE
    for publishers in (None, 0, 12):
        value = wire.encode_p2p_find_reply([], [b"r"], b"", publishers, cookie)
        decoded = wire.decode_datagram(
            wire.encode_response(b"m" * 20, value), max_size=1200
        )
        assert isinstance(decoded, wire.Response)
        assert wire.parse_p2p_find_reply_counted(decoded.value) == ([], [b"r"], b"", publishers)
        assert wire.p2p_find_reply_cookie(decoded.value) == cookie
    # Without a cookie the reply is as before (3 or 4 elements).
    assert len(wire.encode_p2p_find_reply([], [], b"")) == 3
    assert wire.p2p_find_reply_cookie(wire.encode_p2p_find_reply([], [], b"", 3)) == b""
    for bad in (b"\x07" * 7, "text", 5):
        with pytest.raises(MalformedError):
            wire.p2p_find_reply_cookie([[], [], b"", 3, bad])
    with pytest.raises(MalformedError):
        wire.parse_p2p_find_reply_counted([[], [], b"", "many", cookie])


def test_stock_encoding_is_understood() -> None:
    import umsgpack

    # What rpcudp sends: umsgpack of a tuple of args.
    data = b"\x00" + b"m" * 20 + umsgpack.packb(["find_value", (ID, KEY)])
    frame = wire.decode_datagram(data, max_size=1200)
    assert isinstance(frame, wire.Request)
    assert wire.parse_find_args(frame) == (ID, KEY)
    contacts = [(ID, "127.0.0.1", 8468), (KEY, "::1", 1)]
    reply = wire.encode_response(b"m" * 20, wire.encode_contacts(contacts))
    assert [tuple(c) for c in umsgpack.unpackb(reply[21:])] == contacts


def test_limits_and_shapes() -> None:
    with pytest.raises(OversizeError):
        wire.decode_datagram(b"\x00" * 1201, max_size=1200)
    with pytest.raises(MalformedError):
        wire.decode_datagram(b"\x02" + b"m" * 20 + b"\xc0", max_size=1200)
    with pytest.raises(MalformedError):
        wire.parse_contacts([[ID, "example.com", 1]])  # names are never resolved
    with pytest.raises(MalformedError):
        wire.parse_contacts([[ID, "127.000.0.1", 1]])  # non-canonical spelling
    with pytest.raises(MalformedError):
        wire.parse_contacts([[ID, "127.0.0.1", 0]])
    with pytest.raises(MalformedError):
        wire.parse_contacts([[ID, "127.0.0.1", 1]] * 65)
    with pytest.raises(MalformedError):
        wire.parse_find_value_reply({"value": "text"})
    with pytest.raises(MalformedError):
        wire.parse_p2p_store_reply(["ok"], 2)
    assert wire.parse_find_value_reply({"value": b"x"}) == b"x"


def test_contacts_are_trimmed_to_the_budget() -> None:
    contacts = [(bytes([i]) * 20, "2001:db8:1234:5678:9abc:def0:1234:5678", 40000)
                for i in range(20)]
    fitted = wire.fit_contacts(contacts, 1179)
    assert 0 < len(fitted) < 20
    assert len(msgpack.packb(wire.encode_contacts(fitted), use_bin_type=True)) <= 1179
    assert len(wire.fit_contacts(contacts[:3], 1179)) == 3


def test_bundle_round_trip_and_first_page() -> None:
    raws = [record(f"b{i}").raw for i in range(10)]
    bundle = encode_bundle(raws, len(raws), max_size=1100)
    assert len(bundle) <= 1100
    total, inside = decode_bundle(bundle, max_size=1100)
    assert total == 10 and 0 < len(inside) < 10 and inside == raws[: len(inside)]
    with pytest.raises(MalformedError):
        decode_bundle(msgpack.packb([2, 0, []]), max_size=1100)


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_our_error(data: bytes) -> None:
    try:
        frame = wire.decode_datagram(data, max_size=200)
    except (MalformedError, OversizeError):
        return
    assert isinstance(frame, wire.Request | wire.Response)


@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=30)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=12,
))
def test_any_reply_value_parses_or_raises_our_error(value: object) -> None:
    for parse in (wire.parse_contacts, wire.parse_find_value_reply, wire.parse_p2p_find_reply,
                  wire.parse_ping_reply, wire.parse_store_reply):
        with contextlib.suppress(MalformedError):
            parse(value)
