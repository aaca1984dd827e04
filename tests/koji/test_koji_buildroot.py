"""Koji builds use the build tag's repository: the dispatcher takes the target's build tag,
its current repository from the hub (``getRepo``), pins its ``repomd.xml`` at dispatch, the
nodes build in a buildroot made from it, and the CG import lists each buildroot's
components and the repository id."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import koji
import pytest
from koji_farms import open_farms, task_id_of

from p2pbuild import Job
from p2pbuild.node import BuildrootCache, ExecutorRunner
from p2pbuild.testing import GREET_HEADER, greet_devel_rpm, hello_srpm, make_trust_list
from p2pbuild.testing._kojifarm import KojiFarm

pytestmark = pytest.mark.slow

FIXTURE = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob")])


@pytest.fixture
async def farm(tmp_path: Path) -> AsyncIterator[KojiFarm]:
    runners = {name: ExecutorRunner(buildroots=BuildrootCache(tmp_path / f"{name}-br"))
               for name in ("n1", "n2")}
    async with open_farms(tmp_path, FIXTURE) as farms:
        yield await farms.start(runners, build_types=("rpm", "rpm.dnf"))


async def test_a_koji_build_uses_the_build_tags_repo_and_imports_components(
    farm: KojiFarm, tmp_path: Path
) -> None:
    assert not Path(GREET_HEADER).exists(), "the host must not have the test header"
    devel = greet_devel_rpm(tmp_path / "rpms", greeting="hello from p2pbuild")
    # The build group is met by the node's host base (bash, gcc); the header is only here.
    repo_id = await farm.call("testhub.newRepo", "f40-build", "x86_64", [str(devel)],
                              ["bash", "gcc"])
    repo = await farm.call("getRepo", "f40-build")
    assert repo["id"] == repo_id and repo["state"] == koji.REPO_STATES["READY"]
    srpm = hello_srpm(tmp_path / "src", devel=True)
    code, out, err = await farm.koji("build", "--wait", "f40-p2p", str(srpm.path))
    assert code == 0, out + err
    result = await farm.call("getTaskResult", task_id_of(out))
    [build_id] = result["koji_builds"]
    build = await farm.call("getBuild", build_id)
    assert build["state"] == koji.BUILD_STATES["COMPLETE"]
    base = farm.hub.data_dir / "packages" / build["name"] / build["version"] / build["release"]
    metadata: dict[str, Any] = json.loads((base / "data" / "metadata.json").read_text())
    roots = metadata["buildroots"]
    assert len(roots) == 2
    for root in roots:
        components = {c["name"]: c for c in root["components"]}
        devel_component = components["p2pbuild-greet-devel"]
        assert devel_component == {
            "type": "rpm", "name": "p2pbuild-greet-devel", "version": "1.0", "release": "1",
            "epoch": None, "arch": "noarch", "sigmd5": devel_component["sigmd5"],
            "signature": None,
        }
        assert len(devel_component["sigmd5"]) == 32
        assert "p2pbuild-host" in components
        pinned = root["extra"]["p2pbuild"]["repo"]
        assert pinned["tag"] == "f40-build" and pinned["repo_id"] == repo_id
        assert pinned["url"].endswith(f"/repos/f40-build/{repo_id}/x86_64/")
        # The signed job the node ran names exactly that pinned repository.
        fingerprint = root["extra"]["p2pbuild"]["fingerprint"].replace(":", "")
        job = Job.from_bytes((base / "data" / "logs" / fingerprint /
                              "p2pbuild-job.msgpack").read_bytes())
        assert job.spec.buildroot is not None
        assert job.spec.buildroot.repos[0].repomd_sha256.hex() == pinned["repomd_sha256"]
        assert job.spec.buildroot.group == "build"
    # The hub recorded the components of each imported buildroot.
    rpms = await farm.call("listRPMs", build_id)
    listing = await farm.call("getBuildrootListing", rpms[0]["buildroot_id"])
    assert "p2pbuild-greet-devel" in {c["name"] for c in listing}
