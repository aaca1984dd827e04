"""The build host behaves like ``kojid`` where the hub expects it: hub policies asked
(``host.assertPolicy``), the destination tag's package list checked before building, and a
task freed with ``koji free-task`` and handed back to the same host ending once, correctly.

The test hub's policy, package-list and task-freeing behaviour follows the real hub's code
(Koji 1.35 ``kojihub/kojihub.py``: ``check_policy``, ``Host.assertPolicy``,
``HostExports.tagBuild``, ``getPackageConfig``, ``Task.free``; ``koji/daemon.py``:
``TaskManager.updateTasks``; ``builder/kojid``: ``BuildTask.handler``); see
``docs/koji.md``.
"""

from __future__ import annotations

import shutil
import xmlrpc.client
from pathlib import Path
from typing import Any

import koji
import pytest
import trio
from koji_farms import Farms, submit_building, task_id_of, wait_stopped
from waits import wait_until

from p2pbuild import ResultState
from p2pbuild.testing._kojifarm import KojiFarm
from p2pbuild.testing._runner import InstantRunner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("rpmbuild") is None, reason="needs rpmbuild"),
]

NVR = "hello-noarch-1.0-1"
RPM_NAME = f"{NVR}.noarch.rpm"


def runners(packages: tuple[Path, bytes], **kwargs: Any) -> dict[str, InstantRunner]:
    return {name: InstantRunner(artifacts={RPM_NAME: packages[1]}, **kwargs)
            for name in ("n1", "n2")}


async def task_fault(farm: KojiFarm, task_id: int) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as failure:
        await farm.call("getTaskResult", task_id)
    return failure.value


async def denied(
    farms: Farms, packages: tuple[Path, bytes], policies: dict[str, str]
) -> tuple[KojiFarm, int, xmlrpc.client.Fault]:
    """``koji build --wait`` on a hub whose ``policies`` deny it: the farm, the failed
    task and its fault."""
    farm = await farms.start(runners(packages), policies=policies)
    code, out, err = await farm.koji("build", "--wait", "f40-p2p", str(packages[0]))
    assert code == 1, out + err
    task_id = task_id_of(out)
    assert (await farm.call("getTaskInfo", task_id))["state"] == koji.TASK_STATES["FAILED"]
    return farm, task_id, await task_fault(farm, task_id)


async def test_hub_policy_deny_fails_the_task_with_the_hubs_message(
    farms: Farms, packages: tuple[Path, bytes]
) -> None:
    # hub.conf [policy] build_from_srpm = all :: deny ...: asked like kojid asks it, before
    # anything is reserved or built.
    farm, _, fault = await denied(
        farms, packages, {"build_from_srpm": "all :: deny no SRPMs here"})
    assert fault.faultCode == koji.ActionNotAllowed.faultCode
    assert fault.faultString == "policy violation (build_from_srpm): no SRPMs here"
    calls = await farm.call("testhub.calls")
    asked = [c for c in calls if c["method"] == "host.assertPolicy"]
    assert [c.get("fault") for c in asked] == [koji.ActionNotAllowed.faultCode]
    # Nothing reserved, nothing sent to a node.
    assert await farm.call("getBuild", NVR) is None
    assert not any(c["method"] == "CGInitBuild" for c in calls)
    assert all(n.service.statistics().accepted == 0 for n in farm.nodes.values())


async def test_build_rpm_policy_is_asked_too(
    farms: Farms, packages: tuple[Path, bytes]
) -> None:
    _, _, fault = await denied(
        farms, packages, {"build_rpm": "match target *-p2p :: deny not here"})
    assert fault.faultString == "policy violation (build_rpm): not here"


async def test_package_not_in_the_tags_list_fails_before_anything_is_reserved(
    farms: Farms, packages: tuple[Path, bytes]
) -> None:
    farm = await farms.start(runners(packages), packages=())
    srpm = packages[0]
    code, out, err = await farm.koji("build", "--wait", "f40-p2p", str(srpm))
    assert code == 1, out + err
    task_id = task_id_of(out)
    fault = await task_fault(farm, task_id)
    assert fault.faultCode == koji.BuildError.faultCode
    assert fault.faultString == "package hello-noarch not in list for tag f40"
    # The NVR is not used up: no reservation, no import, nothing built.
    assert await farm.call("getBuild", NVR) is None
    assert all(n.service.statistics().accepted == 0 for n in farm.nodes.values())
    # --skip-tag builds without the package list, like kojid.
    code, out, err = await farm.koji("build", "--wait", "--skip-tag", "f40-p2p", str(srpm))
    assert code == 0, out + err
    assert (await farm.call("getBuild", NVR))["state"] == koji.BUILD_STATES["COMPLETE"]
    assert await farm.call("listTagged", "f40") == []
    # After `koji add-pkg` (what dispatcher/koji-hub-setup.md says to run) it builds.
    code, out, err = await farm.koji("add-pkg", "--owner", "kojiadmin", "f40",
                                     "hello-noarch", admin=True)
    assert code == 0, out + err
    config = await farm.call("getPackageConfig", "f40", "hello-noarch")
    assert config["blocked"] is False and config["owner_name"] == "kojiadmin"


