"""The pull queue's lease state machine: offers, takes, leases, results, tombstones.

Pure, like the build planner: no trio, no clock, no file system. Every call that judges
time takes ``now`` (Unix seconds); what the caller must do afterwards is left in three
outboxes that :meth:`PullLeases.drain` empties (h11's and aioquic's shape: state changes
in, events out):

* ``notify``: jobs whose waiters must look again (taken, put back, delivered, ended);
* ``offered``: a job was queued or put back, so long-polling nodes must look again;
* ``remove``: jobs whose upload directories must be deleted now (ended, replaced, or
  left by a dispatcher before a restart).

``_pull.PullQueue`` is the trio adapter: it reads its clock, calls in, and carries the
outboxes out (sets events, deletes directories, streams uploads to disk). The rules
themselves (who may take a job, how a lease is renewed and when it runs out, what a late
request hears) are in ``_pull``'s module doc.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from pathlib import Path

import attrs

from .._errors import MalformedError, OversizeError, ReplayError
from .._identity import PublicKey
from .._jobs import MAX_RESULT_SIZE, FileDigest, Job, Result
from ._bodies import json_object
from ._errors import (
    JobWithdrawnError,
    LeaseExpiredError,
    NodeBusyError,
    NodeRefusedError,
    ResultMissingError,
    UnknownPullJobError,
)

__all__ = [
    "LEASE_PHASES",
    "TRANSIENT_REFUSALS",
    "LeaseProgress",
    "PullDelivery",
    "PullLeases",
    "PullQueueStatistics",
]

#: What a node may report as its phase in a lease renewal.
LEASE_PHASES = frozenset({"building", "uploading"})
#: Node refusal codes after which the job goes back in the queue for another node.
TRANSIENT_REFUSALS = frozenset({"no-free-slot", "draining", "unavailable"})


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
        value = json_object(body, "a lease renewal", MalformedError)
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
    #: Delivered (result and files here), refused, or ended.
    done: bool = False

    @property
    def complete(self) -> bool:
        if self.result is None:
            return False
        wanted = {("artifacts", f.name) for f in self.result.artifacts}
        wanted |= {("logs", f.name) for f in self.result.logs}
        return wanted <= set(self.files)


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
class PullLeases:
    """The state of every job offered to pull-mode nodes. Bounds: ``max_pending`` jobs
    offered and not taken, ``max_gone`` tombstones, ``max_file_bytes`` per file a result
    may name, ``max_result_bytes`` per result. A taken job must be renewed within
    ``lease_s`` seconds; nodes are told to renew every ``heartbeat_s`` (at most half the
    lease, so one lost renewal is not fatal; :class:`ValueError` otherwise)."""

    lease_s: float = attrs.field(default=60.0, validator=_positive)
    heartbeat_s: float = attrs.field(default=15.0, validator=_positive)
    max_pending: int = 10_000
    max_gone: int = 10_000
    max_file_bytes: int = 4 * 1024**3
    max_result_bytes: int = MAX_RESULT_SIZE
    #: Outboxes (module doc), emptied by :meth:`drain`.
    notify: set[bytes] = attrs.field(factory=set, init=False)
    offered: bool = attrs.field(default=False, init=False)
    remove: list[bytes] = attrs.field(factory=list, init=False)
    _jobs: dict[bytes, PullDelivery] = attrs.field(factory=dict, init=False)
    _pending: collections.deque[bytes] = attrs.field(factory=collections.deque, init=False)
    _gone: collections.OrderedDict[bytes, _Tombstone] = attrs.field(
        factory=collections.OrderedDict, init=False
    )
    _counts: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)

    def __attrs_post_init__(self) -> None:
        if self.lease_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"lease_s ({self.lease_s:g}) must be at least twice heartbeat_s "
                f"({self.heartbeat_s:g})"
            )

    def drain(self) -> tuple[set[bytes], bool, list[bytes]]:
        """Empty the outboxes: (jobs to notify, whether a job was offered, job upload
        directories to remove), in that order of importance for the caller."""
        out = (self.notify, self.offered, self.remove)
        self.notify, self.offered, self.remove = set(), False, []
        return out

    # -- the engine's side -----------------------------------------------------------------------

    def offer(self, node: PublicKey | None, job: Job) -> None:
        """Queue ``job`` for ``node`` (None: any trusted node; a job addressed to one node
        is only ever given to that node). Raises :class:`NodeBusyError` when
        ``max_pending`` jobs are waiting. Offering a job id again replaces the earlier
        offer (whoever waited on it gets :class:`JobWithdrawnError`)."""
        if len(self._pending) >= self.max_pending:
            raise NodeBusyError(f"{self.max_pending} pull jobs are already waiting")
        self._replace(job.job_id)
        self._jobs[job.job_id] = PullDelivery(job, node if node is not None else job.node)
        self._pending.append(job.job_id)
        self.offered = True

    def resume(self, node: PublicKey, job: Job, now: float) -> None:
        """Put back, after a dispatcher restart, a job ``node`` took before it: taken by
        ``node``, with a fresh lease of ``lease_s`` from ``now``. Nobody else can take it.
        Replaces an earlier offer of the id."""
        self._replace(job.job_id)
        delivery = PullDelivery(job, node)
        self._jobs[job.job_id] = delivery
        self._mark_taken(delivery, node, now)

    def withdraw(self, job_id: bytes) -> None:
        """End the job (``_pull.PullQueue.withdraw``). Unknown or already ended: only its
        upload directory is removed (what a dispatcher before a restart left)."""
        delivery = self._jobs.get(job_id)
        if delivery is None:
            self.remove.append(job_id)
            return
        if delivery.taken_by is not None and not delivery.done:
            self._counts["withdrawn_taken"] += 1
        self._end(delivery, JobWithdrawnError(f"job {job_id.hex()} was withdrawn"))

    def release(self, job_id: bytes) -> None:
        """Forget a delivered job (``_pull.PullQueue.release``); one not delivered yet is
        withdrawn. Unknown or already ended: nothing happens."""
        delivery = self._jobs.get(job_id)
        if delivery is None:
            return
        if not delivery.done:
            self.withdraw(job_id)
            return
        self._counts["released"] += 1
        self._end(delivery, JobWithdrawnError(
            f"job {job_id.hex()} was delivered; the dispatcher has its result"
        ))  # fmt: skip

    def delivery(self, job_id: bytes) -> PullDelivery | None:
        """The live delivery of ``job_id`` (offered, taken or delivered), else None."""
        return self._jobs.get(job_id)

    def ended(self, job_id: bytes) -> JobWithdrawnError | LeaseExpiredError:
        """Why a job no longer live ended; raises :class:`UnknownPullJobError` for one
        never offered (or whose tombstone is gone)."""
        tombstone = self._gone.get(job_id)
        if tombstone is None:
            raise UnknownPullJobError(f"no pull job {job_id.hex()}")
        return tombstone.error

    def outcome_of(self, delivery: PullDelivery, now: float) -> Result | None:
        """The delivered result of ``delivery``, None while it is not delivered, judging
        its lease at ``now`` (a lease run out ends the job here). Raises what the job
        ended with: :class:`NodeRefusedError`, :class:`LeaseExpiredError` or
        :class:`JobWithdrawnError` (withdrawn, released, or offered again)."""
        self._lease_due(delivery, now)
        if not delivery.done:
            return None
        if delivery.gone is not None:
            raise delivery.gone
        if delivery.refusal is not None:
            raise delivery.refusal
        assert delivery.result is not None
        return delivery.result

    def statistics(
        self, now: float, waiting_nodes: int, rejected: tuple[tuple[str, int], ...]
    ) -> PullQueueStatistics:
        self.expire_due(now)
        deliveries = list(self._jobs.values())
        return PullQueueStatistics(
            pending=len(self._pending),
            taken=sum(1 for d in deliveries if d.taken_by is not None and not d.done),
            delivered=sum(1 for d in deliveries if d.done and d.refusal is None),
            refused=sum(1 for d in deliveries if d.refusal is not None),
            waiting_nodes=waiting_nodes,
            rejected=rejected,
            leases_expired=self._counts["leases_expired"],
            renewals=self._counts["renewals"],
            withdrawn_taken=self._counts["withdrawn_taken"],
            released=self._counts["released"],
            tombstones=len(self._gone),
        )

    def expire_due(self, now: float) -> int:
        """End every taken job whose lease has run out by ``now``; returns how many."""
        due = [
            d for d in self._jobs.values()
            if d.lease_until is not None and not d.done and d.lease_until <= now
        ]
        for delivery in due:
            self._expire(delivery, now)
        return len(due)

    # -- the node's side ---------------------------------------------------------------------------

    def take(self, node: PublicKey, now: float) -> Job | None:
        """The first pending job ``node`` may take, now taken by it with its lease
        starting at ``now``; None if there is none."""
        for job_id in self._pending:
            delivery = self._jobs[job_id]
            if delivery.for_node is None or delivery.for_node == node:
                self._pending.remove(job_id)
                self._mark_taken(delivery, node, now)
                return delivery.job
        return None

    def taken(self, node: PublicKey, job_id: bytes, now: float) -> PullDelivery:
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
            self._mark_taken(delivery, node, now)
        if delivery is not None and delivery.taken_by == node and self._lease_due(delivery, now):
            delivery = None  # it is a tombstone now: answered below
        if delivery is None:
            ended = self._gone.get(job_id)
            if ended is not None and node in (ended.taken_by, ended.for_node):
                raise ended.error
            raise UnknownPullJobError(f"no job {job_id.hex()} taken by this node")
        if delivery.taken_by != node:
            raise UnknownPullJobError(f"no job {job_id.hex()} taken by this node")
        if not delivery.done:
            delivery.renewed_at = now
            delivery.lease_until = now + self.lease_s
        return delivery

    def renew(
        self, node: PublicKey, job_id: bytes, progress: LeaseProgress, now: float
    ) -> PullDelivery:
        """Renew the lease ``node`` holds on ``job_id`` for another ``lease_s`` and keep its
        ``progress``. Raises what :meth:`taken` raises."""
        delivery = self.taken(node, job_id, now)
        delivery.progress = progress
        delivery.renewals += 1
        self._counts["renewals"] += 1
        return delivery

    def receive_result(self, node: PublicKey, job_id: bytes, data: bytes, now: float) -> Result:
        """Accept the signed result of a job ``node`` took.

        Raises what :meth:`taken` raises (a late result: refused, not stored), the
        result's parse errors, ``wrong-node`` or ``malformed`` if it does not answer that
        job, :class:`OversizeError` for a file over ``max_file_bytes``, and
        :class:`ReplayError` for a second, different result.
        """
        delivery = self.taken(node, job_id, now)
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
            self._finish(delivery)
        return result

    def expect_file(
        self, node: PublicKey, job_id: bytes, kind: str, name: str, now: float
    ) -> tuple[PullDelivery, FileDigest]:
        """The delivery and signed digest of the artifact (``kind="artifacts"``) or log
        (``"logs"``) ``node`` is about to upload. Raises what :meth:`taken` raises, and
        :class:`ResultMissingError` (no result yet, or the result does not name it)."""
        delivery = self.taken(node, job_id, now)
        if delivery.result is None:
            raise ResultMissingError("upload the signed result before its files")
        items = delivery.result.artifacts if kind == "artifacts" else delivery.result.logs
        expected = next((item for item in items if item.name == name), None)
        if expected is None:
            raise ResultMissingError(f"the signed result names no {kind[:-1]} {name!r:.80}")
        return delivery, expected

    def file_arrived(self, delivery: PullDelivery, kind: str, name: str, path: Path) -> None:
        """Keep a verified upload at ``path``; the job is delivered once its result and
        every file it names are here. Raises what :meth:`check_live` raises if the job
        ended while the file streamed in (the caller then deletes the file)."""
        self.check_live(delivery)
        delivery.files[(kind, name)] = path
        if delivery.complete and not delivery.done:
            self._finish(delivery)

    def check_live(self, delivery: PullDelivery) -> None:
        """Raise what the node must hear if ``delivery`` ended (withdrawn, expired,
        released, offered again) while its upload streamed in."""
        job_id = delivery.job.job_id
        if self._jobs.get(job_id) is delivery:
            return
        if job_id not in self._jobs:
            # The upload may have made the directory again after the job's end removed it.
            self.remove.append(job_id)
        ended = self._gone.get(job_id)
        if delivery.gone is not None:
            raise delivery.gone
        if ended is not None:
            raise ended.error
        raise JobWithdrawnError(f"job {job_id.hex()} was withdrawn")

    def receive_refusal(
        self, node: PublicKey, job_id: bytes, code: str, reason: str, now: float
    ) -> None:
        """The node will not run a job it took. A transient reason (no free slot,
        draining) puts the job back in the queue; any other ends it with
        :class:`NodeRefusedError` for its waiter. Raises what :meth:`taken` raises."""
        delivery = self.taken(node, job_id, now)
        if code == "replayed" and delivery.job.node == node:
            # The node already runs this job (taken before a dispatcher restart): its
            # result will come, as a push node's "replayed" answer means "accepted".
            return
        if delivery.done:
            return  # its result is already here
        if code in TRANSIENT_REFUSALS:
            delivery.taken_by = None
            delivery.taken_at = None
            delivery.lease_until = None
            self._pending.appendleft(job_id)
            self.notify.add(job_id)
            self.offered = True
            return
        delivery.refusal = NodeRefusedError(
            f"node {node.fingerprint} refused pulled job {job_id.hex()}: {code}: {reason}",
            422,
            code,
        )
        self._finish(delivery)

    # -- state changes -----------------------------------------------------------------------------

    def _finish(self, delivery: PullDelivery) -> None:
        delivery.lease_until = None
        delivery.done = True
        self.notify.add(delivery.job.job_id)

    def _drop(self, job_id: bytes) -> PullDelivery | None:
        delivery = self._jobs.pop(job_id, None)
        if delivery is not None:
            with contextlib.suppress(ValueError):  # already taken
                self._pending.remove(job_id)
        self._gone.pop(job_id, None)
        return delivery

    def _replace(self, job_id: bytes) -> None:
        old = self._drop(job_id)
        if old is not None and not old.done:
            old.gone = JobWithdrawnError(f"job {job_id.hex()} was offered again")
            self._finish(old)
        # Uploads of an earlier offer, or left by a dispatcher before a restart: nothing
        # refers to them any more (the new delivery starts empty).
        self.remove.append(job_id)

    def _end(self, delivery: PullDelivery, error: JobWithdrawnError | LeaseExpiredError) -> None:
        """Forget the job and have its uploads deleted; keep a small tombstone so the node
        hears ``error``. A job still in flight ends with ``error`` for its waiters."""
        job_id = delivery.job.job_id
        self._drop(job_id)
        if not delivery.done:
            delivery.gone = error
            self._finish(delivery)
        self._gone[job_id] = _Tombstone(delivery.taken_by, delivery.for_node, error)
        while len(self._gone) > self.max_gone:
            self._gone.popitem(last=False)
        self.remove.append(job_id)

    def _mark_taken(self, delivery: PullDelivery, node: PublicKey, now: float) -> None:
        delivery.taken_by = node
        delivery.taken_at = now
        delivery.renewed_at = now
        delivery.lease_until = now + self.lease_s
        self.notify.add(delivery.job.job_id)

    def _expire(self, delivery: PullDelivery, now: float) -> None:
        assert delivery.taken_by is not None and delivery.renewed_at is not None
        silent = now - delivery.renewed_at
        self._counts["leases_expired"] += 1
        self._end(delivery, LeaseExpiredError(
            f"pull node {delivery.taken_by.fingerprint} did not renew the lease of job "
            f"{delivery.job.id_hex} for {silent:.0f} s (lease {self.lease_s:g} s; last heard: "
            f"{delivery.progress.describe()}, {delivery.renewals} renewal(s))"
        ))  # fmt: skip

    def _lease_due(self, delivery: PullDelivery, now: float) -> bool:
        if delivery.lease_until is not None and not delivery.done and delivery.lease_until <= now:
            self._expire(delivery, now)
            return True
        return False

    def jobs(self) -> Iterator[PullDelivery]:
        """Every live delivery (for views and tests)."""
        return iter(list(self._jobs.values()))
