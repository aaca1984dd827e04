"""The lease state machine: pure, explicit ``now``, seeded selection."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import attrs
import pytest

from p2pbuild import BuildType, MachineType, Role, Status, TrustEntry
from p2pbuild._sqlite import statements as _statements
from p2pbuild.dispatcher._db import MIGRATIONS, Database
from p2pbuild.dispatcher._errors import NoCapableNodeError
from p2pbuild.dispatcher._leases import (
    LeaseBook,
    LeaseRefusedError,
    LeaseRequest,
    LeaseState,
    OperatorMode,
    Quotas,
    UnknownLeaseError,
)
from p2pbuild.dispatcher._leasing import insert_lease, load_leases, update_lease
from p2pbuild.dispatcher._select import Candidate, Requirements, select_nodes
from p2pbuild.testing import example_capability, make_identity

T0 = 1_800_000_000.0


def candidate(
    name: str, operator: str, *, slots: int = 1, machine: MachineType = MachineType.VM,
    os: str = "fedora-41", arch: str = "x86_64",
) -> Candidate:
    key = make_identity(name).public_key
    status = Status(load_milli=0, slots_total=slots, slots_free=slots, running=0, uptime_s=60)
    return Candidate(
        key, example_capability(arch=arch, os=os, machine=machine), status,
        TrustEntry(key, Role.NODE, operator), 0.8,
    )


FARM = [
    candidate("a1", "alice"), candidate("a2", "alice"), candidate("a3", "alice"),
    candidate("b1", "bob"), candidate("c1", "carol"), candidate("d1", "dave"),
]


def ask(count: int = 2, duration_s: int = 7200, **kwargs: object) -> LeaseRequest:
    args: dict[str, object] = {"arch": "x86_64", "os": "fedora-41"}
    args.update(kwargs)
    return LeaseRequest(count=count, duration_s=duration_s, **args)  # type: ignore[arg-type]


def test_grant_distinct_operators_names_nodes_and_expiry() -> None:
    book = LeaseBook()
    lease = book.request("L1", ask(3), "u", None, FARM, random.Random(1), T0)
    assert lease.state is LeaseState.ACTIVE
    assert lease.expires_at == T0 + 7200
    assert len(lease.nodes) == 3 and len(lease.operators) == 3
    assert book.get("L1") == lease


def test_same_operator_takes_nodes_of_one_operator() -> None:
    book = LeaseBook()
    lease = book.request("L1", ask(3, operators=OperatorMode.SAME), "u", None, FARM,
                         random.Random(1), T0)
    assert lease.operators == {"alice"} and len({n.key for n in lease.nodes}) == 3
    with pytest.raises(LeaseRefusedError, match="no operator has 4 of them") as info:
        book.request("L2", ask(4, operators=OperatorMode.SAME), "u", None, FARM,
                     random.Random(1), T0)
    assert info.value.constraint in ("operators", "leased")


def test_os_left_open_picks_one_os_and_records_it() -> None:
    farm = [candidate("f1", "alice"), candidate("f2", "bob"),
            candidate("e1", "carol", os="el-9")]
    lease = LeaseBook().request("L1", ask(2, os=None), "u", None, farm, random.Random(1), T0)
    assert lease.request.os == "fedora-41"


def test_held_slots_are_not_granted_or_offered_to_others() -> None:
    book = LeaseBook()
    first = book.request("L1", ask(2), "u1", None, FARM, random.Random(2), T0)
    held = book.held_slots(T0)
    assert held == {n.key: 1 for n in first.nodes}
    # One-slot nodes: a second lease never shares a node with the first.
    second = book.request("L2", ask(2), "u2", None, FARM, random.Random(3), T0)
    assert not {n.key for n in first.nodes} & {n.key for n in second.nodes}
    # Another user's build sees the held nodes as full and filtered out...
    req = Requirements("x86_64", "fedora-41", BuildType.RPM, count=2,
                       held_slots=book.held_slots(T0))
    rng = random.Random(4)
    leased = {n.key for n in first.nodes} | {n.key for n in second.nodes}
    for _ in range(50):
        assert not {c.key for c in select_nodes(FARM, req, rng)} & leased
    # ...and the lease's own build may use only its nodes.
    own = attrs.evolve(req, lease_nodes=frozenset(n.key for n in first.nodes), lease_id="L1",
                       held_slots=book.held_slots(T0, except_lease="L1"))
    for _ in range(50):
        assert {c.key for c in select_nodes(FARM, own, rng)} == {n.key for n in first.nodes}


def test_all_slots_held_names_the_constraint() -> None:
    farm = [candidate("a1", "alice"), candidate("b1", "bob")]
    book = LeaseBook()
    book.request("L1", ask(2), "u1", None, farm, random.Random(1), T0)
    with pytest.raises(LeaseRefusedError, match="a slot not held by another user's lease") as info:
        book.request("L2", ask(1), "u2", None, farm, random.Random(1), T0)
    assert info.value.constraint == "leased"
    req = Requirements("x86_64", "fedora-41", BuildType.RPM, held_slots=book.held_slots(T0))
    with pytest.raises(NoCapableNodeError) as error:
        select_nodes(farm, req, random.Random(1))
    assert error.value.constraint == "leased"


def test_a_node_with_spare_slots_stays_offered_with_the_held_ones_as_load() -> None:
    farm = [candidate("a1", "alice", slots=4), candidate("b1", "bob", slots=4)]
    book = LeaseBook()
    book.request("L1", ask(2), "u1", None, farm, random.Random(1), T0)
    req = Requirements("x86_64", "fedora-41", BuildType.RPM, held_slots=book.held_slots(T0))
    chosen = select_nodes(farm, req, random.Random(1))
    assert len(chosen) == 2 and all(c.held == 1 and c.load == 0.25 for c in chosen)


def test_user_quota_refuses_the_extra_request_with_one_line() -> None:
    book = LeaseBook(Quotas(max_slots_per_user=3))
    book.request("L1", ask(2), "alice", None, FARM, random.Random(1), T0)
    with pytest.raises(LeaseRefusedError) as info:
        book.request("L2", ask(2), "alice", None, FARM, random.Random(1), T0 + 1)
    assert str(info.value) == (
        "quota reached: user alice holds 2 slots of 3; 2 more requested"
    )
    assert info.value.constraint == "quota-user"
    # Another user is not affected; a returned lease frees the quota.
    book.request("L3", ask(2), "bob", None, FARM, random.Random(1), T0 + 1)
    book.done("L1", "alice", T0 + 2)
    book.request("L4", ask(2), "alice", None, FARM, random.Random(1), T0 + 3)


def test_team_quota_counts_every_member() -> None:
    book = LeaseBook(Quotas(max_slots_per_team=2))
    book.request("L1", ask(1), "alice", "ci", FARM, random.Random(1), T0)
    book.request("L2", ask(1), "bob", "ci", FARM, random.Random(1), T0)
    with pytest.raises(LeaseRefusedError, match="team ci holds 2 slots of 2") as info:
        book.request("L3", ask(1), "carol", "ci", FARM, random.Random(1), T0)
    assert info.value.constraint == "quota-team"
    book.request("L4", ask(1), "dave", None, FARM, random.Random(1), T0)


def test_duration_bound() -> None:
    book = LeaseBook(Quotas(max_duration_s=3600))
    with pytest.raises(LeaseRefusedError, match="at most 3600 s") as info:
        book.request("L1", ask(2, duration_s=7200), "u", None, FARM, random.Random(1), T0)
    assert info.value.constraint == "duration"


def test_expiry_frees_slots_exactly_at_expires_at() -> None:
    book = LeaseBook()
    lease = book.request("L1", ask(2, duration_s=100), "u", None, FARM, random.Random(1), T0)
    assert book.next_expiry() == T0 + 100
    assert book.expire_due(T0 + 99.9) == []
    assert book.held_slots(T0 + 99.9)
    # Past its time a lease holds nothing, even before expire_due has run.
    assert book.held_slots(T0 + 100) == {}
    with pytest.raises(LeaseRefusedError, match="expired") as info:
        book.restriction("L1", "u", T0 + 100)
    assert info.value.constraint == "lease-expired"
    (expired,) = book.expire_due(T0 + 130)
    assert expired.id == lease.id and expired.state is LeaseState.EXPIRED
    assert expired.ended_at == T0 + 100
    assert book.expire_due(T0 + 200) == [] and book.next_expiry() is None


def test_extend_done_and_ownership() -> None:
    book = LeaseBook(Quotas(max_duration_s=3 * 3600))
    book.request("L1", ask(2, duration_s=3600), "u", None, FARM, random.Random(1), T0)
    assert book.extend("L1", "u", 1800, T0 + 10).expires_at == T0 + 5400
    with pytest.raises(LeaseRefusedError, match="at most 10800 s from now"):
        book.extend("L1", "u", 3 * 3600, T0 + 10)
    with pytest.raises(LeaseRefusedError, match="belongs to another user") as info:
        book.extend("L1", "mallory", 60, T0 + 10)
    assert info.value.constraint == "not-yours"
    with pytest.raises(LeaseRefusedError, match="belongs to another user"):
        book.done("L1", "mallory", T0 + 10)
    done = book.done("L1", "admin", T0 + 20, admin=True)
    assert done.state is LeaseState.DONE and done.ended_at == T0 + 20
    assert book.held_slots(T0 + 21) == {}
    with pytest.raises(LeaseRefusedError, match="was returned"):
        book.extend("L1", "u", 60, T0 + 30)
    with pytest.raises(UnknownLeaseError):
        book.get("L9")


def test_a_verified_build_needs_two_operators_in_the_lease() -> None:
    book = LeaseBook()
    book.request("S", ask(2, operators=OperatorMode.SAME), "u", None, FARM,
                 random.Random(1), T0)
    with pytest.raises(LeaseRefusedError, match="needs 2") as info:
        book.check_use("S", "u", 2, T0)
    assert info.value.constraint == "operators"
    book.request("D", ask(2), "u", None, FARM, random.Random(1), T0)
    assert book.check_use("D", "u", 2, T0).id == "D"
    with pytest.raises(LeaseRefusedError, match="needs 3"):
        book.check_use("D", "u", 3, T0)


def test_no_node_of_that_kind_is_named() -> None:
    with pytest.raises(LeaseRefusedError, match="no trusted node has arch=s390x") as info:
        LeaseBook().request("L1", ask(1, arch="s390x"), "u", None, FARM, random.Random(1), T0)
    assert info.value.constraint == "arch"
    with pytest.raises(LeaseRefusedError, match="none has machine=metal"):
        LeaseBook().request("L1", ask(1, machine=MachineType.METAL), "u", None, FARM,
                            random.Random(1), T0)


def test_request_values_are_checked() -> None:
    with pytest.raises(ValueError, match="count"):
        ask(0)
    with pytest.raises(ValueError, match="count must be at most 64"):
        ask(65)
    with pytest.raises(ValueError, match="duration_s"):
        ask(1, duration_s=0)


def test_leases_persist_with_their_audit_and_a_v1_database_migrates(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    old = sqlite3.connect(path)
    for statement in _statements(MIGRATIONS[0]):
        old.execute(statement)
    old.execute("PRAGMA user_version=1")
    old.execute(
        "INSERT INTO builds (id, created_at, updated_at, user, state, source_name, "
        "source_sha256, source_size, source_ready, build_type, arch, os, replicas, "
        "time_limit_s) VALUES ('b', 1, 1, 'u', 'queued', 's', 'x', 1, 1, 'rpm', 'x86_64', "
        "'fedora-41', 2, 60)"
    )
    old.commit()
    old.close()
    db = Database.open(path)
    assert db.schema_version == len(MIGRATIONS) and db.build("b").lease_id is None
    book = LeaseBook()
    lease = book.request("L1", ask(2), "u", "t", FARM, random.Random(1), T0)
    insert_lease(db, lease, T0)
    update_lease(db, book.extend("L1", "u", 60, T0 + 1), "lease-extended", T0 + 1, by_s=60)
    db.close()
    again = Database.open(path)
    (loaded,) = load_leases(again)
    assert loaded == book.get("L1")
    assert [e.event for e in again.audit_entries()] == ["lease-granted", "lease-extended"]
    assert all(e.detail["lease"] == "L1" for e in again.audit_entries())
