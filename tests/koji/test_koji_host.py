"""The dispatcher as a Koji build host, end to end: the test hub as a child process, the real
``koji`` command line and client library, the dispatcher and push nodes in this process."""

from __future__ import annotations

import hashlib
import json
import shutil
import xmlrpc.client
from pathlib import Path
from typing import Any

import koji
import pytest
import trio
from koji_farms import FIXTURE, Farms, submit_building, task_id_of, wait_stopped
from waits import wait_until

from p2pbuild import ResultState
from p2pbuild.koji import read_rpm_header
from p2pbuild.node._runner import ExecutorRunner
from p2pbuild.testing import hello_srpm
from p2pbuild.testing._kojifarm import KojiFarm
from p2pbuild.testing._runner import InstantRunner

pytestmark = pytest.mark.slow

needs_rpmbuild = pytest.mark.skipif(
    shutil.which("bwrap") is None or shutil.which("rpmbuild") is None,
    reason="needs bwrap and rpmbuild",
)


def validate_import(farm: KojiFarm, build: dict[str, Any]) -> dict[str, Any]:
    """Check the imported build the way the hub does, from the files it stored."""
    base = farm.hub.data_dir / "packages" / build["name"] / build["version"] / build["release"]
    metadata = json.loads((base / "data" / "metadata.json").read_text())
    nvr = build["nvr"]
    referenced = {o["buildroot_id"] for o in metadata["output"]}
    assert referenced == {br["id"] for br in metadata["buildroots"]}
    for out in metadata["output"]:
        if out["type"] == "rpm":
            path = base / out["arch"] / out["filename"]
            header = read_rpm_header(path)
            if header.is_source:
                assert header.nvr == nvr
            else:
                assert header.sourcerpm == f"{nvr}.src.rpm"
        else:
            path = base / "data" / "logs" / out["subdir"] / out["filename"]
        data = path.read_bytes()
        assert len(data) == out["filesize"]
        assert hashlib.new(out["checksum_type"], data).hexdigest() == out["checksum"]
    return metadata


@needs_rpmbuild
async def test_koji_build_is_built_on_two_operators_imported_and_tagged(
    farms: Farms, tmp_path: Path
) -> None:
    farm = await farms.start({"n1": ExecutorRunner(), "n2": ExecutorRunner()})
    srpm = hello_srpm(tmp_path / "src", noarch=True)
    code, out, err = await farm.koji("build", "--wait", "f40-p2p", str(srpm.path))
    assert code == 0, out + err
    task_id = task_id_of(out)
    task = await farm.call("getTaskInfo", task_id, True)
    assert task["state"] == koji.TASK_STATES["CLOSED"]
    assert task["channel_id"] == (await farm.call("getChannel", "p2p"))["id"]
    result = await farm.call("getTaskResult", task_id)
    [build_id] = result["koji_builds"]
    build = await farm.call("getBuild", build_id)
    assert build["state"] == koji.BUILD_STATES["COMPLETE"]
    assert build["nvr"] == "hello-noarch-1.0-1"
    assert build["task_id"] == task_id
    assert build["cg_name"] == "p2p-build"
    assert [b["nvr"] for b in await farm.call("listTagged", "f40")] == [build["nvr"]]
    rpms = await farm.call("listRPMs", build_id)
    assert sorted(r["arch"] for r in rpms) == ["noarch", "src"]
    metadata = validate_import(farm, build)
    # One buildroot per verifying node, of different operators, with the signed digests.
    roots = metadata["buildroots"]
    assert len(roots) == 2
    assert {r["extra"]["p2pbuild"]["operator"] for r in roots} == {"alice", "bob"}
    for root in roots:
        p2p = root["extra"]["p2pbuild"]
        assert len(p2p["result_sha256"]) == 64
        assert p2p["artifacts"]  # name -> SHA-256 of what the node signed
        assert root["container"]["type"] == "none"
    logs = await farm.call("getBuildLogs", build_id)
    dirs = {log["dir"] for log in logs}
    assert dirs == {r["extra"]["p2pbuild"]["fingerprint"].replace(":", "") for r in roots}
    assert {"p2pbuild-result.msgpack", "build.log"} <= {log["name"] for log in logs}
    assert metadata["build"]["extra"]["p2pbuild"]["reproducible"] is True
    # The RPMs Koji stored are the ones both operators built, bit for bit.
    binary = next(o for o in metadata["output"] if o["type"] == "rpm" and o["arch"] != "src")
    for root in roots:
        assert root["extra"]["p2pbuild"]["artifacts"][binary["filename"]] == binary["checksum"]
    host = farm.host.statistics()
    assert host.tasks_taken == 1 and host.failed_rounds == 0


