"""The bridge between the Koji side of the build host (blocking, in worker threads) and
trio (the engine and the task store live in the trio thread).

:class:`Bridge` runs a task's P2P build through the engine and follows it (also one the
engine resumed after a restart, or adopted when a crash came between the engine accepting
it and the task's row naming it), cancels P2P builds, and lends the store to the worker
threads (``trio.from_thread``). :func:`run_task_blocking` is what ``kojid``'s forked child
does for one task: ``TaskManager.runTask`` with the task's own hub subsession.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import httpx
import koji
import trio

from .._errors import RemoteError
from .._jobs import Result
from ..dispatcher._config import KojiConfig
from ..dispatcher._db import BuildRow, BuildState
from ..dispatcher._engine import BuildRequest, Engine
from ..dispatcher._errors import DispatcherError, UnknownBuildError
from ..https import pinned_client
from ._cg import node_subdir
from ._resume import HUB_ERRORS
from ._store import TaskPhase, TaskRow, TaskStore

if TYPE_CHECKING:
    from ._host import P2PTaskManager
    from ._task import P2PBuildTask

__all__ = ["LIVE", "Bridge", "P2POutcome", "run_task_blocking"]

_log = logging.getLogger("p2pbuild.koji")

T = TypeVar("T")

#: P2P build states a later attempt of the same task can still use.
LIVE = (BuildState.QUEUED, BuildState.RUNNING, BuildState.VERIFIED)


@attrs.frozen
class P2POutcome:
    """How the engine ended a Koji task's build."""

    build: BuildRow
    #: The build never got a node: the task should go back to Koji (soft refusal).
    no_node: bool
    #: Each verifying node's logs and signed result, downloaded for the import.
    node_files: dict[str, list[Path]] = attrs.field(factory=dict)


