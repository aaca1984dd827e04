"""The node's job service: admits signed jobs, runs them through a runner, signs results.

This is the state behind the HTTPS API (``_api.py``), kept free of HTTP so it can be driven
directly in tests. It owns:

* admission (:meth:`JobService.submit`): parse and authenticate the job, check it against
  the trust list, this node's key and the replay cache, and take a build slot;
* one task per admitted job, in the service's nursery (:meth:`JobService.run`), which calls
  the :class:`JobRunner`, tees the live log to a file followers can read, and signs the
  :class:`~p2pbuild.Result` when the build ends (also when it is cancelled or its input is
  rejected);
* a bounded table of finished jobs, with their files, for download; the oldest finished
  job's directory is removed when the table is full;
* counters of every rejection, by error ``code`` (:meth:`JobService.statistics`);
* optionally, what the node can serve (:class:`JobFilter`: target arch and OS, build
  types, source size) and a :class:`JobStore` that persists admissions and finished
  results, so a restarted daemon still serves them and still refuses replays.

A runner is anything with ``async def run(job, workdir, log) -> RunReport``: the real one
drives the sandboxed executor (``_runner.py``), tests use an in-process fake
(``p2pbuild.testing.InstantRunner``).
"""

from __future__ import annotations

import collections
import enum
import errno
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from pathlib import Path
from typing import Protocol

import attrs
import trio

from .._errors import OversizeError, P2PBuildError, RemoteError
from .._identity import Identity
from .._jobs import (
    BUILDROOT_METHODS,
    DEFAULT_JOB_POLICY,
    BuildrootRecord,
    FileDigest,
    Job,
    JobPolicy,
    Result,
    ResultState,
)
from .._orders import JobControl, JobControlAction
from .._replay import ReplayCache
from .._trust import TrustList
from ._errors import BuildEnvironmentError

__all__ = [
    "DrainingError",
    "JobFilter",
    "JobRunner",
    "JobStore",
    "JobService",
    "JobServiceStatistics",
    "JobRunningError",
    "JobStatus",
    "LocalFile",
    "NoFreeSlotError",
    "RunReport",
    "UnavailableError",
    "UnknownJobError",
    "UnservableJobError",
]

_LOG_CHUNK = 64 * 1024


_log = logging.getLogger("p2pbuild.node.service")

class UnavailableError(P2PBuildError, code="unavailable", status=503):
    """The node cannot take a job now; the same job may be sent again later."""


class NoFreeSlotError(UnavailableError, code="no-free-slot"):
    """Every build slot is taken."""


class DrainingError(UnavailableError, code="draining"):
    """The node is shutting down and takes no new job."""


class UnservableJobError(RemoteError, code="unservable", status=422):
    """An authentic job this node cannot serve: another target arch or OS, a build type it
    does not offer, or a source larger than its limit. Sending it again will not help."""


class SourceTooLargeError(
    UnservableJobError, OversizeError, code="source-too-large", status=422
):
    """A job whose source is larger than this node accepts."""


@attrs.frozen
class JobFilter:
    """What this node can serve; :meth:`check` refuses any other job.

    Empty ``arches``/``oses``/``build_types`` would refuse everything, which is what a node
    that cannot build should do.
    """

    arches: Collection[str]
    oses: Collection[str]
    build_types: Collection[str]
    max_source_bytes: int

    def check(self, job: Job) -> None:
        """Raise :class:`UnservableJobError` (or :class:`SourceTooLargeError`) unless this
        node can serve ``job``."""
        spec = job.spec
        if spec.build_type.value not in self.build_types:
            offered = ", ".join(sorted(self.build_types)) or "none"
            raise UnservableJobError(
                f"build type {spec.build_type.value!r} is not offered here (offered: {offered})"
            )
        if spec.buildroot is not None and not BUILDROOT_METHODS & set(self.build_types):
            raise UnservableJobError("the job names a buildroot; this node cannot make one")
        if spec.target.arch not in self.arches:
            raise UnservableJobError(
                f"target arch {spec.target.arch!r} is not this node's "
                f"({', '.join(sorted(self.arches))})"
            )
        if spec.target.os not in self.oses:
            raise UnservableJobError(
                f"target os {spec.target.os!r} is not this node's ({', '.join(sorted(self.oses))})"
            )
        if spec.source.size > self.max_source_bytes:
            raise SourceTooLargeError(
                f"source of {spec.source.size} bytes exceeds this node's {self.max_source_bytes}"
            )