async def test_mismatch_fails_the_task_and_refunds_the_reservation(
    farms: Farms, tmp_path: Path
) -> None:
    srpm = hello_srpm(tmp_path / "src", noarch=True)
    name = "hello-noarch-1.0-1.noarch.rpm"
    farm = await farms.start({
        "n1": InstantRunner(artifacts={name: b"alice's bytes\n"}),
        "n2": InstantRunner(artifacts={name: b"bob's other bytes\n"}),
    })
    code, out, err = await farm.koji("build", "--wait", "f40-p2p", str(srpm.path))
    assert code == 1, out + err
    task_id = task_id_of(out)
    task = await farm.call("getTaskInfo", task_id)
    assert task["state"] == koji.TASK_STATES["FAILED"]
    with pytest.raises(xmlrpc.client.Fault) as failure:
        await farm.call("getTaskResult", task_id)
    message = failure.value.faultString
    assert failure.value.faultCode == koji.BuildError.faultCode
    assert "Replicas disagree" in message and name in message
    # The first line says what happened, whatever ended the tie-breaks after it.
    first = message.splitlines()[0]
    assert first.startswith("p2p build ") and "failed: the replicas disagreed" in first
    # The refunded reservation shows the host as owner and no task: the message names it.
    build = await farm.call("getBuild", "hello-noarch-1.0-1")
    assert message.splitlines()[-1] == (
        f"(Koji build hello-noarch-1.0-1, id {build['id']}, reserved for this task, "
        "refunded as FAILED)")
    for node in ("n1", "n2"):
        assert FIXTURE.nodes[node].public_key.fingerprint in message
    assert "(alice)" in message and "(bob)" in message
    # Nothing imported or tagged; the reservation was refunded as failed.
    build = await farm.call("getBuild", "hello-noarch-1.0-1")
    assert build["state"] == koji.BUILD_STATES["FAILED"]
    assert await farm.call("listRPMs", build["id"]) == []
    assert await farm.call("listTagged", "f40") == []
    assert not (farm.hub.data_dir / "packages").exists()
    assert "p2pbuild-mismatch.txt" in await farm.call("listTaskOutput", task_id)


async def test_no_capable_node_refuses_the_task_softly(farms: Farms, tmp_path: Path) -> None:
    srpm = hello_srpm(tmp_path / "src", noarch=True)
    farm = await farms.start({"n1": InstantRunner(), "n2": InstantRunner()},
                             koji={"arch": "s390x"})
    code, out, err = await farm.koji("build", "--nowait", "f40-p2p", str(srpm.path))
    assert code == 0, out + err
    task_id = task_id_of(out)
    refusals = await wait_until(lambda: farm.call("testhub.taskRefusals", task_id), 30,
                                "the host refused the task")
    assert refusals[0]["soft"] is True
    assert refusals[0]["msg"] == "no capable p2p node: no trusted node has arch=s390x"
    task = await farm.call("getTaskInfo", task_id)
    assert task["state"] == koji.TASK_STATES["FREE"] and task["host_id"] is None
    build = await farm.call("getBuild", "hello-noarch-1.0-1")
    assert build["state"] == koji.BUILD_STATES["CANCELED"]


async def test_cancel_in_koji_stops_the_nodes(farms: Farms, tmp_path: Path) -> None:
    srpm = hello_srpm(tmp_path / "src", noarch=True)
    gate = trio.Event()
    farm = await farms.start({"n1": InstantRunner(gate=gate), "n2": InstantRunner(gate=gate)})
    task_id, jobs = await submit_building(farm, srpm.path)
    nodes = list(farm.nodes.values())
    code, out, err = await farm.koji("cancel", str(task_id))
    assert code == 0, out + err
    await wait_stopped(nodes)
    for node in nodes:
        status = node.service.status(jobs[node.identity.public_key])
        assert status.state is ResultState.CANCELLED
    assert (await farm.call("getTaskInfo", task_id))["state"] == koji.TASK_STATES["CANCELED"]
    async def refunded() -> bool:
        build = await farm.call("getBuild", "hello-noarch-1.0-1")
        return build["state"] == koji.BUILD_STATES["CANCELED"]

    await wait_until(refunded, 30, "the reservation was cancelled")


@needs_rpmbuild
async def test_expired_session_and_hub_restart_during_import(
    farms: Farms, tmp_path: Path
) -> None:
    farm = await farms.start({"n1": ExecutorRunner(), "n2": ExecutorRunner()},
                             hub_auth="ssl")
    srpm = hello_srpm(tmp_path / "src", noarch=True)
    code, out, err = await farm.koji("build", "--nowait", "f40-p2p", str(srpm.path))
    assert code == 0, out + err
    task_id = task_id_of(out)
    # The first upload of the import finds every session expired; CGImport kills the hub.
    await farm.call("testhub.expireOn", "rawUpload")
    await farm.call("testhub.crashOn", "CGImport")
    with trio.fail_after(60):
        exit_code = await farm.hub.wait_exit()
    assert exit_code == 17
    await farm.hub.stop()
    # Down until the host has found the port closed: one of its rounds failed on it.
    failed = farm.host.failed_rounds
    with trio.fail_after(30):
        while farm.host.failed_rounds == failed:
            await farm.host.wait_rounds(1)
    await farm.hub.start()
    task = await farm.wait_task(task_id, ("CLOSED", "FAILED"), timeout=90)
    assert task["state"] == koji.TASK_STATES["CLOSED"]
    [build_id] = (await farm.call("getTaskResult", task_id))["koji_builds"]
    build = await farm.call("getBuild", build_id)
    assert build["state"] == koji.BUILD_STATES["COMPLETE"]
    validate_import(farm, build)
    assert [b["nvr"] for b in await farm.call("listTagged", "f40")] == [build["nvr"]]
    state = json.loads(await farm.call("testhub.state"))
    renewed = [s for s in state["sessions"].values() if s["renew_ts"] is not None]
    assert renewed, "the expired sessions were renewed by the koji client"
