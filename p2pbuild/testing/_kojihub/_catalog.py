"""Plain lookups of the hub: users, hosts, tags, targets, channels and builds.
"""

from __future__ import annotations

from typing import Any

import attrs
import koji
import koji.util
import koji.xmlrpcplus

from ._core import HubCore
from ._state import add_package
from ._wire import KOJI_VERSION, _Call, _when


@attrs.define(eq=False)
class CatalogMethods(HubCore):
    # -- plain lookups --------------------------------------------------------------------------

    def m_getAPIVersion(self, call: _Call) -> int:
        return int(koji.API_VERSION)

    def m_getKojiVersion(self, call: _Call) -> str:
        return KOJI_VERSION

    @staticmethod
    def _public_user(user: dict[str, Any]) -> dict[str, Any]:
        return {k: user[k] for k in ("id", "name", "status", "usertype", "krb_principals")}

    def m_getLoggedInUser(self, call: _Call) -> dict[str, Any] | None:
        if call.user is None or call.session is None:
            return None
        return {**self._public_user(call.user), "authtype": call.session["authtype"],
                "krb_principal": None}

    def m_getUser(self, call: _Call, userInfo: Any = None, strict: bool = False,
                  krb_princs: bool = True, groups: bool = False) -> dict[str, Any] | None:
        if userInfo is None:
            return self.m_getLoggedInUser(call)
        user = self._user(userInfo, strict)
        return None if user is None else self._public_user(user)

    def _host(self, info: Any, strict: bool = True) -> dict[str, Any] | None:
        return self._find("hosts", info, strict)

    @staticmethod
    def _public_host(host: dict[str, Any]) -> dict[str, Any]:
        return {k: host[k] for k in ("arches", "capacity", "comment", "description",
                                     "enabled", "id", "name", "ready", "task_load",
                                     "update_ts", "user_id")}

    def m_hasPerm(self, call: _Call, perm: str, strict: bool = False) -> bool:
        """Whether the caller has ``perm`` (Koji 1.35 auth.py ``Session.hasPerm``: the
        permission itself; admin does not imply others here, only in ``assertPerm``)."""
        return call.user is not None and perm in call.user["perms"]

    def m_getHost(self, call: _Call, hostInfo: Any, strict: bool = False,
                  event: Any = None) -> dict[str, Any] | None:
        host = self._host(hostInfo, strict)
        return None if host is None else self._public_host(host)

    def _tag(self, info: Any, strict: bool = True) -> dict[str, Any] | None:
        return self._find("tags", info, strict)

    def m_getTag(self, call: _Call, tagInfo: Any, strict: bool = False, event: Any = None,
                 blocked: bool = False) -> dict[str, Any] | None:
        tag = self._tag(tagInfo, strict)
        return None if tag is None else dict(tag)

    def _target(self, info: Any, strict: bool = True) -> dict[str, Any] | None:
        return self._find("targets", info, strict)

    def m_getBuildTarget(self, call: _Call, info: Any, event: Any = None,
                         strict: bool = False) -> dict[str, Any] | None:
        target = self._target(info, strict)
        return None if target is None else dict(target)

    def m_getChannel(self, call: _Call, channelInfo: Any, strict: bool = False
                     ) -> dict[str, Any] | None:
        channel = self._find("channels", channelInfo, strict)
        return None if channel is None else dict(channel)

    def m_listChannels(self, call: _Call, hostID: Any = None, event: Any = None,
                       enabled: Any = None) -> list[dict[str, Any]]:
        channels = list(self._state["channels"].values())
        if hostID is not None:
            host = self._host(hostID)
            assert host is not None
            channels = [c for c in channels if c["id"] in host["channels"]]
        return [dict(c) for c in channels]


    # -- builds ---------------------------------------------------------------------------------

    def _build(self, info: Any, strict: bool = True) -> dict[str, Any]:
        """The stored build (``{}`` if there is none and not ``strict``)."""
        return self._find("builds", info, strict) or {}

    def _build_info(self, build: dict[str, Any]) -> dict[str, Any]:
        owner = self._user(build["owner_id"])
        assert owner is not None
        cg = self._state["cgs"].get(str(build["cg_id"])) if build["cg_id"] else None
        info = {k: v for k, v in build.items() if k not in ("rpms", "logs", "buildroots")}
        info.update(
            build_id=build["id"], owner_name=owner["name"], package_name=build["name"],
            start_time=_when(build["start_ts"]), completion_time=_when(build["completion_ts"]),
            creation_time=_when(build["creation_ts"]), cg_name=cg["name"] if cg else None,
        )
        return info

    def m_getBuild(self, call: _Call, buildInfo: Any, strict: bool = False
                   ) -> dict[str, Any] | None:
        build = self._build(buildInfo, strict)
        return self._build_info(build) if build else None

    def m_listRPMs(self, call: _Call, buildID: int | None = None, buildrootID: Any = None,
                   imageID: Any = None, componentBuildrootID: Any = None, hostID: Any = None,
                   arches: Any = None, queryOpts: Any = None, draft: Any = None
                   ) -> list[dict[str, Any]]:
        build = self._build(buildID)
        return [dict(r) for r in build["rpms"]]

    def m_getRepo(self, call: _Call, tag: Any, state: Any = None, event: Any = None,
                  dist: bool = False, min_event: Any = None) -> dict[str, Any] | None:
        """The tag's newest ready repository (``testhub.newRepo`` makes them), or None."""
        taginfo = self._tag(tag)
        assert taginfo is not None
        repos = [r for r in self._state.get("repos", {}).values()
                 if r["tag_id"] == taginfo["id"]]
        if not repos:
            return None
        return dict(max(repos, key=lambda r: r["id"]))

    def m_getBuildrootListing(self, call: _Call, id: int) -> list[dict[str, Any]]:
        """The rpm components an imported buildroot listed. (The real hub lists only the
        components it matched to rpms it built; this one lists every rpm component it
        accepted, so that tests can see what a content generator imported.)"""
        for build in self._state["builds"].values():
            for br in build.get("buildroots") or []:
                if br["id"] == id:
                    return [dict(c) for c in br["components"] if c["type"] == "rpm"]
        raise koji.GenericError(f"No such buildroot: {id}")

    def m_getBuildLogs(self, call: _Call, buildinfo: Any) -> list[dict[str, Any]]:
        build = self._build(buildinfo)
        return [dict(log) for log in build["logs"]]

    def m_listTagged(self, call: _Call, tag: Any, event: Any = None, inherit: bool = False,
                     prefix: Any = None, latest: bool = False, package: Any = None,
                     owner: Any = None, type: Any = None, strict: bool = True,
                     extra: bool = False, draft: Any = None) -> list[dict[str, Any]]:
        taginfo = self._tag(tag)
        assert taginfo is not None
        return [
            {**self._build_info(self._build(b)), "tag_id": taginfo["id"],
             "tag_name": taginfo["name"]}
            for b in self._state["tagged"][str(taginfo["id"])]
        ]


    # -- package lists (Koji 1.35 kojihub.py: readPackageList, pkglist_add) ---------------------

    def _package_entry(self, tag: dict[str, Any], package: dict[str, Any],
                       listed: dict[str, Any]) -> dict[str, Any]:
        owner = self._user(listed["owner_id"], strict=False) if listed["owner_id"] else None
        return {
            "package_id": package["id"], "package_name": package["name"],
            "tag_id": tag["id"], "tag_name": tag["name"],
            "owner_id": listed["owner_id"], "owner_name": owner["name"] if owner else None,
            "blocked": listed["blocked"], "extra_arches": listed["extra_arches"],
        }

    def _package_list(self, tag: dict[str, Any]) -> list[dict[str, Any]]:
        """The tag's own list (tag inheritance is not modelled: tags here inherit none)."""
        listed = self._state["pkglist"].get(str(tag["id"]), {})
        return [self._package_entry(tag, self._state["packages"][pid], entry)
                for pid, entry in sorted(listed.items(), key=lambda i: int(i[0]))]

    def package_config(self, tag_info: Any, package: str) -> dict[str, Any] | None:
        """``getPackageConfig``: the package's entry on the tag's list, or None."""
        tag = self._tag(tag_info, strict=False)
        if tag is None:
            return None
        return next((e for e in self._package_list(tag) if e["package_name"] == package
                     or e["package_id"] == package), None)

    def m_getPackageConfig(self, call: _Call, tag: Any, pkg: Any,
                           event: Any = None) -> dict[str, Any] | None:
        return self.package_config(tag, pkg)

    def m_listPackages(self, call: _Call, tagID: Any = None, userID: Any = None,
                       pkgID: Any = None, prefix: str | None = None, inherited: bool = False,
                       with_dups: bool = False, event: Any = None, queryOpts: Any = None,
                       with_owners: bool = True, with_blocked: bool = True
                       ) -> list[dict[str, Any]]:
        if tagID is None:
            return [{"package_id": p["id"], "package_name": p["name"]}
                    for p in self._state["packages"].values()]
        tag = self._tag(tagID)
        assert tag is not None
        return [e for e in self._package_list(tag)
                if (with_blocked or not e["blocked"])
                and (prefix is None or e["package_name"].startswith(prefix))]

    def m_packageListAdd(self, call: _Call, taginfo: Any, pkginfo: Any, owner: Any = None,
                         block: bool | None = None, extra_arches: str | None = None,
                         force: bool = False, update: bool = False) -> None:
        """``koji add-pkg``. The hub's default ``package_list`` policy: admin or ``tag``
        permission."""
        user = self._require_user(call)
        if not {"admin", "tag"} & set(user["perms"]):
            raise koji.ActionNotAllowed(
                "policy violation (package_list): Only admin/tag can do this via default "
                "policy")
        tag = self._tag(taginfo)
        assert tag is not None
        owner_user = self._user(owner) if owner is not None else None
        package = add_package(self._state, str(pkginfo))
        listed = self._state["pkglist"].setdefault(str(tag["id"]), {})
        entry = listed.get(str(package["id"]))
        if entry is None:
            if owner_user is None:
                raise koji.GenericError("owner not specified")
            entry = {"blocked": False, "owner_id": owner_user["id"], "extra_arches": None}
            listed[str(package["id"])] = entry
        elif owner_user is not None:
            entry["owner_id"] = owner_user["id"]
        if block is not None:
            entry["blocked"] = bool(block)
        if extra_arches is not None:
            entry["extra_arches"] = extra_arches
        call.dirty = True
