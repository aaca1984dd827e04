"""Wire compatibility with the stock PyPI ``kademlia`` package, over real loopback UDP.

The stock nodes are asyncio, so they run in a child process
(``tests/interop/stock_kademlia_peer.py``) driven by JSON lines; the p2pbuild nodes run in
this test's trio loop. Covered:

(a) stock nodes bootstrap from p2pbuild nodes and ``get`` a facet key p2pbuild published,
    receiving the record bundle as bytes, which decodes into records that verify;
(b) p2pbuild nodes bootstrap through stock nodes only and then find each other's records;
(c) whatever a stock node sends (a ``set`` of garbage, a forged, replayed or misplaced
    record, a bundle with junk, a bare ``store`` to each node) never replaces or corrupts
    the signed records p2pbuild holds.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from waits import JsonLines

from p2pbuild import SignedRecord, encode
from p2pbuild.dht import (
    DhtConfig,
    Directory,
    Query,
    decode_bundle,
    facet_key,
    facet_text_key,
    node_id_for,
    node_key,
    node_text_key,
    open_directory,
)
from p2pbuild.testing import example_capability, example_status, make_identity

pytestmark = pytest.mark.slow

PEER = Path(__file__).resolve().parent.parent / "interop" / "stock_kademlia_peer.py"
X86 = facet_text_key("arch=x86_64")
MAX_BUNDLE = DhtConfig().max_bundle


def _records(label: str, *, seq: int = 1, arch: str = "x86_64") -> list[SignedRecord]:
    identity = make_identity(label)
    now = int(time.time())
    return [
        SignedRecord.create(identity, example_capability(arch=arch), seq=seq, issued_at=now,
                            lifetime=3600),
        SignedRecord.create(identity, example_status(), seq=seq, issued_at=now, lifetime=600),
    ]


class StockPeers:
    """The child process running stock nodes, spoken to in JSON lines."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._lines = JsonLines(process.stdout, "the stock peer process")
        self.addresses: list[tuple[str, int]] = []

    async def read(self) -> dict[str, Any]:
        return await self._lines.next()

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one command and return its answer; fails the test if it is not ``ok``."""
        await self._stdin.send_all(json.dumps({"op": op, **fields}).encode() + b"\n")
        with trio.fail_after(30):
            answer = await self.read()
        assert answer["ok"], answer
        return answer

    async def get(self, key: str, node: int = 0) -> bytes | None:
        answer = await self.call("get", key=key, node=node)
        if not answer["found"]:
            return None
        assert "value_b64" in answer, f"a stock get returned a non-bytes value: {answer}"
        return base64.b64decode(answer["value_b64"])


@asynccontextmanager
async def stock_peers(
    count: int, bootstrap: Sequence[tuple[str, int]] = ()
) -> AsyncIterator[StockPeers]:
    argv = [sys.executable, str(PEER), "--count", str(count), "--op-timeout", "20"]
    for host, port in bootstrap:
        argv += ["--bootstrap", f"{host}:{port}"]
    process = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE)
    try:
        peers = StockPeers(process)
        with trio.fail_after(60):
            ready = await peers.read()
        assert ready["op"] == "ready"
        peers.addresses = [(host, port) for host, port in ready["addresses"]]
        yield peers
    finally:
        with trio.CancelScope(shield=True):
            # Closing stdin ends the program; kill it if it does not go.
            assert process.stdin is not None
            await process.stdin.aclose()
            with trio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _p2p_nodes(
    stack: AsyncExitStack, count: int, bootstrap: Sequence[tuple[str, int]], **kwargs: Any
) -> list[Directory]:
    nodes: list[Directory] = []
    for _ in range(count):
        seeds = list(bootstrap) or [n.address for n in nodes[-1:]]
        nodes.append(await stack.enter_async_context(open_directory(bootstrap=seeds, **kwargs)))
    return nodes


def _verified(bundle: bytes, now: float) -> list[SignedRecord]:
    """Decode a bundle as documented and verify every record in it."""
    total, raws = decode_bundle(bundle, max_size=MAX_BUNDLE)
    # docs/protocol.md: canonical msgpack [1, total, [record, ...]], at most 1,100 bytes.
    assert len(bundle) <= 1100
    assert msgpack.unpackb(bundle) == [1, total, raws]
    assert 0 < len(raws) <= total
    records = [SignedRecord.from_bytes(raw) for raw in raws]
    for record in records:
        record.check(now)
    return records


async def test_stock_nodes_bootstrap_from_p2pbuild_and_get_a_facet_key() -> None:
    async with AsyncExitStack() as stack:
        plain = await _p2p_nodes(stack, 4, ())
        labels = ("node-a", "node-b", "node-c")
        publishers = [
            await stack.enter_async_context(open_directory(
                bootstrap=[plain[0].address],
                node_id=node_id_for(make_identity(label).public_key),
            ))
            for label in labels
        ]
        # Every node is up before anyone publishes: a node that joins later receives the
        # records of its keys only at their next republication.
        published: dict[bytes, SignedRecord] = {}
        for label, publisher in zip(labels, publishers, strict=True):
            records = _records(label)
            await publisher.publish(records)
            published.update((r.raw, r) for r in records)

        stock = await stack.enter_async_context(
            stock_peers(3, [plain[1].address, plain[2].address])
        )
        for index in range(3):
            bundle = await stock.get(X86, node=index)
            assert bundle is not None, f"stock node {index} did not find {X86}"
            total, _ = decode_bundle(bundle, max_size=MAX_BUNDLE)
            records = _verified(bundle, time.time())
            # Six records do not fit in one datagram: a stock client gets the first page,
            # and ``total`` tells it there is more.
            assert total == len(published) == 6
            assert 0 < len(records) < total
            assert {r.raw for r in records} <= set(published)

        # A publisher's own key, read by a stock client, holds its capability and status.
        node_a = make_identity("node-a").public_key
        bundle = await stock.get(node_text_key(node_a), node=1)
        assert bundle is not None
        mine = _verified(bundle, time.time())
        assert {r.kind.value for r in mine} == {"capability", "status"}
        assert all(r.publisher == node_a for r in mine)

        # A key nobody published is not found (and nothing breaks).
        assert await stock.get(facet_text_key("arch=s390x"), node=2) is None

        # The stock nodes are in our routing tables now, and nothing they sent was dropped
        # as malformed.
        stock_ports = {port for _, port in stock.addresses}
        seen = {c.port for n in plain for c in n.contacts()}
        assert seen & stock_ports
        for node in plain:
            assert node.statistics().dropped.get("malformed", 0) == 0, node.statistics()


async def test_p2pbuild_bootstraps_through_stock_nodes_only() -> None:
    async with AsyncExitStack() as stack:
        stock = await stack.enter_async_context(stock_peers(5))
        seeds = stock.addresses[:2]
        others = await _p2p_nodes(stack, 3, seeds)
        identity = make_identity("node-behind-stock")
        publisher = await stack.enter_async_context(open_directory(
            bootstrap=seeds, node_id=node_id_for(identity.public_key)
        ))
        records = _records("node-behind-stock")
        acknowledged = await publisher.publish(records)
        assert all(count >= 1 for count in acknowledged.values()), acknowledged

        reader = await stack.enter_async_context(open_directory(bootstrap=stock.addresses[3:]))
        assert reader.statistics().contacts > 0
        # It finds the other p2pbuild nodes it has never been told about ...
        for other in [*others, publisher]:
            found = await reader.find_nodes(other.node_id)
            assert found and found[0].node_id == other.node_id
            assert found[0].address == other.address
        # ... and their records, by facet and by node key.
        entries = await reader.find(Query(arch="x86_64"))
        assert [e.publisher for e in entries] == [identity.public_key]
        assert entries[0].capability_record.raw == records[0].raw
        assert entries[0].status_record is not None
        assert entries[0].status_record.raw == records[1].raw
        got = await reader.get(node_key(identity.public_key))
        assert {r.raw for r in got} == {r.raw for r in records}


async def test_stock_writes_never_replace_or_corrupt_signed_records() -> None:
    async with AsyncExitStack() as stack:
        plain = await _p2p_nodes(stack, 5, ())
        identity = make_identity("node-victim")
        publisher = await stack.enter_async_context(open_directory(
            bootstrap=[plain[0].address], node_id=node_id_for(identity.public_key)
        ))
        old = _records("node-victim", seq=1)
        current = _records("node-victim", seq=2)
        await publisher.publish(current)
        stock = await stack.enter_async_context(stock_peers(2, [plain[1].address]))
        p2p_nodes = [*plain, publisher]

        forged = bytearray(current[0].raw)
        forged[-1] ^= 0x01  # last byte of the signature
        misplaced = _records("node-intruder", arch="s390x")[0]
        junk_bundle = encode([1, 3, [b"junk", bytes(forged), old[0].raw]])
        writes: list[tuple[str, dict[str, Any]]] = [
            (X86, {"value_b64": base64.b64encode(b"hello, world").decode()}),
            (X86, {"value": "text instead of bytes"}),
            (X86, {"value": 12345}),
            (X86, {"value_b64": base64.b64encode(bytes(forged)).decode()}),
            (X86, {"value_b64": base64.b64encode(old[0].raw).decode()}),  # replay, seq 1 < 2
            (X86, {"value_b64": base64.b64encode(junk_bundle).decode()}),
            (X86, {"value_b64": base64.b64encode(misplaced.raw).decode()}),  # not bound to X86
            (node_text_key(identity.public_key),
             {"value_b64": base64.b64encode(old[1].raw).decode()}),
        ]
        for key, value in writes:
            # The package's own flag only says whether some node answered.
            await stock.call("set", key=key, **value)
        # And a bare store RPC straight to every p2pbuild node, bypassing any lookup.
        for node in p2p_nodes:
            for value_b64 in (base64.b64encode(b"\x98garbage").decode(),
                              base64.b64encode(old[0].raw).decode()):
                answer = await stock.call("store_raw", address=list(node.address),
                                          key_hex=facet_key("arch=x86_64").hex(),
                                          value_b64=value_b64)
                assert answer["answered"] and answer["result"] is False

        # Every p2pbuild node still serves exactly the current records, to p2pbuild ...
        reader = await stack.enter_async_context(open_directory(bootstrap=[plain[3].address]))
        got = await reader.get(facet_key("arch=x86_64"))
        assert {r.raw for r in got} == {r.raw for r in current}
        entries = await reader.find(Query(arch="x86_64"))
        assert [e.capability_record.seq for e in entries] == [2]
        assert await reader.get(facet_key("arch=s390x")) == []
        # ... and to a stock client asking each p2pbuild holder directly.
        holders = 0
        for node in p2p_nodes:
            answer = await stock.call("find_value_raw", address=list(node.address),
                                      key_hex=facet_key("arch=x86_64").hex())
            if answer.get("found"):
                holders += 1
                records = _verified(base64.b64decode(answer["value_b64"]), time.time())
                assert {r.raw for r in records} == {r.raw for r in current}
        assert holders >= 1

        rejected: dict[str, int] = {}
        for node in p2p_nodes:
            for code, count in node.statistics().rejected.items():
                rejected[code] = rejected.get(code, 0) + count
        for code in ("malformed", "bad-signature", "stale-seq", "wrong-key"):
            assert rejected.get(code, 0) >= 1, rejected
