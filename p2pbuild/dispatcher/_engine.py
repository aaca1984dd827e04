"""The build engine: from an accepted build to a verified, stored one (or a reasoned failure).

One trio task per build in flight (:meth:`Engine._drive`) and one per attempt (a signed job
on one node, :meth:`Engine._attempt_task`), all in the engine's nursery. Every step is
persisted before the next is taken, so a dispatcher killed at any point resumes from the
database (:meth:`Engine.run` restarts a task for every build not yet finished):

* an attempt ``pending`` (job signed, maybe sent) is sent again; a node that already has it
  answers ``replayed`` and we follow it as running;
* an attempt ``running`` is re-attached by job id: the engine follows the job on the node
  and fetches the signed result it kept, instead of running the build again;
* a pull-mode attempt is ``pending`` while its job waits in the pull queue and ``running``
  once its node took it (and holds a lease on it, ``_pull.py``): a restart offers a
  ``pending`` one again, and puts a ``running`` one back as taken by its node with a fresh
  lease (``PullNodeClient.resume``);
* a build whose replicas agreed but which was not yet marked verified is stored again
  (the sink is idempotent) and marked.

The decisions are the planner's (``_plan.plan``: pure, from the persisted attempts and
``now``): verified -> store and finish; replicas disagree -> one tie-break on a new
operator; too few operators -> choose more nodes (``_select.select_nodes``); consistent
failure on two operators, too many attempts, or no node satisfying the constraints -> fail
with the reason. The build task only carries the planner's action out and asks again when
an attempt changes. Nodes that time out, vanish from the DHT, are unreachable for too long,
let a pull job's lease expire (``lease-expired``), refuse the job or return a bad result
are *lost*: rated down, excluded from this build for a backoff that doubles with each loss,
and replaced. Push and pull nodes look the same here (``_nodes.NodeClient``): a lost pull
job is withdrawn from the queue, so a late result is refused; a delivered one is released
from it (uploads deleted) once its result is stored, synced.

Module size: the engine is the one place these steps meet; splitting the build loop from
the attempt loop would scatter the persistence protocol they share.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from .._errors import RemoteError
from .._identity import Identity, PublicKey, Role
from .._jobs import (
    BuildType,
    Job,
    JobSpec,
    Result,
    ResultState,
)
from .._records import MachineType
from .._trust import TrustList
from ..dht import NodeEntry, Query
from ._db import (
    AttemptRow,
    AttemptState,
    BuildRow,
    BuildState,
    Database,
)
from ._engine_config import EngineConfig, EngineStatistics
from ._errors import (
    BadNodeResultError,
    BadRequestError,
    NoCapableNodeError,
    NodeBusyError,
    NodeError,
    NodeTimeoutError,
    NodeUnreachableError,
    NodeVanishedError,
    SourceUnavailableError,
    UnknownBuildError,
)
from ._leases import LeaseBook, LeaseRefusedError, UnknownLeaseError
from ._logs import failure_tails, log_dir
from ._nodes import NodeClient, NodeConnector, NodeFinder, SharedDownloads, download_logs
from ._plan import (
    Action,
    Attempt,
    Choose,
    Complete,
    Fail,
    TieBreak,
    Wait,
    after_no_node,
    backoff,
    plan,
)
from ._ratings import RatingBook, Signal
from ._request import (
    BuildRequest,
    ParsedBuild,
    SourceStore,
)
from ._select import (
    Candidate,
    Platform,
    Requirements,
    asleep,
    select_nodes,
)
from ._sink import ProofItem, RepositorySink, Settler
from ._verify import (
    NeedTieBreak,
    Verified,
    difference_report,
    with_diffoscope,
)
from ._waking import wake_nodes

__all__ = [
    "BuildRequest",
    "Engine",
    "EngineConfig",
    "EngineStatistics",
    "NodeTimeoutError",
    "NodeVanishedError",
    "SourceStore",
]

_log = logging.getLogger("p2pbuild.dispatcher.engine")

Clock = Callable[[], float]


@attrs.define(eq=False)
class Engine:
    """The dispatcher's build engine. Start with ``await nursery.start(engine.run)``; then
    :meth:`accept` builds and :meth:`cancel` them.

    ``clock`` gives Unix seconds; ``rng`` drives selection. Peer failures never end
    :meth:`run`: they are counted (:meth:`statistics`) and the node replaced. It raises
    only for local failures (the database or the repository directory).
    """

    db: Database
    identity: Identity
    trust_list: TrustList
    finder: NodeFinder
    sink: RepositorySink
    config: EngineConfig
    connector: NodeConnector = attrs.field(factory=NodeConnector)
    clock: Clock = time.time
    rng: random.Random = attrs.field(factory=random.SystemRandom)
    ratings: RatingBook = attrs.field(default=None)
    #: Leases (loaded from the database when not given): builds under a lease run on its
    #: nodes only, and slots other users' leases hold are not offered (``_leases.py``).
    leases: LeaseBook = attrs.field(default=None)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _wake: dict[str, trio.Event] = attrs.field(factory=dict, init=False)
    _running: set[str] = attrs.field(factory=set, init=False)
    _attempt_tasks: int = attrs.field(default=0, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _errors: Counter[str] = attrs.field(factory=Counter, init=False)
    #: Node key -> until when: on-demand nodes that did not wake within their wake time.
    _wake_failed: dict[str, float] = attrs.field(factory=dict, init=False)
    #: build -> (reason, time) of its last "no-node-yet" audit entry.
    _no_node_audited: dict[str, tuple[str, float]] = attrs.field(factory=dict, init=False)
    #: Each build task's typed values, parsed once, by build id.
    _parsed: dict[str, ParsedBuild] = attrs.field(factory=dict, init=False)
    #: Puts stored builds' directory names on disk after their verified state.
    settler: Settler = attrs.field(default=None)
    #: One download per distinct artifact of a build, whichever replica signed it.
    _downloads: SharedDownloads = attrs.field(factory=SharedDownloads, init=False)

    def __attrs_post_init__(self) -> None:
        if self.settler is None:
            self.settler = Settler(self.sink)
        if self.ratings is None:
            self.ratings = RatingBook(self.db)
        if self.connector.identity is None:
            self.connector.identity = self.identity  # it signs job control orders
        if self.leases is None:
            from ._leasing import load_leases

            self.leases = LeaseBook()
            self.leases.load(load_leases(self.db))

    @property
    def sources(self) -> SourceStore:
        return SourceStore(self.config.state_dir / "sources", self.config.source_allow_hosts)

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resume every unfinished build, then run until cancelled.

        Cancelling leaves attempts on nodes running: a restart re-attaches to them.
        """
        for sub in ("sources", "work", "reports"):
            (self.config.state_dir / sub).mkdir(parents=True, exist_ok=True)
        await self._mend_sink()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.settler.run, self._errors, name="settle stored builds")
                try:
                    resumed = self.db.builds(
                        states=[BuildState.QUEUED, BuildState.RUNNING], limit=1_000_000
                    )
                    for build in reversed(resumed):
                        self.db.audit(self.clock(), "resumed", build.id, state=build.state.value)
                        self._spawn(build.id)
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    self._nursery = None
        finally:
            # Only once every build task has finished: a task still unwinding may yet use
            # a shared node client, and a closed client raises instead of cancelling.
            with trio.CancelScope(shield=True):
                await self.connector.aclose()

    def _spawn(self, build_id: str) -> None:
        assert self._nursery is not None
        if build_id not in self._running:
            self._running.add(build_id)
            self._nursery.start_soon(self._drive, build_id, name=f"build {build_id[:12]}")

    def _poke(self, build_id: str) -> None:
        if (event := self._wake.pop(build_id, None)) is not None:
            event.set()
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Return at the next change of any build (for API followers)."""
        await self._changed.wait()

    @property
    def next_change(self) -> trio.Event:
        """The event set at the next change of any build. Take it *before* looking at the
        database and wait on it after, so a change in between is not missed (as it is by
        calling :meth:`wait_changed` after looking)."""
        return self._changed

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            len(self._running), self._attempt_tasks, tuple(sorted(self._errors.items()))
        )

    # -- the API's calls -----------------------------------------------------------------------

    def accept(self, request: BuildRequest, user: str, team: str | None) -> BuildRow:
        """Validate, persist (committed before returning) and start a build.

        The source must already be in :attr:`sources` unless ``request.source_url`` is set.
        A build accepted before :meth:`run` starts is started by it. Raises
        :class:`BadRequestError`.
        """
        previous = self.db.platform(user)
        if request.lease is not None:
            lease = self.leases.check_use(request.lease, user, request.replicas, self.clock())
            # A granted lease names its nodes' one OS (``LeaseBook.request``).
            previous = (lease.request.arch, lease.request.os or "", None)
        arch = request.arch or (previous[0] if previous else self.config.default_arch)
        os_name = request.os or (previous[1] if previous and previous[0] == arch else None)
        os_name = os_name or self.config.default_os
        spec = request.job_spec(arch, os_name)
        ready = self.sources.has(request.source_sha256)
        if not ready and not request.source_url:
            raise BadRequestError("the source is neither uploaded nor given by URL")
        build = request.to_row(
            os.urandom(16).hex(), self.clock(), user, team, spec, ready=ready
        )
        self.db.insert_build(build)
        if self._nursery is not None:
            self._spawn(build.id)
        self._changed.set()
        self._changed = trio.Event()
        return build

    def cancel(self, build_id: str, by: str) -> BuildRow:
        """Request cancellation; the build's task tells the nodes. Raises
        :class:`UnknownBuildError`."""
        build = self.db.request_cancel(build_id, self.clock(), by)
        if not build.state.terminal:
            if build_id not in self._running and self._nursery is not None:
                self._spawn(build_id)
            self._poke(build_id)
        return build

    # -- one build -----------------------------------------------------------------------------

    async def _drive(self, build_id: str) -> None:
        try:
            async with trio.open_nursery() as nursery:
                tasks: dict[int, trio.CancelScope] = {}
                waiting_since: float | None = None
                while True:
                    wake = self._wake.setdefault(build_id, trio.Event())
                    build = self.db.build(build_id)
                    if build.state.terminal:
                        break
                    rows = self.db.attempts(build_id)
                    if build.cancel_requested:
                        await self._finish_attempts(build, rows, tasks, "build cancelled")
                        self.db.set_build_state(
                            build_id, BuildState.CANCELLED, self.clock(), reason="cancelled"
                        )
                        break
                    if not build.source_ready:
                        await self._fetch_source(build)
                        continue
                    await self._start_attempts(rows, tasks, nursery)
                    now = self.clock()
                    action = plan(build, self._planned(rows), now, self.config)
                    wait = await self._carry_out(
                        action, build, rows, waiting_since, nursery, tasks
                    )
                    if wait is None:
                        break
                    if wait.until is None:
                        waiting_since = None
                        await wake.wait()
                    else:  # no node yet
                        waiting_since = waiting_since or now
                        with trio.move_on_after(max(wait.until - self.clock(), 0.0)):
                            await wake.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._running.discard(build_id)
            self._no_node_audited.pop(build_id, None)
            self._wake.pop(build_id, None)
            self._parsed.pop(build_id, None)
            self._downloads.forget(build_id)
            self._changed.set()
            self._changed = trio.Event()
        # In a thread: removing the work files is several file system calls per artifact,
        # each able to block the event loop for milliseconds on a busy disk.
        await trio.to_thread.run_sync(self._cleanup, build_id)

    async def _carry_out(
        self,
        action: Action,
        build: BuildRow,
        rows: list[AttemptRow],
        waiting_since: float | None,
        nursery: trio.Nursery,
        tasks: dict[int, trio.CancelScope],
    ) -> Wait | None:
        """Carry out the planner's ``action``; returns how to wait before planning again,
        or None when the build is finished."""
        if isinstance(action, TieBreak):
            await self._record_disagreement(build, action.disagreement)
            if action.choose is None:
                return Wait(reason="a tie-break is running")
            action = action.choose
        if isinstance(action, Choose):
            outcome = await self._choose(build, rows, action, waiting_since, nursery, tasks)
            if outcome is None:  # chosen: their attempt tasks wake us
                return Wait()
            action = outcome
        if isinstance(action, Complete):
            await self._complete(build, rows, tasks, action.verdict)
            return None
        if isinstance(action, Fail):
            if action.disagreement is not None:
                await self._record_disagreement(build, action.disagreement)
            await self._fail(build, rows, tasks, action.reason)
            return None
        return action

    async def _start_attempts(
        self, rows: list[AttemptRow], tasks: dict[int, trio.CancelScope], nursery: trio.Nursery
    ) -> None:
        """Start a task for every active attempt that has none (new, or resumed)."""
        for row in rows:
            if row.active and row.id not in tasks:
                tasks[row.id] = await nursery.start(self._attempt_task, row.id)

    def _planned(self, rows: list[AttemptRow]) -> list[Attempt]:
        """The attempts with their signed results, each parsed once per build task (the
        attempt task hands over the result it parsed; a resumed build reads it once)."""
        attempts = []
        for row in rows:
            result = None
            if row.state in (AttemptState.SUCCEEDED, AttemptState.FAILED):
                known = self._parsed_of(row.build_id).results
                result = known.get(row.id)
                if result is None:
                    raw = self.db.result_bytes(row.id)
                    if raw is not None:
                        result = known[row.id] = Result.from_bytes(raw)
            attempts.append(Attempt(row, result))
        return attempts

    def _parsed_of(self, build_id: str) -> ParsedBuild:
        return self._parsed.setdefault(build_id, ParsedBuild())

    def _job(self, attempt: AttemptRow) -> Job:
        return self._parsed_of(attempt.build_id).job(attempt)

    def _spec(self, build: BuildRow) -> JobSpec:
        return self._parsed_of(build.id).job_spec(build, self.config.public_url)

    async def _fetch_source(self, build: BuildRow) -> None:
        try:
            size = await self.sources.fetch(
                build.source_url, build.source_sha256, self.config.max_source_bytes
            )
        except SourceUnavailableError as exc:
            self.db.set_build_state(
                build.id, BuildState.FAILED, self.clock(), reason=f"source: {exc}"
            )
            return
        self.db.set_source_ready(build.id, self.clock(), size)

    async def _record_disagreement(self, build: BuildRow, disagreement: NeedTieBreak) -> None:
        """Keep the difference report (with diffoscope's, when it is new) on the build."""
        report = difference_report(disagreement.groups)
        if build.report == report:
            return
        report = await with_diffoscope(
            report, disagreement.groups, lambda attempt: self._work_dir(build.id, attempt)
        )
        self.db.set_build_state(
            build.id, BuildState.RUNNING, self.clock(),
            reason="replicas disagree; tie-break on another operator", report=report,
            groups=[[r.result.node.fingerprint for r in g] for g in disagreement.groups],
        )
        # Followers see the report as soon as it is there, not only when the build ends.
        self._changed.set()
        self._changed = trio.Event()

    async def _choose(
        self,
        build: BuildRow,
        attempts: list[AttemptRow],
        choose: Choose,
        waiting_since: float | None,
        nursery: trio.Nursery,
        tasks: dict[int, trio.CancelScope],
    ) -> Fail | Wait | None:
        """Carry out ``choose``: find and select nodes and start their attempts (None), or
        say why none could be chosen (``after_no_node``)."""
        now = self.clock()
        lease_nodes = None
        if build.lease_id is not None:
            try:
                lease = self.leases.restriction(build.lease_id, build.user, now)
            except (LeaseRefusedError, UnknownLeaseError) as exc:
                return Fail(str(exc))
            lease_nodes = frozenset(n.key for n in lease.nodes)
        machine = MachineType(build.machine) if build.machine else None
        query = Query(arch=build.arch, os=build.os, machine=machine, pool=build.pool)

        async def find(fresh: bool) -> list[NodeEntry]:
            entries = await self.finder.find(query, fresh=fresh)
            if not entries and query != Query(arch=build.arch):
                # Nothing under the narrow facet: look at the arch's nodes, so the
                # selection's reason names the constraint that left none (os, machine,
                # pool), not the arch.
                entries = await self.finder.find(Query(arch=build.arch), fresh=fresh)
            self.ratings.status_heartbeats(
                entries, self.clock(), self.config.heartbeat_interval_s
            )
            return entries

        entries = await find(fresh=False)
        previous = self.db.platform(build.user)
        affinity = (
            Platform(previous[0], previous[1], MachineType(previous[2]) if previous[2] else None)
            if previous else None
        )
        requirements = Requirements(
            arch=build.arch,
            os=build.os,
            build_type=BuildType(build.build_type),
            buildroot=self._spec(build).buildroot is not None,
            count=choose.count,
            machine=machine,
            pool=build.pool,
            min_memory_mb=build.min_memory_mb,
            min_disk_mb=build.min_disk_mb,
            team=build.team,
            dedicated_pools=self.config.dedicated_pools,
            exclude_nodes=frozenset(PublicKey.from_text(k) for k in choose.exclude_nodes)
            | self._not_waking(now),
            exclude_operators=choose.exclude_operators,
            affinity=affinity,
            lease_nodes=lease_nodes,
            lease_id=build.lease_id or "",
            held_slots=self.leases.held_slots(now, except_lease=build.lease_id),
        )
        try:
            try:
                chosen = select_nodes(self.candidates(entries), requirements, self.rng,
                                      self.config.selection)
            except NoCapableNodeError:
                # The directory cache may predate a node that joined since (a replacement
                # for a lost node, say): before waiting, look again.
                entries = await find(fresh=True)
                chosen = select_nodes(self.candidates(entries), requirements, self.rng,
                                      self.config.selection)
        except NoCapableNodeError as exc:
            outcome = after_no_node(
                exc, choose, waiting_since, now, self.config,
                other_operators=self._other_operators(choose.exclude_operators),
            )
            if isinstance(outcome, Wait):
                # Audited when the reason changes (or once a minute), not at every retry.
                last = self._no_node_audited.get(build.id)
                if last is None or last[0] != str(exc) or now - last[1] >= 60.0:
                    self._no_node_audited[build.id] = (str(exc), now)
                    self.db.audit(now, "no-node-yet", build.id, constraint=exc.constraint,
                                  reason=str(exc))
            return outcome
        sleeping = [c for c in chosen if asleep(c) and c.capability.wake_url]
        if sleeping:
            # On-demand nodes in standby: wake them first (their wake time at most).
            late = await wake_nodes(
                self.identity, self.finder, sleeping, self.clock,
                lambda at, event, node, **detail: self.db.audit(at, event, build.id, node,
                                                                 **detail),
                poll_s=self.config.wake_poll_s,
            )
            if late:
                until = self.clock() + self.config.backoff_max_s
                for candidate in late:
                    self._wake_failed[str(candidate.key)] = until
                return Wait(self.clock(), "a node did not wake in time; choosing again")
        with self.db.batch():  # the chosen attempts in one commit
            for candidate in chosen:
                if candidate.capability.pull_only and not self.connector.pull_available:
                    continue
                self._create_attempt(
                    build, candidate, choose.role, len(entries), requirements
                )
        await self._start_attempts(self.db.attempts(build.id), tasks, nursery)
        return None

    def _other_operators(self, exclude: frozenset[str]) -> bool:
        """Whether the trust list names a node of an operator not in ``exclude``."""
        return any(e.role is Role.NODE and e.operator not in exclude
                   for e in self.trust_list.entries)

    def _not_waking(self, now: float) -> frozenset[PublicKey]:
        """Nodes that did not wake in time lately: not chosen again for a while."""
        for key in [k for k, until in self._wake_failed.items() if until <= now]:
            del self._wake_failed[key]
        return frozenset(PublicKey.from_text(k) for k in self._wake_failed)

    def leases_changed(self) -> None:
        """Slots were freed (a lease ended): builds waiting for a node look again now."""
        for build_id in list(self._wake):
            self._poke(build_id)

    def candidates(self, entries: list[NodeEntry]) -> list[Candidate]:
        """Selection's view of directory entries: trust entry, rating, our jobs on each."""
        active = self.db.active_attempts_by_node()
        keys = [str(e.publisher) for e in entries]
        ratings = self.ratings.ratings(self.clock(), keys)
        return [
            Candidate(
                e.publisher, e.capability, e.status,
                e.trust if e.trust is not None else self.trust_list.entry(e.publisher),
                ratings[str(e.publisher)].score, active.get(str(e.publisher), 0),
            )
            for e in entries
        ]

    def _create_attempt(
        self, build: BuildRow, candidate: Candidate, role: str, considered: int,
        requirements: Requirements,
    ) -> AttemptRow:
        now = self.clock()
        job = Job.create(
            self.identity, self._spec(build), issued_at=int(now),
            lifetime=build.time_limit_s + self.config.job_margin_s, node=candidate.key,
        )
        capability = candidate.capability
        row = self.db.insert_attempt(
            build_id=build.id,
            node=str(candidate.key),
            operator=candidate.operator,
            endpoint=capability.endpoint,
            tls_sha256=capability.tls_sha256,
            role=role,
            job_id=job.id_hex,
            job=job.to_bytes(),
            now=now,
            why={
                "rating": round(candidate.rating, 4),
                "load": round(candidate.load, 3),
                "candidates": considered,
                "machine": capability.machine.value,
                "mode": "pull" if capability.pull_only else "push",
                "excluded_operators": sorted(requirements.exclude_operators),
                "reason": "power of two choices among the best-rated, least-loaded "
                          "trusted nodes matching the constraints",
            },
        )
        parsed = self._parsed_of(build.id)
        parsed.jobs[row.id], parsed.machines[row.id] = job, capability.machine.value
        return row

    async def _complete(
        self,
        build: BuildRow,
        attempts: list[AttemptRow],
        tasks: dict[int, trio.CancelScope],
        verdict: Verified,
    ) -> None:
        now = self.clock()
        by_id = {a.id: a for a in attempts}
        proof = [
            ProofItem(
                self._job(by_id[r.attempt]), r.result, r.operator,
                self._work_dir(build.id, r.attempt), self._log_dir(build.id, r.attempt),
            )
            for r in verdict.proof
        ]
        path = await trio.to_thread.run_sync(
            lambda: self.sink.store(
                build.id, build.source_name, build.source_sha256, proof,
                trust_list=self.trust_list, now=now, user=build.user, arch=build.arch,
                os_name=build.os, build_type=build.build_type,
            )
        )
        # The machine the first proof node had when chosen; a resumed build asks the DHT.
        machine = self._parsed_of(build.id).machines.get(verdict.proof[0].attempt)
        if machine is None:
            entry = await self.finder.lookup(verdict.proof[0].node)
            machine = entry.capability.machine.value if entry is not None else build.machine
        await self._finish_attempts(build, attempts, tasks, "build verified")
        report = build.report
        if verdict.outliers and not report:
            groups = [list(verdict.agreeing)] + [[o] for o in verdict.outliers]
            report = difference_report(groups)
        operators = " and ".join(r.operator for r in verdict.proof)
        # The report file first: whoever sees the final state may read it at once.
        if report:
            await self._write_report(build.id, report)
        # The ratings, the user's platform and the verified state in one commit: a restart
        # before it redoes all of them (the sink is idempotent), after it none.
        with self.db.batch():
            self.ratings.record_verdict(verdict, attempts, now, build_id=build.id)
            self.db.set_platform(build.user, build.arch, build.os, machine, now)
            self.db.set_build_state(
                build.id, BuildState.VERIFIED, self.clock(),
                reason=f"verified by {operators}", sink_path=str(path), report=report,
                proof=[str(r.node) for r in verdict.proof],
                outliers=[str(r.node) for r in verdict.outliers],
            )
        self.settler.stored(build.id)

    async def _fail(
        self, build: BuildRow, attempts: list[AttemptRow],
        tasks: dict[int, trio.CancelScope], reason: str,
    ) -> None:
        await self._finish_attempts(build, attempts, tasks, "build failed")
        report = self.db.build(build.id).report
        tails = failure_tails(self.config.state_dir, build.id, self.db.attempts(build.id))
        if tails:
            # What the packager needs first: the failing step's last lines, per operator.
            report = tails + ("\n\n" + report if report else "")
        if report:
            await self._write_report(build.id, report)
        self.db.set_build_state(build.id, BuildState.FAILED, self.clock(), reason=reason,
                                report=report or None)

    async def _write_report(self, build_id: str, report: str) -> None:
        path = trio.Path(self.config.state_dir / "reports" / f"{build_id}.txt")
        await path.write_text(report)

    async def _finish_attempts(
        self, build: BuildRow, attempts: list[AttemptRow], tasks: dict[int, trio.CancelScope],
        why: str,
    ) -> None:
        """Stop our tasks for the build's active attempts and cancel the jobs on the nodes
        (best effort: a node that does not answer within the timeout is left alone)."""
        active = [a for a in attempts if a.active]
        for attempt in active:
            scope = tasks.get(attempt.id)
            if scope is not None:
                scope.cancel()
        async with trio.open_nursery() as nursery:
            for attempt in active:
                # A pending push job may have reached its node (sent before a restart, or
                # its answer still on the way): cancel it there too (unknown: 404, fine).
                started = attempt.state is AttemptState.RUNNING or bool(attempt.endpoint)
                nursery.start_soon(self._cancel_on_node, attempt, started)
        for attempt in active:
            self.db.set_attempt_state(attempt, AttemptState.CANCELLED, self.clock(), reason=why)

    async def _cancel_on_node(self, attempt: AttemptRow, started: bool) -> None:
        """Cancel the attempt's job on its node, or, for a job not known to have started,
        withdraw it (``NodeClient.withdraw``: what a pull queue still offers)."""
        try:
            client = self.connector.client(
                PublicKey.from_text(attempt.node), attempt.endpoint, attempt.tls_sha256
            )
        except NodeError:
            return
        try:
            with trio.move_on_after(self.config.node_timeout_s):
                job_id = bytes.fromhex(attempt.job_id)
                await (client.cancel(job_id) if started else client.withdraw(job_id))
        except NodeError as exc:
            self._errors[exc.code] += 1
        finally:
            await client.aclose()

    def _work_dir(self, build_id: str, attempt_id: int) -> Path:
        return self.config.state_dir / "work" / build_id / str(attempt_id)

    def _log_dir(self, build_id: str, attempt_id: int) -> Path:
        # Outside work/, which goes when the build ends: a failed build's logs are what
        # its packager needs (``builds logs``, the failure summary's log tail).
        return log_dir(self.config.state_dir, build_id, attempt_id)

    async def _mend_sink(self) -> None:
        """Rename again the stored builds a power cut took back (``_sink`` module doc)."""

        def verified_path(build_id: str) -> Path | None:
            with contextlib.suppress(UnknownBuildError):
                build = self.db.build(build_id)
                if build.state is BuildState.VERIFIED and build.sink_path:
                    return Path(build.sink_path)
            return None

        for build_id, path in await self.settler.mend(verified_path, self._errors):
            self.db.audit(self.clock(), "mended", build_id, path=str(path))

    def _cleanup(self, build_id: str) -> None:
        shutil.rmtree(self.config.state_dir / "work" / build_id, ignore_errors=True)

    # -- one attempt ---------------------------------------------------------------------------

    async def _attempt_task(
        self, attempt_id: int, *, task_status: trio.TaskStatus[trio.CancelScope]
    ) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            attempt = self.db.attempt(attempt_id)
            self._attempt_tasks += 1
            try:
                await self._run_attempt(attempt)
            except NodeError as exc:
                self._errors[exc.code] += 1
                self._lose(attempt, exc)
                # Out of a pull queue: the node hears "withdrawn" if it is still there,
                # and a late result is refused rather than stored.
                await self._cancel_on_node(attempt, False)
            finally:
                self._attempt_tasks -= 1
                self._poke(attempt.build_id)

    def _lose(self, attempt: AttemptRow, exc: NodeError) -> None:
        now = self.clock()
        current = self.db.attempt(attempt.id)
        if not current.active:
            return
        reason = f"{exc.code}: {exc}"
        self.db.set_attempt_state(attempt, AttemptState.LOST, now, reason=reason)
        self.ratings.record(attempt.node, Signal.SUCCESS, 0.0, now,
                            build_id=attempt.build_id, reason=reason)
        if isinstance(exc, NodeVanishedError):
            self.ratings.node_failed(attempt.node, attempt.operator, now, reason)

    async def _run_attempt(self, attempt: AttemptRow) -> None:
        job = self._job(attempt)
        node = PublicKey.from_text(attempt.node)
        client = self.connector.client(node, attempt.endpoint, attempt.tls_sha256)
        try:
            if attempt.state is AttemptState.PENDING:
                await self._submit(client, job, node)
                # A pull job is offered: it runs (and its lease starts) once the node takes it.
                await self._wait_done(client, job, node, client.wait_started)
                self.db.set_attempt_state(attempt, AttemptState.RUNNING, self.clock())
                self._poke(attempt.build_id)
            else:
                await client.resume(job)
            await self._wait_done(client, job, node)
            result = await client.result(job.job_id)
            if result is None:
                raise BadNodeResultError("the node says the job is done but has no result")
            try:
                result.check_answers(job, node)
            except RemoteError as exc:
                raise BadNodeResultError(f"{exc.code}: {exc}") from None
            final = AttemptState.FAILED
            failure: NodeError | None = None
            # The logs while the artifacts come, off the critical path.
            async with trio.open_nursery() as downloads:
                downloads.start_soon(self._download_logs, client, job, result,
                                     self._log_dir(attempt.build_id, attempt.id))
                if result.state is ResultState.SUCCEEDED:
                    work = self._work_dir(attempt.build_id, attempt.id)
                    try:
                        for item in result.artifacts:
                            await self._downloads.fetch(
                                attempt.build_id, client, job.job_id, item, work / item.name
                            )
                    except NodeError as exc:  # raised below, not as an exception group
                        failure = exc
                        downloads.cancel_scope.cancel()
                    final = AttemptState.SUCCEEDED
            if failure is not None:
                raise failure
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
        now = self.clock()
        # The result and its rating in one commit, not synced on its own: a restart before
        # the next synced commit fetches the result again from the node (_db module doc).
        # Not so a pull node's: it deletes its copy once uploaded, and the queue deletes
        # its own on release below, so this commit is the one copy left and is synced first.
        with self.db.batch(durable=not client.keeps_result):
            self.db.store_result(
                attempt, result.to_bytes(), result.state.value, final, now,
                reason="" if final is AttemptState.SUCCEEDED else f"build {result.state.value}"
                + (f": {why}" if (why := result.environment_map.get("reason")) else ""),
                duration_ms=result.duration_ms, artifacts=len(result.artifacts),
            )
            if final is AttemptState.SUCCEEDED:
                self.ratings.record(
                    attempt.node, Signal.SUCCESS, 1.0, now, build_id=attempt.build_id
                )
        self._parsed_of(attempt.build_id).results[attempt.id] = result
        # Stored and the artifacts copied into the work directory: the node side may forget
        # the job (a pull queue deletes its uploads; the node's late requests get 410).
        await client.release(job.job_id)

    async def _download_logs(self, client: NodeClient, job: Job, result: Result,
                             dest: Path) -> None:
        """The result's signed logs into ``dest`` (``_nodes.download_logs``); one that does
        not arrive as signed is counted and left out: it is not part of the proof."""
        for item, exc in await download_logs(client, job, result, dest):
            self._errors[f"log-{exc.code}"] += 1
            _log.warning("log %s of job %s left out: %s: %s", item.name, job.id_hex, exc.code, exc)

    async def _submit(self, client: NodeClient, job: Job, node: PublicKey) -> None:
        tries = 0
        while True:
            try:
                await client.submit(job)
                return
            except NodeError as exc:
                # Busy or unreachable: back off and try again, a few times. Anything else
                # (refused: bad signature, expired, wrong node) will not get better.
                if not isinstance(exc, NodeBusyError | NodeUnreachableError):
                    raise
                tries += 1
                if tries >= self.config.submit_tries:
                    raise
                self._errors[exc.code] += 1
                if await self.finder.lookup(node) is None:
                    raise NodeVanishedError("the node left the directory") from None
                await trio.sleep(backoff(self.config.backoff_base_s, tries - 1,
                                          self.config.backoff_max_s))

    async def _wait_done(
        self, client: NodeClient, job: Job, node: PublicKey,
        waiter: Callable[[bytes, float], Awaitable[bool]] | None = None,
    ) -> None:
        """Follow the job until ``waiter`` (default ``client.wait_done``) says it is there,
        checking the node's liveness in between. Raises :class:`NodeError`."""
        waiter = waiter or client.wait_done
        unreachable_since: float | None = None
        tries = 0
        while True:
            remaining = job.expires_at - self.clock()
            if remaining <= 0:
                with trio.move_on_after(self.config.node_timeout_s):
                    with contextlib.suppress(NodeError):
                        await client.cancel(job.job_id)
                raise NodeTimeoutError(f"no result within the job's lifetime ({job.id_hex})")
            try:
                follow = min(remaining, self.config.follow_interval_s)
                if await waiter(job.job_id, follow):
                    return
                unreachable_since, tries = None, 0
            except NodeUnreachableError:
                now = self.clock()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.config.unreachable_after_s:
                    raise
                tries += 1
                if await self.finder.lookup(node) is None:
                    raise NodeVanishedError("unreachable and gone from the directory") from None
                await trio.sleep(backoff(self.config.backoff_base_s, tries - 1,
                                          self.config.backoff_max_s))
                continue
            entry = await self.finder.lookup(node)
            if entry is None:
                raise NodeVanishedError("gone from the directory while building")
            self.ratings.status_heartbeats(
                [entry], self.clock(), self.config.heartbeat_interval_s
            )