async def test_free_task_handed_back_to_the_same_host_ends_once_correctly(
    farms: Farms, packages: tuple[Path, bytes]
) -> None:
    gate = trio.Event()
    farm = await farms.start(runners(packages, gate=gate))
    task_id, jobs = await submit_building(farm, packages[0])
    nodes = list(farm.nodes.values())
    code, out, err = await farm.koji("free-task", str(task_id), admin=True)
    assert code == 0, out + err
    # The test hub's scheduler hands a free task to the next host asking for work: this
    # one, within a poll interval (0.2 s), as the real hub did within about a second.
    async def open_again() -> bool:
        info = await farm.call("getTaskInfo", task_id)
        return info["state"] == koji.TASK_STATES["OPEN"] and info["host_id"] is not None

    await wait_until(open_again, 30, "the hub gave the freed task to a host again")
    # A few host rounds with the task back here: the P2P build was not cancelled.
    with trio.fail_after(30):
        await farm.host.wait_rounds(5)
    for node in nodes:
        assert node.service.running_jobs() == [jobs[node.identity.public_key]]
    gate.set()
    task = await farm.wait_task(task_id, ("CLOSED", "FAILED", "CANCELED"), timeout=60)
    assert task["state"] == koji.TASK_STATES["CLOSED"]
    [build_id] = (await farm.call("getTaskResult", task_id))["koji_builds"]
    assert (await farm.call("getBuild", build_id))["state"] == koji.BUILD_STATES["COMPLETE"]
    assert [b["nvr"] for b in await farm.call("listTagged", "f40")] == [NVR]
    calls = await farm.call("testhub.calls")
    ended = [c for c in calls if c["method"] in ("host.closeTask", "host.failTask")]
    assert [c["method"] for c in ended if "fault" not in c] == ["host.closeTask"]
    assert sum(c["method"] == "CGImport" for c in calls) == 1
    # Each node ran its job once; the host took the task back without a second attempt.
    for node in nodes:
        assert node.service.statistics().accepted == 1
    assert farm.host.statistics().tasks_handed_back == 1
    assert farm.host.statistics().tasks_taken == 1


async def test_a_task_given_to_another_host_stops_here_quietly_and_is_settled(
    farms: Farms, packages: tuple[Path, bytes]
) -> None:
    gate = trio.Event()
    farm = await farms.start(runners(packages, gate=gate), other_hosts=("other-gw",))
    task_id, jobs = await submit_building(farm, packages[0])
    nodes = list(farm.nodes.values())
    # An admin hands the running task to another host (scheduler.do_assign with force).
    code, out, err = await farm.koji("assign-task", "--force", str(task_id), "other-gw",
                                     admin=True)
    assert code == 0, out + err
    # This host's attempt stops without a report; the next round refunds the reservation
    # (so the other host can reserve the NVR) and cancels the P2P build on the nodes.
    async def refunded() -> bool:
        return (await farm.call("getBuild", NVR))["state"] != koji.BUILD_STATES["BUILDING"]

    await wait_until(refunded, 30, "the host refunded the reservation")
    await wait_stopped(nodes)
    assert (await farm.call("getBuild", NVR))["state"] == koji.BUILD_STATES["FAILED"]
    for node in nodes:
        assert node.service.status(jobs[node.identity.public_key]).state is (
            ResultState.CANCELLED)
    info = await farm.call("getTaskInfo", task_id)
    other = await farm.call("getHost", "other-gw")
    assert (info["state"], info["host_id"]) == (koji.TASK_STATES["ASSIGNED"], other["id"])
    calls = await farm.call("testhub.calls")
    assert not [c for c in calls if c["method"] in ("host.closeTask", "host.failTask",
                                                    "host.refuseTask")]
    assert farm.host.statistics().tasks_running == 0
