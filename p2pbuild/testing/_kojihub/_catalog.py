"""Plain lookups of the hub: users, hosts, tags, targets, channels and builds.
"""

from __future__ import annotations

from typing import Any, cast

import attrs
import koji
import koji.util
import koji.xmlrpcplus

from ._core import HubCore
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
        for host in self._state["hosts"].values():
            if host["id"] == info or host["name"] == info:
                return cast(dict[str, Any], host)
        if strict:
            raise koji.GenericError(f"No such host: {info!r}")
        return None

    @staticmethod
    def _public_host(host: dict[str, Any]) -> dict[str, Any]:
        return {k: host[k] for k in ("arches", "capacity", "comment", "description",
                                     "enabled", "id", "name", "ready", "task_load",
                                     "update_ts", "user_id")}

    def m_getHost(self, call: _Call, hostInfo: Any, strict: bool = False,
                  event: Any = None) -> dict[str, Any] | None:
        host = self._host(hostInfo, strict)
        return None if host is None else self._public_host(host)

    def _tag(self, info: Any, strict: bool = True) -> dict[str, Any] | None:
        for tag in self._state["tags"].values():
            if tag["id"] == info or tag["name"] == info:
                return cast(dict[str, Any], tag)
        if strict:
            raise koji.GenericError(f"No such tagInfo: {info!r}")
        return None

    def m_getTag(self, call: _Call, tagInfo: Any, strict: bool = False, event: Any = None,
                 blocked: bool = False) -> dict[str, Any] | None:
        tag = self._tag(tagInfo, strict)
        return None if tag is None else dict(tag)

    def _target(self, info: Any, strict: bool = True) -> dict[str, Any] | None:
        for target in self._state["targets"].values():
            if target["id"] == info or target["name"] == info:
                return cast(dict[str, Any], target)
        if strict:
            raise koji.GenericError(f"No such build target: {info}")
        return None

    def m_getBuildTarget(self, call: _Call, info: Any, event: Any = None,
                         strict: bool = False) -> dict[str, Any] | None:
        target = self._target(info, strict)
        return None if target is None else dict(target)

    def m_getChannel(self, call: _Call, channelInfo: Any, strict: bool = False
                     ) -> dict[str, Any] | None:
        for channel in self._state["channels"].values():
            if channelInfo in (channel["id"], channel["name"]):
                return dict(channel)
        if strict:
            raise koji.GenericError(f"No such channel: {channelInfo}")
        return None

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
        for build in self._state["builds"].values():
            if build["id"] == info or build["nvr"] == info:
                return cast(dict[str, Any], build)
        if strict:
            raise koji.GenericError(f"No such build: {info!r}")
        return {}

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

