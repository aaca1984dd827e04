"""Canonical msgpack: round trips, one encoding per value, bounds before parsing, and
"any bytes in, a value or our own error out"."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pbuild import CodecError, LocalError, MalformedError, OversizeError, decode, encode
from p2pbuild._codec import require_canonical_encoding, unpack_unchecked

LIMIT = 64 * 1024

# Values in the canonical subset: None, bool, int (msgpack range), text, bytes, lists and
# text-keyed maps, nested a few levels.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=10), inner, max_size=5),
    ),
    max_leaves=20,
)


@given(values)
def test_round_trip(value: Any) -> None:
    data = encode(value)
    assert decode(data, max_size=LIMIT) == value
    # Encoding is a function of the value alone: re-encoding the decoded value is identical.
    assert encode(decode(data, max_size=LIMIT)) == data


@given(st.dictionaries(st.text(max_size=10), scalars, min_size=2, max_size=8))
def test_map_key_order_does_not_matter_to_encode(mapping: dict[str, Any]) -> None:
    reversed_map = dict(reversed(list(mapping.items())))
    assert encode(mapping) == encode(reversed_map)


@given(values)
def test_unchecked_path_agrees_with_decode(value: Any) -> None:
    data = encode(value)
    unpacked = unpack_unchecked(data, max_size=LIMIT)
    require_canonical_encoding(unpacked, data)


@given(st.binary(max_size=200))
def test_any_bytes_give_a_value_or_our_error(data: bytes) -> None:
    try:
        value = decode(data, max_size=LIMIT)
    except CodecError:
        return
    assert encode(value) == data


@given(values, st.data())
def test_truncation_at_every_position_is_rejected(value: Any, data: st.DataObject) -> None:
    encoded = encode(value)
    for cut in range(len(encoded)):
        with pytest.raises(MalformedError):
            decode(encoded[:cut], max_size=LIMIT)


@given(values, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_rejected(value: Any, trailer: bytes) -> None:
    with pytest.raises(MalformedError):
        decode(encode(value) + trailer, max_size=LIMIT)


def test_oversize_is_rejected_before_decoding() -> None:
    # 10 MB of a valid-looking header: rejected on length alone, so it is fast.
    data = b"\xc6" + (10 * 1024 * 1024).to_bytes(4, "big") + bytes(10 * 1024 * 1024)
    start = time.perf_counter()
    with pytest.raises(OversizeError):
        decode(data, max_size=1000)
    with pytest.raises(OversizeError):
        unpack_unchecked(data, max_size=1000)
    assert time.perf_counter() - start < 0.05


def test_exactly_at_the_limit_is_accepted() -> None:
    data = encode(b"x" * 100)
    assert decode(data, max_size=len(data)) == b"x" * 100
    with pytest.raises(OversizeError):
        decode(data, max_size=len(data) - 1)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x82\xa1b\x01\xa1a\x02", "unsorted keys"),
        (b"\x82\xa1a\x01\xa1a\x02", "duplicate keys"),
        (b"\xcc\x05", "uint8 for a fixint"),
        (b"\xcd\x00\x05", "uint16 for a fixint"),
        (b"\xd0\x05", "int8 for a fixint"),
        (b"\xd1\x03\xe8", "int16 for 1000 (the packer uses uint16)"),
        (b"\xd9\x01a", "str8 for a fixstr"),
        (b"\xc5\x00\x01a", "bin16 for a bin8"),
        (b"\xdc\x00\x01\x01", "array16 for a fixarray"),
        (b"\xde\x00\x01\xa1a\x01", "map16 for a fixmap"),
        (b"\xca\x3f\x80\x00\x00", "float32"),
        (b"\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00", "float64"),
        (b"\xd4\x01\x00", "ext type"),
        (b"\xd6\xff\x00\x00\x00\x01", "timestamp ext type"),
        (b"\x81\xc4\x01a\x01", "bytes map key"),
        (b"\x82\xa1a\x01\xc4\x01b\x02", "mixed str and bytes map keys"),
        (b"\x81\x01\x01", "int map key"),
        (b"\xa1\xff", "invalid UTF-8"),
        (b"\xc1", "reserved byte"),
        (b"", "empty input"),
        (b"\x01\x02", "two values"),
        (b"\x91" * 40 + b"\x01", "nested too deeply"),
    ],
)
def test_non_canonical_or_invalid_is_rejected(data: bytes, why: str) -> None:
    with pytest.raises(MalformedError):
        decode(data, max_size=LIMIT)


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [1.5, {1: 2}, {b"k": 1}, object(), 2**64, -(2**63) - 1, "\udcff", _deep(20)],
)
def test_encode_refuses_what_is_outside_the_subset(value: Any) -> None:
    with pytest.raises(LocalError):
        encode(value)


def test_encode_size_limit() -> None:
    with pytest.raises(OversizeError):
        encode(b"x" * 100, max_size=50)


def test_tuples_encode_as_arrays() -> None:
    assert encode((1, 2)) == encode([1, 2]) == msgpack.packb([1, 2])
