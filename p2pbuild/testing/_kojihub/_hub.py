"""The test hub: every layer of methods, and the ``testhub.*`` controls.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import attrs
import koji
import koji.util
import koji.xmlrpcplus

from ._cg import ContentGeneratorMethods
from ._state import _new_id
from ._wire import _when


@attrs.define(eq=False)
class KojiTestHub(ContentGeneratorMethods):
    """The hub over ``data_dir`` (``_core.HubCore``), with every method."""

    # -- test controls --------------------------------------------------------------------------

    def _test_control(self, method: str, params: list[Any]) -> Any:
        name = method.split(".", 1)[1]
        if name == "expireSessions":
            self._expire_all()
            self._save()
            return True
        if name == "expireOn":
            self._expire_on.add(params[0])
            return True
        if name == "crashOn":
            self._crash_on.add(params[0])
            return True
        if name == "setOffline":
            self._offline = bool(params[0])
            return True
        if name == "taskRefusals":
            return list(self._task(params[0])["refusals"].values())
        if name == "calls":
            return [dict(c) for c in self.calls]
        if name == "state":
            return json.dumps(self._state)
        if name == "newRepo":
            return self._new_repo(*params)
        raise koji.GenericError(f"Invalid method: {method}")

    def _new_repo(self, tag: str, arch: str, rpms: list[str], build_group: list[str]) -> int:
        """``testhub.newRepo``: what kojira's ``newRepo`` task makes, in small: the tag's
        next repository ``repos/<tag>/<id>/<arch>/`` under the files the hub serves, of
        the RPM files at the paths ``rpms``, with comps group ``build`` = ``build_group``,
        made with createrepo_c. Returns the repository id."""
        taginfo = self._tag(tag)
        assert taginfo is not None
        repo_id = _new_id(self._state, "repos")
        directory = self.path(f"repos/{taginfo['name']}/{repo_id}/{arch}")
        (directory / "Packages").mkdir(parents=True)
        for rpm in rpms:
            shutil.copyfile(rpm, directory / "Packages" / Path(rpm).name)
        reqs = "".join(f"<packagereq type='mandatory'>{escape(n)}</packagereq>"
                       for n in build_group)
        comps = directory / "comps.xml"
        comps.write_text("<?xml version='1.0'?><comps><group><id>build</id><name>build</name>"
                         f"<packagelist>{reqs}</packagelist></group></comps>\n")
        subprocess.run(["createrepo_c", "--quiet", "--no-database", "--groupfile", str(comps),
                        str(directory)], check=True, capture_output=True)
        self._state["event"] += 1
        self._state.setdefault("repos", {})[str(repo_id)] = {
            "id": repo_id, "tag_id": taginfo["id"], "tag_name": taginfo["name"],
            "state": koji.REPO_STATES["READY"], "create_event": self._state["event"],
            "create_ts": time.time(), "creation_time": _when(time.time()), "dist": False,
        }
        self._save()
        return repo_id

