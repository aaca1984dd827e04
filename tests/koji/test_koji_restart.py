"""A dispatcher killed (SIGKILL) at each point of a Koji task, and started again.

The test hub and the real ``koji`` command line as in ``test_koji_host.py``, two push nodes
in this process, and the dispatcher as a child process (``dispatcher_child.py``) so that
it can die for real: no shutdown, no last hub call, SQLite files as a kill leaves them.
The nodes return a real noarch RPM (built once with ``rpmbuild``) so that the hub's
import checks pass, and wait on a gate so the kill can come while they build.

Each test asserts where the task ends (closed with the build imported once, or the
reservation refunded), that the hub saw at most one ``CGImport`` and that the nodes built
each job once (the P2P build followed after the restart, not redone).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import xmlrpc.client
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import koji
import pytest
import tomli_w
import trio
from koji_farms import wait_building, wait_stopped
from waits import ready_line, wait_until

from p2pbuild import ResultState
from p2pbuild.https import generate_tls_material
from p2pbuild.koji._store import TaskEvent, TaskPhase, TaskRow, TaskStore
from p2pbuild.node._config import PullDispatcher
from p2pbuild.testing import make_trust_list
from p2pbuild.testing._farm import FarmNode, PullFarmNode, start_pull_node, start_push_node
from p2pbuild.testing._kojifarm import HOST_NAME, KOJI, P2P_POLICIES, PACKAGES
from p2pbuild.testing._kojihub import (
    HubProcess,
    make_hub_pki,
    seed_hub,
    write_koji_cli_config,
)
from p2pbuild.testing._runner import InstantRunner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("rpmbuild") is None, reason="needs rpmbuild"),
]

FIXTURE = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob")], label="koji-restart-")
CHILD = Path(__file__).with_name("dispatcher_child.py")
NVR = "hello-noarch-1.0-1"
RPM_NAME = f"{NVR}.noarch.rpm"
BUILD = koji.BUILD_STATES
TASK = koji.TASK_STATES
#: Pull nodes renew their lease (and retry an upload at the latest) this often.
PULL_HEARTBEAT_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@attrs.define(eq=False)
class RestartFarm:
    """The hub (child process), two nodes (here) and the dispatcher (child process)."""

    tmp: Path
    hub: HubProcess
    nodes: Mapping[str, FarmNode | PullFarmNode]
    runners: dict[str, InstantRunner]
    config: Path
    nodes_file: Path
    user_config: Path
    admin_config: Path
    #: The nodes' builds wait for it.
    gate: trio.Event
    process: trio.Process | None = None
    starts: int = 0

    @property
    def store_path(self) -> Path:
        return self.config.parent / "state" / "koji" / "tasks.db"

    async def start_dispatcher(self) -> None:
        self.starts += 1
        log = (self.tmp / f"dispatcher-{self.starts}.log").open("wb")
        self.process = await trio.lowlevel.open_process(
            [sys.executable, str(CHILD), str(self.config), str(self.nodes_file)],
            stdout=subprocess.PIPE, stderr=log,
        )
        log.close()
        await ready_line(self.process, f"the dispatcher (see {log.name})")

    async def kill_dispatcher(self) -> None:
        """SIGKILL: no shutdown, no logout, nothing more reaches the hub."""
        assert self.process is not None
        self.process.kill()
        await self.process.wait()
        assert self.process.stdout is not None
        await self.process.stdout.aclose()
        self.process = None

    async def stop_dispatcher(self) -> int:
        """SIGTERM, as systemd stops it; its exit status."""
        assert self.process is not None
        self.process.terminate()
        with trio.fail_after(30):
            code = await self.process.wait()
        assert self.process.stdout is not None
        await self.process.stdout.aclose()
        self.process = None
        return code

    async def restart_hub(self) -> None:
        await self.hub.stop()
        await self.hub.start()

    async def koji(self, *argv: str, admin: bool = False) -> tuple[int, str, str]:
        config = self.admin_config if admin else self.user_config
        with trio.fail_after(120):
            done = await trio.run_process(
                [KOJI, "-c", str(config), "-p", "koji", *argv],
                capture_stdout=True, capture_stderr=True, check=False,
            )
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    async def submit(self, srpm: Path) -> int:
        code, out, err = await self.koji("build", "--nowait", "f40-p2p", str(srpm))
        assert code == 0, out + err
        line = next(x for x in out.splitlines() if x.startswith("Created task:"))
        return int(line.split(":")[1])

    async def call(self, method: str, *args: Any) -> Any:
        def blocking() -> Any:
            func: Any = self.hub.control()
            for part in method.split("."):
                func = getattr(func, part)
            return func(*args)

        return await trio.to_thread.run_sync(blocking)

    async def wait_task(self, task_id: int, *states: str, timeout: float = 60) -> dict[str, Any]:
        """The task's info once it is in one of ``states`` (the hub, another process, has
        no event for it)."""

        async def info() -> dict[str, Any] | None:
            task: dict[str, Any] = await self.call("getTaskInfo", task_id)
            return task if task["state"] in {TASK[s] for s in states} else None

        return await wait_until(info, timeout, f"task {task_id} is {' or '.join(states)}")

    async def wait_building(self) -> None:
        """Until both nodes run their job (held at the gate)."""
        await wait_building(self.nodes.values(), timeout=60)

    async def wait_phase(self, task_id: int, phase: TaskPhase, timeout: float = 10) -> None:
        """Until the dispatcher (a child process) has stored the task in ``phase``."""
        await wait_until(lambda: self.row(task_id).phase is phase, timeout,
                         f"task {task_id} is stored as {phase.value}")

    async def hub_calls(self, method: str) -> list[dict[str, Any]]:
        """The calls of ``method`` this hub process answered (since it last started)."""
        calls: list[dict[str, Any]] = await self.call("testhub.calls")
        return [c for c in calls if c["method"] == method]

    def row(self, task_id: int) -> TaskRow:
        store = TaskStore.open(self.store_path)
        try:
            row = store.get(task_id)
        finally:
            store.close()
        assert row is not None
        return row

    def events(self, task_id: int) -> list[str]:
        store = TaskStore.open(self.store_path)
        try:
            found: list[TaskEvent] = store.events(task_id)
        finally:
            store.close()
        return [e.event for e in found]

    def rewrite(self, task_id: int, **fields: Any) -> None:
        """Set columns of a task's row while the dispatcher is down: the state a crash at
        another instant would have left."""
        with sqlite3.connect(self.store_path) as db:
            sets = ", ".join(f"{k} = ?" for k in fields)
            db.execute(f"UPDATE tasks SET {sets} WHERE task_id = ?", (*fields.values(), task_id))


@pytest.fixture
async def farm(tmp_path: Path, packages: tuple[Path, bytes]) -> AsyncIterator[RestartFarm]:
    async with _restart_farm(tmp_path, packages, pull=False) as started:
        yield started


@pytest.fixture
async def pull_farm(tmp_path: Path, packages: tuple[Path, bytes]) -> AsyncIterator[RestartFarm]:
    """The same with pull nodes (no port; they long-poll the dispatcher's fixed URL)."""
    async with _restart_farm(tmp_path, packages, pull=True) as started:
        yield started


@contextlib.asynccontextmanager
async def _restart_farm(tmp_path: Path, packages: tuple[Path, bytes], *,
                        pull: bool) -> AsyncIterator[RestartFarm]:
    gate = trio.Event()
    runners = {name: InstantRunner(artifacts={RPM_NAME: packages[1]}, gate=gate)
               for name in ("n1", "n2")}
    host_password = secrets.token_urlsafe(16)
    pki = make_hub_pki(tmp_path / "pki", [HOST_NAME, "plainuser", "kojiadmin"])
    seed_hub(
        tmp_path / "hub",
        users={"kojiadmin": "", "plainuser": "", HOST_NAME: host_password},
        admins=("kojiadmin",), hosts={HOST_NAME: "x86_64"},
        targets={"f40-p2p": ("f40-build", "f40")}, cg={"p2p-build": (HOST_NAME,)},
        packages={"f40": PACKAGES}, policies=P2P_POLICIES,
    )
    hub = HubProcess(tmp_path / "hub", tmp_path / "pki")
    await hub.start()
    restart_farm = None
    try:
        async with trio.open_nursery() as nursery:
            base = tmp_path / "dispatcher"
            (base / "tls").mkdir(parents=True)
            tls = generate_tls_material(base / "tls")
            # A fixed port: the jobs signed before a kill name it as their source URL,
            # and pull nodes poll it.
            port = _free_port()
            nodes: dict[str, FarmNode | PullFarmNode] = {}
            for name, runner in runners.items():
                if pull:
                    nodes[name] = await start_pull_node(
                        nursery, tmp_path / "nodes" / name, FIXTURE.nodes[name],
                        FIXTURE.trust_list, runner, PullDispatcher(
                            f"https://127.0.0.1:{port}",
                            FIXTURE.dispatchers["dispatcher-1"].public_key, tls.sha256),
                        heartbeat_s=PULL_HEARTBEAT_S)
                else:
                    nodes[name] = await start_push_node(
                        nursery, tmp_path / "nodes" / name, FIXTURE.nodes[name],
                        FIXTURE.trust_list, runner)
            nodes_file = tmp_path / "nodes.json"
            nodes_file.write_text(json.dumps([
                {"capability": entry.capability_record.to_bytes().hex(),
                 "status": entry.status_record.to_bytes().hex()}
                for entry in (node.entry() for node in nodes.values())
                if entry.status_record is not None
            ]))
            FIXTURE.dispatchers["dispatcher-1"].save(base / "dispatcher.key")
            (base / "trust-list.bin").write_bytes(FIXTURE.trust_list.to_bytes())
            (base / "koji-host.password").write_text(host_password + "\n")
            (base / "koji-host.password").chmod(0o600)
            (base / "dispatcher.toml").write_text(tomli_w.dumps({
                "dispatcher": {"key": "dispatcher.key", "trust_list": "trust-list.bin",
                               "synchronous": "NORMAL"},
                "api": {"port": port},
                "pull": {"heartbeat_s": PULL_HEARTBEAT_S, "lease_s": 20},
                "engine": {"follow_interval_s": 2, "backoff_base_s": 0.05,
                           "no_node_wait_s": 1},
                "koji": {"server": hub.url, "topurl": hub.topurl, "host": HOST_NAME,
                         "authtype": "password", "password_file": "koji-host.password",
                         "poll_interval_s": 0.2, "retry_interval_s": 0.5,
                         "min_space_mb": 1},
            }))
            restart_farm = RestartFarm(
                tmp_path, hub, nodes, runners, base / "dispatcher.toml", nodes_file,
                write_koji_cli_config(tmp_path / "koji-user.conf", server=hub.https_url,
                                      topurl=hub.topurl, cert=pki.clients["plainuser"],
                                      serverca=pki.ca),
                write_koji_cli_config(tmp_path / "koji-admin.conf", server=hub.https_url,
                                      topurl=hub.topurl, cert=pki.clients["kojiadmin"],
                                      serverca=pki.ca),
                gate,
            )
            await restart_farm.start_dispatcher()
            yield restart_farm
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if restart_farm is not None and restart_farm.process is not None:
                await restart_farm.kill_dispatcher()
            await hub.stop()


def open_gate(farm: RestartFarm) -> None:
    farm.gate.set()


async def assert_imported_once(farm: RestartFarm, task_id: int) -> dict[str, Any]:
    """The task closed with one COMPLETE build, tagged once, for this task; each node ran
    one job; the restarted host took the task up again rather than free it (kojid's
    way, which would hand the task out again to be built anew)."""
    task = await farm.wait_task(task_id, "CLOSED", "FAILED", "CANCELED")
    assert task["state"] == TASK["CLOSED"], task
    [build_id] = (await farm.call("getTaskResult", task_id))["koji_builds"]
    build: dict[str, Any] = await farm.call("getBuild", build_id)
    assert build["state"] == BUILD["COMPLETE"] and build["nvr"] == NVR
    assert build["task_id"] == task_id and build["owner_name"] == "plainuser"
    assert [b["build_id"] for b in await farm.call("listTagged", "f40")] == [build_id]
    assert sorted(r["arch"] for r in await farm.call("listRPMs", build_id)) == ["noarch", "src"]
    assert [len(r.runs) for r in farm.runners.values()] == [1, 1]
    assert not await farm.hub_calls("host.freeTasks")
    await farm.wait_phase(task_id, TaskPhase.DONE)  # marked once closeTask has returned
    return build


async def test_killed_while_the_nodes_build(farm: RestartFarm, packages: Any) -> None:
    task_id = await farm.submit(packages[0])
    await farm.wait_building()
    reserved = await farm.call("getBuild", NVR)
    assert reserved["state"] == BUILD["BUILDING"]
    await farm.kill_dispatcher()
    # The hub still has the task open on the dead host, and the NVR reserved.
    assert (await farm.call("getTaskInfo", task_id))["state"] == TASK["OPEN"]
    await farm.start_dispatcher()
    open_gate(farm)
    build = await assert_imported_once(farm, task_id)
    # The same reservation and the same P2P build, taken up again: nothing freed or redone.
    assert build["id"] == reserved["id"]
    assert len(await farm.hub_calls("CGInitBuild")) == 1
    assert len(await farm.hub_calls("CGImport")) == 1
    events = farm.events(task_id)
    assert events.count("p2p-submitted") == 1 and "resumed" in events


async def test_stopped_while_the_nodes_build(farm: RestartFarm, packages: Any) -> None:
    task_id = await farm.submit(packages[0])
    await farm.wait_building()
    # A stop (SIGTERM) does not wait for the build, and gives nothing back to the hub: the
    # next start goes on with the same reservation and P2P build.
    assert await farm.stop_dispatcher() == 0
    assert (await farm.call("getBuild", NVR))["state"] == BUILD["BUILDING"]
    assert farm.row(task_id).phase is TaskPhase.RESERVED
    # One logout, of the host's session (which closes the task's subsession with it on
    # the hub): no second logout for the hub to refuse.
    state = json.loads(await farm.call("testhub.state"))
    host_user = next(u["id"] for u in state["users"].values() if u["name"] == HOST_NAME)
    logouts = [c for c in await farm.hub_calls("logout")
               if state["sessions"][c["session"]]["user_id"] == host_user]
    assert len(logouts) == 1 and "fault" not in logouts[0], logouts
    await farm.start_dispatcher()
    open_gate(farm)
    await assert_imported_once(farm, task_id)
    assert len(await farm.hub_calls("CGInitBuild")) == 1
    assert not await farm.hub_calls("CGRefundBuild")


async def test_killed_after_verification_before_the_import(
    farm: RestartFarm, packages: Any
) -> None:
    open_gate(farm)
    # The hub dies as CGImport arrives (not imported); the dispatcher is killed while its
    # client waits for the hub to come back.
    await farm.call("testhub.crashOn", "CGImport")
    task_id = await farm.submit(packages[0])
    with trio.fail_after(60):
        assert await farm.hub.wait_exit() == 17
    assert farm.row(task_id).phase is TaskPhase.RESERVED
    await farm.kill_dispatcher()
    await farm.restart_hub()
    await farm.start_dispatcher()
    build = await assert_imported_once(farm, task_id)
    assert len(await farm.hub_calls("CGImport")) == 1
    assert not await farm.hub_calls("CGInitBuild")  # the reservation was kept
    assert build["id"] == farm.row(task_id).build_id


@pytest.mark.parametrize("answer_lost", [False, True], ids=["recorded", "answer-lost"])
async def test_killed_after_the_import(
    farm: RestartFarm, packages: Any, answer_lost: bool
) -> None:
    open_gate(farm)
    # CGImport goes through; the hub dies as host.tagBuild arrives; the dispatcher is
    # killed then. With answer_lost, its row is put back to before CGImport's answer (a
    # kill while the answer was on the way): the hub has the build, the row does not.
    await farm.call("testhub.crashOn", "host.tagBuild")
    task_id = await farm.submit(packages[0])
    with trio.fail_after(60):
        assert await farm.hub.wait_exit() == 17
    await farm.kill_dispatcher()
    assert farm.row(task_id).phase is TaskPhase.IMPORTED
    if answer_lost:
        farm.rewrite(task_id, phase=TaskPhase.RESERVED.value)
    await farm.restart_hub()
    await farm.start_dispatcher()
    await assert_imported_once(farm, task_id)
    # Not imported again, not reserved again: only tagged and closed.
    assert not await farm.hub_calls("CGImport")
    assert not await farm.hub_calls("CGInitBuild")
    assert len(await farm.hub_calls("host.tagBuild")) == 1


async def test_killed_before_the_reservation_was_made(farm: RestartFarm, packages: Any) -> None:
    open_gate(farm)
    await farm.call("testhub.crashOn", "CGInitBuild")
    task_id = await farm.submit(packages[0])
    with trio.fail_after(60):
        assert await farm.hub.wait_exit() == 17
    await farm.kill_dispatcher()
    assert farm.row(task_id).phase is TaskPhase.RESERVING
    await farm.restart_hub()
    await farm.start_dispatcher()
    await assert_imported_once(farm, task_id)
    assert len(await farm.hub_calls("CGInitBuild")) == 1
    assert not await farm.hub_calls("cancelBuild")  # no reservation was left to recover


async def test_killed_before_the_reservation_token_was_stored(
    farm: RestartFarm, packages: Any
) -> None:
    task_id = await farm.submit(packages[0])
    await farm.wait_building()
    await farm.kill_dispatcher()
    lost = await farm.call("getBuild", NVR)
    # As if the kill came between CGInitBuild reaching the hub and its answer being
    # stored (and so before the P2P build was linked to the task).
    farm.rewrite(task_id, phase=TaskPhase.RESERVING.value, build_id=None, token=None,
                 p2p_build_id=None)
    await farm.start_dispatcher()
    open_gate(farm)
    build = await assert_imported_once(farm, task_id)
    # The orphaned reservation was cancelled (the host owns it), the NVR reserved again,
    # and the P2P build the engine had accepted for the task was adopted, not redone.
    assert (await farm.call("getBuild", lost["id"]))["state"] == BUILD["CANCELED"]
    assert build["id"] != lost["id"]
    assert len(await farm.hub_calls("cancelBuild")) == 1
    events = farm.events(task_id)
    assert "lost-reservation-cancelled" in events and "p2p-adopted" in events


async def test_task_cancelled_while_the_dispatcher_is_down(
    farm: RestartFarm, packages: Any
) -> None:
    task_id = await farm.submit(packages[0])
    await farm.wait_building()
    jobs = {name: node.service.running_jobs()[0] for name, node in farm.nodes.items()}
    await farm.kill_dispatcher()
    code, out, err = await farm.koji("cancel", str(task_id))
    assert code == 0, out + err
    await farm.start_dispatcher()
    # The reservation is refunded as cancelled and the nodes' jobs are cancelled.
    async def refunded() -> bool:
        return (await farm.call("getBuild", NVR))["state"] == BUILD["CANCELED"]

    await wait_until(refunded, 30, "the reservation is cancelled")
    await wait_stopped(farm.nodes.values())
    for name, node in farm.nodes.items():
        assert node.service.status(jobs[name]).state is ResultState.CANCELLED
    await farm.wait_phase(task_id, TaskPhase.DONE)
    assert not await farm.hub_calls("CGImport")
    assert (await farm.call("getTaskInfo", task_id))["state"] == TASK["CANCELED"]


async def test_task_freed_while_the_dispatcher_is_down(farm: RestartFarm, packages: Any) -> None:
    task_id = await farm.submit(packages[0])
    await farm.wait_building()
    first = await farm.call("getBuild", NVR)
    await farm.kill_dispatcher()
    # The hub gives up on the host (what its host timeout does; here an admin's free-task).
    code, out, err = await farm.koji("free-task", str(task_id), admin=True)
    assert code == 0, out + err
    assert (await farm.call("getTaskInfo", task_id))["state"] == TASK["FREE"]
    await farm.start_dispatcher()
    # The restarted host refunds the reservation (any host may get the task now); the task
    # comes back to it, reserves the NVR anew and follows the P2P build it kept.
    await wait_until(lambda: TaskPhase.RELEASED.value in farm.events(task_id), 30,
                     "the restarted host released the task")
    open_gate(farm)
    build = await assert_imported_once(farm, task_id)
    assert (await farm.call("getBuild", first["id"]))["state"] == BUILD["CANCELED"]
    assert build["id"] != first["id"]
    assert len(await farm.hub_calls("CGImport")) == 1


async def test_build_cancelled_in_koji_while_the_dispatcher_is_down(
    farm: RestartFarm, packages: Any
) -> None:
    task_id = await farm.submit(packages[0])
    await farm.wait_building()
    await farm.kill_dispatcher()
    # An admin gives up on the reservation (`koji cancel <nvr>`, the hub's cancelBuild).
    code, out, err = await farm.koji("cancel", NVR, admin=True)
    assert code == 0, out + err
    await farm.start_dispatcher()
    # The restarted host finds its reservation gone: it cancels the nodes' jobs and fails
    # the task with the reason; nothing is imported.
    task = await farm.wait_task(task_id, "CLOSED", "FAILED", "CANCELED")
    assert task["state"] == TASK["FAILED"]
    with pytest.raises(xmlrpc.client.Fault, match="no longer reserved in Koji"):
        await farm.call("getTaskResult", task_id)
    await wait_stopped(farm.nodes.values())
    assert (await farm.call("getBuild", NVR))["state"] == BUILD["CANCELED"]
    assert not await farm.hub_calls("CGImport")
    await farm.wait_phase(task_id, TaskPhase.DONE)


async def test_a_pull_nodes_result_outlives_a_dispatcher_restart(
    pull_farm: RestartFarm, packages: Any
) -> None:
    farm = pull_farm
    task_id = await farm.submit(packages[0])
    await farm.wait_building()
    await farm.kill_dispatcher()
    # The builds end while the dispatcher is away: each node keeps its signed result and
    # tries to deliver it, for longer than the five tries (about 15 s) it once gave up after.
    open_gate(farm)
    nodes = [n for n in farm.nodes.values() if isinstance(n, PullFarmNode)]
    await wait_stopped(nodes)
    assert all(n.service.statistics().finished == 1 for n in nodes)
    down_since = trio.current_time()
    await trio.sleep(16)  # the outage under test, not a wait for something
    for node in nodes:
        assert node.service.statistics().finished == 1  # still held, not collected
        assert node.client.uploaded == 0 and node.client.failures > 5
    assert trio.current_time() - down_since > 15
    await farm.start_dispatcher()
    # Taken over without a rebuild: each node ran its job once, and delivered it once.
    build = await assert_imported_once(farm, task_id)
    for node in nodes:
        assert node.client.uploaded == 1
        assert node.service.statistics().finished == 0
    # The pull nodes' logs reached Koji, under each node's directory, like push nodes'.
    logs = await farm.call("getBuildLogs", build["id"])
    assert {(log["dir"], log["name"]) for log in logs if log["name"] == "build.log"} == {
        (n.identity.public_key.fingerprint.replace(":", ""), "build.log") for n in nodes}
