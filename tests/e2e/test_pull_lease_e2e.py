"""End to end: a pull-mode node SIGKILLed mid-build loses its lease, and the build moves on.

Real processes on loopback (``p2pbuild.testing.LocalFarm``): the dispatcher runs with a
3 s pull lease (renewed every second), a push node and a pull node build a real SRPM whose
``%build`` sleeps, the pull node is killed in the middle, and the build must end verified
on a third node a few seconds later, not after the job's hour-long time limit.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
import trio

from p2pbuild.testing import LocalFarm, NodeSpec, hello_srpm, open_local_farm

pytestmark = pytest.mark.slow

LEASE_S = 3.0
HEARTBEAT_S = 1.0
#: %build sleeps this long: long enough to kill the node mid-build, more than a lease.
BUILD_SECONDS = 7


def with_short_leases(farm: LocalFarm) -> None:
    """Give the farm's dispatcher a short pull lease (the nodes take the heartbeat it
    advertises)."""
    path = farm.dispatcher_config
    document = tomllib.loads(path.read_text())
    document["pull"] = {"lease_s": LEASE_S, "heartbeat_s": HEARTBEAT_S}
    path.write_text(tomli_w.dumps(document))


async def test_pull_node_killed_mid_build_is_replaced_after_its_lease(tmp_path: Path) -> None:
    source = hello_srpm(tmp_path / "src", build_seconds=BUILD_SECONDS, release="3.lease").path
    specs = [
        NodeSpec("alice-1", "alice"),
        NodeSpec("carol-pull", "carol", pull=True),
        NodeSpec("dave-1", "dave"),
    ]
    farm = LocalFarm.create(tmp_path / "farm", specs)
    with_short_leases(farm)
    async with open_local_farm(farm):
        with trio.fail_after(60):
            await farm.start_all(nodes=["alice-1", "carol-pull"])
        submitted = await farm.submit(source)
        running = await farm.wait_build(
            submitted["id"],
            lambda b: sum(a["state"] == "running" for a in b["attempts"]) == 2,
        )
        # A pull attempt is "running" once the node took the job. dave-1 joins now, so the
        # replacement is certainly it (the dead node is excluded for a while after a loss).
        assert {farm.node_name(a["node"]) for a in running["attempts"]} == {
            "alice-1", "carol-pull"
        }
        await farm.start("dave-1")
        await farm.wait_nodes(["dave-1"])
        # Past one lease period into carol's build: its renewals have kept it alive.
        (taken_at,) = [a["sent_at"] for a in running["attempts"]
                       if farm.node_name(a["node"]) == "carol-pull"]
        await trio.sleep(max(taken_at + LEASE_S + 1.5 - time.time(), 0.0))
        build = await farm.build(submitted["id"])
        assert all(a["state"] == "running" for a in build["attempts"]), build["attempts"]

        farm.kill("carol-pull")
        killed_at = time.time()
        assert await farm.wait_exit("carol-pull") == -9
        build = await farm.wait_build(submitted["id"], timeout=60)
        finished_after = time.time() - killed_at
        assert build["state"] == "verified", build["reason"]

        by_node = {farm.node_name(a["node"]): a for a in build["attempts"]}
        lost = by_node["carol-pull"]
        assert lost["state"] == "lost"
        assert lost["reason"].startswith("lease-expired: "), lost["reason"]
        # Lost one lease after its last renewal (at most a heartbeat before the kill), not
        # after the job's own timeout (its time limit + 600 s).
        assert lost["ended_at"] - lost["sent_at"] > LEASE_S + 1
        assert LEASE_S - HEARTBEAT_S - 0.5 < lost["ended_at"] - killed_at < LEASE_S + 1.5
        assert by_node["dave-1"]["role"] == "replacement"
        assert by_node["dave-1"]["state"] == by_node["alice-1"]["state"] == "succeeded"
        # The whole recovery, dave-1's build included, took well under a minute.
        assert finished_after < BUILD_SECONDS + 30
        lost_events = [e for e in build["events"] if e["event"] == "attempt-lost"]
        assert [farm.node_name(e["node"]) for e in lost_events] == ["carol-pull"]

        status = await farm.get("/v1/status")
        assert status["node_errors"].get("lease-expired") == 1
        nodes = {farm.node_name(n["node"]): n for n in (await farm.cli("nodes", "ls"))["nodes"]}
        assert nodes["carol-pull"]["success"] < nodes["alice-1"]["success"]