class JobStore(Protocol):
    """Where a :class:`JobService` persists what must survive a restart (``_state.py``).

    Each call is synchronous and short (one SQLite transaction); an ``OSError`` or
    ``sqlite3.Error`` from it propagates as a bug or a broken disk.
    """

    def admitted(self, job: Job, accepted_ms: int, workdir: Path) -> None:
        """``job`` was admitted: remember it and its id (replay protection)."""
        ...

    def finished(
        self, job: Job, result: Result, files: Mapping[tuple[str, str], Path], finished_ms: int
    ) -> None:
        """``job`` ended with ``result``; ``files`` maps (kind, name) to a path."""
        ...

    def forgotten(self, job_id: bytes) -> None:
        """The job and its files are gone (collected, expired or evicted)."""
        ...

    def replay_horizon(self, horizon: int) -> None:
        """The replay cache's eviction horizon rose to ``horizon``."""
        ...


class UnknownJobError(P2PBuildError, code="unknown-job", status=404):
    """No job with that id on this node (never admitted, or already forgotten)."""


class JobRunningError(P2PBuildError, code="job-running", status=409):
    """The request needs a finished job, and this one is still running."""


@attrs.frozen
class LocalFile:
    """An output file of a build: its signed description and where it is on this host."""

    digest: FileDigest
    path: Path


@attrs.frozen
class RunReport:
    """What a runner returns: everything the node signs, plus where the files are."""

    state: ResultState
    exit_code: int | None
    environment: Mapping[str, str]
    artifacts: tuple[LocalFile, ...] = ()
    logs: tuple[LocalFile, ...] = ()
    #: The buildroot the build ran in (jobs that name one).
    buildroot: BuildrootRecord | None = None


class LogSink(Protocol):
    async def __call__(self, data: bytes, /) -> None: ...


class JobRunner(Protocol):
    """Runs one admitted job. The service calls it once per job, in its own task."""

    async def run(self, job: Job, workdir: Path, log: LogSink) -> RunReport:
        """Build ``job`` in ``workdir`` (an empty directory the runner owns until the job
        is forgotten), sending build output to ``log`` as it arrives.

        Return a report for every build that ran, whatever its exit. Raise a
        :class:`~p2pbuild.RemoteError` if the job's input is bad (the service signs a
        ``rejected`` result) or :class:`BuildEnvironmentError` if this node cannot build;
        anything else is a bug and propagates. Cancellation means the job was cancelled.
        """
        ...


