"""Routing table invariants against a brute-force model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pbuild.dht._routing import RoutingTable

ids = st.integers(0, 2**160 - 1)


@given(own=ids, others=st.lists(ids, max_size=120, unique=True), target=ids)
def test_closest_matches_brute_force(own: int, others: list[int], target: int) -> None:
    table = RoutingTable(own, k=8, replacements=2, max_failures=3, now=0.0)
    for n, node_id in enumerate(others):
        table.seen(node_id, ("10.0.0.1", 1 + n), 0.0)
    held = [peer.node_id for peer in table]
    assert len(held) == len(set(held)) and own not in held
    # Never more than k per bucket.
    buckets: dict[int, int] = {}
    for node_id in held:
        index = (node_id ^ own).bit_length() - 1
        buckets[index] = buckets.get(index, 0) + 1
    assert all(count <= 8 for count in buckets.values())
    expected = sorted(held, key=lambda node_id: node_id ^ target)[:8]
    assert [p.node_id for p in table.closest(target, 8)] == expected


@given(a=ids, b=ids, c=ids)
def test_xor_metric_laws(a: int, b: int, c: int) -> None:
    assert (a ^ a) == 0
    assert (a ^ b) == (b ^ a)
    assert (a ^ c) <= (a ^ b) + (b ^ c)


def test_rtt_estimate_and_failures() -> None:
    table = RoutingTable(0, k=2, replacements=1, max_failures=2, now=0.0)
    table.seen(1 << 100, ("10.0.0.1", 1), 0.0, rtt=0.010)
    table.seen(1 << 100, ("10.0.0.1", 1), 0.0, rtt=0.020)
    peer = table.get(1 << 100)
    assert peer is not None and 0.010 < peer.srtt < 0.020 and peer.rttvar > 0
    assert table.overall.srtt > 0
    assert not table.failed(1 << 100)
    assert table.failed(1 << 100)  # second failure in a row: removed
    assert table.get(1 << 100) is None
    # A claimed move to another address is ignored.
    table.seen(5, ("10.0.0.5", 5), 0.0)
    table.seen(5, ("10.6.6.6", 6), 0.0)
    moved = table.get(5)
    assert moved is not None and moved.address == ("10.0.0.5", 5)


# One step on a table of few buckets (ids 1..63 against own id 0, k=2): a contact heard
# from (a request, or an answer with an RTT) at one of few addresses, or a failed RPC.
steps = st.lists(
    st.tuples(
        st.sampled_from(["request", "answer", "failed", "confirmed"]),
        st.integers(1, 63),
        st.integers(1, 6),
    ),
    max_size=80,
)


@given(steps=steps)
def test_the_contact_count_follows_every_change(steps: list[tuple[str, int, int]]) -> None:
    """``len`` (a count kept as contacts come and go) equals the contacts listed, whatever
    adds, moves, replaces or removes them: newcomers, replacements promoted when a contact
    fails (or not, when their address is taken), removals after failures, an address
    taken over by the id that answered there."""
    table = RoutingTable(0, k=2, replacements=2, max_failures=2, now=0.0)
    for kind, node_id, port in steps:
        if kind == "request":
            table.seen(node_id, ("10.0.0.1", port), 1.0)
        elif kind == "answer":
            table.seen(node_id, ("10.0.0.1", port), 1.0, rtt=0.05)
        else:
            table.failed(node_id, confirmed=kind == "confirmed")
        assert len(table) == len(list(table))
