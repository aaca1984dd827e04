"""Leases in a running dispatcher: HTTPS API, the ``lease`` CLI, builds under a lease, expiry,
restart and quotas, with real push nodes on loopback TLS and a real SQLite file."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio
from engine_waits import wait_build
from push_nodes import PushNodes
from waits import wait_until

from p2pbuild._cli import main as cli_main
from p2pbuild.dispatcher import hash_token, load_config, run_dispatcher
from p2pbuild.dispatcher._db import BuildState
from p2pbuild.dispatcher._service import RunningDispatcher
from p2pbuild.https import pinned_client
from p2pbuild.testing import hello_tarball, make_trust_list
from p2pbuild.testing._farm import write_dispatcher_config

pytestmark = pytest.mark.slow

FIXTURE = make_trust_list(
    nodes=[("n1", "alice"), ("n2", "bob"), ("n3", "carol"), ("n4", "dave")]
)
USERS = {"u1": "token-u1-not-secret", "u2": "token-u2-not-secret",
         "root": "token-root-not-secret"}


def write_config(tmp: Path, leases: dict[str, Any] | None = None) -> Path:
    return write_dispatcher_config(
        tmp, FIXTURE,
        clients=[
            {"user": user, "team": "team-a", "token_sha256": hash_token(token),
             **({"role": "admin"} if user == "root" else {})}
            for user, token in USERS.items()
        ],
        engine={"follow_interval_s": 2, "backoff_base_s": 0.05, "node_retry_base_s": 0.2},
        leases=leases or {},
    )


class Farm(PushNodes):
    def __init__(self, nursery: trio.Nursery, tmp: Path) -> None:
        super().__init__(nursery, tmp, FIXTURE)
        self.config_path: Path | None = None
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    async def add_nodes(self, *names: str) -> None:
        for name in names:
            await self.add_node(name, slots=1)

    def key(self, name: str) -> str:
        return str(FIXTURE.nodes[name].public_key)

    async def start(self, leases: dict[str, Any] | None = None) -> RunningDispatcher:
        if self.config_path is None:
            self.config_path = write_config(self.tmp, leases)
        config = load_config(self.config_path)
        self.scope = trio.CancelScope()
        scope = self.scope

        stopped = self.stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[RunningDispatcher]) -> None:
            try:
                with scope:
                    await run_dispatcher(config, finder=self.finder, task_status=task_status)
            finally:
                stopped.set()

        running: RunningDispatcher = await self.nursery.start(run)
        for user, token in USERS.items():
            (self.tmp / f"{user}.toml").write_text(tomli_w.dumps(
                {"url": running.url, "tls_sha256": running.tls.sha256.hex(), "token": token}
            ))
        self.running = running
        return running

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()

    async def cli(self, user: str, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()

        def run() -> int:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                return cli_main([*argv, "--client-config", str(self.tmp / f"{user}.toml")])

        status = await trio.to_thread.run_sync(run)
        return status, out.getvalue(), err.getvalue()

    async def lease(self, user: str, *argv: str) -> dict[str, Any]:
        status, out, err = await self.cli(user, "lease", "request", "--json", *argv)
        assert status == 0, err
        lease: dict[str, Any] = json.loads(out)
        return lease

    async def submit(self, user: str, **params: str) -> str:
        async with pinned_client(self.running.tls.sha256, base_url=self.running.url) as http:
            response = await http.post(
                "/v1/builds", params={"name": "hello-1.0-1.src.rpm", **params},
                content=b"srpm bytes " + user.encode(),
                headers={"authorization": f"Bearer {USERS[user]}"},
            )
        assert response.status_code == 202, response.text
        build_id: str = response.json()["id"]
        return build_id

    async def wait_done(self, build_id: str, timeout: float = 20) -> Any:
        with trio.fail_after(timeout):
            return await wait_build(self.running.engine, build_id, lambda b: b.state.terminal)

    def nodes_of(self, build_id: str) -> set[str]:
        return {a.node for a in self.running.engine.db.attempts(build_id)}


@pytest.fixture
async def farm(nursery: trio.Nursery, tmp_path: Path) -> Farm:
    return Farm(nursery, tmp_path)


async def test_lease_builds_run_on_its_nodes_and_others_go_elsewhere(farm: Farm) -> None:
    await farm.add_nodes("n1", "n2", "n3", "n4")
    await farm.start()
    lease = await farm.lease("u1", "--arch", "x86_64", "--count", "2", "--for", "2h")
    leased = {n["node"] for n in lease["nodes"]}
    assert len(leased) == 2 and len({n["operator"] for n in lease["nodes"]}) == 2
    assert lease["state"] == "active" and 7199 <= lease["remaining_s"] <= 7200
    # The leased nodes were told (a signed hold) and show it in their own status.
    async def leased_slots(name: str) -> int:
        node = farm.nodes[name]
        async with pinned_client(node.tls.sha256, base_url=node.url) as http:
            count: int = (await http.get("/v1/status")).json()["leased_slots"]
            return count

    by_key = {farm.key(name): name for name in farm.nodes}
    leases = farm.running.leases
    assert leases is not None
    # The holds go out in the background; each counts once its node accepted it.
    await wait_until(lambda: leases.holds_sent + leases.holds_failed == 2, 10,
                     "both leased nodes answered their hold")
    assert [await leased_slots(by_key[k]) for k in sorted(leased)] == [1, 1]
    assert not any([await leased_slots(n) for n in farm.nodes if farm.key(n) not in leased])
    # Several builds of each user, at the same time.
    mine = [await farm.submit("u1", lease=lease["id"]) for _ in range(3)]
    theirs = [await farm.submit("u2") for _ in range(3)]
    for build_id in mine + theirs:
        assert (await farm.wait_done(build_id)).state is BuildState.VERIFIED
    for build_id in mine:
        assert farm.nodes_of(build_id) == leased
    for build_id in theirs:
        assert farm.nodes_of(build_id) and not farm.nodes_of(build_id) & leased
    # Where users look: nodes ls, lease ls (own; an admin sees all), readable and JSON.
    status, out, _ = await farm.cli("u1", "nodes", "ls", "--json")
    rows = {n["node"]: n for n in json.loads(out)["nodes"]}
    assert {k for k, n in rows.items() if n["leases"] == [lease["id"]]} == leased
    status, out, _ = await farm.cli("u1", "nodes", "ls")
    assert out.count("leased (1)") == 2
    async with pinned_client(farm.running.tls.sha256, base_url=farm.running.url) as http:
        page = await http.get("/nodes")
        assert page.status_code == 200 and page.text.count("leased (1)") == 2
        web = (await http.get("/v1/web/nodes")).json()
        assert {n["node"] for n in web["nodes"] if n["leased_slots"] == 1} == leased
    status, out, _ = await farm.cli("u1", "lease", "ls")
    assert lease["id"] in out and "active" in out and "x86_64/fedora-41" in out
    status, out, _ = await farm.cli("u2", "lease", "ls", "--json")
    assert json.loads(out)["leases"] == []
    status, out, _ = await farm.cli("root", "lease", "ls", "--json")
    assert [x["id"] for x in json.loads(out)["leases"]] == [lease["id"]]
    # Another user may not build on it, nor return it.
    status, _, err = await farm.cli("u2", "submit", str(_source(farm)), "--lease", lease["id"])
    assert status == 1 and "belongs to another user" in err and err.count("\n") == 1
    status, _, err = await farm.cli("u2", "lease", "done", lease["id"])
    assert status == 1 and "HTTP 409" in err
    # Extended, then returned: its nodes serve everyone again.
    status, out, _ = await farm.cli("u1", "lease", "extend", lease["id"], "--by", "30m",
                                    "--json")
    assert json.loads(out)["expires_at"] == lease["expires_at"] + 1800
    status, out, _ = await farm.cli("u1", "lease", "done", lease["id"])
    assert status == 0 and f"lease {lease['id']} returned" in out
    # Returned: the nodes were told it is released (after the holds of the extension).
    await wait_until(lambda: leases.holds_sent + leases.holds_failed == 6, 10,
                     "the leased nodes answered every hold")
    assert not any([await leased_slots(by_key[k]) for k in leased])
    assert leases.holds_sent == 6
    events = [e["event"] for e in _lease_events(farm, lease["id"])]
    assert [e for e in events if e.startswith("lease-")] == [
        "lease-granted", "lease-extended", "lease-done"
    ]
    assert events.count("accepted") == 3  # the builds submitted under it
    audit = farm.running.engine.db.audit_entries()
    assert [e.event for e in audit if e.event == "lease-requested"] == ["lease-requested"]
    status, _, err = await farm.cli("u1", "submit", str(_source(farm)), "--lease", lease["id"])
    assert status == 1 and f"lease {lease['id']} was returned" in err


async def test_expired_lease_frees_its_slots_and_is_audited(farm: Farm) -> None:
    await farm.add_nodes("n1", "n2")
    await farm.start()
    lease = await farm.lease("u1", "--arch", "x86_64", "--os", "fedora-41", "--count", "2",
                             "--for", "2s")
    # Every slot is held: another user's build waits, naming the constraint.
    waiting = await farm.submit("u2")
    db = farm.running.engine.db
    await wait_until(lambda: any(e.event == "no-node-yet" for e in db.audit_entries(waiting)),
                     10, "the build waits for a node")
    (wait_event,) = [e for e in db.audit_entries(waiting) if e.event == "no-node-yet"][:1]
    assert wait_event.detail["constraint"] == "leased"
    assert "a slot not held by another user's lease" in wait_event.detail["reason"]
    # The lease runs out by itself; the waiting build then gets its nodes.
    build = await farm.wait_done(waiting)
    assert build.state is BuildState.VERIFIED
    expired = [e for e in db.audit_entries() if e.event == "lease-expired"]
    assert [e.detail["lease"] for e in expired] == [lease["id"]]
    chosen = [e for e in db.audit_entries(waiting) if e.event == "node-chosen"]
    assert chosen and all(e.id > expired[0].id for e in chosen)
    assert farm.nodes_of(waiting) == {n["node"] for n in lease["nodes"]}
    status, out, _ = await farm.cli("u1", "lease", "ls", "--json")
    assert json.loads(out)["leases"][0]["state"] == "expired"
    status, _, err = await farm.cli("u1", "submit", str(_source(farm)), "--lease", lease["id"])
    assert status == 1 and f"lease {lease['id']} expired" in err


async def test_a_restart_keeps_a_lease(farm: Farm) -> None:
    await farm.add_nodes("n1", "n2", "n3", "n4")
    await farm.start()
    lease = await farm.lease("u1", "--arch", "x86_64", "--count", "2", "--for", "1h")
    await farm.stop()
    await farm.start()
    _, out, _ = await farm.cli("u1", "lease", "ls", "--json", "--active")
    (kept,) = json.loads(out)["leases"]
    assert kept["id"] == lease["id"] and kept["expires_at"] == lease["expires_at"]
    assert kept["nodes"] == lease["nodes"]
    leased = {n["node"] for n in lease["nodes"]}
    mine = await farm.submit("u1", lease=lease["id"])
    theirs = await farm.submit("u2")
    assert (await farm.wait_done(mine)).state is BuildState.VERIFIED
    assert (await farm.wait_done(theirs)).state is BuildState.VERIFIED
    assert farm.nodes_of(mine) == leased
    assert not farm.nodes_of(theirs) & leased


async def test_quota_refuses_the_extra_request_with_one_line(farm: Farm) -> None:
    await farm.add_nodes("n1", "n2", "n3", "n4")
    await farm.start({"max_slots_per_user": 2})
    await farm.lease("u1", "--arch", "x86_64", "--count", "2", "--for", "1h")
    status, out, err = await farm.cli("u1", "lease", "request", "--arch", "x86_64",
                                      "--count", "1", "--for", "1h")
    assert status == 1 and out == ""
    assert err == ("p2pbuild: error: dispatcher answered HTTP 409: lease-refused: quota "
                   "reached: user u1 holds 2 slots of 2; 1 more requested\n")
    # No node of that kind, said as such.
    status, _, err = await farm.cli("u2", "lease", "request", "--arch", "s390x",
                                    "--count", "1", "--for", "1h")
    assert status == 1 and "no trusted node has arch=s390x" in err
    refused = [e for e in farm.running.engine.db.audit_entries() if e.event == "lease-refused"]
    assert [e.detail["constraint"] for e in refused] == ["quota-user", "arch"]
    async with pinned_client(farm.running.tls.sha256, base_url=farm.running.url) as http:
        response = await http.post("/v1/leases", json={"arch": "x86_64", "count": 1},
                                   headers={"authorization": f"Bearer {USERS['u2']}"})
        assert response.status_code == 400
        assert response.json()["reason"] == "duration_s must be an integer"
        response = await http.get("/v1/leases")
        assert response.status_code == 401
        assert isinstance(response, httpx.Response)


def _source(farm: Farm) -> Path:
    path = farm.tmp / "hello-1.0.tar.gz"
    if not path.exists():
        hello_tarball(path)
    return path


def _lease_events(farm: Farm, lease_id: str) -> list[dict[str, Any]]:
    from p2pbuild.dispatcher._leasing import lease_events

    return [e for e in lease_events(farm.running.engine.db, lease_id)]
