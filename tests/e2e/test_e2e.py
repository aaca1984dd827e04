"""End to end: a whole farm as real child processes on loopback.

Every test runs its own small farm (``p2pbuild.testing.LocalFarm``): ``p2pbuild dht serve``,
``p2pbuild dispatcher run`` and ``p2pbuild node run`` (or the test-only tampering node)
processes, talking over real UDP (the DHT) and HTTPS (pinned certificates), building a
generated C SRPM with real ``rpmbuild`` in bubblewrap, the dispatcher keeping its state in
a real SQLite file. Assertions read what a user would: the stored repository, the proof
files, ``p2pbuild builds show --json`` and ``p2pbuild nodes ls --json``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_farm import farm_of, wait_log

from p2pbuild import Job, Result, Role
from p2pbuild.testing import LocalFarm, NodeSpec

pytestmark = pytest.mark.slow




def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_stored(farm: LocalFarm, build: dict[str, Any]) -> tuple[Path, set[str]]:
    """Check a verified build's directory: artifacts match the manifest and both signed
    results, which answer the dispatcher's signed jobs, come from trust-listed nodes of two
    different operators. Returns the directory and the proof's operators."""
    stored = Path(build["sink_path"])
    assert stored.parent == farm.repository
    manifest = json.loads((stored / "manifest.json").read_text())
    assert manifest["build_id"] == build["id"]
    digests = {a["name"]: a["sha256"] for a in manifest["artifacts"]}
    assert digests and all(name.endswith(".rpm") for name in digests)
    for name, digest in digests.items():
        assert sha256(stored / "artifacts" / name) == digest
    operators = set()
    for entry in manifest["verified_by"]:
        job = Job.from_bytes((stored / entry["job"]).read_bytes())  # signature checked
        result = Result.from_bytes((stored / entry["result"]).read_bytes())
        assert job.dispatcher == farm.dispatcher_key
        result.check_answers(job, result.node)
        assert {a.name: a.sha256.hex() for a in result.artifacts} == digests
        operators.add(farm.trust_list.require(result.node, Role.NODE).operator)
    assert len(manifest["verified_by"]) == 2
    assert len(operators) == 2, "nodes of one operator never verify each other"
    assert sorted(p.name for p in (stored / "proof").iterdir()) == sorted(
        name for e in manifest["verified_by"] for name in
        (Path(e["job"]).name, Path(e["result"]).name)
    )
    return stored, operators


def repository_digests(farm: LocalFarm) -> set[str]:
    if not farm.repository.exists():
        return set()
    return {sha256(p) for p in farm.repository.rglob("*") if p.is_file()}


def rpm_name(path: Path) -> str:
    done = subprocess.run(["rpm", "-qp", "--nosignature", "--qf", "%{NAME}", str(path)],
                          capture_output=True, check=True, text=True)
    return done.stdout