class JobPhase(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"


@attrs.frozen
class JobStatus:
    """A job as the API reports it."""

    job_id: bytes
    dispatcher: str
    phase: JobPhase
    #: The result's state once done, else None.
    state: ResultState | None
    accepted_ms: int
    log_bytes: int

    def to_json(self) -> dict[str, object]:
        return {
            "job_id": self.job_id.hex(),
            "dispatcher": self.dispatcher,
            "phase": self.phase.value,
            "state": self.state.value if self.state is not None else "running",
            "accepted_ms": self.accepted_ms,
            "log_bytes": self.log_bytes,
        }


@attrs.frozen
class JobServiceStatistics:
    """Counters and gauges of a :class:`JobService`."""

    slots: int
    running: int
    finished: int
    accepted: int
    draining: bool
    #: Rejections by error code, sorted by code.
    rejected: tuple[tuple[str, int], ...]
    #: Finished builds by result state, sorted by state.
    results: tuple[tuple[str, int], ...] = ()
    #: Seconds spent running builds (from start to signed result), all jobs together.
    build_seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        """The gauges and rejections (``/v1/status``); results and build time are in the
        metrics."""
        body = attrs.asdict(self, filter=lambda a, _: a.name not in ("results", "build_seconds"))
        body["rejected"] = dict(self.rejected)
        return body


@attrs.define(eq=False)
class _Entry:
    job: Job
    workdir: Path
    accepted_ms: int
    log_path: Path
    log_size: int = 0
    log_changed: trio.Event = attrs.field(factory=trio.Event)
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    result: Result | None = None
    files: dict[tuple[str, str], Path] = attrs.field(factory=dict)
    done: trio.Event = attrs.field(factory=trio.Event)
    handed_back: bool = False
    finished_ms: int = 0

    def status(self) -> JobStatus:
        return JobStatus(
            self.job.job_id,
            str(self.job.dispatcher),
            JobPhase.DONE if self.result else JobPhase.RUNNING,
            self.result.state if self.result else None,
            self.accepted_ms,
            self.log_size,
        )


@attrs.define(eq=False)
class JobService:
    """Admits, runs and remembers jobs for one node. Start it with :meth:`run` in a nursery.

    ``work_root`` holds one directory per job. ``clock`` returns Unix seconds (injected for
    tests); ``max_log_bytes`` caps the live log a runner can write; ``max_finished`` bounds
    how many finished jobs (and their files) are kept for download, and ``result_keep_s``
    how long (:meth:`expire_finished`). ``job_filter`` refuses jobs this node cannot serve
    (None: any); ``store`` persists admissions and results (None: memory only).
    """

    identity: Identity
    trust_list: TrustList
    runner: JobRunner
    work_root: Path
    slots: int = 1
    policy: JobPolicy = DEFAULT_JOB_POLICY
    replay: ReplayCache = attrs.field(factory=ReplayCache)
    #: Nonces of job control orders (:meth:`authorize`), in memory: an order lives
    #: ``policy.pull_auth_window`` seconds and names one job, so after a restart a replayed
    #: one could only repeat what that job's own dispatcher already ordered.
    control_replay: ReplayCache = attrs.field(factory=lambda: ReplayCache(max_entries=10_000))
    clock: Callable[[], float] = time.time
    max_log_bytes: int = 16 * 1024 * 1024
    max_finished: int = 256
    result_keep_s: float = 7 * 24 * 3600
    job_filter: JobFilter | None = None
    store: JobStore | None = None
    _jobs: dict[bytes, _Entry] = attrs.field(factory=dict, init=False)
    _finished: collections.deque[bytes] = attrs.field(factory=collections.deque, init=False)
    _rejected: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    _accepted: int = attrs.field(default=0, init=False)
    _results: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    _build_ms: int = attrs.field(default=0, init=False)
    _running: int = attrs.field(default=0, init=False)
    _draining: bool = attrs.field(default=False, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _slot_freed: trio.Event = attrs.field(factory=trio.Event, init=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the service until cancelled; jobs run as tasks inside it.

        On cancellation every running job is cancelled too. Raises what a runner raises
        beyond its documented errors (a bug).
        """
        self.work_root.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- admission -----------------------------------------------------------------------------

    def count_rejection(self, error: P2PBuildError) -> None:
        """Count a rejection by its ``code`` (the API also calls this for HTTP-level ones)."""
        self._rejected[error.code] += 1

    def submit(self, data: bytes) -> JobStatus:
        """Admit the signed job ``data`` and start it.

        Raises (and counts) any :class:`~p2pbuild.RemoteError` from parsing and
        :meth:`Job.check` (``oversize``, ``malformed``, ``bad-signature``, ``expired``,
        ``not-yet-valid``, ``lifetime-out-of-bounds``, ``untrusted-key``, ``wrong-node``,
        ``replayed``), :class:`UnservableJobError` (``unservable``, ``source-too-large``)
        from the :class:`JobFilter`, or :class:`NoFreeSlotError` / :class:`DrainingError`.
        Raises :class:`RuntimeError` if :meth:`run` is not running.
        """
        try:
            return self._submit(data)
        except (RemoteError, UnavailableError) as exc:
            self.count_rejection(exc)
            raise

    def _submit(self, data: bytes) -> JobStatus:
        if self._nursery is None:
            raise RuntimeError("JobService.run() is not running")
        now = self.clock()
        job = Job.from_bytes(data)
        job.check(now, self.trust_list, self.identity.public_key, self.replay, policy=self.policy)
        if self.job_filter is not None:
            self.job_filter.check(job)
        if self._draining:
            raise DrainingError("this node is draining and takes no new jobs")
        if self._running >= self.slots:
            raise NoFreeSlotError(f"all {self.slots} build slots are busy")
        horizon = self.replay.horizon
        self.replay.add(job.job_id, job.expires_at, now)
        workdir = self.work_root / job.id_hex
        workdir.mkdir()
        entry = _Entry(job, workdir, int(now * 1000), workdir / "live.log")
        if self.store is not None:
            self.store.admitted(job, entry.accepted_ms, workdir)
            if self.replay.horizon != horizon:
                self.store.replay_horizon(self.replay.horizon)
        self._jobs[job.job_id] = entry
        self._accepted += 1
        self._running += 1
        self._nursery.start_soon(self._run_job, entry, name=f"job {job.id_hex}")
        return entry.status()

    def drain(self) -> None:
        """Stop admitting jobs (``draining``); running jobs go on."""
        self._draining = True
        self._slot_freed.set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def free_slots(self) -> int:
        """Slots a new job could take now (0 while draining)."""
        return 0 if self._draining else max(0, self.slots - self._running)

    async def wait_free_slot(self) -> None:
        """Return once a slot is free; never returns while draining (wait for cancellation)."""
        while self.free_slots == 0:
            freed = self._slot_freed
            await freed.wait()
            if freed is self._slot_freed:
                self._slot_freed = trio.Event()

    def running_jobs(self) -> list[bytes]:
        """Ids of the jobs still running."""
        return [job_id for job_id, e in self._jobs.items() if e.result is None]

    async def wait_idle(self) -> None:
        """Return once no job is running."""
        for job_id in self.running_jobs():
            entry = self._jobs.get(job_id)
            if entry is not None:
                await entry.done.wait()

    def hand_back(self) -> int:
        """Cancel every running job; each ends with a signed ``handed-back`` result (the
        dispatcher should run it elsewhere). Returns how many were handed back."""
        running = [e for e in self._jobs.values() if e.result is None]
        for entry in running:
            entry.handed_back = True
            entry.cancel_scope.cancel()
        return len(running)

    # -- running -------------------------------------------------------------------------------

    async def _run_job(self, entry: _Entry) -> None:
        job = entry.job
        started_ms = int(self.clock() * 1000)
        report: RunReport | None = None
        state = ResultState.CANCELLED
        try:
            # Opened here rather than in a worker thread: creating an empty file is quick,
            # and a thread hop would add to every job's dispatch latency.
            async with trio.wrap_file(entry.log_path.open("wb")) as log_file:

                async def log(data: bytes) -> None:
                    room = self.max_log_bytes - entry.log_size
                    if room <= 0 or not data:
                        return
                    chunk = data[:room]
                    await log_file.write(chunk)
                    await log_file.flush()
                    entry.log_size += len(chunk)
                    entry.log_changed.set()
                    entry.log_changed = trio.Event()

                with entry.cancel_scope:
                    try:
                        report = await self.runner.run(job, entry.workdir / "build", log)
                    except (RemoteError, BuildEnvironmentError) as exc:
                        self.count_rejection(exc)
                        await log(f"\n[p2pbuild: job rejected: {exc.code}: {exc}]\n".encode())
                        # The reason goes into the signed result, so that the dispatcher can
                        # tell the packager (bad-source: not a source RPM, ...).
                        why = "".join(c if c.isprintable() else "?" for c in f"{exc.code}: {exc}")
                        report = RunReport(ResultState.REJECTED, None, {"reason": why[:200]})
                    except OSError as exc:
                        # The work directory's file system is full: this build ends
                        # (the dispatcher sends it elsewhere); the node goes on.
                        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        self._rejected["disk-full"] += 1
                        _log.warning("job %s: work directory full: %s", job.id_hex, exc)
                        state = ResultState.LIMIT_EXCEEDED
        finally:
            # Also on cancellation of the whole service: every admitted job gets a result.
            if report is None and entry.handed_back:
                state = ResultState.HANDED_BACK
            self._finish(entry, report, state, started_ms)

    def _finish(
        self, entry: _Entry, report: RunReport | None, state: ResultState, started_ms: int
    ) -> None:
        ended_ms = max(started_ms, int(self.clock() * 1000))
        artifacts: tuple[LocalFile, ...] = ()
        logs: tuple[LocalFile, ...] = ()
        if report is not None:
            state, artifacts, logs = report.state, report.artifacts, report.logs
        result = Result.create(
            self.identity,
            entry.job,
            state=state,
            exit_code=report.exit_code if report else None,
            started_ms=started_ms,
            ended_ms=ended_ms,
            environment=report.environment if report else {},
            artifacts=[f.digest for f in artifacts],
            logs=[f.digest for f in logs],
            buildroot=report.buildroot if report else None,
        )
        entry.files = {("artifacts", f.digest.name): f.path for f in artifacts}
        entry.files.update({("logs", f.digest.name): f.path for f in logs})
        entry.result = result
        entry.finished_ms = ended_ms
        self._results[state.value] += 1
        self._build_ms += ended_ms - started_ms
        if self.store is not None:
            self.store.finished(entry.job, result, entry.files, ended_ms)
        entry.log_changed.set()
        entry.done.set()
        self._running -= 1
        self._slot_freed.set()
        self._add_finished(entry.job.job_id)

    def _add_finished(self, job_id: bytes) -> None:
        self._finished.append(job_id)
        while len(self._finished) > self.max_finished:
            self._forget(self._finished.popleft())

    def _forget(self, job_id: bytes) -> None:
        entry = self._jobs.pop(job_id, None)
        if entry is None:
            return
        if self.store is not None:
            self.store.forgotten(job_id)
        if self._nursery is not None:
            self._nursery.start_soon(_remove_tree, entry.workdir)
        else:
            shutil.rmtree(entry.workdir, ignore_errors=True)

    # -- persistence and expiry ------------------------------------------------------------------

    def restore(
        self,
        job: Job,
        result: Result,
        files: Mapping[tuple[str, str], Path],
        *,
        accepted_ms: int,
        finished_ms: int,
        workdir: Path,
    ) -> None:
        """Serve a finished job from an earlier run again (the daemon calls this at start
        with what its :class:`JobStore` kept). Its id must already be in :attr:`replay`.

        Raises nothing: a job already known is left as it is.
        """
        if job.job_id in self._jobs:
            return
        entry = _Entry(job, workdir, accepted_ms, workdir / "live.log")
        entry.result = result
        entry.files = dict(files)
        entry.finished_ms = finished_ms
        entry.log_size = _file_size(entry.log_path)
        entry.done.set()
        self._jobs[job.job_id] = entry
        self._add_finished(job.job_id)

    def collect(self, job_id: bytes) -> None:
        """Forget a finished job and remove its files (its dispatcher has them).

        Raises :class:`UnknownJobError`, and :class:`JobRunningError` for a running job.
        """
        entry = self._entry(job_id)
        if entry.result is None:
            raise JobRunningError(f"job {job_id.hex()} is still running; cancel it first")
        self._finished.remove(job_id)
        self._forget(job_id)

    def expire_finished(self) -> int:
        """Forget finished jobs older than ``result_keep_s``; returns how many."""
        limit_ms = (self.clock() - self.result_keep_s) * 1000
        old = [
            job_id
            for job_id in self._finished
            if self._jobs[job_id].finished_ms < limit_ms
        ]
        for job_id in old:
            self._finished.remove(job_id)
            self._forget(job_id)
        return len(old)

    # -- queries -------------------------------------------------------------------------------

    def _entry(self, job_id: bytes) -> _Entry:
        entry = self._jobs.get(job_id)
        if entry is None:
            raise UnknownJobError(f"no job {job_id.hex()[:32]} on this node")
        return entry

    def status(self, job_id: bytes) -> JobStatus:
        """The job's status. Raises :class:`UnknownJobError`."""
        return self._entry(job_id).status()

    def result(self, job_id: bytes) -> Result | None:
        """The signed result, or None while the job runs. Raises :class:`UnknownJobError`."""
        return self._entry(job_id).result

    def file(self, job_id: bytes, kind: str, name: str) -> tuple[FileDigest, Path] | None:
        """An artifact (``kind="artifacts"``) or log (``"logs"``) of a finished job, by its
        exact name in the result, or None. Raises :class:`UnknownJobError`."""
        entry = self._entry(job_id)
        if entry.result is None:
            return None
        items = entry.result.artifacts if kind == "artifacts" else entry.result.logs
        for digest in items:
            if digest.name == name:
                path = entry.files.get((kind, name))
                return None if path is None else (digest, path)
        return None

    async def wait_result(self, job_id: bytes) -> Result:
        """Wait for the job's signed result. Raises :class:`UnknownJobError`."""
        entry = self._entry(job_id)
        await entry.done.wait()
        assert entry.result is not None
        return entry.result

    def authorize(self, job_id: bytes, order: bytes, action: JobControlAction) -> None:
        """Check that ``order`` (a :class:`~p2pbuild.JobControl`'s bytes) is a fresh order
        for ``action`` on ``job_id``, signed by the dispatcher that issued that job.

        Raises (and counts) :class:`UnknownJobError`, the parse errors
        (``oversize``, ``malformed``, ``bad-signature``), :class:`~p2pbuild.ForbiddenError`
        (another key, job or action), ``expired``, ``not-yet-valid`` and ``replayed``.
        """
        entry = self._entry(job_id)
        try:
            control = JobControl.from_bytes(order)
            control.check(self.clock(), entry.job, action, self.control_replay,
                          policy=self.policy)
        except RemoteError as exc:
            self.count_rejection(exc)
            raise

    def cancel(self, job_id: bytes) -> JobStatus:
        """Cancel a running job (it ends ``cancelled``); a no-op for a finished one.
        Raises :class:`UnknownJobError`."""
        entry = self._entry(job_id)
        entry.cancel_scope.cancel()
        return entry.status()

    async def follow_log(self, job_id: bytes, *, follow: bool) -> AsyncIterator[bytes]:
        """Yield the job's live log from the start; with ``follow``, keep yielding new
        output until the job ends. Raises :class:`UnknownJobError`."""
        entry = self._entry(job_id)
        offset = 0
        while True:
            changed = entry.log_changed
            done = entry.result is not None
            if offset < entry.log_size:
                # At most 64 KiB this process just wrote (in the page cache): read in place,
                # as a worker-thread hop would cost more on a busy event loop.
                await trio.lowlevel.checkpoint()
                chunk = _read_at(entry.log_path, offset, min(_LOG_CHUNK, entry.log_size - offset))
                if not chunk:
                    return  # the directory was removed under us
                offset += len(chunk)
                yield chunk
                continue
            if done or not follow:
                return
            await changed.wait()

    def activity(self) -> tuple[int, int]:
        """Builds running now and jobs accepted ever (what an on-demand node watches)."""
        stats = self.statistics()
        return stats.running, stats.accepted

    def statistics(self) -> JobServiceStatistics:
        return JobServiceStatistics(
            slots=self.slots,
            running=self._running,
            finished=len(self._finished),
            accepted=self._accepted,
            draining=self._draining,
            rejected=tuple(sorted(self._rejected.items())),
            results=tuple(sorted(self._results.items())),
            build_seconds=self._build_ms / 1000,
        )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_at(path: Path, offset: int, size: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(size)
    except FileNotFoundError:
        return b""


async def _remove_tree(path: Path) -> None:
    await trio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))
