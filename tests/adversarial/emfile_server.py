"""A node API server in its own process that can be made to run out of file descriptors.

Run as ``python emfile_server.py DIR``: serves a node's HTTPS API (``serve_asgi``) on a free
loopback port and prints ``{"port": N}``. Then it reads commands on stdin, one per line:
``exhaust`` opens files until the process has no descriptor left (``accept`` then fails
with EMFILE) and prints ``exhausted``; ``release`` closes them and prints ``released``;
``quit`` ends. Logging goes to stderr, which the test reads.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from p2pbuild.https import generate_tls_material, serve_asgi
from p2pbuild.node._api import NodeApiConfig


async def main(directory: Path) -> None:
    tls = generate_tls_material(directory)

    async def status(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/status", status)])
    held: list[int] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_asgi, app, NodeApiConfig(tls=tls))
        print(json.dumps({"port": port}), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buffer = b""
        while True:
            data = await stdin.receive_some(1024)
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = line.decode().strip()
                if command == "exhaust":
                    try:
                        while True:
                            held.append(os.open(os.devnull, os.O_RDONLY))
                    except OSError:
                        pass
                    print("exhausted", flush=True)
                elif command == "release":
                    for fd in held:
                        os.close(fd)
                    held.clear()
                    print("released", flush=True)
                elif command == "quit":
                    nursery.cancel_scope.cancel()
                    return


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(name)s %(levelname)s: %(message)s")
    trio.run(main, Path(sys.argv[1]))
