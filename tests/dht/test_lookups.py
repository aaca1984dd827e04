"""How a record lookup walks and when it ends, driven by hand with explicit time: a reader
with a few contacts whose answers (or silence) the test chooses, datagram by datagram."""

from __future__ import annotations

from test_core import records

from p2pbuild import SignedRecord
from p2pbuild.dht import DhtConfig, facet_key, node_key
from p2pbuild.testing import (
    SANSIO_EPOCH,
    ScriptedLookup,
    SentQuery,
    example_capability,
    example_status,
    make_identity,
)

T0 = SANSIO_EPOCH

# A contact's round trip as the reader measured it: stall after 10 ms (the floor, half of
# min_rpc_timeout), time out after 20 ms (min_rpc_timeout).
RTT = 0.001
STALL = 0.01
TIMEOUT = 0.02


def _by_address(reader: ScriptedLookup, queries: list[SentQuery]) -> list[int]:
    """The contact index each query went to."""
    return [reader.addresses.index(q.address) for q in queries]


def test_node_key_lookup_ends_at_the_first_holder_with_the_answers_in_flight() -> None:
    mine = records("one-publisher")
    reader = ScriptedLookup(node_key(mine[0].publisher), [1 << n for n in range(10, 16)])
    op = reader.get()
    first = reader.sent()
    assert _by_address(reader, first) == [0, 1, 2]  # alpha = 3, closest first
    # The second closest holds the publisher's records: nothing new is asked, and the two
    # answers still on their way are awaited.
    reader.answer(first[1], mine)
    assert reader.sent() == []
    assert not op.done
    reader.answer(first[0])
    assert not op.done
    reader.answer(first[2], contacts=[1 << 9])  # even naming a closer node: asked no more
    assert op.done
    assert reader.sent() == []
    assert sorted(r.raw for r in op.result) == sorted(r.raw for r in mine)
    assert op.rpcs == 3 and op.rounds == 1


def test_node_key_lookup_keeps_the_newest_of_the_answers_in_flight() -> None:
    identity = make_identity("updated-publisher")
    old, new = (
        [
            SignedRecord.create(
                identity, example_capability(), seq=seq, issued_at=int(T0), lifetime=3600
            ),
            SignedRecord.create(
                identity, example_status(), seq=seq, issued_at=int(T0), lifetime=600
            ),
        ]
        for seq in (1, 2)
    )
    reader = ScriptedLookup(node_key(identity.public_key), [1 << n for n in range(10, 16)])
    op = reader.get()
    first = reader.sent()
    reader.answer(first[2], old)  # a holder that missed the last publish answers first
    reader.answer(first[0], new)
    reader.answer(first[1])
    assert op.done
    assert {r.seq for r in op.result} == {2}


def test_node_key_lookup_waits_for_a_silent_query_only_until_it_stalls() -> None:
    mine = records("stalled-publisher")
    reader = ScriptedLookup(node_key(mine[0].publisher), [1 << n for n in range(10, 16)])
    op = reader.get()
    first = reader.sent()
    reader.answer(first[0], mine)
    reader.answer(first[1])
    # first[2] is never answered: the lookup ends when it stalls, with no new query.
    reader.at(T0 + STALL - 0.001)
    assert not op.done
    reader.at(T0 + STALL)
    assert op.done and len(op.result) == 2
    assert reader.sent() == []
    # Its timeout later is not resent: the lookup it served has ended.
    reader.at(T0 + TIMEOUT)
    assert reader.sent() == []
    assert reader.node.statistics().rpcs_timed_out == 1
    assert reader.node.statistics().rpcs_sent == 3


def test_facet_lookup_asks_on_until_its_quorum_answered() -> None:
    facet = "arch=x86_64"
    found = records("facet-publisher")  # x86_64: its capability is bound to the facet key
    reader = ScriptedLookup(facet_key(facet), [1 << n for n in range(10, 16)])
    op = reader.get()
    first = reader.sent()
    assert _by_address(reader, first) == [0, 1, 2]
    # A holder answers with a capability: the key is a facet key (many publishers), so the
    # lookup goes on, alpha in flight, to the value_quorum (4) closest.
    reader.answer(first[1], found)
    second = reader.sent()
    assert _by_address(reader, second) == [3]
    reader.answer(first[0], found)
    reader.answer(first[2], found)
    later = reader.sent()
    assert _by_address(reader, later) == [4, 5]
    reader.answer(later[0], found)
    reader.answer(later[1], found)
    # Five holders answered, but not the 4th closest: the quorum is the 4 closest.
    assert not op.done
    reader.answer(second[0], found)
    assert op.done
    assert sorted(r.raw for r in op.result) == sorted(r.raw for r in found)
    assert op.rpcs == 6


