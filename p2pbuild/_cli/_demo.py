"""``p2pbuild demo``: the README's main job, on a throwaway farm on this machine.

It writes a deployment (maintainer keys, a 2-of-3 signed trust list, a dispatcher, four
nodes of three operators, one of them pull-mode) into a temporary directory (or ``--keep
DIR``), starts a DHT bootstrap node, the dispatcher and the nodes as real child processes
on loopback (``_localfarm.LocalFarm``), builds a generated C "hello" SRPM on nodes of
two operators, checks the stored result and its proof, and stops everything, also on an
error or Ctrl-C. The SRPM's ``BuildRequires: p2pbuild-greet-devel`` exists only in a small
RPM repository the demo makes (rpmbuild + createrepo_c) and serves over HTTPS: each node
builds in a buildroot made from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from .._errors import LocalError, P2PBuildError
from .._identity import Role
from .._jobs import Job, Result
from .._trust import accept_update
from ..dispatcher import StoredBuild
from ._args import action, json_flag
from ._client import Client, follow_build, post_source
from ._localfarm import LocalFarm, NodeSpec, open_local_farm
from ._packages import hello_srpm
from ._repos import GREET_HEADER, greet_devel_rpm, publish_repository, serve_files

__all__ = ["register"]

#: The throwaway farm: four nodes of three operators; carol's is behind NAT (pull mode).
_NODES = (
    NodeSpec("alice-1", "alice"),
    NodeSpec("alice-2", "alice"),
    NodeSpec("bob-1", "bob"),
    NodeSpec("carol-pull", "carol", pull=True),
)


def register(sub: Any) -> None:
    demo = action(
        sub, "demo", _demo,
        help="run a throwaway build farm on this machine and build a package on it",
    )
    demo.add_argument("--keep", type=Path, metavar="DIR",
                      help="write the deployment into DIR (a new or empty directory) and "
                      "keep it, with the stored build and the logs, afterwards")
    json_flag(demo, "print a JSON summary as the last line")


def _demo(args: argparse.Namespace) -> int:
    """Create a throwaway deployment (maintainer keys, a 2-of-3 signed trust list, a dispatcher,
    four nodes of three operators, one behind NAT in pull mode), start it as real processes on
    loopback, build a small C package on nodes of two operators, verify and store it, print where
    the result and its proof are, and stop everything. Nothing leaves this machine."""
    started = time.monotonic()
    if args.keep is not None:
        keep: Path = args.keep
        if keep.exists() and any(keep.iterdir()):
            raise LocalError(f"{keep} is not empty; give a new or empty directory to --keep")
        keep.mkdir(parents=True, exist_ok=True)
        summary = trio.run(_run, keep.resolve(), started)
    else:
        with tempfile.TemporaryDirectory(prefix="p2pbuild-demo-") as tmp:
            summary = trio.run(_run, Path(tmp), started)
    seconds = time.monotonic() - started
    print(f"\n== 5. Done in {seconds:.1f} s; every process stopped.")
    if args.keep is None:
        print("The temporary directory is removed; `p2pbuild demo --keep DIR` keeps the "
              "deployment, the stored build and the logs.")
    else:
        root = summary["root"]
        print(f"Everything is in {root} (logs in {root}/logs). To run the farm again by hand:")
        for command in summary["commands"]:
            print(f"  {command} &")
        print(f"  p2pbuild builds show {summary['build']} --client-config "
              f"{root}/dispatcher/client.toml")
    if args.json:
        summary["seconds"] = round(seconds, 2)
        print(json.dumps(summary))
    return 0


class _Clock:
    def __init__(self, started: float) -> None:
        self.started = started

    def stamp(self) -> str:
        return f"[{time.monotonic() - self.started:5.1f}s]"


def _section(title: str) -> None:
    print(f"\n== {title}")


async def _run(root: Path, started: float) -> dict[str, Any]:
    clock = _Clock(started)
    print(f"p2pbuild demo: a throwaway build farm on this machine (loopback only) in {root}")
    farm = LocalFarm.create(root, _NODES)
    _trust_root(farm)
    try:
        source = hello_srpm(root / "sources", devel=True)
        devel = greet_devel_rpm(root / "rpms", greeting="hello from p2pbuild")
        repo = publish_repository(root / "www" / "repo", [devel])
    except (OSError, subprocess.CalledProcessError) as exc:
        raise LocalError(f"cannot generate the demo's SRPM and repository: {exc}") from None
    try:
        async with open_local_farm(farm), trio.open_nursery() as nursery:
            repo_base, _ = await nursery.start(serve_files, root / "www", root / "repo-tls")
            repo_url = f"{repo_base}/repo/"
            _section("2. Start the farm: every part is a separate process, as in a deployment")

            def show(name: str, line: dict[str, Any]) -> None:
                process = farm.processes[name]
                if name == "bootstrap":
                    what = f"DHT bootstrap node   UDP {line['address']}"
                elif name == "dispatcher":
                    what = f"dispatcher           {line['url']}, DHT UDP port {line['dht_port']}"
                else:
                    spec = farm.spec(name)
                    where = line["endpoint"] or "no open port: long-polls the dispatcher"
                    what = f"node {name:<11} operator {spec.operator:<6} {where}"
                print(f"  {clock.stamp()} {what} (pid {process.pid})")

            await farm.start_all(progress=show)
            print(f"  {clock.stamp()} the dispatcher finds all {len(_NODES)} nodes in the DHT "
                  "(signed capability and status records, trust list checked)")
            print(f"  {clock.stamp()} RPM repository {repo_url} (HTTPS, loopback): "
                  f"{devel.name} only, made with rpmbuild + createrepo_c")
            summary = await _build(farm, source.path, clock, repo_url, repo.repomd_sha256)
            nursery.cancel_scope.cancel()
    except httpx.HTTPError as exc:
        raise LocalError(f"talking to the dispatcher failed: {exc!r:.200}") from None
    commands = [_by_hand(farm.command(name))
                for name in ("bootstrap", "dispatcher", *(s.name for s in farm.specs))]
    return summary | {"root": str(root), "commands": commands}


def _by_hand(argv: list[str]) -> str:
    """A child's command line (``python -P -m p2pbuild ...``) as a user types it."""
    rest = argv[argv.index("-m") + 1:]
    if rest[0] == "p2pbuild":
        return shlex.join(rest)
    return shlex.join([sys.executable, "-m", *rest])


