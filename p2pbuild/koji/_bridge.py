"""The bridge between the Koji side of the build host (blocking, in worker threads) and
trio (the build service and the task store live in the trio thread).

:class:`Bridge` runs a task's P2P build through the build service (``_service``) and
follows it (also one the dispatcher resumed after a restart, or adopted when a crash came
between the service accepting it and the task's row naming it), cancels P2P builds, and
lends the store to the worker threads (``trio.from_thread``). :func:`run_task_blocking`
is what ``kojid``'s forked child does for one task: ``TaskManager.runTask`` with the
task's own hub subsession.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import koji
import trio

from .._jobs import BuildrootSpec
from ..dispatcher import (
    BadRequestError,
    BuildState,
    BuildStatus,
    StoredBuild,
    buildroot_from_json,
)
from ._config import KojiConfig
from ._resume import HUB_ERRORS
from ._service import BuildService
from ._store import TaskPhase, TaskRow, TaskStore

if TYPE_CHECKING:
    from ._host import P2PTaskManager
    from ._task import P2PBuildTask

__all__ = ["Bridge", "P2POutcome", "TaskDetached", "run_task_blocking"]

_log = logging.getLogger("p2pbuild.koji")

T = TypeVar("T")


#: The comps group of a Koji build tag that a buildroot starts from (Koji's own name).
KOJI_BUILD_GROUP = "build"


async def pin_tag_repo(tag: str, url: str) -> BuildrootSpec:
    """The buildroot of a build tag's repository at ``url``, pinned to its current
    ``repomd.xml``. Raises ``koji.BuildError`` when the repository cannot be fetched."""
    name = re.sub(r"[^a-z0-9._+-]", "-", tag.lower()).lstrip("._+-")[:64] or "build-tag"
    try:
        return await buildroot_from_json(
            {"repos": [{"name": name, "url": url}], "group": KOJI_BUILD_GROUP}
        )
    except BadRequestError as exc:
        raise koji.BuildError(f"cannot pin the build tag's repository {url}: {exc}") from None


class TaskDetached(BaseException):
    """The task went to another host while this host's attempt ran: the attempt stops
    without a word to the hub (a BaseException, so neither the handler nor
    ``TaskManager.runTask`` reports it). The row is settled once the attempt has ended."""


@attrs.frozen
class P2POutcome:
    """How the build service ended a Koji task's build."""

    build: BuildStatus
    #: The verified build as stored (its files and every verifying node's logs).
    stored: StoredBuild | None = None

    @property
    def no_node(self) -> bool:
        """The build never got a node: the task should go back to Koji (soft refusal)."""
        return self.build.no_node


