"""On-demand nodes: a node that sleeps when idle and is woken by a dispatcher.

Configured with ``[on_demand]`` (``idle_s``, ``wake_s``, ``wake_url``, ``hook``), a node:

* publishes a ``standby`` status once it has run no build for ``idle_s`` seconds, and runs
  its owner's hook with the argument ``standby`` (the hook may stop the VM, suspend
  services, or do nothing);
* leaves standby when a dispatcher's signed wake request arrives (``POST /v1/wake`` on the
  node's API, or the operator's own service at ``wake_url`` while the machine is stopped,
  which then starts it), or when a job arrives anyway (a pull node's long-poll is its
  wake-up: the dispatcher offers it a job and the poll answers at once); it runs the hook
  with ``wake`` and publishes its status at once;
* declares in its capability how long waking takes at most (``wake_s``) and where to send
  the wake request (``wake_url``; for a push node by default its own ``/v1/wake``).

A wake request that arrives while the node is awake restarts its idle time: a dispatcher
keeps a pool's pre-allocated nodes awake that way (``[on_demand] keep_awake``).

The decisions (:meth:`OnDemand.observe`) take ``now`` and do no I/O; :meth:`OnDemand.run`
is the thin loop around them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from .._errors import RemoteError
from .._identity import PublicKey
from .._replay import ReplayCache
from .._trust import TrustList
from .._wake import WakeRequest

__all__ = ["OnDemand", "OnDemandConfig"]

_log = logging.getLogger("p2pbuild.node.ondemand")


@attrs.frozen
class OnDemandConfig:
    """``idle_s``: idle this long, the node goes to standby; ``wake_s``: the longest a wake
    takes (published); ``wake_url``: where dispatchers send wake requests (``""``: the
    node's own ``/v1/wake``, or a pull node's long-poll); ``hook``: a command run with
    ``standby`` or ``wake`` appended (empty: none); ``hook_timeout_s`` bounds it."""

    idle_s: float = 600.0
    wake_s: int = 120
    wake_url: str = ""
    hook: tuple[str, ...] = ()
    hook_timeout_s: float = 60.0


@attrs.define(eq=False)
class OnDemand:
    """One node's standby state. ``on_change`` republishes the node's status."""

    config: OnDemandConfig
    key: PublicKey
    trust_list: TrustList
    clock: Callable[[], float] = time.time
    on_change: Callable[[], Awaitable[None]] | None = None
    replay: ReplayCache = attrs.field(factory=lambda: ReplayCache(max_entries=10_000))
    standby: bool = False
    wakes: int = 0
    refused: int = 0
    _last_busy: float = attrs.field(default=None)
    _accepted: int = attrs.field(default=0, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        if self._last_busy is None:
            self._last_busy = self.clock()

    # -- decisions (pure) ----------------------------------------------------------------------

    def observe(self, running: int, now: float, accepted: int | None = None) -> str | None:
        """``"standby"`` when the node should go to standby now, ``"wake"`` when a build
        runs, or was accepted since the last call (``accepted``: the count of jobs ever
        accepted, so a job shorter than the watch interval is seen too), while in standby
        (a job arrived without a wake request), else None."""
        if accepted is not None and accepted != self._accepted:
            self._accepted = accepted
            running = max(running, 1)
        if running > 0:
            self._last_busy = now
            return "wake" if self.standby else None
        if not self.standby and now - self._last_busy >= self.config.idle_s:
            return "standby"
        return None

    def accept(self, data: bytes, now: float) -> WakeRequest:
        """Parse and check a wake request for this node (single use).

        Raises :class:`RemoteError` subclasses: malformed, bad signature, not a trusted
        dispatcher, for another node, stale or replayed (counted in ``refused``).
        """
        try:
            wake = WakeRequest.from_bytes(data)
            wake.check(now, self.key, self.trust_list, self.replay)
        except RemoteError:
            self.refused += 1
            raise
        return wake

    # -- effects -------------------------------------------------------------------------------

    async def wake(self, why: str) -> None:
        """Leave standby (hook ``wake``, republish), or, awake, restart the idle time."""
        self._last_busy = self.clock()
        if not self.standby:
            return
        self.standby = False
        self.wakes += 1
        _log.info("waking up (%s)", why)
        await self._hook("wake")
        await self._announce()

    async def sleep(self) -> None:
        """Enter standby: hook ``standby``, republish."""
        if self.standby:
            return
        self.standby = True
        _log.info("idle for %gs: standby", self.config.idle_s)
        await self._announce()
        await self._hook("standby")

    async def _announce(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        if self.on_change is not None:
            await self.on_change()

    async def _hook(self, argument: str) -> None:
        if not self.config.hook:
            return
        command: Sequence[str] = [*self.config.hook, argument]
        try:
            with trio.move_on_after(self.config.hook_timeout_s):
                result = await trio.run_process(command, check=False, capture_stdout=True,
                                                capture_stderr=True)
                if result.returncode != 0:
                    _log.warning("hook %s %s exited %d: %s", command[0], argument,
                                 result.returncode, result.stderr[-300:].decode(errors="replace"))
        except OSError as exc:
            _log.warning("hook %s cannot run: %s", command[0], exc)

    async def run(
        self, activity: Callable[[], tuple[int, int]], *, interval: float = 0.2,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Watch ``activity()`` (builds running, jobs ever accepted) every ``interval``
        seconds and go to standby or wake up as :meth:`observe` says, until cancelled."""
        task_status.started()
        self._accepted = activity()[1]
        while True:
            running, accepted = activity()
            action = self.observe(running, self.clock(), accepted)
            if action == "standby":
                await self.sleep()
            elif action == "wake":
                await self.wake("a job arrived")
            await trio.sleep(interval)
