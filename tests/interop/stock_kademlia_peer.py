"""Stock ``kademlia`` nodes driven over stdin/stdout, for interoperability tests.

The PyPI ``kademlia`` package is asyncio-only, so the trio tests run it in a child process
(``.venv/bin/python tests/interop/stock_kademlia_peer.py``). This program starts ``--count``
stock ``kademlia.network.Server`` nodes on 127.0.0.1 with ephemeral ports, bootstraps the
first from ``--bootstrap`` addresses and every later one from those plus its predecessors,
then prints one JSON line::

    {"op": "ready", "addresses": [["127.0.0.1", port], ...], "ids": ["<hex>", ...]}

and answers JSON line commands read from stdin, one JSON line each on stdout. Every command
may carry ``"tag"`` (echoed back) and ``"node"`` (index of the stock node to act from,
default 0). Bytes travel as base64 text in fields ending in ``_b64``.

``{"op": "addresses"}``
    ``{"ok": true, "addresses": [...], "ids": [...]}``
``{"op": "bootstrap", "addresses": [[host, port], ...]}``
    ``Server.bootstrap`` on the chosen node; answers the number of nodes its crawl found.
``{"op": "get", "key": "arch=x86_64"}``
    ``Server.get``; answers ``value_b64`` for bytes, ``value`` for other types, or
    ``"found": false``.
``{"op": "set", "key": "...", "value_b64": "..."}`` (or ``"value"`` for text)
    ``Server.set``; answers ``"result"``, the package's own success flag.
``{"op": "store_raw", "address": [h, p], "key_hex": "...", "value_b64": "..."}``
    One bare ``store`` RPC to ``address``, what any UDP sender can do to a stock node.
``{"op": "find_value_raw", "address": [h, p], "key_hex": "..."}``
    One bare ``find_value`` RPC; answers ``value_b64`` or ``nodes`` ([[id_hex, h, p]]).
``{"op": "neighbors"}``
    The node's ``bootstrappable_neighbors()``.
``{"op": "local", "key": "..."}``
    What the node holds in its own storage for ``key`` (no network).
``{"op": "quit"}``
    Answer ``{"ok": true}``, stop every node and exit.

Every network operation is bounded by ``--op-timeout`` seconds; a failure answers
``{"ok": false, "error": "..."}`` and the program keeps going. It exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import sys
from typing import Any

from kademlia.network import Server

_ID_SIZE = 20


def _parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _address(value: Any) -> tuple[str, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
    ):
        raise ValueError(f"an address is [host, port], got {value!r:.80}")
    return value[0], value[1]


def _value_fields(value: Any) -> dict[str, Any]:
    if value is None:
        return {"found": False}
    if isinstance(value, bytes):
        return {"found": True, "value_b64": base64.b64encode(value).decode()}
    return {"found": True, "value": value}


def _command_value(command: dict[str, Any]) -> Any:
    if "value_b64" in command:
        return base64.b64decode(command["value_b64"], validate=True)
    return command["value"]


class Peers:
    """The running stock nodes and the command handlers."""

    def __init__(self, servers: list[Server], op_timeout: float) -> None:
        self.servers = servers
        self.op_timeout = op_timeout

    def addresses(self) -> dict[str, Any]:
        return {
            "addresses": [["127.0.0.1", s.transport.get_extra_info("sockname")[1]]
                          for s in self.servers],
            "ids": [s.node.id.hex() for s in self.servers],
        }

    def server(self, command: dict[str, Any]) -> Server:
        index = command.get("node", 0)
        if not isinstance(index, int) or not 0 <= index < len(self.servers):
            raise ValueError(f"no node {index!r}")
        return self.servers[index]

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command.get("op")
        if op == "addresses":
            return self.addresses()
        server = self.server(command)
        if op == "bootstrap":
            addresses = [_address(a) for a in command["addresses"]]
            found = await self._bounded(server.bootstrap(addresses))
            return {"found": len(found)}
        if op == "get":
            return _value_fields(await self._bounded(server.get(command["key"])))
        if op == "set":
            result = await self._bounded(server.set(command["key"], _command_value(command)))
            return {"result": bool(result)}
        if op == "store_raw":
            key = bytes.fromhex(command["key_hex"])
            reply = await self._bounded(server.protocol.store(
                _address(command["address"]), server.node.id, key, _command_value(command)
            ))
            return {"answered": bool(reply[0]), "result": reply[1]}
        if op == "find_value_raw":
            key = bytes.fromhex(command["key_hex"])
            reply = await self._bounded(
                server.protocol.find_value(_address(command["address"]), server.node.id, key)
            )
            if not reply[0]:
                return {"answered": False}
            result = reply[1]
            if isinstance(result, dict):
                return {"answered": True, **_value_fields(result.get("value"))}
            return {
                "answered": True,
                "nodes": [[bytes(n[0]).hex(), n[1], n[2]] for n in result],
            }
        if op == "neighbors":
            return {"neighbors": [list(n) for n in server.bootstrappable_neighbors()]}
        if op == "local":
            key = command["key"].encode()
            return _value_fields(server.storage.get(hashlib.sha1(key).digest()))
        raise ValueError(f"unknown op {op!r:.40}")

    async def _bounded(self, awaitable: Any) -> Any:
        return await asyncio.wait_for(awaitable, self.op_timeout)


async def _start(args: argparse.Namespace) -> list[Server]:
    servers: list[Server] = []
    for _ in range(args.count):
        server = Server(ksize=args.ksize, alpha=args.alpha)
        await server.listen(0, interface="127.0.0.1")
        known = list(args.bootstrap) + [
            ("127.0.0.1", s.transport.get_extra_info("sockname")[1]) for s in servers[-3:]
        ]
        if known:
            await asyncio.wait_for(server.bootstrap(known), args.op_timeout)
        servers.append(server)
    return servers


def _write(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    servers = await _start(args)
    peers = Peers(servers, args.op_timeout)
    _write({"op": "ready", **peers.addresses()})
    try:
        while line := await reader.readline():
            if not line.strip():
                continue
            tag: Any = None
            try:
                command = json.loads(line)
                if not isinstance(command, dict):
                    raise ValueError("a command is a JSON object")
                tag = command.get("tag")
                if command.get("op") == "quit":
                    _write({"ok": True, "tag": tag})
                    break
                answer = {"ok": True, **await peers.handle(command)}
            except TimeoutError:  # asyncio.wait_for's; an OSError subclass, so first
                answer = {"ok": False, "error": f"timed out after {args.op_timeout}s"}
            except (ValueError, KeyError, TypeError, OSError) as exc:
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            answer["tag"] = tag
            _write(answer)
    finally:
        for server in servers:
            server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=1, help="stock nodes to start")
    parser.add_argument("--bootstrap", type=_parse_address, action="append", default=[],
                        metavar="HOST:PORT", help="bootstrap the nodes from these")
    parser.add_argument("--ksize", type=int, default=20)
    parser.add_argument("--alpha", type=int, default=3)
    parser.add_argument("--op-timeout", type=float, default=15.0,
                        help="bound on each network operation (seconds)")
    parser.add_argument("--verbose", action="store_true", help="log the package's messages")
    args = parser.parse_args(argv)
    # The package logs every unanswered RPC at ERROR; keep stderr quiet unless asked.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.CRITICAL,
                        stream=sys.stderr)
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
