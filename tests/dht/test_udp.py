"""Real loopback UDP sockets: 50 nodes in one trio process, and hostile datagrams."""

from __future__ import annotations

import random
import socket

import pytest
import trio
from waits import wait_until

from p2pbuild import SignedRecord
from p2pbuild.dht import Directory, Query, node_id_for, node_key, serve
from p2pbuild.testing import example_capability, example_status, make_identity

pytestmark = pytest.mark.slow


async def test_50_nodes_on_loopback_publish_and_find() -> None:
    rng = random.Random(11)
    identities = [make_identity(f"udp-{i}") for i in range(50)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nodes: list[Directory] = []
            for identity in identities:
                bootstrap = [nodes[0].address] if nodes else []
                directory = await nursery.start(
                    lambda task_status, b=bootstrap, i=identity: serve(
                        "127.0.0.1", 0, bootstrap=b, node_id=node_id_for(i.public_key),
                        rng=random.Random(rng.getrandbits(64)), task_status=task_status,
                    )
                )
                assert directory.address[1] != 0
                nodes.append(directory)
            now = int(nodes[0].now())
            for index in range(0, 50, 5):
                identity = identities[index]
                acks = await nodes[index].publish([
                    SignedRecord.create(identity, example_capability(arch="s390x"), seq=1,
                                        issued_at=now, lifetime=3600),
                    SignedRecord.create(identity, example_status(), seq=1, issued_at=now,
                                        lifetime=600),
                ])
                assert min(acks.values()) >= 10
            expected = {identities[i].public_key for i in range(0, 50, 5)}
            for directory in nodes:
                entries = await directory.find(Query(arch="s390x", os="fedora-41"))
                assert {entry.publisher for entry in entries} == expected
            records = await nodes[7].get(node_key(identities[15].public_key))
            assert len(records) == 2

            # Hostile datagrams at one node: all dropped, counted, and it keeps working.
            target = nodes[3]
            before = target.statistics()
            hostile = [b"", b"\x00", b"\x07" + b"x" * 40, b"\x00" + b"i" * 20 + b"\xc1",
                       b"\x00" + b"i" * 20 + b"\x92\xa4ping\x90", b"\x01" + b"r" * 21,
                       b"\x00" * 3000]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
                for data in hostile:
                    attacker.sendto(data, target.address)
            await wait_until(
                lambda: target.statistics().datagrams_in >= before.datagrams_in + len(hostile),
                5, "the node received every hostile datagram")
            after = target.statistics()
            assert after.dropped_total - before.dropped_total == len(hostile)
            assert after.dropped["oversize"] >= 1
            assert len(await target.find(Query(arch="s390x"))) == len(expected)
            nursery.cancel_scope.cancel()
