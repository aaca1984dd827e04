"""Selection: pure, seeded, with explicit candidates."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from p2pbuild import BuildType, MachineType, PublicKey, Role, TrustEntry
from p2pbuild.dispatcher._errors import NoCapableNodeError
from p2pbuild.dispatcher._select import Candidate, Platform, Requirements, select_nodes
from p2pbuild.testing import example_capability, example_status, make_identity


def candidate(
    name: str,
    operator: str,
    *,
    arch: str = "x86_64",
    os: str = "fedora-41",
    machine: MachineType = MachineType.VM,
    pools: tuple[str, ...] = (),
    rating: float = 0.8,
    slots_free: int = 4,
    draining: bool = False,
    trusted: bool = True,
) -> Candidate:
    key = make_identity(name).public_key
    trust = TrustEntry(key, Role.NODE, operator) if trusted else None
    status = example_status(slots_free=slots_free, draining=draining)
    # example_status has 4 slots; slots_free above 4 is not valid
    return Candidate(
        key, example_capability(arch=arch, os=os, machine=machine, pools=pools), status,
        trust, rating,
    )


def req(**kwargs: object) -> Requirements:
    args: dict[str, object] = {"arch": "x86_64", "os": "fedora-41", "build_type": BuildType.RPM}
    args.update(kwargs)
    return Requirements(**args)  # type: ignore[arg-type]


FARM = [
    candidate("a1", "alice"), candidate("a2", "alice"),
    candidate("b1", "bob"), candidate("b2", "bob"),
    candidate("c1", "carol"), candidate("d1", "dave"),
]


def test_replicas_on_different_operators() -> None:
    rng = random.Random(1)
    for _ in range(200):
        chosen = select_nodes(FARM, req(count=3), rng)
        assert len(chosen) == 3
        assert len({c.operator for c in chosen}) == 3


def test_load_spreads_over_every_eligible_node() -> None:
    rng = random.Random(7)
    counts: Counter[PublicKey] = Counter()
    active: Counter[PublicKey] = Counter()
    for _ in range(600):
        farm = [attrs_evolve(c, active=active[c.key] % 3) for c in FARM]
        for chosen in select_nodes(farm, req(count=2), rng):
            counts[chosen.key] += 1
            active[chosen.key] += 1
    assert set(counts) == {c.key for c in FARM}
    # No node does more than three times the work of another.
    assert max(counts.values()) <= 3 * min(counts.values())


def attrs_evolve(c: Candidate, **changes: object) -> Candidate:
    import attrs

    return attrs.evolve(c, **changes)  # type: ignore[arg-type]


def test_power_of_two_prefers_less_loaded() -> None:
    rng = random.Random(3)
    idle = candidate("idle", "x", slots_free=4)
    busy = candidate("busy", "y", slots_free=0)
    picks = Counter(select_nodes([idle, busy], req(count=1), rng)[0].operator for _ in range(100))
    assert picks["x"] == 100


def test_low_rated_node_rarely_chosen_when_many_good_ones() -> None:
    rng = random.Random(5)
    farm = [candidate(f"g{i}", f"op{i}", rating=0.9) for i in range(6)]
    farm.append(candidate("bad", "evil", rating=0.1))
    picks = Counter(
        c.operator for _ in range(300) for c in select_nodes(farm, req(count=2), rng)
    )
    assert picks["evil"] == 0


@pytest.mark.parametrize(
    ("requirements", "candidates", "message", "constraint"),
    [
        (req(arch="s390x"), FARM, "no trusted node has arch=s390x", "arch"),
        (
            req(count=2),
            [candidate("a1", "alice"), candidate("a2", "alice")],
            "2 nodes match arch=x86_64, os=fedora-41 but all are operator alice; "
            "2 replicas need 2 operators",
            "operators",
        ),
        (req(os="debian-13"), FARM, "6 nodes match arch=x86_64 but none has os=debian-13", "os"),
        (
            req(pool="team-x", team="team-y", dedicated_pools={"team-x": "team-x"}),
            FARM,
            "pool team-x is dedicated to team-x",
            "pool-dedicated",
        ),
        (
            req(machine=MachineType.METAL),
            FARM,
            "6 nodes match arch=x86_64, os=fedora-41 but none has machine=metal",
            "machine",
        ),
        (
            req(min_memory_mb=1_000_000),
            FARM,
            "6 nodes match arch=x86_64, os=fedora-41 but none has memory >= 1000000 MB",
            "memory",
        ),
        (
            req(),
            [candidate("u1", "x", trusted=False)],
            "no trusted node has arch=x86_64 (1 node found, none trusted)",
            "trust",
        ),
        (
            req(count=1),
            [candidate("d", "x", draining=True)],
            "1 node match arch=x86_64, os=fedora-41 but none has a node that is not draining",
            "draining",
        ),
    ],
)
def test_failing_constraint_is_named(
    requirements: Requirements, candidates: list[Candidate], message: str, constraint: str
) -> None:
    with pytest.raises(NoCapableNodeError) as info:
        select_nodes(candidates, requirements, random.Random(0))
    assert str(info.value) == message
    assert info.value.constraint == constraint


def test_dedicated_pool_only_for_its_team() -> None:
    pools = {"gpu": "team-x"}
    farm = [
        candidate("p1", "alice", pools=("gpu",)), candidate("p2", "bob", pools=("gpu",)),
        candidate("o1", "carol"), candidate("o2", "dave"),
    ]
    rng = random.Random(2)
    for _ in range(100):
        outsiders = select_nodes(farm, req(team="team-y", dedicated_pools=pools), rng)
        assert {c.operator for c in outsiders} == {"carol", "dave"}
    team = select_nodes(farm, req(team="team-x", pool="gpu", dedicated_pools=pools), rng)
    assert {c.operator for c in team} == {"alice", "bob"}


def test_platform_affinity_prefers_the_users_machine_type() -> None:
    farm = [
        candidate("v1", "alice"), candidate("v2", "bob"),
        candidate("m1", "carol", machine=MachineType.METAL),
        candidate("m2", "dave", machine=MachineType.METAL),
    ]
    rng = random.Random(4)
    affinity = Platform("x86_64", "fedora-41", MachineType.METAL)
    for _ in range(100):
        chosen = select_nodes(farm, req(affinity=affinity), rng)
        assert {c.capability.machine for c in chosen} == {MachineType.METAL}
    # Not enough operators with that machine type: affinity yields, the build still runs.
    chosen = select_nodes(farm, req(count=3, affinity=affinity), rng)
    assert len({c.operator for c in chosen}) == 3


def test_excluded_operators_and_nodes() -> None:
    rng = random.Random(0)
    chosen = select_nodes(
        FARM, req(count=1, exclude_operators=frozenset({"alice", "bob", "carol"})), rng
    )
    assert chosen[0].operator == "dave"
    with pytest.raises(NoCapableNodeError) as info:
        select_nodes(
            FARM,
            req(count=1, exclude_operators=frozenset({"alice", "bob", "carol"}),
                exclude_nodes=frozenset({make_identity("d1").public_key})),
            rng,
        )
    assert info.value.constraint == "operators-used"
