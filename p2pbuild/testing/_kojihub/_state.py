"""The hub's state (users, hosts, channels, tags, targets, builds, tasks,
sessions): one JSON file in the data directory, written atomically; :func:`seed_hub`
writes the first one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import koji
import koji.util
import koji.xmlrpcplus

from ._policy import DEFAULT_POLICIES


def _empty_state() -> dict[str, Any]:
    return {
        "next": {}, "event": 1, "users": {}, "hosts": {}, "channels": {}, "tags": {},
        "targets": {}, "tasks": {}, "builds": {}, "cgs": {}, "reservations": {},
        "sessions": {}, "policy": [], "tagged": {}, "packages": {}, "pkglist": {},
        "policies": {},
    }


def _state_file(data_dir: Path) -> Path:
    return data_dir / "hub-state.json"


def _load_state(data_dir: Path) -> dict[str, Any]:
    path = _state_file(data_dir)
    if not path.exists():
        return _empty_state()
    state: dict[str, Any] = json.loads(path.read_text())
    for key, value in _empty_state().items():
        state.setdefault(key, value)  # a state file from before packages and policies
    return state


def _save_state(data_dir: Path, state: dict[str, Any]) -> None:
    path = _state_file(data_dir)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        json.dump(state, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _new_id(state: dict[str, Any], table: str) -> int:
    value = int(state["next"].get(table, 1))
    state["next"][table] = value + 1
    return value


def seed_hub(
    data_dir: Path,
    *,
    users: dict[str, str],
    admins: tuple[str, ...] = (),
    hosts: dict[str, str] | None = None,
    channels: tuple[str, ...] = ("default", "p2p"),
    host_channels: tuple[str, ...] = ("p2p",),
    tags: tuple[str, ...] = ("f40", "f40-build"),
    targets: dict[str, tuple[str, str]] | None = None,
    policy: tuple[tuple[str, str], ...] = (("*-p2p", "p2p"),),
    cg: dict[str, tuple[str, ...]] | None = None,
    packages: Mapping[str, Sequence[str]] | None = None,
    policies: Mapping[str, str] | None = None,
) -> None:
    """Write a hub's initial state: ``users`` (name -> password, empty for certificate-only
    users), ``hosts`` (host user name -> arches) in ``host_channels``, ``tags``,
    ``targets`` (name -> (build tag, destination tag)), the channel ``policy`` (target glob
    -> channel, first match; no match: ``default``), ``cg`` (content generator -> users
    granted) and ``packages`` (tag -> package names on its list, owned by the first
    admin). What ``koji add-host``, ``add-channel``, ``add-host-to-channel``, ``add-tag``,
    ``add-target``, ``grant-cg-access`` and ``add-pkg`` would have set up. ``policies``
    are ``hub.conf``'s ``[policy]`` entries (name -> rules), over the hub's defaults
    (``_policy.DEFAULT_POLICIES``)."""
    state = _empty_state()
    now = time.time()
    for name, password in users.items():
        uid = _new_id(state, "users")
        state["users"][str(uid)] = {
            "id": uid, "name": name, "password": password, "status": 0, "usertype": 0,
            "krb_principals": [], "perms": ["admin"] if name in admins else [],
        }
    for name in channels:
        cid = _new_id(state, "channels")
        state["channels"][str(cid)] = {"id": cid, "name": name}
    by_channel = {c["name"]: c["id"] for c in state["channels"].values()}
    for name, arches in (hosts or {}).items():
        user = next((u for u in state["users"].values() if u["name"] == name), None)
        if user is None:
            uid = _new_id(state, "users")
            user = {"id": uid, "name": name, "password": "", "status": 0,
                    "krb_principals": [], "perms": []}
            state["users"][str(uid)] = user
        user["usertype"] = koji.USERTYPES["HOST"]
        hid = _new_id(state, "hosts")
        state["hosts"][str(hid)] = {
            "id": hid, "user_id": user["id"], "name": name, "arches": arches,
            "capacity": 50.0, "enabled": True, "ready": False, "task_load": 0.0,
            "update_ts": now, "description": "gateway to p2p volunteer farm", "comment": None,
            "channels": [by_channel[c] for c in host_channels], "data": None,
        }
    for name in tags:
        tid = _new_id(state, "tags")
        state["tags"][str(tid)] = {
            "id": tid, "name": name, "arches": "x86_64", "locked": False, "perm": None,
            "perm_id": None, "maven_support": False, "maven_include_all": False,
            "extra": {}, "taginfo": None,
        }
        state["tagged"][str(tid)] = []
    tag_ids = {t["name"]: t["id"] for t in state["tags"].values()}
    for name, (build_tag, dest_tag) in (targets or {}).items():
        tid = _new_id(state, "targets")
        state["targets"][str(tid)] = {
            "id": tid, "name": name, "build_tag": tag_ids[build_tag],
            "build_tag_name": build_tag, "dest_tag": tag_ids[dest_tag],
            "dest_tag_name": dest_tag,
        }
    state["policy"] = [list(rule) for rule in policy]
    user_ids = {u["name"]: u["id"] for u in state["users"].values()}
    for name, granted in (cg or {}).items():
        cid = _new_id(state, "cgs")
        state["cgs"][str(cid)] = {"id": cid, "name": name,
                                  "users": [user_ids[u] for u in granted]}
    owner = next((user_ids[a] for a in admins), None)
    for tag_name, names in (packages or {}).items():
        listed = state["pkglist"].setdefault(str(tag_ids[tag_name]), {})
        for name in names:
            package = add_package(state, name)
            listed[str(package["id"])] = {"blocked": False, "owner_id": owner,
                                          "extra_arches": None}
    state["policies"] = {**DEFAULT_POLICIES, **(policies or {})}
    data_dir.mkdir(parents=True, exist_ok=True)
    _save_state(data_dir, state)


def add_package(state: dict[str, Any], name: str) -> dict[str, Any]:
    """The package ``name``, created if new (the hub creates packages on first use)."""
    for package in state["packages"].values():
        if package["name"] == name:
            return dict(package)
    pid = _new_id(state, "packages")
    state["packages"][str(pid)] = {"id": pid, "name": name}
    return {"id": pid, "name": name}


