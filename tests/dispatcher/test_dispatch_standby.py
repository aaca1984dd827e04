"""On-demand decisions, pure: which nodes selection wakes, and when a node sleeps."""

from __future__ import annotations

import random

from p2pbuild import BuildType, Role, Status, TrustEntry
from p2pbuild.dispatcher._select import Candidate, Requirements, asleep, select_nodes
from p2pbuild.node._ondemand import OnDemand, OnDemandConfig
from p2pbuild.testing import example_capability, make_identity, make_trust_list


def node(name: str, operator: str, *, standby: bool = False, free: int = 1) -> Candidate:
    key = make_identity(name).public_key
    status = Status(load_milli=0, slots_total=1, slots_free=free, running=1 - free,
                    uptime_s=60, standby=standby)
    return Candidate(key, example_capability(), status, TrustEntry(key, Role.NODE, operator),
                     0.8, active=1 - free)


REQ = Requirements("x86_64", "fedora-41", BuildType.RPM, count=2)


def test_sleeping_nodes_are_woken_only_when_awake_ones_lack_room() -> None:
    rng = random.Random(1)
    awake = [node("a", "alice"), node("b", "bob")]
    sleepers = [node("c", "carol", standby=True), node("d", "dave", standby=True)]
    for _ in range(100):
        assert not any(asleep(c) for c in select_nodes(awake + sleepers, REQ, rng))
    # One awake node with room: the other pick wakes a sleeper, never the full node.
    full = node("b", "bob", free=0)
    for _ in range(100):
        chosen = select_nodes([awake[0], full, *sleepers], REQ, rng)
        assert chosen[0].operator == "alice" and asleep(chosen[1])
    # Only sleepers match: they are chosen (and woken).
    assert all(asleep(c) for c in select_nodes(sleepers, REQ, rng))


def test_a_node_sleeps_after_its_idle_time_and_wakes_with_work() -> None:
    fixture = make_trust_list()
    key = fixture.nodes["node-1"].public_key
    now = [1000.0]
    od = OnDemand(OnDemandConfig(idle_s=60, wake_s=30), key, fixture.trust_list,
                  clock=lambda: now[0])
    assert od.observe(0, 1059.9) is None
    assert od.observe(1, 1059.9) is None  # busy: the idle time restarts
    assert od.observe(0, 1119.8) is None
    assert od.observe(0, 1119.9) == "standby"
    od.standby = True
    assert od.observe(0, 2000.0) is None
    assert od.observe(1, 2000.0) == "wake"


def test_an_on_demand_node_without_a_status_counts_as_asleep() -> None:
    import attrs

    key = make_identity("z").public_key
    trust = TrustEntry(key, Role.NODE, "zed")
    on_demand = attrs.evolve(example_capability(), wake_s=60)
    assert asleep(Candidate(key, on_demand, None, trust))
    assert not asleep(Candidate(key, example_capability(), None, trust))
