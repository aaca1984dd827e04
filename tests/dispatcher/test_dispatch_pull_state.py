"""The pull lease state machine on its own: explicit ``now``, no trio, outboxes checked."""

from __future__ import annotations

import pytest
from pull_fixtures import NODE_1, NODE_2, T0, job_for

from p2pbuild import Job, Result
from p2pbuild.dispatcher._errors import (
    JobWithdrawnError,
    LeaseExpiredError,
    NodeBusyError,
    NodeRefusedError,
    UnknownPullJobError,
)
from p2pbuild.dispatcher._pull_state import LeaseProgress, PullLeases


def result_bytes(job: Job) -> bytes:
    return Result.create(
        NODE_1, job, state="succeeded", exit_code=0, started_ms=1, ended_ms=2,
        environment={}, artifacts=[], logs=[],
    ).to_bytes()


def test_a_lease_lives_while_renewed_and_ends_exactly_at_lease_s() -> None:
    leases = PullLeases(lease_s=60.0, heartbeat_s=15.0)
    job = job_for(NODE_1, issued_at=int(T0))
    leases.offer(NODE_1.public_key, job)
    assert leases.drain() == (set(), True, [job.job_id])  # long-pollers look; no old files
    assert leases.take(NODE_2.public_key, T0) is None  # addressed to NODE_1 only
    assert leases.take(NODE_1.public_key, T0) == job
    assert leases.drain()[0] == {job.job_id}
    delivery = leases.renew(NODE_1.public_key, job.job_id, LeaseProgress("building"), T0 + 59)
    assert delivery.lease_until == T0 + 119 and delivery.renewals == 1
    assert leases.outcome_of(delivery, T0 + 118.9) is None
    with pytest.raises(LeaseExpiredError, match="did not renew the lease"):
        leases.outcome_of(delivery, T0 + 119)
    notify, offered, remove = leases.drain()
    assert notify == {job.job_id} and not offered and remove == [job.job_id]
    # The node's late request hears the same, and nothing is kept.
    with pytest.raises(LeaseExpiredError):
        leases.renew(NODE_1.public_key, job.job_id, LeaseProgress(), T0 + 120)
    with pytest.raises(UnknownPullJobError):
        leases.renew(NODE_2.public_key, job.job_id, LeaseProgress(), T0 + 120)
    assert leases.statistics(T0 + 120, 0, ()).leases_expired == 1


def test_delivery_release_and_withdrawal_leave_tombstones() -> None:
    leases = PullLeases(lease_s=60.0, heartbeat_s=15.0, max_gone=1)
    job, other = job_for(NODE_1, issued_at=int(T0)), job_for(NODE_1, issued_at=int(T0) + 1)
    leases.offer(None, job)
    leases.offer(None, other)
    assert leases.take(NODE_1.public_key, T0) == job
    leases.receive_result(NODE_1.public_key, job.job_id, result_bytes(job), T0 + 1)
    delivery = leases.delivery(job.job_id)
    assert delivery is not None and delivery.done
    assert leases.outcome_of(delivery, T0 + 500) is not None  # delivered: no lease to judge
    leases.release(job.job_id)
    with pytest.raises(JobWithdrawnError, match="dispatcher has its result"):
        leases.renew(NODE_1.public_key, job.job_id, LeaseProgress(), T0 + 2)
    leases.withdraw(other.job_id)
    assert isinstance(leases.ended(other.job_id), JobWithdrawnError)
    with pytest.raises(UnknownPullJobError):  # max_gone=1: the older tombstone is gone
        leases.ended(job.job_id)


def test_refusals_requeue_or_end_and_the_pending_bound_holds() -> None:
    leases = PullLeases(lease_s=60.0, heartbeat_s=15.0, max_pending=1)
    job = job_for(None, issued_at=int(T0))
    leases.offer(None, job)
    with pytest.raises(NodeBusyError):
        leases.offer(None, job_for(None, issued_at=int(T0) + 1))
    assert leases.take(NODE_1.public_key, T0) == job
    leases.receive_refusal(NODE_1.public_key, job.job_id, "no-free-slot", "", T0 + 1)
    assert leases.drain()[1] is True  # back in the queue for another node
    assert leases.take(NODE_2.public_key, T0 + 2) == job
    leases.receive_refusal(NODE_2.public_key, job.job_id, "unservable", "s390x", T0 + 3)
    delivery = leases.delivery(job.job_id)
    assert delivery is not None
    with pytest.raises(NodeRefusedError, match="unservable"):
        leases.outcome_of(delivery, T0 + 4)


def test_the_lease_must_cover_two_heartbeats() -> None:
    with pytest.raises(ValueError, match="at least twice heartbeat_s"):
        PullLeases(lease_s=20.0, heartbeat_s=15.0)
