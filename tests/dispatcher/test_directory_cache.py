"""The dispatcher's directory cache: a query's answer is reused for ``refresh_interval``
seconds, then looked up again (exact virtual times, a real DHT on the in-memory network)."""

from __future__ import annotations

import trio
import trio.testing

from p2pbuild import SignedRecord
from p2pbuild.dht import Query
from p2pbuild.dispatcher._nodes import DirectoryFinder
from p2pbuild.testing import example_capability, example_status, make_trust_list, open_cluster


def _records(identity: object, now: float) -> list[SignedRecord]:
    return [
        SignedRecord.create(identity, example_capability(), seq=1, issued_at=int(now),  # type: ignore[arg-type]
                            lifetime=3600),
        SignedRecord.create(identity, example_status(), seq=1, issued_at=int(now),  # type: ignore[arg-type]
                            lifetime=600),
    ]


async def test_placing_builds_reads_the_directory_once_per_refresh_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trust = make_trust_list()
    first, second = trust.nodes["node-1"], trust.nodes["node-2"]
    async with open_cluster(12, seed=4) as cluster:
        dispatcher = cluster.nodes[3]
        finder = DirectoryFinder(dispatcher, trust.trust_list, refresh_interval=30.0)
        await cluster.nodes[5].publish(_records(first, cluster.nodes[5].now()))
        query = Query(arch="x86_64")
        found = await finder.find(query)
        assert [e.publisher for e in found] == [first.public_key]
        lookups = dispatcher.statistics().lookups
        await cluster.nodes[6].publish(_records(second, cluster.nodes[6].now()))
        await trio.sleep(29.0)
        # Within the interval: the cached answer, without a DHT lookup.
        assert [e.publisher for e in await finder.find(query)] == [first.public_key]
        assert dispatcher.statistics().lookups == lookups
        await trio.sleep(1.0)
        # Refreshed: the node that published meanwhile is there.
        refreshed = await finder.find(query)
        assert {e.publisher for e in refreshed} == {first.public_key, second.public_key}
        assert dispatcher.statistics().lookups > lookups


async def test_a_due_refresh_runs_in_the_background_while_the_cached_answer_is_returned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trust = make_trust_list()
    first, second = trust.nodes["node-1"], trust.nodes["node-2"]
    async with open_cluster(12, seed=4) as cluster, trio.open_nursery() as nursery:
        dispatcher = cluster.nodes[3]
        finder = DirectoryFinder(
            dispatcher, trust.trust_list, refresh_interval=30.0, nursery=nursery,
            max_stale=120.0,
        )
        await cluster.nodes[5].publish(_records(first, cluster.nodes[5].now()))
        query = Query(arch="x86_64")
        assert [e.publisher for e in await finder.find(query)] == [first.public_key]
        await cluster.nodes[6].publish(_records(second, cluster.nodes[6].now()))
        await trio.sleep(31.0)
        lookups = dispatcher.statistics().lookups
        # Due: the cached answer at once (no simulated time passes), a refresh begun.
        begun = trio.current_time()
        assert [e.publisher for e in await finder.find(query)] == [first.public_key]
        assert [e.publisher for e in await finder.find(query)] == [first.public_key]
        assert trio.current_time() == begun
        assert finder._refreshing == {query}  # one refresh, not one per find
        await trio.sleep(5.0)
        assert not finder._refreshing
        assert dispatcher.statistics().lookups > lookups
        refreshed = await finder.find(query)
        assert {e.publisher for e in refreshed} == {first.public_key, second.public_key}
        # Too old to serve (a long pause): read again before answering.
        await trio.sleep(121.0)
        begun = trio.current_time()
        await finder.find(query)
        assert trio.current_time() > begun
        nursery.cancel_scope.cancel()
