"""Pull mode, dispatcher side: the queue pull-mode nodes long-poll, and its HTTPS routes.

A node behind NAT cannot be reached, so the dispatcher keeps the jobs meant for such nodes
in a :class:`PullQueue` until a node asks for one (design item 14). The node side is
``p2pbuild.node._pull``. Endpoints (``_pull_routes.pull_routes``; mount them in the
dispatcher's Starlette app, or run them alone with ``_pull_routes.serve_pull``)::

    POST /v1/pull?wait=S                        long-poll: 200 + signed job, or 204
    POST /v1/pull/jobs/{id}/lease               renew the lease: JSON progress in, 200 or 410
    PUT  /v1/pull/jobs/{id}/result              the node's signed result (msgpack)
    PUT  /v1/pull/jobs/{id}/artifacts/{name}    an artifact, streamed; re-hashed here
    PUT  /v1/pull/jobs/{id}/logs/{name}         a log, likewise
    POST /v1/pull/jobs/{id}/refused             JSON {"error": code, "reason": text}

Every request carries ``Authorization: P2PBuild-Pull <base64url PullAuth>``: a token signed
by the node, for this dispatcher's key, fresh (60 s window), single-use (its nonce goes in
the replay cache), by a key the trust list names as a node. A job is handed only to the
node it was offered for (or to any trusted node if offered for none); uploads are accepted
only from the node that took the job, a result only if it answers exactly that job, a file
only if the result names it, no larger than the result says, with the SHA-256 it says.
Refusals are the node API's one-line JSON (``{"error": code, "reason": ...}``).

Leases. Taking a job starts a lease of ``lease_s`` seconds (the ``200`` of the long-poll
says it, with the ``heartbeat_s`` the node should renew at, in ``X-P2PBuild-Lease-S`` and
``X-P2PBuild-Heartbeat-S``). Every authenticated request of the taking node about the job
renews it: the lease route while it builds, and its uploads. A lease that runs out before
the job's result and files are all here ends the job with :class:`LeaseExpiredError`
(``lease-expired``) for :meth:`PullQueue.wait_result`: the node is lost, as a push node that
stops answering. A job that ended so, or that the engine withdrew (build cancelled,
verified without it, given up), leaves a tombstone (at most ``max_gone`` of them): the
taking node's next request about it is answered ``410`` with ``lease-expired`` or
``withdrawn``, and the node stops the build and uploads nothing; in particular a late
result is refused, never stored. Expiry is judged against ``clock`` whenever the job is
looked at (a waiter in :meth:`~PullQueue.wait_result` sleeps until the deadline), so it does
not depend on a timer task.

Forgetting. A delivered job stays in the queue, with its uploads, until the engine has kept
what it needs (the signed result committed durably, the artifacts copied into its work
directory) and calls :meth:`PullQueue.release`; a job the engine withdraws or whose lease
runs out is forgotten at once. Either way the job's upload directory is deleted and all that
is left is a tombstone of a few dozen bytes (the node keys and the reason; at most
``max_gone``, oldest first out), so the node's late requests about it (a retried upload, a
last renewal) are answered ``410`` (``withdrawn`` or ``lease-expired``) rather than stored.
Memory and disk thus hold only the jobs in flight. Uploads are not kept across a restart
(the queue does not read them back), so a fresh offer or :meth:`~PullQueue.resume` of a job
deletes whatever an earlier process left in its directory.

What the engine uses (``_nodes.PullQueue`` protocol): :meth:`PullQueue.offer`,
:meth:`~PullQueue.wait_taken`, :meth:`~PullQueue.resume`, :meth:`~PullQueue.withdraw`,
:meth:`~PullQueue.wait_result`, :meth:`~PullQueue.artifact`, :meth:`~PullQueue.release`.
The queue lives in memory; the engine's database is what survives a restart. After one,
:meth:`~PullQueue.resume` puts a job its node had taken back as taken by that node with a
*fresh* lease, so a node that is still building has a whole lease period to renew (and
upload) before it counts as lost.

The errors a node hears (:class:`UnknownPullJobError`, :class:`ResultMissingError`,
:class:`JobWithdrawnError`, :class:`LeaseExpiredError`) live in the error tree
(``_errors.py``); the routes in ``_pull_routes.py``.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

import attrs
import trio

from .._errors import MalformedError, OversizeError, P2PBuildError, ReplayError
from .._identity import PublicKey
from .._jobs import (
    DEFAULT_JOB_POLICY,
    MAX_PULL_AUTH_SIZE,
    MAX_RESULT_SIZE,
    FileDigest,
    Job,
    JobPolicy,
    PullAuth,
    Result,
)
from .._replay import ReplayCache
from .._trust import TrustList
from ._errors import (
    ArtifactDigestError,
    AuthenticationError,
    JobWithdrawnError,
    LeaseExpiredError,
    NodeBusyError,
    NodeRefusedError,
    ResultMissingError,
    UnknownPullJobError,
)

__all__ = [
    "AUTH_SCHEME",
    "HEARTBEAT_HEADER",
    "LEASE_HEADER",
    "LEASE_PHASES",
    "JobWithdrawnError",
    "LeaseExpiredError",
    "LeaseProgress",
    "PullDelivery",
    "PullQueue",
    "PullQueueStatistics",
    "ResultMissingError",
    "UnknownPullJobError",
]

AUTH_SCHEME = "P2PBuild-Pull"
MSGPACK = "application/msgpack"
_WRITE_CHUNK = 1024 * 1024
#: Node refusal codes after which the job goes back in the queue for another node.
_TRANSIENT = frozenset({"no-free-slot", "draining", "unavailable"})


#: What a node may report as its phase in a lease renewal.
LEASE_PHASES = frozenset({"building", "uploading"})
#: Response headers of a long-poll that hands out a job.
LEASE_HEADER = "X-P2PBuild-Lease-S"
HEARTBEAT_HEADER = "X-P2PBuild-Heartbeat-S"
_MAX_PROGRESS_BYTES = 4096


@attrs.frozen
class LeaseProgress:
    """What a node reported with its last lease renewal. ``phase`` is one of
    :data:`LEASE_PHASES` (or "" if not said); the numbers are the node's own claims, for
    people and the audit trail, never for decisions."""

    phase: str = ""
    elapsed_s: int | None = None
    log_bytes: int | None = None

    @classmethod
    def from_json(cls, body: bytes) -> LeaseProgress:
        """Parse a renewal body: empty, or a JSON object with optional ``phase``,
        ``elapsed_s`` and ``log_bytes`` (other keys are ignored, for newer nodes).
        Raises :class:`MalformedError`."""
        if not body.strip():
            return cls()
        try:
            value = json.loads(body)
        except ValueError:
            raise MalformedError("a lease renewal is a JSON object") from None
        if not isinstance(value, dict):
            raise MalformedError("a lease renewal is a JSON object")
        phase = value.get("phase", "")
        if not isinstance(phase, str) or (phase and phase not in LEASE_PHASES):
            raise MalformedError(f"phase must be one of {', '.join(sorted(LEASE_PHASES))}")
        numbers: list[int | None] = []
        for key in ("elapsed_s", "log_bytes"):
            number = value.get(key)
            if number is not None and (
                type(number) is not int or not 0 <= number < 2**53
            ):
                raise MalformedError(f"{key} must be a non-negative integer")
            numbers.append(number)
        return cls(phase, numbers[0], numbers[1])

    def describe(self) -> str:
        parts = [self.phase or "no phase reported"]
        if self.elapsed_s is not None:
            parts.append(f"{self.elapsed_s} s in")
        return ", ".join(parts)


@attrs.define(eq=False)
class PullDelivery:
    """One offered job and what its node sent back so far."""

    job: Job
    #: The node it is offered to, or None for any trusted node.
    for_node: PublicKey | None
    taken_by: PublicKey | None = None
    taken_at: float | None = None
    #: While taken and not done: the node must renew by then (Unix seconds).
    lease_until: float | None = None
    renewed_at: float | None = None
    renewals: int = 0
    progress: LeaseProgress = LeaseProgress()
    result: Result | None = None
    #: Verified uploads: (kind, name) to the file's path.
    files: dict[tuple[str, str], Path] = attrs.field(factory=dict)
    refusal: NodeRefusedError | None = None
    #: Set when the job ended without a result: withdrawn or lease expired.
    gone: JobWithdrawnError | LeaseExpiredError | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    #: Set (and replaced) whenever the job is taken, put back or ends.
    changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def complete(self) -> bool:
        if self.result is None:
            return False
        wanted = {("artifacts", f.name) for f in self.result.artifacts}
        wanted |= {("logs", f.name) for f in self.result.logs}
        return wanted <= set(self.files)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def finish(self) -> None:
        self.lease_until = None
        self.done.set()
        self.notify()


@attrs.frozen
class _Tombstone:
    """What is left of a job that ended: who may ask about it, and the answer (``410``)."""

    taken_by: PublicKey | None
    for_node: PublicKey | None
    error: JobWithdrawnError | LeaseExpiredError


@attrs.frozen
class PullQueueStatistics:
    pending: int
    taken: int
    delivered: int
    refused: int
    waiting_nodes: int
    #: Rejected requests by error code, sorted.
    rejected: tuple[tuple[str, int], ...]
    #: Taken jobs whose lease ran out (node lost), and lease renewals accepted.
    leases_expired: int = 0
    renewals: int = 0
    #: Jobs withdrawn by the engine while a node had them.
    withdrawn_taken: int = 0
    #: Delivered jobs the engine released (kept what it needed; forgotten here).
    released: int = 0
    #: Ended jobs remembered only to answer their node ``410`` (at most ``max_gone``).
    tombstones: int = 0


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


@attrs.define(eq=False)
class PullQueue:
    """Jobs waiting for pull-mode nodes, and what those nodes upload.

    ``dispatcher_key`` is this dispatcher's public key (pull tokens must name it);
    ``files_dir`` receives uploads, one directory per job. Bounds: ``max_pending`` jobs
    offered and not taken, ``max_wait`` seconds per long-poll, ``max_file_bytes`` per
    uploaded file (the result's own size is the exact bound; this caps what a result may
    claim), ``max_result_bytes`` per result, ``body_timeout`` to receive a result,
    ``max_gone`` tombstones of withdrawn, lost or released jobs. Leases: a taken job must be
    renewed within ``lease_s`` seconds; nodes are told to renew every ``heartbeat_s`` (at
    most half the lease, so one lost renewal is not fatal; :class:`ValueError` otherwise).
    """

    dispatcher_key: PublicKey
    trust_list: TrustList
    files_dir: Path
    clock: Callable[[], float] = time.time
    policy: JobPolicy = DEFAULT_JOB_POLICY
    replay: ReplayCache = attrs.field(factory=ReplayCache)
    max_pending: int = 10_000
    max_wait: float = 60.0
    max_file_bytes: int = 4 * 1024**3
    max_result_bytes: int = MAX_RESULT_SIZE
    body_timeout: float = 30.0
    lease_s: float = attrs.field(default=60.0, validator=_positive)
    heartbeat_s: float = attrs.field(default=15.0, validator=_positive)
    max_gone: int = 10_000
    _jobs: dict[bytes, PullDelivery] = attrs.field(factory=dict, init=False)
    _pending: collections.deque[bytes] = attrs.field(factory=collections.deque, init=False)
    _gone: collections.OrderedDict[bytes, _Tombstone] = attrs.field(
        factory=collections.OrderedDict, init=False
    )
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _waiting_nodes: int = attrs.field(default=0, init=False)
    _rejected: collections.Counter[str] = attrs.field(
        factory=collections.Counter, init=False
    )
    _counts: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)

    def __attrs_post_init__(self) -> None:
        if self.lease_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"lease_s ({self.lease_s:g}) must be at least twice heartbeat_s "
                f"({self.heartbeat_s:g})"
            )

    # -- the engine's side -----------------------------------------------------------------------

    def offer(self, node: PublicKey | None, job: Job | bytes) -> Job:
        """Queue ``job`` (a :class:`Job` or its signed bytes) for ``node`` (None: any
        trusted node; a job addressed to one node is only ever given to that node).

        Raises :class:`NodeBusyError` when ``max_pending`` jobs are waiting, and for bytes
        the job's parse errors (:class:`~p2pbuild.RemoteError`). Offering a job id again
        replaces the earlier offer (whoever waited on it gets :class:`JobWithdrawnError`).
        """
        if isinstance(job, bytes):
            job = Job.from_bytes(job)
        if len(self._pending) >= self.max_pending:
            raise NodeBusyError(f"{self.max_pending} pull jobs are already waiting")
        self._replace(job.job_id)
        self._jobs[job.job_id] = PullDelivery(job, node if node is not None else job.node)
        self._pending.append(job.job_id)
        self._wake()
        return job

    def offer_bytes(self, job_bytes: bytes, for_node: PublicKey | None = None) -> Job:
        """:meth:`offer` with the arguments the other way round."""
        return self.offer(for_node, job_bytes)

    def resume(self, node: PublicKey, job: Job) -> Job:
        """Put back, after a dispatcher restart, a job ``node`` took before it: taken by
        ``node``, with a fresh lease of ``lease_s`` from now. A node that still builds it
        renews and uploads as before; a node that died meanwhile is lost one lease period
        after the restart. Nobody else can take it. Replaces an earlier offer of the id."""
        self._replace(job.job_id)
        delivery = PullDelivery(job, node)
        self._jobs[job.job_id] = delivery
        self._mark_taken(delivery, node)
        return job

    def withdraw(self, job_id: bytes) -> None:
        """End the job: not taken yet, nobody gets it; taken, the node's next request about
        it (lease renewal, upload) is answered ``410 withdrawn``, so it stops the build.
        Anyone in :meth:`wait_result` or :meth:`wait_taken` gets
        :class:`JobWithdrawnError`. A job whose result (or refusal) is already here is
        forgotten as by :meth:`release`. Either way its uploads are deleted and a tombstone
        answers the node. Unknown or already ended: nothing happens, but for deleting
        what a dispatcher before a restart left in the job's upload directory."""
        delivery = self._jobs.get(job_id)
        if delivery is None:
            self._remove_files(job_id)
            return
        if delivery.taken_by is not None and not delivery.done.is_set():
            self._counts["withdrawn_taken"] += 1
        self._end(delivery, JobWithdrawnError(f"job {job_id.hex()} was withdrawn"))

    def release(self, job_id: bytes) -> None:
        """The engine has kept what it needs of the job (its result stored durably, its
        artifacts copied): forget the job and delete its uploads. What :meth:`artifact`
        returned before is gone after this. The node's late requests about the job are
        answered ``410 withdrawn`` (the dispatcher will never want them); ``wait_result``
        raises :class:`JobWithdrawnError`. A job not delivered yet is withdrawn. Unknown or
        already ended: nothing happens."""
        delivery = self._jobs.get(job_id)
        if delivery is None:
            return
        if not delivery.done.is_set():
            self.withdraw(job_id)
            return
        self._counts["released"] += 1
        self._end(delivery, JobWithdrawnError(
            f"job {job_id.hex()} was delivered; the dispatcher has its result"
        ))  # fmt: skip

    def delivery(self, job_id: bytes) -> PullDelivery | None:
        """The live delivery of ``job_id`` (offered, taken or delivered), else None."""
        return self._jobs.get(job_id)

    async def wait_taken(self, job_id: bytes) -> None:
        """Wait until a node took the job (or it ended otherwise: the outcome is then
        :meth:`wait_result`'s). Raises :class:`UnknownPullJobError` for a job not offered
        and :class:`JobWithdrawnError` for one withdrawn."""
        delivery = self._jobs.get(job_id)
        if delivery is None:
            ended = self._ended(job_id)
            if isinstance(ended.error, JobWithdrawnError):
                raise ended.error
            return
        while delivery.taken_by is None and not delivery.done.is_set():
            await delivery.changed.wait()
        if isinstance(delivery.gone, JobWithdrawnError):
            raise delivery.gone

    async def wait_result(self, job_id: bytes) -> Result:
        """Wait until the node uploaded the job's signed result and every file it names.

        Raises :class:`NodeRefusedError` if the node refused the job for good,
        :class:`LeaseExpiredError` when the taking node stopped renewing its lease (this
        returns about ``lease_s`` after its last renewal), :class:`JobWithdrawnError` for a
        job withdrawn and :class:`UnknownPullJobError` for one never offered.
        """
        delivery = self._jobs.get(job_id)
        if delivery is None:
            raise self._ended(job_id).error
        while not delivery.done.is_set():
            if delivery.lease_until is None:  # offered, not taken: no deadline here
                await delivery.changed.wait()
                continue
            remaining = delivery.lease_until - self.clock()
            if remaining <= 0:
                self._expire(delivery)
                break
            with trio.move_on_after(remaining):
                await delivery.changed.wait()
        if delivery.gone is not None:
            raise delivery.gone
        if delivery.refusal is not None:
            raise delivery.refusal
        assert delivery.result is not None
        return delivery.result

    def artifact(self, job_id: bytes, name: str) -> Path | None:
        """Where the verified upload of artifact ``name`` is, or None."""
        delivery = self._jobs.get(job_id)
        return None if delivery is None else delivery.files.get(("artifacts", name))

    def log(self, job_id: bytes, name: str) -> Path | None:
        delivery = self._jobs.get(job_id)
        return None if delivery is None else delivery.files.get(("logs", name))

    def statistics(self) -> PullQueueStatistics:
        self.expire_due()
        deliveries = list(self._jobs.values())
        return PullQueueStatistics(
            pending=len(self._pending),
            taken=sum(1 for d in deliveries if d.taken_by is not None and not d.done.is_set()),
            delivered=sum(1 for d in deliveries if d.done.is_set() and d.refusal is None),
            refused=sum(1 for d in deliveries if d.refusal is not None),
            waiting_nodes=self._waiting_nodes,
            rejected=tuple(sorted(self._rejected.items())),
            leases_expired=self._counts["leases_expired"],
            renewals=self._counts["renewals"],
            withdrawn_taken=self._counts["withdrawn_taken"],
            released=self._counts["released"],
            tombstones=len(self._gone),
        )

    def expire_due(self) -> int:
        """End every taken job whose lease has run out; returns how many. (Each job is also
        judged whenever it is looked at; this is for counters and tests.)"""
        due = [
            d for d in self._jobs.values()
            if d.lease_until is not None and not d.done.is_set()
            and d.lease_until <= self.clock()
        ]
        for delivery in due:
            self._expire(delivery)
        return len(due)

    # -- state changes -----------------------------------------------------------------------------

    def _ended(self, job_id: bytes) -> _Tombstone:
        """The tombstone of a job no longer live; raises :class:`UnknownPullJobError`."""
        ended = self._gone.get(job_id)
        if ended is None:
            raise UnknownPullJobError(f"no pull job {job_id.hex()}")
        return ended

    def _drop(self, job_id: bytes) -> PullDelivery | None:
        delivery = self._jobs.pop(job_id, None)
        if delivery is not None:
            with contextlib.suppress(ValueError):  # already taken
                self._pending.remove(job_id)
        self._gone.pop(job_id, None)
        return delivery

    def _replace(self, job_id: bytes) -> None:
        old = self._drop(job_id)
        if old is not None and not old.done.is_set():
            old.gone = JobWithdrawnError(f"job {job_id.hex()} was offered again")
            old.finish()
        # Uploads of an earlier offer, or left by a dispatcher before a restart: nothing
        # refers to them any more (the new delivery starts empty).
        self._remove_files(job_id)

    def _end(self, delivery: PullDelivery, error: JobWithdrawnError | LeaseExpiredError) -> None:
        """Forget the job and delete its uploads; keep a small tombstone so the node hears
        ``error``. A job still in flight ends with ``error`` for its waiters."""
        job_id = delivery.job.job_id
        self._drop(job_id)
        if not delivery.done.is_set():
            delivery.gone = error
            delivery.finish()
        self._gone[job_id] = _Tombstone(delivery.taken_by, delivery.for_node, error)
        while len(self._gone) > self.max_gone:
            self._gone.popitem(last=False)
        self._remove_files(job_id)

    def _remove_files(self, job_id: bytes) -> None:
        # Synchronous, so that nothing can see the job gone and its files still there: a
        # job's directory holds only the files its one result names. Errors are ignored
        # (as for the engine's work files): a missing directory is the common case, and an
        # upload still streaming into a removed directory deletes its own part file.
        shutil.rmtree(self.files_dir / job_id.hex(), ignore_errors=True)

    def _mark_taken(self, delivery: PullDelivery, node: PublicKey) -> None:
        now = self.clock()
        delivery.taken_by = node
        delivery.taken_at = now
        delivery.renewed_at = now
        delivery.lease_until = now + self.lease_s
        delivery.notify()

    def _expire(self, delivery: PullDelivery) -> None:
        assert delivery.taken_by is not None and delivery.renewed_at is not None
        silent = self.clock() - delivery.renewed_at
        self._counts["leases_expired"] += 1
        self._end(delivery, LeaseExpiredError(
            f"pull node {delivery.taken_by.fingerprint} did not renew the lease of job "
            f"{delivery.job.id_hex} for {silent:.0f} s (lease {self.lease_s:g} s; last heard: "
            f"{delivery.progress.describe()}, {delivery.renewals} renewal(s))"
        ))  # fmt: skip

    def _lease_due(self, delivery: PullDelivery) -> bool:
        if (
            delivery.lease_until is not None
            and not delivery.done.is_set()
            and delivery.lease_until <= self.clock()
        ):
            self._expire(delivery)
            return True
        return False

    # -- the node's side ---------------------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def count_rejection(self, error: P2PBuildError) -> None:
        self._rejected[error.code] += 1

    def authenticate(self, header: str | None) -> PublicKey:
        """The node key proven by an ``Authorization`` header value.

        Raises :class:`AuthenticationError` (missing or unreadable header) or the
        :meth:`PullAuth.check` errors (``expired``, ``not-yet-valid``, ``wrong-node``,
        ``untrusted-key``, ``replayed``, ``bad-signature``, ``malformed``).
        """
        scheme, _, value = (header or "").partition(" ")
        if scheme != AUTH_SCHEME or not value:
            raise AuthenticationError(f"an Authorization: {AUTH_SCHEME} <token> header is required")
        if len(value) > 2 * MAX_PULL_AUTH_SIZE:
            raise OversizeError("pull token too large")
        try:
            data = base64.urlsafe_b64decode(value.strip().encode("ascii"))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise MalformedError("pull token is not base64url") from None
        token = PullAuth.from_bytes(data)
        token.check(
            self.clock(), self.trust_list, self.dispatcher_key, self.replay, policy=self.policy
        )
        return token.node

    def _take_nowait(self, node: PublicKey) -> Job | None:
        for job_id in self._pending:
            delivery = self._jobs[job_id]
            if delivery.for_node is None or delivery.for_node == node:
                self._pending.remove(job_id)
                self._mark_taken(delivery, node)
                return delivery.job
        return None

    async def take(self, node: PublicKey, timeout: float) -> Job | None:
        """The next job for ``node``, waiting up to ``timeout`` seconds; None if none came.
        Its lease starts now."""
        self._waiting_nodes += 1
        try:
            with trio.move_on_after(timeout):
                while True:
                    job = self._take_nowait(node)
                    if job is not None:
                        return job
                    await self._changed.wait()
            return None
        finally:
            self._waiting_nodes -= 1

    def _taken(self, node: PublicKey, job_id: bytes) -> PullDelivery:
        """The job ``node`` took, its lease renewed by this very request.

        Raises :class:`UnknownPullJobError`, and for a job that ended without a result
        while this node had it, :class:`LeaseExpiredError` or :class:`JobWithdrawnError`.
        """
        delivery = self._jobs.get(job_id)
        if delivery is not None and delivery.taken_by is None and delivery.for_node == node:
            # Offered to this very node again after a dispatcher restart, and it already
            # has the job from before: it is taken (the job is addressed to this node only).
            with contextlib.suppress(ValueError):
                self._pending.remove(job_id)
            self._mark_taken(delivery, node)
        if delivery is not None and delivery.taken_by == node and self._lease_due(delivery):
            delivery = None  # it is a tombstone now: answered below
        if delivery is None:
            ended = self._gone.get(job_id)
            if ended is not None and node in (ended.taken_by, ended.for_node):
                raise ended.error
            raise UnknownPullJobError(f"no job {job_id.hex()} taken by this node")
        if delivery.taken_by != node:
            raise UnknownPullJobError(f"no job {job_id.hex()} taken by this node")
        if not delivery.done.is_set():
            now = self.clock()
            delivery.renewed_at = now
            delivery.lease_until = now + self.lease_s
        return delivery

    def renew(self, node: PublicKey, job_id: bytes, progress: LeaseProgress) -> PullDelivery:
        """Renew the lease ``node`` holds on ``job_id`` for another ``lease_s`` and keep its
        ``progress``. Raises what :meth:`_taken` raises: :class:`UnknownPullJobError`,
        :class:`LeaseExpiredError` (too late: the job is lost and may run elsewhere) and
        :class:`JobWithdrawnError` (stop the build)."""
        delivery = self._taken(node, job_id)
        delivery.progress = progress
        delivery.renewals += 1
        self._counts["renewals"] += 1
        return delivery

    def receive_result(self, node: PublicKey, job_id: bytes, data: bytes) -> Result:
        """Accept the signed result of a job ``node`` took.

        Raises :class:`UnknownPullJobError`, :class:`LeaseExpiredError` or
        :class:`JobWithdrawnError` (a late result: refused, not stored), the result's parse
        errors, ``wrong-node`` or ``malformed`` if it does not answer that job, and
        :class:`ReplayError` for a second, different result.
        """
        delivery = self._taken(node, job_id)
        result = Result.from_bytes(data, max_size=self.max_result_bytes)
        result.check_answers(delivery.job, node)
        if delivery.result is not None:
            if delivery.result.raw == result.raw:
                return result  # a retried upload
            raise ReplayError("this job already has a different signed result")
        for item in (*result.artifacts, *result.logs):
            if item.size > self.max_file_bytes:
                raise OversizeError(f"{item.name}: {item.size} bytes is over the upload bound")
        delivery.result = result
        if delivery.complete:
            delivery.finish()
        return result

    async def receive_file(
        self, node: PublicKey, job_id: bytes, kind: str, name: str, chunks: AsyncIterator[bytes]
    ) -> FileDigest:
        """Store an uploaded artifact (``kind="artifacts"``) or log (``"logs"``), checking
        it against the signed result while it streams in.

        Raises :class:`UnknownPullJobError`, :class:`LeaseExpiredError`,
        :class:`JobWithdrawnError`, :class:`ResultMissingError` (no result yet, or the
        result does not name the file), :class:`OversizeError` (more bytes than the result
        says) and :class:`ArtifactDigestError` (other size or SHA-256). A refused upload
        leaves nothing behind; a file that finishes after the job ended is not kept.
        """
        delivery = self._taken(node, job_id)
        if delivery.result is None:
            raise ResultMissingError("upload the signed result before its files")
        items = delivery.result.artifacts if kind == "artifacts" else delivery.result.logs
        expected = next((item for item in items if item.name == name), None)
        if expected is None:
            raise ResultMissingError(f"the signed result names no {kind[:-1]} {name!r:.80}")
        dest = self.files_dir / job_id.hex() / kind / expected.name
        part = dest.with_name(dest.name + ".part")
        await trio.to_thread.run_sync(lambda: part.parent.mkdir(parents=True, exist_ok=True))
        digest = hashlib.sha256()
        size = 0
        try:
            f: BinaryIO = await trio.to_thread.run_sync(part.open, "wb")
        except FileNotFoundError:
            # The job ended and its directory went between the mkdir and the open.
            self._check_live(delivery)
            raise
        try:
            buffer = bytearray()
            async for chunk in chunks:
                size += len(chunk)
                if size > expected.size:
                    raise OversizeError(f"{name}: more than the signed {expected.size} bytes")
                digest.update(chunk)
                buffer += chunk
                if len(buffer) >= _WRITE_CHUNK:
                    await trio.to_thread.run_sync(f.write, bytes(buffer))
                    buffer.clear()
            if buffer:
                await trio.to_thread.run_sync(f.write, bytes(buffer))
        except BaseException:
            f.close()
            part.unlink(missing_ok=True)
            raise
        f.close()
        if size != expected.size or digest.digest() != expected.sha256:
            part.unlink(missing_ok=True)
            raise ArtifactDigestError(
                f"{name}: arrived as {size} bytes, SHA-256 {digest.hexdigest()[:16]}; the "
                f"signed result says {expected.size} bytes, {expected.sha256.hex()[:16]}"
            )
        if self._jobs.get(job_id) is not delivery:
            part.unlink(missing_ok=True)
            self._check_live(delivery)
        os.replace(part, dest)
        delivery.files[(kind, expected.name)] = dest
        if delivery.complete and not delivery.done.is_set():
            delivery.finish()
        return expected

    def _check_live(self, delivery: PullDelivery) -> None:
        """Raise what the node must hear if ``delivery`` ended (withdrawn, expired,
        released, offered again) while its upload streamed in."""
        job_id = delivery.job.job_id
        if self._jobs.get(job_id) is delivery:
            return
        if job_id not in self._jobs:
            # The upload may have made the directory again after the job's end removed it.
            self._remove_files(job_id)
        ended = self._gone.get(job_id)
        if delivery.gone is not None:
            raise delivery.gone
        if ended is not None:
            raise ended.error
        raise JobWithdrawnError(f"job {job_id.hex()} was withdrawn")

    def receive_refusal(self, node: PublicKey, job_id: bytes, code: str, reason: str) -> None:
        """The node will not run a job it took. A transient reason (no free slot,
        draining) puts the job back in the queue; any other ends it with
        :class:`NodeRefusedError` for :meth:`wait_result`. Raises
        :class:`UnknownPullJobError` (and the ended-job errors of :meth:`_taken`)."""
        delivery = self._taken(node, job_id)
        if code == "replayed" and delivery.job.node == node:
            # The node already runs this job (taken before a dispatcher restart): its
            # result will come, as a push node's "replayed" answer means "accepted".
            return
        if delivery.done.is_set():
            return  # its result is already here
        if code in _TRANSIENT:
            delivery.taken_by = None
            delivery.taken_at = None
            delivery.lease_until = None
            self._pending.appendleft(job_id)
            delivery.notify()
            self._wake()
            return
        delivery.refusal = NodeRefusedError(
            f"node {node.fingerprint} refused pulled job {job_id.hex()}: {code}: {reason}",
            422,
            code,
        )
        delivery.finish()
