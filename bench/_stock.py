"""The stock ``kademlia`` half of ``bench/dht.py``, run in its own process (it is asyncio).

``python bench/_stock.py --n N --lookups L --seed S --value-size B --budget SECONDS``
prints one JSON object: the same phases and figures as p2pbuild's half, measured on the
unmodified package. Three things are added around it and change nothing it does: a protocol
subclass that counts the RPCs it sends, a wrapper counting the rounds of its crawler (one
call of ``SpiderCrawl._find`` is one round of alpha parallel queries), and a wrapper that
marks the store a ``get`` sends at its end as part of the lookup.

Nodes are silenced the way p2pbuild's are: their sockets stay open and every datagram they
receive is dropped, so peers learn of the death only by timeouts (the package's RPC timeout
is 5 s, its default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import gc
import json
import random
import sys
import time
from typing import Any

from kademlia import crawling
from kademlia.network import Server
from kademlia.protocol import KademliaProtocol

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _stats import latency_summary, rss_bytes

# "lookup": the RPCs a get sends itself: its crawler's find_value/find_node queries and the
# store of the value to the nearest node without it, which ``get`` awaits before returning.
# "other": stores and pings any node sends meanwhile (stores to newly seen nodes, pings of
# full buckets): work the network does because of the lookups.
_COUNTS = {"lookup": 0, "other": 0, "rounds": 0}
_IN_LOOKUP_STORE: contextvars.ContextVar[bool] = contextvars.ContextVar("store", default=False)


class _CountingProtocol(KademliaProtocol):  # type: ignore[misc]
    async def call_find_node(self, node_to_ask: Any, node_to_find: Any) -> Any:
        _COUNTS["lookup"] += 1
        return await super().call_find_node(node_to_ask, node_to_find)

    async def call_find_value(self, node_to_ask: Any, node_to_find: Any) -> Any:
        _COUNTS["lookup"] += 1
        return await super().call_find_value(node_to_ask, node_to_find)

    async def call_store(self, node_to_ask: Any, key: bytes, value: Any) -> Any:
        _COUNTS["lookup" if _IN_LOOKUP_STORE.get() else "other"] += 1
        return await super().call_store(node_to_ask, key, value)

    async def call_ping(self, node_to_ask: Any) -> Any:
        _COUNTS["other"] += 1
        return await super().call_ping(node_to_ask)


class _CountingServer(Server):  # type: ignore[misc]
    protocol_class = _CountingProtocol


_original_find = crawling.SpiderCrawl._find


async def _counted_find(self: Any, rpcmethod: Any) -> Any:
    _COUNTS["rounds"] += 1
    return await _original_find(self, rpcmethod)


_original_found = crawling.ValueSpiderCrawl._handle_found_values


async def _attributed_found(self: Any, values: Any) -> Any:
    token = _IN_LOOKUP_STORE.set(True)
    try:
        return await _original_found(self, values)
    finally:
        _IN_LOOKUP_STORE.reset(token)


crawling.SpiderCrawl._find = _counted_find
crawling.ValueSpiderCrawl._handle_found_values = _attributed_found


def _per(count: int, lookups: int) -> float | None:
    return round(count / lookups, 2) if lookups else None


class _OutOfTime(Exception):
    pass


def _silence(server: Server) -> None:
    # The socket stays open; whatever arrives is dropped without an answer.
    server.protocol.datagram_received = lambda data, addr: None


async def _lookups(
    servers: list[Server],
    plan: list[tuple[int, str, bytes]],
    *,
    concurrency: int,
    lookup_timeout: float,
    deadline: float,
) -> dict[str, Any]:
    latencies: list[float] = []
    successes = 0
    before = dict(_COUNTS)
    limit = asyncio.Semaphore(concurrency)

    async def one(requester: int, key: str, value: bytes) -> None:
        nonlocal successes
        async with limit:
            t0 = time.perf_counter()
            try:
                got = await asyncio.wait_for(servers[requester].get(key), lookup_timeout)
            except TimeoutError:
                got = None
            latencies.append(time.perf_counter() - t0)
            if got == value:
                successes += 1

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    tasks = []
    for requester, key, value in plan:
        if time.monotonic() > deadline:
            break
        tasks.append(asyncio.ensure_future(one(requester, key, value)))
        if concurrency == 1:
            await tasks[-1]
        else:
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    done = len(latencies)
    return {
        "lookups": done,
        "cpu_ms_per_lookup": round(cpu * 1000 / done, 3) if done else None,
        "planned": len(plan),
        "concurrency": concurrency,
        "success_rate": successes / done if done else 0.0,
        **latency_summary(latencies),
        "rounds_per_lookup": _per(_COUNTS["rounds"] - before["rounds"], done),
        "rpcs_per_lookup": _per(_COUNTS["lookup"] - before["lookup"], done),
        "other_rpcs_per_lookup": _per(_COUNTS["other"] - before["other"], done),
        "lookups_per_s": round(done / elapsed, 1) if elapsed else None,
        "elapsed_s": round(elapsed, 3),
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.budget
    phases: dict[str, float] = {}
    result: dict[str, Any] = {"n": args.n, "completed": False, "elapsed_s": phases}

    def check(phase: str) -> None:
        if time.monotonic() > deadline:
            result["aborted_in"] = phase
            raise _OutOfTime

    gc.collect()
    rss0 = rss_bytes()
    servers: list[Server] = []
    t0 = time.perf_counter()
    try:
        for _ in range(args.n):
            server = _CountingServer(ksize=20, alpha=3, node_id=rng.randbytes(20))
            await server.listen(0, interface="127.0.0.1")
            if servers:
                contact = rng.choice(servers)
                port = contact.transport.get_extra_info("sockname")[1]
                await server.bootstrap([("127.0.0.1", port)])
            servers.append(server)
            check("build")
        phases["build"] = round(time.perf_counter() - t0, 3)
        gc.collect()
        result["rss_per_node_bytes_before_publish"] = round((rss_bytes() - rss0) / args.n)

        t0 = time.perf_counter()
        publishers = rng.sample(range(args.n), min(args.keys, args.n))
        published: list[tuple[int, str, bytes]] = []
        stored = 0
        for j, publisher in enumerate(publishers):
            key, value = f"bench/{j}", rng.randbytes(args.value_size)
            stored += bool(await servers[publisher].set(key, value))
            published.append((publisher, key, value))
            check("publish")
        phases["publish"] = round(time.perf_counter() - t0, 3)
        result["published"] = {"keys": len(published), "stored": stored}
        gc.collect()
        result["rss_per_node_bytes"] = round((rss_bytes() - rss0) / args.n)

        def plan(alive: list[int], keys: list[tuple[int, str, bytes]]) -> list[Any]:
            out = []
            for _ in range(args.lookups):
                publisher, key, value = rng.choice(keys)
                requester = rng.choice(alive)
                while requester == publisher:
                    requester = rng.choice(alive)
                out.append((requester, key, value))
            return out

        t0 = time.perf_counter()
        everyone = list(range(args.n))
        result["alive"] = await _lookups(
            servers, plan(everyone, published), concurrency=1,
            lookup_timeout=args.lookup_timeout, deadline=deadline,
        )
        phases["lookups_alive"] = round(time.perf_counter() - t0, 3)
        check("lookups_alive")

        t0 = time.perf_counter()
        dead = set(rng.sample(everyone, int(args.n * args.dead_fraction)))
        for index in dead:
            _silence(servers[index])
        alive = [i for i in everyone if i not in dead]
        live_keys = [p for p in published if p[0] not in dead]
        result["dead"] = {
            "dead_nodes": len(dead),
            **await _lookups(
                servers, plan(alive, live_keys)[: args.dead_lookups],
                concurrency=args.dead_concurrency, lookup_timeout=args.lookup_timeout,
                deadline=deadline + args.lookup_timeout,
            ),
        }
        phases["lookups_dead"] = round(time.perf_counter() - t0, 3)
        result["completed"] = True
    except _OutOfTime:
        pass
    finally:
        for server in servers:
            server.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="stock kademlia half of bench/dht.py")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--dead-lookups", type=int, default=100)
    parser.add_argument("--dead-concurrency", type=int, default=10)
    parser.add_argument("--dead-fraction", type=float, default=0.2)
    parser.add_argument("--lookup-timeout", type=float, default=60.0)
    parser.add_argument("--value-size", type=int, default=540)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget", type=float, default=300.0)
    args = parser.parse_args(argv)
    # The package logs every unanswered RPC at ERROR; a benchmark has no use for it.
    import logging

    logging.disable(logging.CRITICAL)
    print(json.dumps(asyncio.run(_run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
