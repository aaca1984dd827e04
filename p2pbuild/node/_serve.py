"""Run a node daemon as a process: its start line on stdout, SIGTERM/SIGINT to drain,
SIGHUP to read the trust list file again.

What ``p2pbuild node run`` does once its config is loaded, and what a test-only node with
another runner (``p2pbuild.testing.tampering_node``) does the same way.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
from typing import Any

import trio

from ._config import NodeConfig
from ._daemon import NodeDaemon, run_node
from ._service import JobRunner

__all__ = ["serve_node"]


async def serve_node(config: NodeConfig, runner: JobRunner | None = None) -> int:
    """Run the daemon, print its start line, forward signals; ``runner`` replaces the
    sandboxed executor (a test node may run another)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            daemon: NodeDaemon = await nursery.start(
                functools.partial(run_node, config, runner=runner)
            )
            print(json.dumps({
                "node": str(daemon.public_key),
                "fingerprint": daemon.public_key.fingerprint,
                "endpoint": daemon.endpoint or None,
                "api_port": daemon.api_port,
                "dht": list(daemon.directory.address),
                "arch": daemon.detected.arch,
                "os": daemon.detected.os,
                "machine": daemon.detected.machine.value,
                "build_types": list(daemon.detected.build_types),
            }), flush=True)
            nursery.start_soon(_forward_signals, signals, daemon)
            await daemon.wait_stopped()
            nursery.cancel_scope.cancel()
    return 0


async def _forward_signals(signals: Any, daemon: NodeDaemon) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            logging.getLogger("p2pbuild.node").info("SIGHUP: reading the trust list again")
            daemon.reload_trust_list()
            continue
        urgent = daemon.shutdown_requested
        logging.getLogger("p2pbuild.node").info(
            "%s: %s", signal.Signals(signum).name,
            "handing back running jobs now" if urgent else "draining",
        )  # fmt: skip
        daemon.request_shutdown(urgent=urgent)
