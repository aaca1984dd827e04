"""A dispatcher with a fixed set of push nodes, as a child process that the Koji restart
tests kill with SIGKILL and start again (``test_koji_restart.py``)::

    python dispatcher_child.py DISPATCHER_TOML NODES_JSON

``NODES_JSON`` lists each node's signed capability and status records (hex), what a
:class:`~p2pbuild.dispatcher.StaticFinder` serves in place of the DHT. Prints one JSON line
(``{"port": N}``) once the dispatcher listens; logs to stderr. SIGTERM stops it the way
``p2pbuild dispatcher run`` stops (the dispatcher's nursery is cancelled).
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from pathlib import Path

import trio

from p2pbuild import SignedRecord, TrustList
from p2pbuild._wiring import load_service_config, serve_dispatcher
from p2pbuild.dht import NodeEntry
from p2pbuild.dispatcher import StaticFinder


async def serve(config_path: Path, nodes_path: Path) -> None:
    config = load_service_config(config_path)
    trust_list = TrustList.from_bytes(config.dispatcher.trust_list_file.read_bytes())
    finder = StaticFinder(trust_list)
    for item in json.loads(nodes_path.read_text()):
        capability = SignedRecord.from_bytes(bytes.fromhex(item["capability"]))
        status = SignedRecord.from_bytes(bytes.fromhex(item["status"]))
        finder.put(NodeEntry(capability.publisher, capability, status))
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(functools.partial(serve_dispatcher, config,
                                                            finder=finder))
            print(json.dumps({"port": running.dispatcher.port}), flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(serve, Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