@attrs.define(eq=False)
class Bridge:
    """What the blocking Koji side needs from trio: the task store, run a P2P build,
    cancel it. Its blocking methods are called from the host's worker threads."""

    engine: Engine
    config: KojiConfig
    workdir: Path
    nursery: trio.Nursery
    store: TaskStore
    builds: dict[int, str] = attrs.field(factory=dict)
    running: set[int] = attrs.field(factory=set)
    done: set[int] = attrs.field(factory=set)
    taken: int = 0
    resumed: int = 0
    released: int = 0

    # -- trio side ------------------------------------------------------------------------------

    async def p2p_build(self, task_id: int, srpm: Path, adopt: bool) -> P2POutcome:
        """Follow the task's P2P build (the row's, or with ``adopt`` one the engine accepted
        for it before a crash took the link), else submit the SRPM; wait for the build to
        end (any way)."""
        row = self.store.get(task_id)
        assert row is not None and row.phase is TaskPhase.RESERVED, row
        build_id = row.p2p_build_id
        if build_id is not None and self.p2p_state(build_id) is None:
            _log.warning("koji task %d: p2p build %s is unknown to the engine", task_id,
                         build_id)
            build_id = None
        if build_id is None and adopt:
            build_id = self._orphan(row)
            if build_id is not None:
                self.store.linked(task_id, build_id, time.time(), how="adopted")
        if build_id is None:
            data = await trio.Path(srpm).read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            if sha != row.source_sha256:
                raise koji.BuildError(f"{srpm.name} changed since the task began")
            store = self.engine.sources
            await trio.Path(store.root).mkdir(parents=True, exist_ok=True)
            if not store.has(sha):
                partial = store.path(sha).with_suffix(".part")
                await trio.Path(partial).write_bytes(data)
                await trio.Path(partial).rename(store.path(sha))
            request = BuildRequest(
                source_name=srpm.name, source_sha256=sha, source_size=len(data),
                arch=self.config.arch, os=self.config.os, replicas=self.config.replicas,
                time_limit_s=self.config.time_limit_s,
            )
            build_id = self.engine.accept(request, row.user, None).id
            # No checkpoint between the two commits; a crash between them leaves a build
            # no row names, which the next attempt adopts (_orphan).
            self.store.linked(task_id, build_id, time.time())
        self.builds[task_id] = build_id
        _log.info("koji task %d: p2p build %s", task_id, build_id)
        while True:
            build = self.engine.db.build(build_id)
            if build.state.terminal:
                break
            await self.engine.wait_changed()
        attempts = self.engine.db.attempts(build.id)
        files: dict[str, list[Path]] = {}
        if build.state is BuildState.VERIFIED:
            files = await self._node_files(build)
        return P2POutcome(build, no_node=build.state is BuildState.FAILED and not attempts,
                          node_files=files)

    def _orphan(self, row: TaskRow) -> str | None:
        """A live P2P build the engine accepted for ``row`` that no row names: same user
        and source, accepted after the row began (the engine's rows are newest first)."""
        linked = self.store.linked_p2p_builds()
        for build in self.engine.db.builds(user=row.user, limit=1000):
            if build.created_at < row.created_at:
                break
            if (build.source_sha256 == row.source_sha256 and build.id not in linked
                    and build.state in LIVE and not build.cancel_requested):
                _log.info("koji task %d: adopting p2p build %s", row.task_id, build.id)
                return build.id
        return None

    async def _node_files(self, build: BuildRow) -> dict[str, list[Path]]:
        """Each verifying node's signed result and its logs (fetched from push nodes; a
        pull-only node's logs stay on the node)."""
        manifest = json.loads(
            await trio.Path(Path(build.sink_path) / "manifest.json").read_text()
        )
        by_job = {a.job_id: a for a in self.engine.db.attempts(build.id)}
        out: dict[str, list[Path]] = {}
        for entry in manifest["verified_by"]:
            subdir = node_subdir(entry["fingerprint"])
            target = self.workdir / "nodes" / build.id / subdir
            await trio.Path(target).mkdir(parents=True, exist_ok=True)
            result_file = target / "p2pbuild-result.msgpack"
            raw = await trio.Path(Path(build.sink_path) / entry["result"]).read_bytes()
            await trio.Path(result_file).write_bytes(raw)
            job_file = target / "p2pbuild-job.msgpack"
            await trio.Path(job_file).write_bytes(
                await trio.Path(Path(build.sink_path) / entry["job"]).read_bytes()
            )
            paths = [job_file, result_file]
            attempt = by_job.get(entry["job_id"])
            if attempt is not None and attempt.endpoint:
                paths += await self._fetch_logs(attempt.endpoint, attempt.tls_sha256,
                                                attempt.job_id, raw, target)
            out[subdir] = paths
        return out

    async def _fetch_logs(self, endpoint: str, pin: bytes, job_id: str, raw_result: bytes,
                          target: Path) -> list[Path]:
        result = Result.from_bytes(raw_result)
        paths = []
        try:
            async with pinned_client(pin, base_url=endpoint) as client:
                for item in result.logs:
                    response = await client.get(f"/v1/jobs/{job_id}/logs/{item.name}")
                    data = response.content
                    if (response.status_code != 200 or len(data) != item.size
                            or hashlib.sha256(data).digest() != item.sha256):
                        _log.warning("log %s of job %s: not as signed; left out",
                                     item.name, job_id)
                        continue
                    path = target / item.name.replace("/", "_")
                    await trio.Path(path).write_bytes(data)
                    paths.append(path)
        except (httpx.HTTPError, RemoteError) as exc:
            _log.warning("logs of job %s: %s; left out", job_id, exc)
        return paths

    def p2p_state(self, build_id: str) -> BuildState | None:
        """The P2P build's state; None if the engine does not know it."""
        try:
            return self.engine.db.build(build_id).state
        except UnknownBuildError:
            return None

    def cancel_p2p(self, build_id: str | None) -> None:
        """Cancel a P2P build unless it has ended (the engine tells the nodes)."""
        if build_id is None or self.p2p_state(build_id) in (None, *(
                s for s in BuildState if s.terminal)):
            return
        try:
            self.engine.cancel(build_id, "koji")
        except DispatcherError as exc:
            _log.warning("cancel of p2p build %s: %s", build_id, exc)

    def cancel_nowait(self, task_id: int) -> None:
        self.cancel_p2p(self.builds.get(task_id))

    # -- called from worker threads -------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in the trio thread (the store and the engine live there)."""
        return trio.from_thread.run_sync(functools.partial(fn, *args, **kwargs))

    def run_p2p_build(self, task_id: int, srpm: Path, adopt: bool) -> P2POutcome:
        # In the calling task (not a system task): when the host stops, the wait is
        # cancelled and the worker thread ends with trio.Cancelled.
        return trio.from_thread.run(self.p2p_build, task_id, srpm, adopt)

    def cancel(self, task_id: int) -> None:
        self.call(self.cancel_nowait, task_id)

    def start_task(self, manager: P2PTaskManager, handler: P2PBuildTask) -> None:
        self.running.add(handler.id)
        self.taken += 1
        self.call(self.nursery.start_soon, self._run_task, manager, handler)

    async def _run_task(self, manager: P2PTaskManager, handler: P2PBuildTask) -> None:
        try:
            await trio.to_thread.run_sync(run_task_blocking, manager, handler)
        finally:
            self.running.discard(handler.id)
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
    except koji.ActionNotAllowed as exc:
        # closeTask/failTask refused: cancelled in Koji or given to another host. The
        # next round settles the row (the task is no longer open here).
        _log.info("koji task %d is no longer ours: %s", handler.id, exc)
    except HUB_ERRORS as exc:
        # The next round takes the task up again while it is open here.
        _log.error("koji task %d: could not report the outcome: %s", handler.id, exc)
    except BaseException:
        # Stopping (trio.Cancelled): the task stays open on the hub and its row as it is,
        # for the next start; no more hub calls.
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
