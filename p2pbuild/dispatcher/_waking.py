"""Waking on-demand nodes: signed wake requests, and keeping a pool's nodes awake.

When selection picks a node in standby (``_select.asleep``: work matches only sleeping
nodes, or the awake ones are full), the engine calls :func:`wake_nodes` before it sends any
job: each node's ``wake_url`` gets ``POST`` with a :class:`~p2pbuild._wake.WakeRequest`
signed by the dispatcher, and the node counts as awake when that answers ``202`` with
``{"standby": false}`` (the node's own ``/v1/wake``) or, for a wake service its operator
runs while the machine is stopped, once the directory shows its status out of standby. A
node not awake within its declared ``wake_s`` is reported back; the engine then chooses
elsewhere. A node without ``wake_url`` (a pull node) needs no request: the job offered in
its long-poll is its wake-up.

:class:`KeepAwake` keeps ``keep_awake`` on-demand nodes of each configured pool awake
(``[on_demand] keep_awake = {pool = n}``): every ``interval_s`` it sends a wake request to
that many of the pool's on-demand nodes, awake ones first, which restarts their idle time;
the others may go to standby. Nodes with a ``wake_url`` only (a pull node's long-poll
cannot be kept awake from here).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import httpx
import trio

from .._errors import RemoteError
from .._identity import Identity
from .._wake import WakeRequest
from ..dht import NodeEntry, Query
from ..https import pinned_client
from ._nodes import NodeFinder
from ._select import Candidate

__all__ = ["KeepAwake", "send_wake", "wake_nodes"]

_log = logging.getLogger("p2pbuild.dispatcher.waking")

Audit = Callable[..., None]


async def send_wake(
    identity: Identity, entry_key: Any, endpoint: str, tls_sha256: bytes, url: str,
    now: float, *, timeout: float = 10.0,
) -> bool:
    """POST a fresh signed wake request to ``url``; True when the answer says the node is
    awake (``202`` and ``{"standby": false}``).

    The node's own ``/v1/wake`` (under its ``endpoint``) is reached pinned to its
    certificate; an operator's wake service by ordinary TLS verification. Raises
    ``httpx.HTTPError`` or :class:`RemoteError` (pin mismatch) when it cannot be reached.
    """
    wake = WakeRequest.create(identity, entry_key, issued_at=int(now))
    own = bool(endpoint) and url.startswith(endpoint.rstrip("/") + "/")
    client = (
        pinned_client(tls_sha256, timeout=timeout) if own
        else httpx.AsyncClient(timeout=timeout, trust_env=False)
    )
    async with client:
        response = await client.post(
            url, content=wake.to_bytes(), headers={"content-type": "application/msgpack"}
        )
    if response.status_code != 202:
        _log.info("wake %s answered %d: %s", url, response.status_code, response.text[:200])
        return False
    try:
        return response.json().get("standby") is False
    except ValueError:
        return False


async def _wake_one(
    identity: Identity, finder: NodeFinder, candidate: Candidate, clock: Callable[[], float],
    poll_s: float, audit: Audit, late: list[Candidate],
) -> None:
    cap = candidate.capability
    start = clock()
    audit(start, "node-wake", str(candidate.key), url=cap.wake_url, wake_s=cap.wake_s)
    with trio.move_on_after(cap.wake_s):
        try:
            if await send_wake(identity, candidate.key, cap.endpoint, cap.tls_sha256,
                               cap.wake_url, start, timeout=cap.wake_s):
                audit(clock(), "node-awake", str(candidate.key),
                      after_s=round(clock() - start, 3))
                return
        except (httpx.HTTPError, RemoteError) as exc:
            # An operator's wake service may be slow, or the machine already booting:
            # keep watching the directory until the wake time is over.
            _log.info("wake request to %s: %s", cap.wake_url, exc)
        while True:
            entry = await finder.lookup(candidate.key)
            if entry is not None and entry.status is not None and not entry.status.standby:
                audit(clock(), "node-awake", str(candidate.key),
                      after_s=round(clock() - start, 3))
                return
            await trio.sleep(poll_s)
    audit(clock(), "wake-timeout", str(candidate.key), wake_s=cap.wake_s,
          reason=f"not awake within its wake time ({cap.wake_s} s)")
    late.append(candidate)


async def wake_nodes(
    identity: Identity, finder: NodeFinder, nodes: Sequence[Candidate],
    clock: Callable[[], float], audit: Audit, *, poll_s: float = 1.0,
) -> list[Candidate]:
    """Wake ``nodes`` (each has a ``wake_url``) at once; returns those not awake within
    their ``wake_s``. ``audit(at, event, node, **detail)`` records ``node-wake``,
    ``node-awake`` and ``wake-timeout``."""
    late: list[Candidate] = []
    async with trio.open_nursery() as nursery:
        for candidate in nodes:
            nursery.start_soon(_wake_one, identity, finder, candidate, clock, poll_s, audit,
                               late)
    return late


@attrs.define(eq=False)
class KeepAwake:
    """Keeps ``pools[name]`` on-demand nodes of each pool awake (module doc)."""

    identity: Identity
    finder: NodeFinder
    pools: Mapping[str, int]
    clock: Callable[[], float]
    interval_s: float = 60.0
    sent: int = 0

    def pick(self, entries: Sequence[NodeEntry], count: int) -> list[NodeEntry]:
        """The on-demand nodes to keep awake: awake ones first (no churn), then by key."""
        on_demand = [e for e in entries if e.capability.on_demand and e.capability.wake_url]
        on_demand.sort(key=lambda e: (e.status is None or e.status.standby, e.publisher.raw))
        return on_demand[:count]

    async def tick(self) -> None:
        """One round: a wake request to each node to keep awake (failures are logged)."""
        for pool, count in sorted(self.pools.items()):
            for entry in self.pick(await self.finder.find(Query(pool=pool)), count):
                cap = entry.capability
                try:
                    await send_wake(self.identity, entry.publisher, cap.endpoint,
                                    cap.tls_sha256, cap.wake_url, self.clock())
                    self.sent += 1
                except (httpx.HTTPError, RemoteError) as exc:
                    _log.info("keep-awake %s: %s", entry.publisher.fingerprint, exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run :meth:`tick` every ``interval_s`` until cancelled."""
        task_status.started()
        while True:
            await self.tick()
            await trio.sleep(self.interval_s)
