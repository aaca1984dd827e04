"""The build planner: each decision from explicit attempts and an explicit ``now``."""

from __future__ import annotations

import hashlib
from pathlib import Path

from p2pbuild import BuildType, FileDigest, Job, JobSpec, Result, SourceArtifact, Target
from p2pbuild.dispatcher._db import AttemptRow, AttemptState, BuildRow, BuildState
from p2pbuild.dispatcher._engine import EngineConfig
from p2pbuild.dispatcher._errors import NoCapableNodeError
from p2pbuild.dispatcher._plan import (
    Attempt,
    Choose,
    Complete,
    Fail,
    TieBreak,
    Wait,
    after_no_node,
    plan,
)
from p2pbuild.testing import make_identity, make_trust_list

CONFIG = EngineConfig(
    state_dir=Path("/nonexistent"), max_attempts=4, max_tiebreaks=1, node_retry_base_s=5.0,
    backoff_max_s=60.0, no_node_wait_s=300.0,
)
NOW = 10_000.0
JOB = Job.create(
    make_trust_list().dispatchers["dispatcher-1"],
    JobSpec(SourceArtifact("a.src.rpm", 1, bytes(32)), BuildType.RPM, Target("x86_64", "f")),
    issued_at=1000, lifetime=600,
)
GOOD = {"a-1.rpm": b"rpm"}
BAD = {"a-1.rpm": b"evil"}


def build(replicas: int = 2) -> BuildRow:
    return BuildRow(id="b1", created_at=0.0, updated_at=0.0, user="u", team=None,
                    state=BuildState.RUNNING, replicas=replicas)


_ids = iter(range(1, 1000))


def attempt(
    node: str, operator: str, state: AttemptState, files: dict[str, bytes] | None = None, *,
    role: str = "replica", ended_at: float | None = None, result_state: str = "succeeded",
) -> Attempt:
    identity = make_identity(node)
    row = AttemptRow(
        id=next(_ids), build_id="b1", node=str(identity.public_key), operator=operator,
        endpoint="https://n", tls_sha256=bytes(32), role=role, job_id=JOB.id_hex,
        job=b"", state=state, reason="", created_at=0.0, sent_at=None, ended_at=ended_at,
    )
    result = None
    if files is not None:
        result = Result.create(
            identity, JOB, state=result_state, exit_code=0, started_ms=0, ended_ms=1000,
            environment={}, logs=[],
            artifacts=[FileDigest(n, len(c), hashlib.sha256(c).digest())
                       for n, c in files.items()],
        )
    return Attempt(row, result)


def test_first_step_chooses_two_operators() -> None:
    assert plan(build(), [], NOW, CONFIG) == Choose(2, "replica", frozenset(), {})


def test_running_replicas_mean_wait_for_a_change() -> None:
    attempts = [attempt("n1", "alice", AttemptState.RUNNING),
                attempt("n2", "bob", AttemptState.PENDING)]
    action = plan(build(), attempts, NOW, CONFIG)
    assert isinstance(action, Wait) and action.until is None


def test_two_operators_agreeing_complete_the_build() -> None:
    attempts = [attempt("n1", "alice", AttemptState.SUCCEEDED, GOOD),
                attempt("n2", "bob", AttemptState.SUCCEEDED, GOOD)]
    action = plan(build(), attempts, NOW, CONFIG)
    assert isinstance(action, Complete)
    assert [r.operator for r in action.verdict.proof] == ["alice", "bob"]


def test_a_third_requested_replica_still_building_is_waited_for() -> None:
    attempts = [attempt("n1", "alice", AttemptState.SUCCEEDED, GOOD),
                attempt("n2", "bob", AttemptState.SUCCEEDED, GOOD),
                attempt("n3", "carol", AttemptState.RUNNING)]
    assert plan(build(replicas=3), attempts, NOW, CONFIG) == Wait(
        reason="the other requested replicas are still building"
    )
    assert isinstance(plan(build(replicas=2), attempts, NOW, CONFIG), Complete)


def test_a_lost_node_is_replaced_and_excluded_for_a_doubling_backoff() -> None:
    attempts = [attempt("n1", "alice", AttemptState.LOST, ended_at=NOW - 1),
                attempt("n1", "alice", AttemptState.LOST, ended_at=NOW - 2),
                attempt("n2", "bob", AttemptState.RUNNING)]
    action = plan(build(), attempts, NOW, CONFIG)
    n1 = str(make_identity("n1").public_key)
    # Two losses: 5 s * 2 after the later one ended.
    assert action == Choose(1, "replacement", frozenset({"bob"}), {n1: NOW - 1 + 10.0})


