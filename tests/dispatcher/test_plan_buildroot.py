"""The planner and buildroot failures: a node that could not reach a repository hands the
job back and another node is chosen; a missing build dependency on two operators fails the
build with the node's reason."""

from __future__ import annotations

from test_dispatch_plan import CONFIG, JOB, NOW, build

from p2pbuild import Result
from p2pbuild.dispatcher._db import AttemptRow, AttemptState
from p2pbuild.dispatcher._plan import Attempt, Choose, Fail, plan
from p2pbuild.testing import make_identity

_ids = iter(range(5000, 6000))


def failed(node: str, operator: str, state: str, reason: str) -> Attempt:
    identity = make_identity(node)
    row = AttemptRow(
        id=next(_ids), build_id="b1", node=str(identity.public_key), operator=operator,
        endpoint="https://n", tls_sha256=bytes(32), role="replica", job_id=JOB.id_hex,
        job=b"", state=AttemptState.FAILED, reason=f"build {state}: {reason}",
        created_at=0.0, sent_at=None, ended_at=NOW - 1,
    )
    result = Result.create(identity, JOB, state=state, exit_code=None, started_ms=0,
                           ended_ms=1, environment={"reason": reason}, artifacts=[], logs=[])
    return Attempt(row, result)


def running(node: str, operator: str) -> Attempt:
    row = AttemptRow(
        id=next(_ids), build_id="b1", node=str(make_identity(node).public_key),
        operator=operator, endpoint="https://n", tls_sha256=bytes(32), role="replica",
        job_id=JOB.id_hex, job=b"", state=AttemptState.RUNNING, reason="", created_at=0.0,
        sent_at=None, ended_at=None,
    )
    return Attempt(row, None)


def test_a_handed_back_unreachable_repository_gets_a_replacement() -> None:
    attempts = [failed("n1", "alice", "handed-back", "repo-unreachable: cannot fetch x"),
                running("n2", "bob")]
    action = plan(build(), attempts, NOW, CONFIG)
    assert isinstance(action, Choose)
    assert action.count == 1 and action.role == "replacement"
    assert action.exclude_operators == frozenset({"bob"})


def test_a_missing_dependency_on_two_operators_fails_with_the_reason() -> None:
    reason = "missing-build-dependency: p2pbuild-greet-devel"
    attempts = [failed("n1", "alice", "rejected", reason), failed("n2", "bob", "rejected", reason)]
    action = plan(build(), attempts, NOW, CONFIG)
    assert isinstance(action, Fail)
    assert action.reason == (
        "the build failed on 2 operators (alice, bob): rejected: " + reason
    )