async def test_real_srpm_verified_and_stored_with_a_pull_mode_node(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    specs = [
        NodeSpec("alice-1", "alice"),
        NodeSpec("bob-1", "bob", pools=("nat",)),
        NodeSpec("carol-pull", "carol", pull=True, pools=("nat",)),
    ]
    async with farm_of(tmp_path, specs) as farm:
        # Only bob's push node and carol's pull node serve pool "nat".
        submitted = await farm.submit(sources["hello"], pool="nat")
        build = await farm.wait_build(submitted["id"], timeout=60)
        assert build["state"] == "verified", build["reason"]
        stored, operators = check_stored(farm, build)
        assert operators == {"bob", "carol"}
        (rpm,) = (stored / "artifacts").rglob("*.rpm")
        assert rpm_name(rpm) == "hello"
        assert stored.name == "hello-1.0-1"

        shown = await farm.cli("builds", "show", build["id"])
        assert shown["state"] == "verified" and shown["sink_path"] == str(stored)
        modes = {farm.node_name(e["node"]): e["detail"]["mode"]
                 for e in shown["events"] if e["event"] == "node-chosen"}
        assert modes == {"bob-1": "push", "carol-pull": "pull"}
        assert {a["state"] for a in shown["attempts"]} == {"succeeded"}
        assert [a["endpoint"] for a in shown["attempts"]
                if farm.node_name(a["node"]) == "carol-pull"] == [""]

        nodes = {farm.node_name(n["node"]): n for n in (await farm.cli("nodes", "ls"))["nodes"]}
        assert set(nodes) == {"alice-1", "bob-1", "carol-pull"}
        assert nodes["carol-pull"]["endpoint"] == "(pull)"
        assert nodes["carol-pull"]["observations"] > 0 and nodes["bob-1"]["observations"] > 0
        assert nodes["alice-1"]["observations"] == 0


async def test_tampering_node_is_caught_and_the_tie_break_decides(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    specs = [
        NodeSpec("alice-1", "alice"),
        NodeSpec("mallory-1", "mallory", tamper=True),
        NodeSpec("bob-1", "bob"),
    ]
    # bob's node joins only once alice's and mallory's results disagree, so the first two
    # replicas are certainly alice's and mallory's and bob's is the tie-break.
    async with farm_of(tmp_path, specs, start=["alice-1", "mallory-1"]) as farm:
        submitted = await farm.submit(sources["hello"])
        waiting = await farm.wait_build(submitted["id"], lambda b: bool(b["report"]))
        assert waiting["state"] == "running"
        assert "mallory" in waiting["report"] and "alice" in waiting["report"]
        await farm.start("bob-1")
        build = await farm.wait_build(submitted["id"], timeout=60)
        assert build["state"] == "verified", build["reason"]
        _, operators = check_stored(farm, build)
        assert operators == {"alice", "bob"}
        roles = {farm.node_name(a["node"]): (a["role"], a["state"]) for a in build["attempts"]}
        assert roles == {"alice-1": ("replica", "succeeded"),
                         "mallory-1": ("replica", "succeeded"),
                         "bob-1": ("tiebreak", "succeeded")}
        verified = [e for e in build["events"] if e["event"] == "build-verified"]
        assert [farm.node_name(k) for k in verified[0]["detail"]["outliers"]] == ["mallory-1"]
        report = farm.root / "dispatcher" / "state" / "reports" / f"{build['id']}.txt"
        assert report.read_text() == build["report"]

        # Nothing mallory signed is stored: its (validly signed) digests are nowhere.
        with sqlite3.connect(f"file:{farm.database}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT node, raw FROM results WHERE build_id = ?",
                              (build["id"],)).fetchall()
        tampered = {a.sha256.hex() for node, raw in rows
                    if farm.node_name(node) == "mallory-1"
                    for a in Result.from_bytes(bytes(raw)).artifacts}
        assert tampered and not tampered & repository_digests(farm)

        nodes = {farm.node_name(n["node"]): n for n in (await farm.cli("nodes", "ls"))["nodes"]}
        assert nodes["mallory-1"]["agreement"] < 0.9  # the prior for a new population
        for honest in ("alice-1", "bob-1"):
            assert nodes["mallory-1"]["agreement"] < nodes[honest]["agreement"]
            assert nodes["mallory-1"]["score"] < nodes[honest]["score"]


async def test_node_killed_mid_build_is_replaced(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    specs = [NodeSpec("alice-1", "alice"), NodeSpec("bob-1", "bob"), NodeSpec("carol-1", "carol")]
    async with farm_of(tmp_path, specs) as farm:
        submitted = await farm.submit(sources["slow"])
        running = await farm.wait_build(
            submitted["id"],
            lambda b: sum(a["state"] == "running" for a in b["attempts"]) == 2,
        )
        victim = farm.node_name(running["attempts"][0]["node"])
        survivor = farm.node_name(running["attempts"][1]["node"])
        await wait_log(farm, running, victim, b"+ sleep 4")  # into the 4 s %build
        farm.kill(victim)
        assert await farm.wait_exit(victim) == -9
        build = await farm.wait_build(submitted["id"], timeout=60)
        assert build["state"] == "verified", build["reason"]
        _, operators = check_stored(farm, build)
        (spare,) = {"alice-1", "bob-1", "carol-1"} - {victim, survivor}
        assert operators == {farm.spec(survivor).operator, farm.spec(spare).operator}
        by_node = {farm.node_name(a["node"]): a for a in build["attempts"]}
        assert by_node[victim]["state"] == "lost"
        assert "unreachable" in by_node[victim]["reason"]
        assert by_node[spare]["role"] == "replacement"
        assert by_node[spare]["state"] == by_node[survivor]["state"] == "succeeded"

        nodes = {farm.node_name(n["node"]): n for n in (await farm.cli("nodes", "ls"))["nodes"]}
        assert nodes[victim]["success"] < nodes[survivor]["success"]
        assert nodes[victim]["in_directory"], "its records outlive it; the engine did not wait"


async def test_dispatcher_killed_mid_build_and_restarted_finishes_it(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    # One push node and one pull node: the pull queue lives in the dispatcher's memory.
    specs = [NodeSpec("alice-1", "alice"), NodeSpec("carol-pull", "carol", pull=True)]
    async with farm_of(tmp_path, specs) as farm:
        submitted = await farm.submit(sources["slow"])
        before = await farm.wait_build(
            submitted["id"],
            lambda b: sum(a["state"] == "running" for a in b["attempts"]) == 2,
        )
        await wait_log(farm, before, "alice-1", b"+ sleep 4")  # into the 4 s %build
        farm.kill("dispatcher")
        assert await farm.wait_exit("dispatcher") == -9
        await farm.start("dispatcher")
        build = await farm.wait_build(submitted["id"], timeout=60)
        assert build["state"] == "verified", build["reason"]
        stored, operators = check_stored(farm, build)
        assert operators == {"alice", "carol"}
        # Nothing lost, nothing redone: the same two signed jobs, re-attached after restart.
        assert [a["job_id"] for a in build["attempts"]] == [
            a["job_id"] for a in before["attempts"]
        ]
        assert {a["state"] for a in build["attempts"]} == {"succeeded"}
        assert "resumed" in [e["event"] for e in build["events"]]
        proof_jobs = {Job.from_bytes(p.read_bytes()).id_hex
                      for p in (stored / "proof").glob("*.job")}
        assert proof_jobs == {a["job_id"] for a in before["attempts"]}
        shown = await farm.cli("builds", "show", build["id"])
        assert shown["state"] == "verified"


async def test_two_nodes_of_one_operator_never_verify_each_other(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    specs = [
        NodeSpec("alice-1", "alice", pools=("solo",)),
        NodeSpec("alice-2", "alice", pools=("solo",)),
        NodeSpec("bob-1", "bob"),
    ]
    async with farm_of(tmp_path, specs) as farm:
        # Only alice's two nodes serve pool "solo": they may not verify each other.
        solo = await farm.submit(sources["hello"], pool="solo")
        build = await farm.wait_build(solo["id"])
        assert build["state"] == "failed"
        assert "all are operator alice" in build["reason"]
        assert "2 replicas need 2 operators" in build["reason"]
        assert build["attempts"] == [] and repository_digests(farm) == set()

        three = await farm.submit(sources["hello"], replicas=3)
        build = await farm.wait_build(three["id"])
        assert build["state"] == "failed"
        assert "only 2 operators (alice, bob)" in build["reason"], build["reason"]

        anywhere = await farm.submit(sources["hello"])
        build = await farm.wait_build(anywhere["id"], timeout=60)
        assert build["state"] == "verified", build["reason"]
        _, operators = check_stored(farm, build)
        assert operators == {"alice", "bob"}
        shown = await farm.cli("builds", "ls")
        assert [b["state"] for b in shown["builds"]] == ["verified", "failed", "failed"]


async def test_constraints_matching_nothing_fail_with_the_reason(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    specs = [NodeSpec("alice-1", "alice"), NodeSpec("bob-1", "bob")]
    async with farm_of(tmp_path, specs) as farm:
        expected = {
            "arch": ("s390x", "no trusted node has arch=s390x"),
            "os": ("fedora-99", f"2 nodes match arch={farm.arch} but none has os=fedora-99"),
            "machine": ("metal", f"2 nodes match arch={farm.arch}, os={farm.os} but none has "
                                 "machine=metal"),
            "pool": ("gpu", f"2 nodes match arch={farm.arch}, os={farm.os} but none has "
                            "pool gpu"),
        }
        for field, (value, reason) in expected.items():
            submitted = await farm.submit(sources["hello"], **{field: value})
            await farm.wait_build(submitted["id"], timeout=20)
            shown = await farm.cli("builds", "show", submitted["id"])
            assert shown["state"] == "failed"
            assert shown["reason"] == reason
            assert shown["attempts"] == []
            assert shown["events"][-1]["event"] == "build-failed"
        assert repository_digests(farm) == set()


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in command:
                found.append(command)
    return found


async def test_demo_builds_verifies_stores_and_cleans_up(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    started = trio.current_time()
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, "-m", "p2pbuild", "demo", "--keep", str(keep), "--json"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert trio.current_time() - started < 60
    out = done.stdout.decode()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["state"] == "verified"
    assert len({v["operator"] for v in summary["verified_by"]}) == 2
    stored = Path(summary["stored"])
    for item in summary["artifacts"]:
        assert sha256(Path(item["path"])) == item["sha256"]
    for v in summary["verified_by"]:
        assert Path(v["job"]).parent == stored / "proof" and Path(v["result"]).is_file()
        assert v["fingerprint"] in out
    for phrase in ("refused: a list signed by 1 of 3 maintainers", "carol-pull",
                   "long-polls the dispatcher", "chose ", "verified by two operators",
                   str(stored), "every process stopped"):
        assert phrase in out
    assert _processes_mentioning(str(keep)) == [], "the demo left processes behind"
    # The commands it prints to run the farm again are ones a user can type.
    assert summary["commands"], summary
    assert all(c.startswith("p2pbuild ") for c in summary["commands"]), summary["commands"]
    assert (f"  p2pbuild dispatcher run --config {keep.resolve()}/dispatcher/dispatcher.toml &"
            in out)
