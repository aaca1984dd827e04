"""Node daemons for tests, demos and benchmarks: N real daemons in one trio process.

:func:`node_config` lays out a node's data directory (key file, TLS certificate, trust
list) and returns its :class:`~p2pbuild.node.NodeConfig` with loopback addresses and free
ports; :func:`open_node_daemons` runs several with :func:`~p2pbuild.node.run_node`.
:func:`serve_files` serves a directory over HTTPS, as a dispatcher would serve sources.
Everything is throwaway: keys come from ``make_trust_list``/``make_identity`` and live in
the caller's temporary directory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from .._cli._repos import serve_files
from .._identity import Identity
from .._trust import TrustList
from ..https import generate_tls_material
from ..node._config import NodeConfig, parse_config
from ..node._daemon import NodeDaemon, run_node
from ..node._service import JobRunner

__all__ = ["node_config", "open_node_daemons", "serve_files"]


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def node_config(
    data_dir: Path,
    identity: Identity,
    trust_list: TrustList,
    *,
    bootstrap: Sequence[tuple[str, int]] = (),
    push: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Create ``data_dir`` with ``identity``'s key file, a TLS certificate and
    ``trust_list``, and return a config for it: DHT and API on ``127.0.0.1`` with free
    ports, one slot, a 1 s status interval. ``overrides`` is merged into the TOML
    document (``{"limits": {"slots": 2}}``, ``{"pull": {"dispatchers": [...]}}``).
    An existing data directory is reused as it is (a restart).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    key_file = data_dir / "node.key"
    if not key_file.exists():
        identity.save(key_file)
        (data_dir / "tls").mkdir()
        generate_tls_material(data_dir / "tls", "localhost")
        (data_dir / "trust-list.bin").write_bytes(trust_list.to_bytes())
    document: dict[str, Any] = {
        "node": {"data_dir": str(data_dir), "operator": "test"},
        "dht": {
            "bind": "127.0.0.1:0",
            "bootstrap": [f"{host}:{port}" for host, port in bootstrap],
        },
        "api": {"enabled": push, "bind": "127.0.0.1:0"},
        "records": {"status_interval_s": 1, "status_lifetime_s": 60},
        "shutdown": {"grace_s": 5},
    }
    document = _merge(document, overrides or {})
    return parse_config(document, base_dir=data_dir)


@asynccontextmanager
async def open_node_daemons(
    base_dir: Path,
    identities: Sequence[Identity],
    trust_list: TrustList,
    *,
    bootstrap: Sequence[tuple[str, int]] = (),
    push: bool = True,
    runner: Callable[[int], JobRunner] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AsyncIterator[list[NodeDaemon]]:
    """Run one daemon per identity (data directories ``base_dir/node-<i>``) and yield them
    once all are running. ``runner(i)`` replaces node ``i``'s sandboxed executor. All are
    cancelled when the block exits (an urgent shutdown: running jobs are handed back)."""
    daemons = []
    async with trio.open_nursery() as nursery:
        for index, identity in enumerate(identities):
            config = node_config(
                base_dir / f"node-{index}",
                identity,
                trust_list,
                bootstrap=bootstrap,
                push=push,
                overrides=overrides,
            )
            daemon = await nursery.start(
                _run, config, runner(index) if runner is not None else None
            )
            daemons.append(daemon)
        yield daemons
        nursery.cancel_scope.cancel()


async def _run(
    config: NodeConfig,
    runner: JobRunner | None,
    task_status: trio.TaskStatus[NodeDaemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    await run_node(config, runner=runner, task_status=task_status)