def _trust_root(farm: LocalFarm) -> None:
    _section("1. The trust root: maintainers sign who may take part")
    trust = farm.trust_list
    print(f"  3 maintainer keys; trust list v{trust.version} signed by 2 of 3 "
          f"({farm.root / 'keys' / 'trust-list.bin'}); it names:")
    print(f"    dispatcher            {farm.dispatcher_key.fingerprint}")
    for spec in farm.specs:
        mode = "pull mode (behind NAT)" if spec.pull else "push mode (HTTPS API)"
        print(f"    node {spec.name:<11} {farm.node_keys[spec.name].fingerprint}  operator "
              f"{spec.operator:<6} {mode}")
    now = time.time()
    short = trust.next_version()
    try:
        short.sign(farm.maintainers[2]).verify(now)
    except P2PBuildError as exc:
        print(f"  refused: a list signed by 1 of 3 maintainers ({exc.code})")
    else:
        raise LocalError("a trust list signed by 1 of 3 maintainers was accepted")
    v2 = short.sign(farm.maintainers[1]).sign(farm.maintainers[2])
    current = accept_update(trust, v2, now)
    try:
        accept_update(current, trust, now)
    except P2PBuildError as exc:
        print(f"  refused: rolling back from v2 to v1 ({exc.code}); the farm runs on v1")
    else:
        raise LocalError("a trust list rollback was accepted")


def _event_line(farm: LocalFarm, event: dict[str, Any]) -> str | None:
    name, detail = event["event"], event["detail"]
    node = event.get("node")
    who = ""
    if node:
        try:
            who = farm.node_name(node)
        except P2PBuildError:
            who = node[:20]
    if name == "accepted":
        return None
    if name == "node-chosen":
        return (f"chose {who} ({detail.get('operator')}, {detail.get('mode')}) as "
                f"{detail.get('role')}: rating {detail.get('rating', 0):.2f}, load "
                f"{detail.get('load', 0):.2f}, {detail.get('candidates')} candidates"
                + (f", operators already used: {', '.join(detail['excluded_operators'])}"
                   if detail.get("excluded_operators") else ""))
    if name.startswith("attempt-"):
        state = name[len("attempt-"):]
        extra = ""
        if state == "running":
            extra = "signed job delivered" if farm.spec(who).pull is False else (
                "signed job queued; the node takes it on its next long-poll")
        elif detail.get("duration_ms") is not None:
            extra = f"signed result, {detail.get('artifacts')} artifact(s) re-hashed, " \
                    f"build took {detail['duration_ms'] / 1000:.1f}s"
        elif detail.get("reason"):
            extra = str(detail["reason"])
        return f"{who}: {state}" + (f" ({extra})" if extra else "")
    if name == "rating":
        return None
    if name.startswith("build-"):
        return f"build {name[len('build-'):]}: {detail.get('reason', '')}"
    reason = detail.get("reason")
    return f"{name}" + (f": {reason}" if reason else "")


