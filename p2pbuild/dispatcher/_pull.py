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

Every decision above is the pure lease state machine's (``_pull_state.PullLeases``: calls
with ``now`` in, jobs to wake and directories to delete out); :class:`PullQueue` is its trio
adapter (clock, events, uploads streamed to disk), and ``_pull_routes.py`` its HTTPS routes.
The errors a node hears (:class:`UnknownPullJobError`, :class:`ResultMissingError`,
:class:`JobWithdrawnError`, :class:`LeaseExpiredError`) live in the error tree
(``_errors.py``).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hashlib
import math
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import attrs
import trio

from .._errors import MalformedError, OversizeError, P2PBuildError
from .._identity import PublicKey
from .._jobs import (
    DEFAULT_JOB_POLICY,
    MAX_RESULT_SIZE,
    FileDigest,
    Job,
    JobPolicy,
    Result,
)
from .._orders import MAX_PULL_AUTH_SIZE, PullAuth
from .._replay import ReplayCache
from .._trust import TrustList
from ._errors import (
    ArtifactDigestError,
    AuthenticationError,
    JobWithdrawnError,
    LeaseExpiredError,
    ResultMissingError,
    UnknownPullJobError,
)
from ._pull_state import (
    LEASE_PHASES,
    TRANSIENT_REFUSALS,
    LeaseProgress,
    PullDelivery,
    PullLeases,
    PullQueueStatistics,
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
_TRANSIENT = TRANSIENT_REFUSALS
#: Response headers of a long-poll that hands out a job.
LEASE_HEADER = "X-P2PBuild-Lease-S"
HEARTBEAT_HEADER = "X-P2PBuild-Heartbeat-S"
_MAX_PROGRESS_BYTES = 4096


@attrs.define(eq=False)
class PullQueue:
    """Jobs waiting for pull-mode nodes, and what those nodes upload: the trio adapter of
    the lease state machine (``_pull_state.PullLeases``), which holds every decision.

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
    lease_s: float = 60.0
    heartbeat_s: float = 15.0
    max_gone: int = 10_000
    _state: PullLeases = attrs.field(init=False)
    #: Per job, what its waiters sleep on until the state machine notifies it.
    _events: dict[bytes, trio.Event] = attrs.field(factory=dict, init=False)
    #: What long-polling nodes sleep on until a job is offered or put back.
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _waiting_nodes: int = attrs.field(default=0, init=False)
    _rejected: collections.Counter[str] = attrs.field(
        factory=collections.Counter, init=False
    )

    def __attrs_post_init__(self) -> None:
        self._state = PullLeases(
            lease_s=self.lease_s, heartbeat_s=self.heartbeat_s, max_pending=self.max_pending,
            max_gone=self.max_gone, max_file_bytes=self.max_file_bytes,
            max_result_bytes=self.max_result_bytes,
        )

    def _flush(self) -> None:
        """Carry out what the state machine asked for: delete upload directories (at once,
        so nothing sees a job gone and its files still there), wake its waiters."""
        notify, offered, remove = self._state.drain()
        for job_id in remove:
            # A missing directory is the common case; an upload still streaming into a
            # removed directory deletes its own part file.
            shutil.rmtree(self.files_dir / job_id.hex(), ignore_errors=True)
        for job_id in notify:
            event = self._events.pop(job_id, None)
            if event is not None:
                event.set()
        if offered:
            self._changed.set()
            self._changed = trio.Event()

    @contextlib.contextmanager
    def _step(self) -> Iterator[float]:
        """One call into the state machine at the clock's ``now``, flushed even when it
        raises (a lease judged expired has still ended the job)."""
        try:
            yield self.clock()
        finally:
            self._flush()

    def _event(self, job_id: bytes) -> trio.Event:
        event = self._events.get(job_id)
        if event is None:
            event = self._events[job_id] = trio.Event()
        return event

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
        with self._step():
            self._state.offer(node, job)
        return job

    def offer_bytes(self, job_bytes: bytes, for_node: PublicKey | None = None) -> Job:
        """:meth:`offer` with the arguments the other way round."""
        return self.offer(for_node, job_bytes)

    def resume(self, node: PublicKey, job: Job) -> Job:
        """Put back, after a dispatcher restart, a job ``node`` took before it: taken by
        ``node``, with a fresh lease of ``lease_s`` from now. A node that still builds it
        renews and uploads as before; a node that died meanwhile is lost one lease period
        after the restart. Nobody else can take it. Replaces an earlier offer of the id."""
        with self._step() as now:
            self._state.resume(node, job, now)
        return job

    def withdraw(self, job_id: bytes) -> None:
        """End the job: not taken yet, nobody gets it; taken, the node's next request about
        it (lease renewal, upload) is answered ``410 withdrawn``, so it stops the build.
        Anyone in :meth:`wait_result` or :meth:`wait_taken` gets
        :class:`JobWithdrawnError`. A job whose result (or refusal) is already here is
        forgotten as by :meth:`release`. Either way its uploads are deleted and a tombstone
        answers the node. Unknown or already ended: nothing happens, but for deleting
        what a dispatcher before a restart left in the job's upload directory."""
        with self._step():
            self._state.withdraw(job_id)

    def release(self, job_id: bytes) -> None:
        """The engine has kept what it needs of the job (its result stored durably, its
        artifacts copied): forget the job and delete its uploads. What :meth:`artifact`
        returned before is gone after this. The node's late requests about the job are
        answered ``410 withdrawn`` (the dispatcher will never want them); ``wait_result``
        raises :class:`JobWithdrawnError`. A job not delivered yet is withdrawn. Unknown or
        already ended: nothing happens."""
        with self._step():
            self._state.release(job_id)

    def delivery(self, job_id: bytes) -> PullDelivery | None:
        """The live delivery of ``job_id`` (offered, taken or delivered), else None."""
        return self._state.delivery(job_id)

    async def wait_taken(self, job_id: bytes) -> None:
        """Wait until a node took the job (or it ended otherwise: the outcome is then
        :meth:`wait_result`'s). Raises :class:`UnknownPullJobError` for a job not offered
        and :class:`JobWithdrawnError` for one withdrawn."""
        delivery = self._state.delivery(job_id)
        if delivery is None:
            error = self._state.ended(job_id)
            if isinstance(error, JobWithdrawnError):
                raise error
            await trio.lowlevel.checkpoint()
            return
        while delivery.taken_by is None and not delivery.done:
            await self._event(job_id).wait()
        if isinstance(delivery.gone, JobWithdrawnError):
            raise delivery.gone

    async def wait_result(self, job_id: bytes) -> Result:
        """Wait until the node uploaded the job's signed result and every file it names.

        Raises :class:`NodeRefusedError` if the node refused the job for good,
        :class:`LeaseExpiredError` when the taking node stopped renewing its lease (this
        returns about ``lease_s`` after its last renewal), :class:`JobWithdrawnError` for a
        job withdrawn and :class:`UnknownPullJobError` for one never offered.
        """
        delivery = self._state.delivery(job_id)
        if delivery is None:
            raise self._state.ended(job_id)
        while True:
            with self._step() as now:
                result = self._state.outcome_of(delivery, now)
            if result is not None:
                return result
            # Offered and not taken: no deadline here; taken: wake at the lease's end.
            remaining = math.inf
            if delivery.lease_until is not None:
                remaining = delivery.lease_until - self.clock()
            with trio.move_on_after(max(remaining, 0.0)):
                await self._event(job_id).wait()

    def artifact(self, job_id: bytes, name: str) -> Path | None:
        """Where the verified upload of artifact ``name`` is, or None."""
        delivery = self._state.delivery(job_id)
        return None if delivery is None else delivery.files.get(("artifacts", name))

    def log(self, job_id: bytes, name: str) -> Path | None:
        delivery = self._state.delivery(job_id)
        return None if delivery is None else delivery.files.get(("logs", name))

    def statistics(self) -> PullQueueStatistics:
        with self._step() as now:
            return self._state.statistics(
                now, self._waiting_nodes, tuple(sorted(self._rejected.items()))
            )

    def expire_due(self) -> int:
        """End every taken job whose lease has run out; returns how many. (Each job is also
        judged whenever it is looked at; this is for counters and tests.)"""
        with self._step() as now:
            return self._state.expire_due(now)

    # -- the node's side ---------------------------------------------------------------------------

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

    async def take(self, node: PublicKey, timeout: float) -> Job | None:
        """The next job for ``node``, waiting up to ``timeout`` seconds; None if none came.
        Its lease starts now."""
        self._waiting_nodes += 1
        try:
            with trio.move_on_after(timeout):
                while True:
                    changed = self._changed
                    with self._step() as now:
                        job = self._state.take(node, now)
                    if job is not None:
                        return job
                    await changed.wait()
            return None
        finally:
            self._waiting_nodes -= 1

    def renew(self, node: PublicKey, job_id: bytes, progress: LeaseProgress) -> PullDelivery:
        """Renew the lease ``node`` holds on ``job_id`` for another ``lease_s`` and keep its
        ``progress``. Raises :class:`UnknownPullJobError`, :class:`LeaseExpiredError` (too
        late: the job is lost and may run elsewhere) and :class:`JobWithdrawnError` (stop
        the build)."""
        with self._step() as now:
            return self._state.renew(node, job_id, progress, now)

    def receive_result(self, node: PublicKey, job_id: bytes, data: bytes) -> Result:
        """Accept the signed result of a job ``node`` took.

        Raises :class:`UnknownPullJobError`, :class:`LeaseExpiredError` or
        :class:`JobWithdrawnError` (a late result: refused, not stored), the result's parse
        errors, ``wrong-node`` or ``malformed`` if it does not answer that job, and
        :class:`ReplayError` for a second, different result.
        """
        with self._step() as now:
            return self._state.receive_result(node, job_id, data, now)

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
        with self._step() as now:
            delivery, expected = self._state.expect_file(node, job_id, kind, name, now)
        dest = self.files_dir / job_id.hex() / kind / expected.name
        part = dest.with_name(dest.name + ".part")
        await trio.to_thread.run_sync(lambda: part.parent.mkdir(parents=True, exist_ok=True))
        digest = hashlib.sha256()
        size = 0
        try:
            f: BinaryIO = await trio.to_thread.run_sync(part.open, "wb")
        except FileNotFoundError:
            # The job ended and its directory went between the mkdir and the open.
            with self._step():
                self._state.check_live(delivery)
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
        if self._state.delivery(job_id) is not delivery:
            part.unlink(missing_ok=True)
            with self._step():
                self._state.check_live(delivery)
        os.replace(part, dest)
        with self._step():
            self._state.file_arrived(delivery, kind, expected.name, dest)
        return expected

    def receive_refusal(self, node: PublicKey, job_id: bytes, code: str, reason: str) -> None:
        """The node will not run a job it took. A transient reason (no free slot,
        draining) puts the job back in the queue; any other ends it with
        :class:`NodeRefusedError` for :meth:`wait_result`. Raises
        :class:`UnknownPullJobError` (and the ended-job errors of a late request)."""
        with self._step() as now:
            self._state.receive_refusal(node, job_id, code, reason, now)