@attrs.define(eq=False)
class Bridge:
    """What the blocking Koji side needs from trio: the task store, run a P2P build,
    cancel it. Its blocking methods are called from the host's worker threads."""

    service: BuildService
    config: KojiConfig
    workdir: Path
    nursery: trio.Nursery
    store: TaskStore
    builds: dict[int, str] = attrs.field(factory=dict)
    running: set[int] = attrs.field(factory=set)
    done: set[int] = attrs.field(factory=set)
    #: Tasks whose attempt must stop quietly (TaskDetached), and the scope of each
    #: attempt's wait for its P2P build.
    detached: set[int] = attrs.field(factory=set)
    waits: dict[int, trio.CancelScope] = attrs.field(factory=dict)
    taken: int = 0
    resumed: int = 0
    released: int = 0
    #: Tasks freed (``koji free-task``) and handed back here while their attempt ran.
    handed_back: int = 0

    # -- trio side ------------------------------------------------------------------------------

    async def p2p_build(self, task_id: int, srpm: Path, adopt: bool,
                        repo: tuple[str, str] | None = None) -> P2POutcome:
        """Follow the task's P2P build (the row's, or with ``adopt`` one the service
        accepted for it before a crash took the link), else submit the SRPM; wait for the
        build to end (any way).

        ``repo`` is the build tag's current repository (tag name, URL of its arch
        directory): a new build runs in a buildroot made from it, starting from the tag's
        ``build`` group, pinned here to the repository's ``repomd.xml`` as it is now."""
        row = self.store.get(task_id)
        assert row is not None and row.phase is TaskPhase.RESERVED, row
        build_id = row.p2p_build_id
        if build_id is not None and self.service.status(build_id) is None:
            _log.warning("koji task %d: p2p build %s is unknown to the dispatcher", task_id,
                         build_id)
            build_id = None
        if build_id is None and adopt:
            build_id = self._orphan(row)
            if build_id is not None:
                self.store.linked(task_id, build_id, time.time(), how="adopted")
        if build_id is None:
            data = await trio.Path(srpm).read_bytes()
            if hashlib.sha256(data).hexdigest() != row.source_sha256:
                raise koji.BuildError(f"{srpm.name} changed since the task began")
            buildroot = None
            if repo is not None:
                buildroot = await pin_tag_repo(*repo)
            build_id = await self.service.accept(
                srpm, row.source_sha256, row.user, arch=self.config.arch, os=self.config.os,
                replicas=self.config.replicas, time_limit_s=self.config.time_limit_s,
                buildroot=buildroot,
            )
            # No checkpoint between the two commits; a crash between them leaves a build
            # no row names, which the next attempt adopts (_orphan).
            self.store.linked(task_id, build_id, time.time())
        self.builds[task_id] = build_id
        _log.info("koji task %d: p2p build %s", task_id, build_id)
        scope = self.waits[task_id] = trio.CancelScope()
        try:
            with scope:
                build = await self.service.wait(build_id)
        finally:
            self.waits.pop(task_id, None)
        if scope.cancelled_caught:
            raise TaskDetached(f"koji task {task_id} went to another host")
        stored = None
        if build.state is BuildState.VERIFIED:
            stored = await self.service.stored(build_id)
        return P2POutcome(build, stored)

    def _orphan(self, row: TaskRow) -> str | None:
        """A live P2P build the service accepted for ``row`` that no row names: same user
        and source, accepted after the row began."""
        linked = self.store.linked_p2p_builds()
        for build in self.service.builds_since(row.user, row.created_at):
            if (build.source_sha256 == row.source_sha256 and build.id not in linked
                    and build.live and not build.cancel_requested):
                _log.info("koji task %d: adopting p2p build %s", row.task_id, build.id)
                return build.id
        return None

    def p2p_live(self, build_id: str | None) -> bool:
        """The P2P build is known and usable by a later attempt (queued, running or
        verified)."""
        status = None if build_id is None else self.service.status(build_id)
        return status is not None and status.live

    def cancel_p2p(self, build_id: str | None) -> None:
        """Cancel a P2P build unless it has ended (the service tells the nodes)."""
        if build_id is not None:
            self.service.cancel(build_id, "koji")

    def cancel_nowait(self, task_id: int) -> None:
        self.cancel_p2p(self.builds.get(task_id))

    def detach_nowait(self, task_id: int) -> None:
        """Stop the task's running attempt quietly (:class:`TaskDetached`); its P2P build
        and its row are left for the next round to settle."""
        self.detached.add(task_id)
        scope = self.waits.get(task_id)
        if scope is not None:
            scope.cancel()

    # -- called from worker threads -------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in the trio thread (the store and the service live there)."""
        return trio.from_thread.run_sync(functools.partial(fn, *args, **kwargs))

    def run_p2p_build(self, task_id: int, srpm: Path, adopt: bool,
                      repo: tuple[str, str] | None = None) -> P2POutcome:
        # In the calling task (not a system task): when the host stops, the wait is
        # cancelled and the worker thread ends with trio.Cancelled.
        return trio.from_thread.run(self.p2p_build, task_id, srpm, adopt, repo)

    def cancel(self, task_id: int) -> None:
        self.call(self.cancel_nowait, task_id)

    def start_task(self, manager: P2PTaskManager, handler: P2PBuildTask) -> None:
        self.running.add(handler.id)
        self.done.discard(handler.id)  # what an earlier, detached attempt left
        self.taken += 1
        self.call(self.nursery.start_soon, self._run_task, manager, handler)

    async def _run_task(self, manager: P2PTaskManager, handler: P2PBuildTask) -> None:
        try:
            await trio.to_thread.run_sync(run_task_blocking, manager, handler)
        finally:
            self.running.discard(handler.id)
            self.detached.discard(handler.id)
            self.done.add(handler.id)
            self.builds.pop(handler.id, None)


def run_task_blocking(manager: P2PTaskManager, handler: P2PBuildTask) -> None:
    # What kojid's forked child does: the same manager, talking through the task's own
    # subsession (the main session belongs to the manager's thread).
    child = copy.copy(manager)
    child.session = handler.session
    bridge = manager.bridge
    try:
        child.runTask(handler)
    except TaskDetached as exc:
        # The task is another host's now: no report; the next round refunds the
        # reservation and cancels the P2P build.
        _log.info("%s: this host's attempt stopped", exc)
    except koji.ActionNotAllowed as exc:
        # closeTask/failTask refused: cancelled in Koji or given to another host. The
        # next round settles the row (the task is no longer open here).
        _log.info("koji task %d is no longer ours: %s", handler.id, exc)
    except HUB_ERRORS as exc:
        # The next round takes the task up again while it is open here.
        _log.error("koji task %d: could not report the outcome: %s", handler.id, exc)
    except BaseException:
        # Stopping (trio.Cancelled): the task stays open on the hub and its row as it is,
        # for the next start; no more hub calls. The host's logout closes this subsession
        # with the main session (the hub's Session.logout closes its children), so the
        # client must not log it out again when it is collected (ClientSession.__del__):
        # the hub would refuse that second logout ("Invalid session").
        handler.session._forget()
        raise
    else:
        # The hub has the outcome. A row still holding a reservation (a refund whose
        # answer was lost, a CGInitBuild that failed on the way) waits for the next round.
        row = bridge.call(bridge.store.get, handler.id)
        if row is not None and row.phase in (TaskPhase.IMPORTED, TaskPhase.REFUNDED):
            bridge.call(bridge.store.done, handler.id, time.time(), "reported")
    try:
        handler.session.logout()
    except HUB_ERRORS as exc:
        _log.debug("subsession logout: %s", exc)
