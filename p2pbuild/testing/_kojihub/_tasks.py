"""Tasks: ``build`` puts one in the channel the target policy picks, the host methods
(``host.*``) take, open, close, fail, refuse and free them, and tag builds.
"""

from __future__ import annotations

import fnmatch
import time
import xmlrpc.client
from typing import Any, cast

import attrs
import koji
import koji.util
import koji.xmlrpcplus

from ._catalog import CatalogMethods
from ._policy import check_policy
from ._state import _new_id
from ._wire import BUILD, TASK, _Call, _when


@attrs.define(eq=False)
class TaskMethods(CatalogMethods):
    # -- tasks ----------------------------------------------------------------------------------

    def _task(self, task_id: Any) -> dict[str, Any]:
        task = self._state["tasks"].get(str(task_id))
        if task is None:
            raise koji.GenericError(f"No such task: {task_id}")
        return cast(dict[str, Any], task)

    @staticmethod
    def _task_info(task: dict[str, Any]) -> dict[str, Any]:
        info = {k: task[k] for k in (
            "arch", "awaited", "channel_id", "completion_ts", "create_ts", "host_id", "id",
            "label", "method", "owner", "parent", "priority", "start_ts", "state",
            "waiting", "weight",
        )}
        for key in ("completion", "create", "start"):
            info[f"{key}_time"] = _when(task[f"{key}_ts"])
        return info

    def m_build(self, call: _Call, src: str, target: str, opts: dict[str, Any] | None = None,
                priority: int | None = None, channel: str | None = None) -> int:
        user = self._require_user(call)
        self._target(target)
        if not channel:
            channel = next((c for glob, c in self._state["policy"]
                            if fnmatch.fnmatchcase(target, glob)), "default")
        chan = self.m_getChannel(call, channel, strict=True)
        assert chan is not None
        task_id = _new_id(self._state, "tasks")
        self._state["tasks"][str(task_id)] = {
            "id": task_id, "method": "build", "request": [src, target, opts or {}],
            "state": TASK["FREE"], "owner": user["id"], "host_id": None,
            "channel_id": chan["id"], "arch": "noarch",
            "priority": koji.PRIO_DEFAULT + (priority or 0), "create_ts": time.time(),
            "start_ts": None, "completion_ts": None, "weight": 1.0, "result": None,
            "parent": None, "label": None, "waiting": None, "awaited": None, "refusals": {},
            "assign_ts": None,
        }
        call.dirty = True
        return task_id

    def m_getTaskInfo(self, call: _Call, task_id: Any, request: bool = False,
                      strict: bool = False) -> Any:
        if isinstance(task_id, list):
            return [self.m_getTaskInfo(call, t, request, strict) for t in task_id]
        task = self._state["tasks"].get(str(task_id))
        if task is None:
            if strict:
                raise koji.GenericError(f"No such task: {task_id}")
            return None
        info = self._task_info(task)
        if request:
            info["request"] = task["request"]
        return info

    def m_getTaskChildren(self, call: _Call, task_id: int, request: bool = False,
                          strict: bool = False) -> list[Any]:
        return []

    def m_getTaskResult(self, call: _Call, taskId: int, raise_fault: bool = True) -> Any:
        task = self._task(taskId)
        if task["state"] == TASK["CANCELED"]:
            raise koji.GenericError(f"Task {taskId} is canceled")
        if task["state"] not in (TASK["CLOSED"], TASK["FAILED"]):
            raise koji.GenericError(f"Task {taskId} is not finished")
        try:
            params, _ = xmlrpc.client.loads(task["result"])
        except xmlrpc.client.Fault as fault:
            if raise_fault:
                raise
            return {"faultCode": fault.faultCode, "faultString": fault.faultString}
        return params[0]

    def m_listTaskOutput(self, call: _Call, taskID: int, stat: bool = False,
                         all_volumes: bool = False, strict: bool = False) -> Any:
        directory = self.data_dir / "work" / koji.pathinfo.taskrelpath(taskID)
        if not directory.is_dir():
            return {} if stat else []
        names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                       if p.is_file())
        if stat:
            return {n: {"st_size": str((directory / n).stat().st_size)} for n in names}
        return names

    def m_cancelTask(self, call: _Call, task_id: int, recurse: bool = True) -> bool:
        user = self._require_user(call)
        task = self._task(task_id)
        if task["owner"] != user["id"] and "admin" not in user["perms"]:
            raise koji.ActionNotAllowed(f"Cannot cancel task, not owner of task {task_id}")
        if task["state"] in (TASK["CLOSED"], TASK["FAILED"], TASK["CANCELED"]):
            return False
        task.update(state=TASK["CANCELED"], completion_ts=time.time())
        call.dirty = True
        return True

    def m_freeTask(self, call: _Call, task_id: int) -> None:
        """Admin: free a task (``koji free-task``), whatever host holds it."""
        self._require_admin(call)
        task = self._task(task_id)
        if task["state"] in (TASK["CLOSED"], TASK["CANCELED"], TASK["FAILED"]):
            name = koji.TASK_STATES[task["state"]]
            raise koji.GenericError(f"Cannot free task {task_id}, state is {name}")
        task.update(state=TASK["FREE"], host_id=None)
        call.dirty = True

    def m_assignTask(self, call: _Call, task_id: int, host: Any, force: bool = False,
                     override: bool = False) -> bool:
        """Admin: ``koji assign-task`` (Koji 1.35 ``scheduler.do_assign`` ->
        ``Task.assign``/``Task.lock``): a free task, or with ``force`` any open or assigned
        one, becomes ``ASSIGNED`` to ``host``."""
        self._require_admin(call)
        target = self._host(host)
        assert target is not None
        task = self._task(task_id)
        if task["state"] in (TASK["CLOSED"], TASK["CANCELED"], TASK["FAILED"]):
            return False
        if not force and task["state"] != TASK["FREE"]:
            return False
        task.update(state=TASK["ASSIGNED"], host_id=target["id"], assign_ts=time.time())
        call.dirty = True
        return True

    # -- host.* -----------------------------------------------------------------------------

    def _free_stale_hosts(self) -> None:
        now = time.time()
        for host in self._state["hosts"].values():
            if now - host["update_ts"] <= self.host_timeout_s:
                continue
            for task in self._state["tasks"].values():
                if task["host_id"] == host["id"] and task["state"] in (
                    TASK["OPEN"], TASK["ASSIGNED"]
                ):
                    task.update(state=TASK["FREE"], host_id=None)

    def _policy_perms(self, call: _Call) -> Any:
        def perms(data: Any) -> list[str]:
            # policy_get_user: the data's user_id, else the caller.
            user = (self._user(data["user_id"], strict=False) if data.get("user_id")
                    is not None else call.user)
            return list(user["perms"]) if user else []
        return perms

    def m_host_assertPolicy(self, call: _Call, name: str, data: dict[str, Any],
                            default: str = "deny") -> None:
        """HostExports.assertPolicy -> check_policy(strict=True) (Koji 1.35)."""
        self._require_host(call)
        check_policy(self._state["policies"], name, data, self._policy_perms(call), default)

    def m_host_checkPolicy(self, call: _Call, name: str, data: dict[str, Any],
                           default: str = "deny", strict: bool = False) -> list[Any]:
        self._require_host(call)
        try:
            check_policy(self._state["policies"], name, data, self._policy_perms(call),
                         default)
        except koji.ActionNotAllowed as exc:
            if strict:
                raise
            return [False, str(exc).split(": ", 1)[-1]]
        return [True, ""]

    def m_host_getID(self, call: _Call) -> int:
        return int(self._require_host(call)["id"])

    def m_host_getHost(self, call: _Call) -> dict[str, Any]:
        return self._public_host(self._require_host(call))

    def m_host_updateHost(self, call: _Call, task_load: float, ready: bool,
                          data: dict[str, Any] | None = None) -> None:
        host = self._require_host(call)
        host.update(task_load=float(task_load), ready=bool(ready), update_ts=time.time())
        if data is not None:
            host["data"] = data
        call.dirty = True

    def m_host_getTasks(self, call: _Call) -> list[dict[str, Any]]:
        host = self._require_host(call)
        if host["enabled"] and host["ready"]:
            for task in sorted(self._state["tasks"].values(),
                               key=lambda t: (t["priority"], t["id"])):
                if (task["state"] == TASK["FREE"] and task["channel_id"] in host["channels"]
                        and str(host["id"]) not in task["refusals"]):
                    task.update(state=TASK["ASSIGNED"], host_id=host["id"],
                                assign_ts=time.time())
                    call.dirty = True
        return [
            {k: t[k] for k in ("arch", "channel_id", "create_ts", "host_id", "id", "method",
                               "priority", "state")}
            for t in self._state["tasks"].values()
            if t["host_id"] == host["id"] and t["state"] == TASK["ASSIGNED"]
        ]

    def m_host_getHostTasks(self, call: _Call) -> list[dict[str, Any]]:
        host = self._require_host(call)
        return [{"id": t["id"], "waiting": t["waiting"], "weight": t["weight"]}
                for t in self._state["tasks"].values()
                if t["host_id"] == host["id"] and t["state"] == TASK["OPEN"]]

    def _owned_open(self, call: _Call, task_id: int) -> dict[str, Any]:
        host = self._require_host(call)
        task = self._task(task_id)
        if task["host_id"] != host["id"] or task["state"] != TASK["OPEN"]:
            raise koji.ActionNotAllowed(f"host {host['id']} does not own task {task_id}")
        return task

    def m_host_openTask(self, call: _Call, task_id: int) -> dict[str, Any] | None:
        host = self._require_host(call)
        task = self._task(task_id)
        if task["state"] != TASK["ASSIGNED"] or task["host_id"] != host["id"]:
            return None
        task.update(state=TASK["OPEN"], start_ts=time.time())
        call.dirty = True
        info = self._task_info(task)
        info["request"] = koji.xmlrpcplus.dumps(tuple(task["request"]), "build", allow_none=1)
        return info

    def m_host_setTaskWeight(self, call: _Call, task_id: int, weight: float) -> None:
        self._owned_open(call, task_id)["weight"] = float(weight)
        call.dirty = True

    def _finish(self, call: _Call, task_id: int, response: str, state: int) -> None:
        task = self._owned_open(call, task_id)
        task.update(state=state, result=response, completion_ts=time.time())
        call.dirty = True

    def m_host_closeTask(self, call: _Call, task_id: int, response: str) -> None:
        self._finish(call, task_id, response, TASK["CLOSED"])

    def m_host_failTask(self, call: _Call, task_id: int, response: str) -> None:
        self._finish(call, task_id, response, TASK["FAILED"])

    def m_host_refuseTask(self, call: _Call, task_id: int, soft: bool = True,
                          msg: str = "") -> None:
        host = self._require_host(call)
        task = self._task(task_id)
        if task["host_id"] != host["id"] or task["state"] not in (TASK["OPEN"],
                                                                  TASK["ASSIGNED"]):
            raise koji.ActionNotAllowed(f"host {host['id']} does not own task {task_id}")
        task["refusals"][str(host["id"])] = {"soft": bool(soft), "msg": msg,
                                             "time": time.time()}
        task.update(state=TASK["FREE"], host_id=None, start_ts=None)
        call.dirty = True

    def m_host_freeTasks(self, call: _Call, tasks: list[int]) -> None:
        host = self._require_host(call)
        for task_id in tasks:
            task = self._task(task_id)
            if task["host_id"] == host["id"] and task["state"] in (TASK["OPEN"],
                                                                   TASK["ASSIGNED"]):
                task.update(state=TASK["FREE"], host_id=None)
                call.dirty = True

    def m_host_tagBuild(self, call: _Call, task_id: int, tag: Any, build_id: int,
                        force: bool = False, fromtag: Any = None) -> None:
        self._owned_open(call, task_id)
        taginfo = self._tag(tag)
        assert taginfo is not None
        build = self._build(build_id)
        # HostExports.tagBuild (Koji 1.35): the package list is checked before the build's
        # state, and the message names the tag as the caller gave it.
        listed = self.package_config(taginfo["id"], build["name"])
        if listed is None:
            raise koji.TagError(f"Package {build['name']} not in list for {tag}")
        if listed["blocked"]:
            raise koji.TagError(f"Package {build['name']} blocked in {tag}")
        if build["state"] != BUILD["COMPLETE"]:
            state = koji.BUILD_STATES[build["state"]]
            raise koji.TagError(f"build {build['nvr']} not complete: state {state}")
        tagged = self._state["tagged"][str(taginfo["id"])]
        if build["id"] in tagged and not force:
            raise koji.TagError(f"build {build['nvr']} already tagged ({taginfo['name']})")
        tagged.append(build["id"])
        call.dirty = True