def test_node_key_quorum_is_configurable() -> None:
    mine = records("quorum-two")
    reader = ScriptedLookup(
        node_key(mine[0].publisher), [1 << n for n in range(10, 16)], DhtConfig(node_key_quorum=2)
    )
    op = reader.get()
    first = reader.sent()
    reader.answer(first[0], mine)
    reader.answer(first[1])
    reader.answer(first[2])
    # One holder answered: a fourth contact is asked for a second one.
    assert not op.done
    fourth = reader.sent()
    assert _by_address(reader, fourth) == [3]
    reader.answer(fourth[0], mine)
    assert op.done and len(op.result) == 2


def test_single_answer_lookup_compares_a_round_then_asks_one_at_a_time() -> None:
    mine = records("deep-publisher")
    # Our contacts are far from the key; the holders are closer, known only to them.
    reader = ScriptedLookup(node_key(mine[0].publisher), [1 << n for n in range(20, 26)])
    op = reader.get()
    first = reader.sent()
    # The farthest of the round answers first, naming a closer node: it is not asked
    # before the rest of the round has answered (they may name closer ones still).
    reader.answer(first[2], contacts=[1 << 15])
    assert reader.sent() == []
    reader.answer(first[0], contacts=[1 << 12, 1 << 14])
    assert reader.sent() == []
    reader.answer(first[1], contacts=[1 << 13])
    # Then the closest named, alone.
    second = reader.sent()
    assert [q.address for q in second] == [reader.address_of(1 << 12)]
    reader.answer(second[0], contacts=[1 << 11])
    third = reader.sent()
    assert [q.address for q in third] == [reader.address_of(1 << 11)]
    # A silent one stalls: the next closest is asked then.
    reader.at(T0 + STALL)
    fourth = reader.sent()
    assert [q.address for q in fourth] == [reader.address_of(1 << 13)]
    reader.answer(fourth[0], mine)
    assert op.done and len(op.result) == 2
    assert op.rounds == 3 and op.rpcs == 6


def test_lost_page_request_is_resent_to_the_same_holder() -> None:
    facet = "arch=s390x"
    many = [r for i in range(6) for r in records(f"paged-{i}", arch="s390x")]
    pages = [many[:4], many[4:8], many[8:]]
    reader = ScriptedLookup(
        facet_key(facet), [1 << n for n in range(10, 14)], DhtConfig(value_quorum=1, page_sources=1)
    )
    op = reader.get()
    first = reader.sent()
    # The closest holder answers a first page and a cursor; the others hold nothing.
    reader.answer(first[0], pages[0], cursor=b"after-first")
    reader.answer(first[1])
    reader.answer(first[2])
    page = reader.sent()
    assert len(page) == 1 and page[0].cursor == b"after-first"
    assert page[0].address == reader.addresses[0]
    # That page request is lost: at its timeout it is sent again, to the same holder,
    # from the same cursor (no other holder has more to page from).
    reader.at(reader.now + TIMEOUT)
    again = reader.sent()
    assert len(again) == 1
    assert again[0].address == page[0].address and again[0].cursor == b"after-first"
    assert again[0].msg_id != page[0].msg_id
    reader.answer(again[0], pages[1], cursor=b"after-second")
    last = reader.sent()
    reader.answer(last[0], pages[2])
    assert op.done
    assert {r.raw for r in op.result} == {r.raw for r in many}


def test_stalled_query_is_resent_by_a_quorum_walk_not_by_a_single_answer_walk() -> None:
    mine = records("resend-publisher")  # x86_64
    facet = facet_key("arch=x86_64")
    for key, resent in ((facet, True), (node_key(mine[0].publisher), False)):
        # The closest contact is slower: it stalls after 20 ms and times out after 30 ms.
        reader = ScriptedLookup(key, [1 << n for n in range(10, 22)], rtts={0: 0.01})
        op = reader.get()
        first = reader.sent()
        # (The facet walk learns from the records that its key is a facet key.)
        reader.answer(first[1], mine if key == facet else [])
        reader.answer(first[2])
        # The others never answer: the walk asks on as its queries stall.
        reader.at(T0 + 0.029)
        assert reader.sent()
        assert not op.done
        # first[0] times out: a quorum walk resends it (it needs the closest to answer); a
        # single-answer walk does not (any holder will do, and it asked another instead).
        reader.at(T0 + 0.03)
        again = [q for q in reader.sent() if q.address == first[0].address]
        assert len(again) == (1 if resent else 0)
        assert not op.done