def test_an_exclusion_that_ended_is_not_kept() -> None:
    attempts = [attempt("n1", "alice", AttemptState.LOST, ended_at=NOW - 6)]
    assert plan(build(), attempts, NOW, CONFIG) == Choose(2, "replacement", frozenset(), {})


def test_failure_on_two_operators_fails_with_the_result_states() -> None:
    attempts = [attempt("n1", "alice", AttemptState.FAILED, {}, result_state="failed"),
                attempt("n2", "bob", AttemptState.FAILED, {}, result_state="failed")]
    action = plan(build(), attempts, NOW, CONFIG)
    assert action == Fail("the build failed on 2 operators (alice, bob): failed")


def test_out_of_attempts_fails_naming_the_last_reasons() -> None:
    attempts = [attempt(f"n{i}", "alice", AttemptState.LOST, ended_at=0.0) for i in range(4)]
    action = plan(build(), attempts, NOW, CONFIG)
    assert isinstance(action, Fail)
    assert action.reason.startswith("gave up after 4 attempts (alice: lost; ")


def test_attempts_left_bound_how_many_are_chosen() -> None:
    attempts = [attempt(f"n{i}", "alice", AttemptState.LOST, ended_at=0.0) for i in range(3)]
    action = plan(build(), attempts, NOW, CONFIG)
    assert isinstance(action, Choose) and action.count == 1


def test_disagreement_asks_for_a_tiebreak_on_a_new_operator() -> None:
    attempts = [attempt("n1", "alice", AttemptState.SUCCEEDED, GOOD),
                attempt("n2", "mallory", AttemptState.SUCCEEDED, BAD)]
    action = plan(build(), attempts, NOW, CONFIG)
    assert isinstance(action, TieBreak)
    assert action.choose == Choose(1, "tiebreak", frozenset({"alice", "mallory"}), {})
    assert len(action.disagreement.groups) == 2


def test_a_running_tiebreak_is_waited_for_and_the_bound_fails_the_build() -> None:
    first = [attempt("n1", "alice", AttemptState.SUCCEEDED, GOOD),
             attempt("n2", "mallory", AttemptState.SUCCEEDED, BAD)]
    running = [*first, attempt("n3", "carol", AttemptState.RUNNING, role="tiebreak")]
    action = plan(build(), running, NOW, CONFIG)
    assert isinstance(action, TieBreak) and action.choose is None
    lost = [*first, attempt("n3", "carol", AttemptState.LOST, role="tiebreak", ended_at=0.0)]
    action = plan(build(), lost, NOW, CONFIG)
    assert isinstance(action, Fail) and action.disagreement is not None
    assert action.reason == "replicas disagree after 1 tie-break(s); nothing stored"


def test_no_node_for_a_lasting_reason_fails_at_once() -> None:
    choose = Choose(2, "replica", frozenset())
    error = NoCapableNodeError("no node has arch=s390x", "arch")
    assert after_no_node(error, choose, None, NOW, CONFIG) == Fail("no node has arch=s390x")


def test_no_node_for_a_passing_reason_waits_until_an_exclusion_ends() -> None:
    choose = Choose(1, "replacement", frozenset(), {"k1": NOW + 20, "k2": NOW + 7})
    error = NoCapableNodeError("all excluded", "excluded")
    assert after_no_node(error, choose, None, NOW, CONFIG) == Wait(NOW + 7, "all excluded")
    bare = Choose(1, "replacement", frozenset())
    assert after_no_node(error, bare, NOW - 10, NOW, CONFIG) == Wait(NOW + 5.0, "all excluded")
    # Waited longer than no_node_wait_s: give up with the selection's reason.
    assert after_no_node(error, bare, NOW - 301, NOW, CONFIG) == Fail("all excluded")


def test_a_tie_break_without_another_operator_fails_at_once() -> None:
    error = NoCapableNodeError("all excluded", "excluded")
    tiebreak = Choose(1, "tiebreak", frozenset({"alice", "bob"}))
    assert after_no_node(error, tiebreak, None, NOW, CONFIG, other_operators=False) == Fail(
        "replicas disagree and the trust list names no node of another operator to break "
        "the tie; nothing stored"
    )
    assert after_no_node(error, tiebreak, None, NOW, CONFIG) == Wait(NOW + 5.0, "all excluded")
    assert after_no_node(error, tiebreak, NOW - 301, NOW, CONFIG) == Fail(
        "replicas disagree and no node could break the tie: all excluded; nothing stored"
    )
