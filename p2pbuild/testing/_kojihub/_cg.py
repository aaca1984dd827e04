"""Uploads and the content-generator API: ``CGInitBuild``, ``CGRefundBuild``,
``cancelBuild`` and ``CGImport`` validated and committed like the hub's.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import zlib
from typing import Any, cast

import attrs
import koji
import koji.util
import koji.xmlrpcplus

from ...koji._rpm import RpmHeaderError, read_rpm_header
from ._state import _new_id
from ._tasks import TaskMethods
from ._wire import BUILD, TASK, _Call


@attrs.define(eq=False)
class ContentGeneratorMethods(TaskMethods):
    # -- uploads --------------------------------------------------------------------------------

    def _raw_upload(self, call: _Call, query: dict[str, str], body: bytes) -> dict[str, Any]:
        self._require_user(call)
        target = self.path(f"work/{query['filepath']}/{query['filename']}")
        offset = int(query.get("offset", "0"))
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = "r+b" if target.exists() else "wb"
        if offset == 0 and query.get("overwrite") == "1":
            mode = "wb"
        with target.open(mode) as f:
            f.seek(offset)
            f.write(body)
        return {"size": len(body), "fileverify": query.get("fileverify", "adler32"),
                "offset": offset, "hexdigest": "%08x" % (zlib.adler32(body) & 0xFFFFFFFF)}

    def m_checkUpload(self, call: _Call, path: str, name: str, verify: str | None = None,
                      tail: int | None = None, volume: str | None = None
                      ) -> dict[str, Any] | None:
        self._require_user(call)
        target = self.path(f"work/{path}/{name}")
        if not target.is_file():
            return None
        info: dict[str, Any] = {"size": target.stat().st_size, "mtime": target.stat().st_mtime}
        if verify == "adler32":
            info["hexdigest"] = "%08x" % (zlib.adler32(target.read_bytes()) & 0xFFFFFFFF)
        return info


    # -- content generators ---------------------------------------------------------------------

    def _cg(self, name: str) -> dict[str, Any]:
        for cg in self._state["cgs"].values():
            if cg["name"] == name:
                return cast(dict[str, Any], cg)
        raise koji.GenericError(f"No such content generator: {name}")

    def _assert_cg(self, call: _Call, name: str) -> dict[str, Any]:
        user = self._require_user(call)
        cg = self._cg(name)
        if user["id"] not in cg["users"]:
            raise koji.ActionNotAllowed(
                f"{user['name']} is not authorized for content generator {name}"
            )
        return cg

    def m_grantCGAccess(self, call: _Call, user: str, cg: str, create: bool = False) -> None:
        self._require_admin(call)
        found = self._user(user)
        assert found is not None
        try:
            entry = self._cg(cg)
        except koji.GenericError:
            if not create:
                raise
            cid = _new_id(self._state, "cgs")
            entry = {"id": cid, "name": cg, "users": []}
            self._state["cgs"][str(cid)] = entry
        if found["id"] not in entry["users"]:
            entry["users"].append(found["id"])
        call.dirty = True

    def m_CGInitBuild(self, call: _Call, cg: str, data: dict[str, Any]) -> dict[str, Any]:
        cginfo = self._assert_cg(call, cg)
        user = self._require_user(call)
        for key in ("name", "version", "release"):
            if key not in data:
                raise koji.GenericError(f"Missing build field: {key}")
        nvr = f"{data['name']}-{data['version']}-{data['release']}"
        existing = self._build(nvr, strict=False)
        if existing and existing["state"] not in (BUILD["FAILED"], BUILD["CANCELED"]):
            raise koji.GenericError(f"Build already exists: {nvr}")
        if existing:
            existing["nvr"] = f"{nvr}#{existing['id']}"  # the name is free again
        build_id = _new_id(self._state, "builds")
        now = time.time()
        self._state["event"] += 1
        self._state["builds"][str(build_id)] = {
            "id": build_id, "name": data["name"], "version": data["version"],
            "release": data["release"], "epoch": data.get("epoch"), "nvr": nvr,
            "state": BUILD["BUILDING"], "task_id": data.get("task_id"),
            "owner_id": data.get("owner", user["id"]), "cg_id": cginfo["id"],
            "source": None, "extra": None, "start_ts": now, "creation_ts": now,
            "completion_ts": None, "creation_event_id": self._state["event"],
            "draft": False, "package_id": 1, "volume_id": 0, "volume_name": "DEFAULT",
            "promoter_id": None, "promoter_name": None, "promotion_time": None,
            "promotion_ts": None, "rpms": [], "logs": [], "buildroots": [],
        }
        token = secrets.token_hex(32)
        self._state["reservations"][str(build_id)] = {"token": token, "cg_id": cginfo["id"]}
        call.dirty = True
        return {"build_id": build_id, "token": token}

    def m_CGRefundBuild(self, call: _Call, cg: str, build_id: int, token: str,
                        state: int = BUILD["FAILED"]) -> None:
        cginfo = self._assert_cg(call, cg)
        build = self._build(build_id)
        reservation = self._state["reservations"].get(str(build["id"]))
        if reservation is None or not secrets.compare_digest(reservation["token"], token):
            raise koji.GenericError(f"Token doesn't match build ID {build['id']}")
        if reservation["cg_id"] != cginfo["id"]:
            raise koji.GenericError(f"Build ID {build['id']} not reserved by {cg}")
        if build["state"] != BUILD["BUILDING"]:
            raise koji.GenericError(f"Build ID {build['id']} is not in BUILDING state")
        if state not in (BUILD["FAILED"], BUILD["CANCELED"]):
            raise koji.GenericError(f"Invalid refund state: {state}")
        build.update(state=state, completion_ts=time.time())
        del self._state["reservations"][str(build["id"])]
        call.dirty = True

    def m_cancelBuild(self, call: _Call, buildID: Any, strict: bool = False) -> bool:
        """The build's owner or an admin cancels a ``BUILDING`` build (``koji cancel
        <nvr>``): its task is cancelled with it, its CG reservation dropped."""
        self._require_user(call)
        user = call.user
        assert user is not None
        build = self._build(buildID, strict)
        if not build:
            return False
        if build["owner_id"] != user["id"] and "admin" not in user["perms"]:
            raise koji.ActionNotAllowed("Cannot cancel build, not owner")
        if build["state"] != BUILD["BUILDING"]:
            return False
        build.update(state=BUILD["CANCELED"], completion_ts=time.time())
        task = self._state["tasks"].get(str(build["task_id"]))
        if task is not None and task["state"] not in (TASK["CLOSED"], TASK["CANCELED"],
                                                      TASK["FAILED"]):
            task.update(state=TASK["CANCELED"], completion_ts=time.time())
        self._state["reservations"].pop(str(build["id"]), None)
        call.dirty = True
        return True

    def m_CGImport(self, call: _Call, metadata: Any, directory: str, token: str | None = None
                   ) -> dict[str, Any]:
        self._require_user(call)
        if isinstance(metadata, str) and not metadata.lstrip().startswith("{"):
            path = self.path(f"work/{directory}/{metadata}")
            try:
                metadata = json.loads(path.read_text())
            except OSError:
                raise koji.GenericError(f"No such file: {directory}/{metadata}") from None
        elif isinstance(metadata, str):
            metadata = json.loads(metadata)
        if not isinstance(metadata, dict):
            raise koji.GenericError("Invalid metadata")
        plan = self._check_import(call, metadata, directory, token)
        return self._commit_import(call, plan)

    def _check_import(self, call: _Call, md: dict[str, Any], directory: str,
                      token: str | None) -> dict[str, Any]:
        """Everything CGImport checks, before anything is recorded (KeyError for a missing
        key travels as fault 1, like the hub's)."""
        if md["metadata_version"] != 0:
            raise koji.GenericError(f"Unknown metadata version: {md['metadata_version']}")
        binfo = md["build"]
        for key in ("name", "version", "release", "source", "extra", "start_time",
                    "end_time"):
            binfo[key]  # a KeyError is the hub's answer (fault 1)
        if not isinstance(binfo["extra"], dict):
            raise koji.GenericError("build extra must be a dict")
        nvr = f"{binfo['name']}-{binfo['version']}-{binfo['release']}"
        # The hub's CG_Importer.prep_build: a reserved build is named by build_id (and the
        # token must come with it); without one, the NVR must be free.
        if binfo.get("build_id"):
            build = self._build(binfo["build_id"])
            reservation = self._state["reservations"].get(str(build["id"]))
            if reservation is None or token is None or not secrets.compare_digest(
                reservation["token"], token
            ):
                raise koji.GenericError(f"Token doesn't match build ID {build['id']}")
            cg_names = {br["content_generator"]["name"] for br in md["buildroots"]}
            if {self._cg(name)["id"] for name in cg_names} != {reservation["cg_id"]}:
                raise koji.GenericError(f"Build ID {build['id']} is not reserved by this CG")
            if build["task_id"] and build["task_id"] != binfo.get("task_id"):
                raise koji.GenericError(f"Build is owned by task {build['task_id']}")
            if build["state"] != BUILD["BUILDING"]:
                raise koji.GenericError(f"Build ID {build['id']} is not in BUILDING state")
            if (build["name"], build["version"], build["release"]) != (
                    binfo["name"], binfo["version"], binfo["release"]):
                raise koji.GenericError(f"Build ({build['id']}) NVR is different")
        elif token is not None:
            raise koji.GenericError("Reservation token given, but no build_id in metadata")
        else:
            build = self._build(nvr, strict=False)
            if build and build["state"] not in (BUILD["FAILED"], BUILD["CANCELED"]):
                raise koji.GenericError(f"Build already exists: {nvr}")
            build = {}
        if binfo.get("owner") is not None:
            self._user(binfo["owner"])  # the hub's get_user(owner, strict=True)
        buildroots = {}
        for br in md["buildroots"]:
            for key in ("id", "host", "content_generator", "container", "tools",
                        "components"):
                br[key]
            br["host"]["os"], br["host"]["arch"]
            br["container"]["type"], br["container"]["arch"]
            self._assert_cg(call, br["content_generator"]["name"])
            br["content_generator"]["version"]
            for comp in br["components"]:
                # The hub's CG_Importer.match_components: rpm components need these keys;
                # "location" (external) and "id" are refused.
                if comp["type"] == "rpm":
                    for key in ("name", "version", "release", "epoch", "arch", "sigmd5",
                                "signature"):
                        comp[key]
                    if "location" in comp:
                        raise koji.GenericError("External rpms not allowed")
                    if "id" in comp:
                        raise koji.GenericError("Unexpected 'id' field in component")
                elif comp["type"] not in ("file", "kojifile"):
                    raise koji.GenericError(f"Unknown component type: {comp['type']}")
            if br["id"] in buildroots:
                raise koji.GenericError(f"Duplicate buildroot id: {br['id']}")
            buildroots[br["id"]] = br
        used: set[Any] = set()
        outputs = []
        for out in md["output"]:
            for key in ("buildroot_id", "filename", "filesize", "checksum_type", "checksum",
                        "type"):
                out[key]
            if out["buildroot_id"] not in buildroots:
                raise koji.GenericError(f"No such buildroot: {out['buildroot_id']}")
            used.add(out["buildroot_id"])
            relpath = out.get("relpath") or ""
            path = self.path(f"work/{directory}/{relpath}/{out['filename']}")
            if not path.is_file():
                raise koji.GenericError(f"No such file: {path.relative_to(self.data_dir)}")
            data = path.read_bytes()
            if len(data) != out["filesize"]:
                raise koji.GenericError(
                    f"File size {len(data)} for {out['filename']} (expected "
                    f"{out['filesize']}) doesn't match"
                )
            if out["checksum_type"] not in ("md5", "sha256"):
                raise koji.GenericError(f"Unsupported checksum type: {out['checksum_type']}")
            actual = hashlib.new(out["checksum_type"], data).hexdigest()
            if actual != out["checksum"]:
                raise koji.GenericError(
                    f"File checksum mismatch for {out['filename']}: {actual} "
                    f"(expected {out['checksum']})"
                )
            header = None
            if out["type"] == "rpm":
                if not out["filename"].endswith(".rpm"):
                    raise koji.GenericError(f"Not an rpm: {out['filename']}")
                try:
                    header = read_rpm_header(path)
                except RpmHeaderError as exc:
                    raise koji.GenericError(str(exc)) from None
                if header.is_source:
                    if header.nvr != nvr:
                        raise koji.GenericError(
                            f"Build is {nvr}, but srpm is {header.nvr}"
                        )
                elif header.sourcerpm != f"{nvr}.src.rpm":
                    raise koji.GenericError(
                        f"srpm mismatch for {out['filename']}: {header.sourcerpm} "
                        f"(expected {nvr}.src.rpm)"
                    )
            elif out["type"] != "log":
                raise koji.GenericError(f"Unsupported file type: {out['type']}")
            outputs.append((out, path, header, hashlib.md5(data).hexdigest()))
        unused = sorted(set(buildroots) - used, key=str)
        if unused:
            raise koji.GenericError(f"Buildroots not referenced by any output: {unused}")
        return {"md": md, "build": build, "nvr": nvr, "outputs": outputs,
                "buildroots": buildroots}

    def _commit_import(self, call: _Call, plan: dict[str, Any]) -> dict[str, Any]:
        md = plan["md"]
        binfo = md["build"]
        user = self._require_user(call)
        build = plan["build"]
        if not build:
            created = self.m_CGInitBuild(call, md["buildroots"][0]["content_generator"]["name"],
                                         {k: binfo[k] for k in ("name", "version", "release")})
            build = self._build(created["build_id"])
        base = f"packages/{binfo['name']}/{binfo['version']}/{binfo['release']}"
        br_ids = {}
        for local_id in plan["buildroots"]:
            br_ids[local_id] = _new_id(self._state, "buildroots")
        rpms, logs = [], []
        for out, path, header, md5 in plan["outputs"]:
            if header is not None:
                arch = header.arch
                dest = self.path(f"{base}/{arch}/{out['filename']}")
                rpms.append({
                    "arch": arch, "build_id": build["id"], "buildroot_id": br_ids[
                        out["buildroot_id"]], "buildtime": header.buildtime, "draft": False,
                    "epoch": header.epoch, "external_repo_id": 0,
                    "external_repo_name": "INTERNAL", "extra": out.get("extra"),
                    "id": _new_id(self._state, "rpms"), "metadata_only": False,
                    "name": header.name, "nvr": header.nvr, "payloadhash": md5,
                    "release": header.release, "size": out["filesize"],
                    "version": header.version,
                })
            else:
                subdir = out.get("subdir") or "."
                dest = self.path(f"{base}/data/logs/{subdir}/{out['filename']}")
                logs.append({"name": out["filename"], "dir": subdir,
                             "path": f"{base}/data/logs/{subdir}/{out['filename']}"})
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
        metadata_file = self.path(f"{base}/data/metadata.json")
        metadata_file.parent.mkdir(parents=True, exist_ok=True)
        metadata_file.write_text(json.dumps(md, indent=2))
        # The hub's CG_Importer.update_build: owner and task come from the metadata.
        owner = self._user(binfo["owner"]) if binfo.get("owner") is not None else user
        assert owner is not None
        build.update(
            state=BUILD["COMPLETE"], source=binfo["source"], extra=binfo["extra"],
            start_ts=float(binfo["start_time"]), completion_ts=float(binfo["end_time"]),
            rpms=rpms, logs=logs, epoch=binfo.get("epoch"),
            buildroots=[{**br, "id": br_ids[br["id"]]} for br in plan["buildroots"].values()],
            owner_id=owner["id"], task_id=binfo.get("task_id"),
        )
        self._state["reservations"].pop(str(build["id"]), None)
        call.dirty = True
        return self._build_info(build)

