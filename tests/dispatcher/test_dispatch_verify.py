"""Verification across operators, and the difference report."""

from __future__ import annotations

import hashlib

from p2pbuild import BuildType, FileDigest, Identity, Job, JobSpec, Result, SourceArtifact, Target
from p2pbuild.dispatcher._verify import (
    NeedReplicas,
    NeedTieBreak,
    Replica,
    Verified,
    assess,
    difference_report,
)
from p2pbuild.testing import make_identity, make_trust_list

FIXTURE = make_trust_list()
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
JOB = Job.create(
    DISPATCHER,
    JobSpec(SourceArtifact("a.src.rpm", 1, bytes(32)), BuildType.RPM, Target("x86_64", "f")),
    issued_at=1000, lifetime=600,
)


def result(node: Identity, files: dict[str, bytes], state: str = "succeeded") -> Result:
    return Result.create(
        node, JOB, state=state, exit_code=0, started_ms=0, ended_ms=1000, environment={},
        artifacts=[FileDigest(n, len(c), hashlib.sha256(c).digest()) for n, c in files.items()],
        logs=[],
    )


GOOD = {"hello-1.0-1.x86_64.rpm": b"rpm", "hello-debuginfo.rpm": b"dbg"}
BAD = {"hello-1.0-1.x86_64.rpm": b"evil", "hello-debuginfo.rpm": b"dbg"}


def replica(name: str, operator: str, files: dict[str, bytes], attempt: int) -> Replica:
    node = make_identity(name)
    return Replica(node.public_key, operator, result(node, files), attempt)


def test_two_operators_agree() -> None:
    verdict = assess([replica("n1", "alice", GOOD, 1), replica("n2", "bob", GOOD, 2)])
    assert isinstance(verdict, Verified)
    assert [r.operator for r in verdict.proof] == ["alice", "bob"]
    assert verdict.outliers == ()


def test_same_operator_never_verifies_itself() -> None:
    verdict = assess([replica("n1", "alice", GOOD, 1), replica("n2", "alice", GOOD, 2)])
    assert isinstance(verdict, NeedReplicas)
    assert verdict.missing == 1
    assert verdict.operators == {"alice"}


def test_mismatch_needs_tiebreak_which_decides() -> None:
    honest, tamper = replica("n1", "alice", GOOD, 1), replica("n2", "mallory", BAD, 2)
    verdict = assess([honest, tamper])
    assert isinstance(verdict, NeedTieBreak)
    assert verdict.operators == {"alice", "mallory"}
    tiebreak = replica("n3", "carol", GOOD, 3)
    verdict = assess([honest, tamper, tiebreak])
    assert isinstance(verdict, Verified)
    assert {r.operator for r in verdict.proof} == {"alice", "carol"}
    assert [r.operator for r in verdict.outliers] == ["mallory"]


def test_three_way_disagreement_stays_unverified() -> None:
    third = {"hello-1.0-1.x86_64.rpm": b"other", "hello-debuginfo.rpm": b"dbg"}
    verdict = assess([
        replica("n1", "alice", GOOD, 1), replica("n2", "bob", BAD, 2),
        replica("n3", "carol", third, 3),
    ])
    assert isinstance(verdict, NeedTieBreak)


def test_failed_results_do_not_count() -> None:
    node = make_identity("n2")
    failed = Replica(node.public_key, "bob", result(node, GOOD, "failed"), 2)
    verdict = assess([replica("n1", "alice", GOOD, 1), failed])
    assert isinstance(verdict, NeedReplicas)


def test_report_lists_differing_files_with_digests() -> None:
    groups = [[replica("n1", "alice", GOOD, 1)], [replica("n2", "mallory", BAD, 2)]]
    report = difference_report(groups)
    assert "hello-1.0-1.x86_64.rpm" in report
    assert hashlib.sha256(b"rpm").hexdigest() in report
    assert hashlib.sha256(b"evil").hexdigest() in report
    assert "identical in every group: hello-debuginfo.rpm" in report
    assert "(alice)" in report and "(mallory)" in report
    missing = difference_report(
        [[replica("n1", "alice", GOOD, 1)], [replica("n2", "bob", {"x": b"1"}, 2)]]
    )
    assert "(missing)" in missing
