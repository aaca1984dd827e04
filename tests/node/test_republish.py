"""The node republishes its capability once the DHT around it has grown: its first publish
happens when it knows little more than the seeds, so nodes that start together could
otherwise miss each other's facet keys until the next (long) refresh."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from p2pbuild.node._daemon import _FIRST_REPUBLISH_S, NodeDaemon


class FakeDirectory:
    def __init__(self) -> None:
        self.contacts = 1

    def statistics(self) -> SimpleNamespace:
        return SimpleNamespace(contacts=self.contacts)

    async def bootstrap(self, seeds: object) -> int:
        return 0


async def test_capability_is_republished_when_contacts_grow(autojump_clock: object) -> None:
    directory = FakeDirectory()
    published: list[tuple[float, bool]] = []

    async def publish(*, capability: bool = False) -> None:
        published.append((trio.current_time(), capability))

    run_file_writes: list[float] = []
    daemon = SimpleNamespace(
        config=SimpleNamespace(status_interval_s=60.0, capability_lifetime_s=86_400,
                               dht=SimpleNamespace(bootstrap=[("127.0.0.1", 1)])),
        clock=trio.current_time,
        directory=directory,
        _publish=publish,
        _warn_alone=lambda: None,
        _write_run_file=lambda: run_file_writes.append(trio.current_time()),
    )
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(NodeDaemon._status_loop, daemon)  # type: ignore[arg-type]
        await trio.sleep(1)
        directory.contacts = 12  # the network formed around the node
        await trio.sleep(_FIRST_REPUBLISH_S + 60 * 2)
        nursery.cancel_scope.cancel()
    times = [(round(t - start), capability) for t, capability in published]
    # Soon after start the capability goes out again because the node now knows 12
    # contacts; afterwards, with no growth, only status is republished every 60 s.
    assert times[0] == (round(_FIRST_REPUBLISH_S), True)
    assert times[1:] == [(round(_FIRST_REPUBLISH_S) + 60, False),
                         (round(_FIRST_REPUBLISH_S) + 120, False)]
    # `node status` reads the run file: it is rewritten after every publish.
    assert [round(t - start) for t in run_file_writes] == [t for t, _ in times]