async def _build(
    farm: LocalFarm, source: Path, clock: _Clock, repo_url: str, repomd_sha256: bytes
) -> dict[str, Any]:
    _section("3. Build a real package: submitted like `p2pbuild submit --wait`")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    print(f"  source {source.name} (a C hello program, SHA-256 {digest[:16]}…), target "
          f"{farm.arch}/{farm.os}, 2 replicas on nodes of different operators")
    present = "has" if Path(GREET_HEADER).exists() else "does not have"
    print(f"  BuildRequires: gcc (the node's host base), p2pbuild-greet-devel (only in the "
          f"repository; this host {present} {GREET_HEADER})")
    client = Client(farm.url, farm.dispatcher_pin, farm.token)
    buildroot = {"repos": [{"name": "demo", "url": repo_url}]}
    params = {"name": source.name, "build_type": "rpm", "replicas": "2",
              "buildroot": json.dumps(buildroot)}
    async with client.http() as http:
        build = await post_source(http, client, source, params)
        build_id = build["id"]
        pinned = build["options"]["buildroot"]["repos"][0]["repomd_sha256"]
        if pinned != repomd_sha256.hex():
            raise LocalError("the dispatcher pinned another repository snapshot")
        print(f"  {clock.stamp()} accepted as build {build_id}; the dispatcher pinned the "
              f"repository: repomd.xml SHA-256 {pinned[:16]}… (in every signed job)")
        with trio.fail_after(90):
            async for kind, value in follow_build(http, client, build_id):
                if kind == "build":
                    build = value
                    continue
                if kind != "event":
                    continue
                text = _event_line(farm, value)
                if text:
                    print(f"  {clock.stamp()} {text}")
    if build["state"] != "verified":
        raise LocalError(f"the build {build['state']}: {build['reason']}")
    print("  selection: power of two choices among the best-rated, least-loaded trusted "
          "nodes that match; one node per operator")
    return _result(farm, build)


def _result(farm: LocalFarm, build: dict[str, Any]) -> dict[str, Any]:
    _section("4. The result and its proof")
    stored = Path(build["sink_path"])
    manifest = StoredBuild.read(stored)
    verified_by = []
    digests = {a.name: a.sha256 for a in manifest.artifacts}
    for entry in manifest.verified_by:
        job = Job.from_bytes(manifest.proof_path(entry.job).read_bytes())
        result = Result.from_bytes(manifest.proof_path(entry.result).read_bytes())
        # from_bytes verified both signatures; now: the right signers, the right job.
        farm.trust_list.require(job.dispatcher, Role.DISPATCHER)
        result.check_answers(job, result.node)
        named = {a.name: a.sha256.hex() for a in result.artifacts}
        if named != digests:
            raise LocalError(f"{entry.result} does not name the stored artifacts")
        operator = farm.trust_list.require(result.node, Role.NODE).operator
        if result.buildroot is None:
            raise LocalError(f"{entry.result} lists no buildroot")
        env = result.environment_map
        packages = ", ".join(p.nevra for p in result.buildroot.packages)
        step = (f"cache {env.get('buildroot_cache', '?')}, set up in "
                f"{int(env.get('buildroot_setup_ms', '0')) / 1000:.1f}s; "
                f"{len(result.buildroot.packages)} packages installed: {packages}")
        verified_by.append({"operator": operator, "node": farm.node_name(result.node),
                            "buildroot": step,
                            "fingerprint": result.node.fingerprint, "key": str(result.node),
                            "job": str(manifest.proof_path(entry.job)),
                            "result": str(manifest.proof_path(entry.result))})
    if len({v["operator"] for v in verified_by}) < 2:
        raise LocalError("the proof does not hold two operators")
    print("  verified by two operators, bit for bit, in the same buildroot:")
    for v in verified_by:
        print(f"    {v['operator']:<6} node {v['node']:<11} {v['fingerprint']}")
    for v in verified_by:
        print(f"  buildroot of {v['node']}: {v['buildroot']}")
    print(f"  stored in    {stored}/")
    artifacts = []
    for name, sha in sorted(digests.items()):
        path = manifest.artifact_path(name)
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != sha:
            raise LocalError(f"{path} does not match its manifest")
        artifacts.append({"name": name, "sha256": sha, "path": str(path),
                          "size": path.stat().st_size})
        print(f"  artifact     artifacts/{name} ({path.stat().st_size} bytes)")
        print(f"               SHA-256 {sha}")
    print("  proof        the signed job and the signed result of each verifying node:")
    for v in verified_by:
        print(f"               {Path(v['job']).relative_to(stored)}  "
              f"{Path(v['result']).relative_to(stored)}")
    print("               checked here: both results are signed by trust-listed nodes of "
          "different operators, answer the dispatcher's signed jobs and name the stored "
          "file's SHA-256")
    print(f"  manifest     {stored / 'manifest.json'}")
    return {"ok": True, "build": build["id"], "state": build["state"],
            "stored": str(stored), "verified_by": verified_by, "artifacts": artifacts,
            "manifest": str(stored / "manifest.json")}
