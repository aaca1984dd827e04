"""The test hub's policies and package lists, as the real hub answers a build host: each
rule cites the Koji 1.35 hub code it copies (``kojihub/kojihub.py``: ``check_policy``,
``HostExports.assertPolicy``, ``HostExports.tagBuild``, ``getPackageConfig``,
``pkglist_add``; ``kojihub/kojixmlrpc.py``: ``_default_policies``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import koji
import pytest

from p2pbuild.testing._kojihub import KojiTestHub, seed_hub

HOST = "p2p-gw.example.org"
#: Every client session a test opened: kept referenced and logged out at the end. A
#: ClientSession collected unreferenced logs out in __del__, and a garbage collection in
#: a thread of this in-process hub that holds the hub's lock would wait for itself.
SESSIONS: list[koji.ClientSession] = []


def start(tmp_path: Path, **kwargs: object) -> KojiTestHub:
    seed_hub(tmp_path / "hub", users={"kojiadmin": "ap", "plainuser": "pp", HOST: "hp"},
             admins=("kojiadmin",), hosts={HOST: "x86_64"},
             targets={"f40-p2p": ("f40-build", "f40")}, cg={"p2p-build": (HOST,)},
             **kwargs)  # type: ignore[arg-type]
    hub = KojiTestHub(tmp_path / "hub")
    hub.start()
    return hub


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[KojiTestHub]:
    running = start(tmp_path)
    yield running
    for client in SESSIONS:
        client._forget()
    SESSIONS.clear()
    running.stop()


def session(hub: KojiTestHub, user: str, password: str) -> koji.ClientSession:
    client = koji.ClientSession(hub.url, {"user": user, "password": password,
                                          "max_retries": 0, "offline_retry": False})
    client.login()
    SESSIONS.append(client)
    return client


def host_session(hub: KojiTestHub) -> koji.ClientSession:
    host = session(hub, HOST, "hp")
    host.exclusiveSession(force=True)
    return host


def open_task(hub: KojiTestHub, host: koji.ClientSession) -> int:
    user = session(hub, "plainuser", "pp")
    task_id = int(user.build("cli-build/1/hello-1.0-1.src.rpm", "f40-p2p", {}))
    host.host.updateHost(0.0, True)
    assert [t["id"] for t in host.host.getTasks()] == [task_id]
    assert host.host.openTask(task_id) is not None
    return task_id


def test_default_build_policies_and_a_deny_rule(hub: KojiTestHub, tmp_path: Path) -> None:
    host = host_session(hub)
    users = {u: host.getUser(u)["id"] for u in ("plainuser", "kojiadmin")}
    data = {"user_id": users["plainuser"], "source": "cli-build/x.src.rpm",
            "target": "f40-p2p", "skip_tag": False}
    # kojixmlrpc._default_policies: build_from_srpm is admin-only, build_rpm allows all.
    with pytest.raises(koji.ActionNotAllowed) as denied:
        host.host.assertPolicy("build_from_srpm", data)
    assert str(denied.value) == (
        "policy violation (build_from_srpm): Only admin can do this via default policy")
    host.host.assertPolicy("build_from_srpm", {**data, "user_id": users["kojiadmin"]})
    host.host.assertPolicy("build_rpm", data)
    # A policy the hub does not have is allowed (MissingPolicyOk, on by default).
    host.host.assertPolicy("no_such_policy", data)
    # Only a host may ask (HostExports: Host().verify()).
    with pytest.raises(koji.GenericError):
        session(hub, "plainuser", "pp").host.assertPolicy("build_rpm", data)
    hub.stop()
    # hub.conf [policy]: rules in order, first match; no match: the default (deny).
    configured = start(tmp_path / "other", policies={
        "build_from_srpm": "match target *-p2p && !bool skip_tag :: allow\n"
                           "bool skip_tag :: deny no untagged SRPM builds",
        "build_rpm": "has_perm admin :: allow",
    })
    try:
        host = host_session(configured)
        host.host.assertPolicy("build_from_srpm", data)
        with pytest.raises(koji.ActionNotAllowed, match=r"^policy violation "
                           r"\(build_from_srpm\): no untagged SRPM builds$"):
            host.host.assertPolicy("build_from_srpm", {**data, "skip_tag": True})
        with pytest.raises(koji.ActionNotAllowed, match=r"^policy violation \(build_rpm\): "
                           r"not covered by policy$"):
            host.host.assertPolicy("build_rpm", data)
    finally:
        configured.stop()


def test_package_list_and_tagging_an_unlisted_package(hub: KojiTestHub) -> None:
    host = host_session(hub)
    task_id = open_task(hub, host)
    assert host.getPackageConfig("f40", "hello") is None
    reserved = host.CGInitBuild("p2p-build", {"name": "hello", "version": "1.0",
                                              "release": "1"})
    # HostExports.tagBuild checks the package list before the build's state, and names
    # the tag as given: what the real hub answered (TagError, not GenericError).
    with pytest.raises(koji.TagError) as refused:
        host.host.tagBuild(task_id, "f40", reserved["build_id"])
    assert str(refused.value) == "Package hello not in list for f40"
    # `koji add-pkg` (admin, or the tag permission: the default package_list policy).
    with pytest.raises(koji.ActionNotAllowed):
        session(hub, "plainuser", "pp").packageListAdd("f40", "hello", "plainuser")
    admin = session(hub, "kojiadmin", "ap")
    admin.packageListAdd("f40", "hello", "kojiadmin", block=False)
    listed = host.getPackageConfig("f40", "hello")
    assert (listed["package_name"], listed["tag_name"], listed["owner_name"],
            listed["blocked"]) == ("hello", "f40", "kojiadmin", False)
    assert [p["package_name"] for p in admin.listPackages(tagID=listed["tag_id"])] == ["hello"]
    with pytest.raises(koji.TagError) as refused:
        host.host.tagBuild(task_id, "f40", reserved["build_id"])
    assert str(refused.value) == "build hello-1.0-1 not complete: state BUILDING"
    admin.packageListAdd("f40", "hello", block=True)
    with pytest.raises(koji.TagError, match=r"^Package hello blocked in f40$"):
        host.host.tagBuild(task_id, "f40", reserved["build_id"])
