"""The record store: validation order, binding, caps, paging, expiry."""

from __future__ import annotations

import pytest

from p2pbuild import SignedRecord, StaleSeqError
from p2pbuild.dht import (
    RecordCache,
    RecordStore,
    StoreFullError,
    WrongKeyError,
    facet_key,
    node_key,
)
from p2pbuild.testing import example_capability, example_status, make_identity

T = 1_700_000_000


def make(label: str, *, seq: int = 1, status: bool = False, lifetime: int = 600,
         arch: str = "x86_64") -> SignedRecord:
    body = example_status() if status else example_capability(arch=arch)
    return SignedRecord.create(make_identity(label), body, seq=seq, issued_at=T,
                               lifetime=lifetime)


def store(**caps: int) -> RecordStore:
    limits = {"max_per_key": 100, "max_per_publisher": 100, "max_total": 1000} | caps
    return RecordStore(cache=RecordCache(), **limits)


def test_offer_ok_held_stale_and_newer() -> None:
    s = store()
    key = facet_key("arch=x86_64")
    assert s.offer(key, make("a").raw, T) == "ok"
    assert s.offer(key, make("a").raw, T) == "held"
    with pytest.raises(StaleSeqError):
        s.offer(key, make("a", arch="x86_64", lifetime=601).raw, T)  # same seq, other bytes
    assert s.offer(key, make("a", seq=2).raw, T) == "ok"
    assert [r.seq for r in s.records(key, T)] == [2]
    assert len(s) == 1


def test_binding() -> None:
    s = store()
    capability, status = make("a"), make("a", status=True)
    with pytest.raises(WrongKeyError):
        s.offer(facet_key("arch=s390x"), capability.raw, T)
    with pytest.raises(WrongKeyError):
        s.offer(facet_key("arch=x86_64"), status.raw, T)  # no capability there yet
    assert s.offer(node_key(status.publisher), status.raw, T) == "ok"
    codes, errors = s.offer_many(facet_key("arch=x86_64"), [status.raw, capability.raw], T)
    assert codes == ["ok", "ok"] and errors == []


def test_caps() -> None:
    s = store(max_per_key=2, max_per_publisher=3, max_total=4)
    key = facet_key("os=fedora-41")
    s.offer(key, make("a").raw, T)
    s.offer(key, make("a", status=True).raw, T)
    with pytest.raises(StoreFullError):
        s.offer(key, make("b").raw, T)
    s.offer(facet_key("arch=x86_64"), make("a").raw, T)
    with pytest.raises(StoreFullError):
        s.offer(facet_key("machine=vm"), make("a").raw, T)  # a's 4th slot
    codes, errors = s.offer_many(facet_key("arch=x86_64"), [b"junk", make("c").raw], T)
    assert codes == ["malformed", "ok"] and len(errors) == 1
    with pytest.raises(StoreFullError):
        s.offer(facet_key("machine=vm"), make("d").raw, T)  # total


def test_pages_cover_everything_once_and_cursor_survives_changes() -> None:
    s = store()
    key = facet_key("arch=x86_64")
    raws = {make(f"p{i}").raw for i in range(30)}
    for raw in raws:
        s.offer(key, raw, T)
    seen: list[bytes] = []
    cursor = b""
    pages = 0
    while True:
        page, cursor = s.page(key, cursor, T, 1000)
        assert sum(len(r) + 3 for r in page) <= 1000
        seen += page
        pages += 1
        if pages == 2:
            s.offer(key, make("late").raw, T)  # a change between pages
        if not cursor:
            break
    assert raws <= set(seen) and len(seen) == len(set(seen))
    assert pages > 5
    # Nothing fits in a tiny budget: the cursor says "from the start", not "done".
    assert s.page(key, b"", T, 10) == ([], b"\x00")


def test_expiry() -> None:
    s = store()
    key = node_key(make("a").publisher)
    s.offer(key, make("a", lifetime=60).raw, T)
    s.offer(key, make("a", status=True, lifetime=120).raw, T)
    assert len(s.records(key, T + 61)) == 1
    assert s.expire(T + 61) == 1
    assert s.expire(T + 200) == 1
    assert len(s) == 0 and s.keys() == []


def test_a_hand_off_count_raises_a_held_keys_count_for_one_sketch_window() -> None:
    from p2pbuild.dht._store import SKETCH_WINDOW

    s = store()
    key, other = facet_key("arch=x86_64"), facet_key("arch=s390x")
    for label in ("a", "b"):
        s.offer(key, make(label, lifetime=3 * 3600).raw, T)
    s.counted(other, 50, T)  # not held here: ignored (nobody can inflate unheld keys)
    assert s.publishers(other, T) == 0
    s.counted(key, 50, T)
    s.counted(key, 40, T)  # the largest stated counts
    assert s.publishers(key, T) == 50
    assert s.publishers(key, T + SKETCH_WINDOW - 1) == 50
    assert s.publishers(key, T + SKETCH_WINDOW) == 2  # its own count again
    s.expire(T + SKETCH_WINDOW)
    assert not s._counted  # forgotten
