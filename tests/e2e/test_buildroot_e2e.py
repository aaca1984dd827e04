"""End to end with buildroots: a farm of real processes builds an SRPM whose BuildRequires
exist only in a repository served over HTTPS on loopback; the dispatcher pins the
repository at submission and verifies across two operators' buildroots."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import trio

from p2pbuild import Result
from p2pbuild.testing import (
    GREET_HEADER,
    LocalFarm,
    NodeSpec,
    greet_devel_rpm,
    greet_srpm,
    open_local_farm,
    publish_repository,
    serve_files,
    write_rpm,
)

pytestmark = pytest.mark.slow


async def test_a_buildroot_build_verifies_across_operators_and_a_missing_one_fails(
    tmp_path: Path,
) -> None:
    assert not Path(GREET_HEADER).exists(), "the host must not have the test header"
    www = tmp_path / "www"
    repo = publish_repository(www / "repo", [greet_devel_rpm(tmp_path / "rpms")])
    srpm = greet_srpm(tmp_path / "srpm")
    farm = LocalFarm.create(tmp_path / "farm",
                            [NodeSpec("alice-1", "alice"), NodeSpec("bob-1", "bob")])
    async with open_local_farm(farm), trio.open_nursery() as nursery:
        base, _ = await nursery.start(serve_files, www, tmp_path / "tls")
        with trio.fail_after(60):
            await farm.start_all()
        # No digest given: the dispatcher pins the repository's repomd.xml at submission.
        buildroot = {"repos": [{"name": "greet", "url": f"{base}/repo/"}]}
        submitted = await farm.submit(srpm.path, buildroot=json.dumps(buildroot))
        assert submitted["options"]["buildroot"]["repos"][0]["repomd_sha256"] == (
            repo.repomd_sha256.hex()
        )
        build = await farm.wait_build(submitted["id"], timeout=120)
        assert build["state"] == "verified", build["reason"]
        stored = Path(build["sink_path"])
        manifest = json.loads((stored / "manifest.json").read_text())
        records = []
        for entry in manifest["verified_by"]:
            result = Result.from_bytes((stored / entry["result"]).read_bytes())
            assert result.buildroot is not None
            records.append(result.buildroot)
        assert len(records) == 2 and records[0] == records[1]
        assert records[0].repos == (("greet", repo.repomd_sha256),)
        assert "p2pbuild-greet-devel-1.0-1.noarch" in [p.nevra for p in records[0].packages]

        # The repository re-published without the devel package: nothing provides it.
        publish_repository(www / "repo", [write_rpm(tmp_path / "other", "unrelated",
                                                    files={"/usr/share/unrelated/x": "x"})])
        # Through the CLI this time, pinned by the client.
        republished = hashlib.sha256((www / "repo" / "repodata" / "repomd.xml").read_bytes())
        submitted = await farm.cli("submit", str(srpm.path), "--repo",
                                   f"greet={base}/repo/@{republished.hexdigest()}")
        assert submitted["options"]["buildroot"]["repos"][0]["repomd_sha256"] == (
            republished.hexdigest()
        )
        build = await farm.wait_build(submitted["id"], timeout=120)
        assert build["state"] == "failed"
        assert "rejected: missing-build-dependency: p2pbuild-greet-devel" in build["reason"]
        shown = await farm.cli("builds", "show", build["id"])
        reasons = {a["reason"] for a in shown["attempts"] if a["state"] == "failed"}
        assert reasons == {"build rejected: missing-build-dependency: p2pbuild-greet-devel"}
        nursery.cancel_scope.cancel()
