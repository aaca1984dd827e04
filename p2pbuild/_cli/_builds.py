"""``p2pbuild submit``, ``builds`` and ``nodes``: use a dispatcher's API.

Client commands find the dispatcher in a client file (``client.toml``: ``url``,
``tls_sha256``, ``token``), given by ``--client-config``, ``$P2PBUILD_CLIENT_CONFIG`` or
``~/.config/p2pbuild/client.toml``; ``--url``, ``--pin`` and ``--token`` override it.
``dispatcher init`` writes one next to the dispatcher's own configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ..dispatcher._errors import ConfigError
from ._client import Client, check, client_from_args, follow_build, network, post_source

__all__ = ["client_args", "register"]


def register(sub: Any) -> None:
    submit = sub.add_parser(
        "submit", help="submit a build to a dispatcher",
        description="Upload a source RPM (or a tarball for --build-type make) and ask for a "
        "build on nodes of --replicas different operators.",
    )
    submit.add_argument("source", type=Path, metavar="FILE.src.rpm")
    submit.add_argument("--arch", help="target architecture (default: your last, or the "
                        "dispatcher's default)")
    submit.add_argument("--os", help="target OS release, e.g. fedora-41")
    submit.add_argument("--replicas", type=int, default=2)
    submit.add_argument("--build-type", choices=["rpm", "make"], default=None)
    submit.add_argument("--machine", choices=["vm", "metal"])
    submit.add_argument("--pool")
    submit.add_argument("--lease", metavar="ID", help="run only on this lease's nodes "
                        "(p2pbuild lease request)")
    submit.add_argument("--repo", action="append", default=[], metavar="NAME=URL[@SHA256]",
                        help="build in a clean buildroot from this RPM repository (repeat "
                        "for more, in priority order); without @SHA256 the dispatcher pins "
                        "its current repodata/repomd.xml")
    submit.add_argument("--base-package", action="append", default=[], metavar="NAME",
                        help="a package the buildroot starts with (with --repo)")
    submit.add_argument("--comps-group", metavar="GROUP",
                        help="the comps group the buildroot starts with, e.g. buildsys-build")
    submit.add_argument("--wait", action="store_true", help="follow the build to its end")
    client_args(submit)
    submit.set_defaults(func=_submit)

    builds = sub.add_parser("builds", help="list, show and cancel builds",
                            description="List, show and cancel a dispatcher's builds.")
    bsub = builds.add_subparsers(dest="builds_command", metavar="ACTION", required=True)
    ls = bsub.add_parser("ls", help="list builds, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--state", action="append", default=[])
    client_args(ls)
    ls.set_defaults(func=_builds_ls)
    show = bsub.add_parser("show", help="one build with its attempts and decisions")
    show.add_argument("build_id", metavar="ID")
    client_args(show)
    show.set_defaults(func=_builds_show)
    cancel = bsub.add_parser("cancel", help="cancel a build (reaches its nodes)")
    cancel.add_argument("build_id", metavar="ID")
    client_args(cancel)
    cancel.set_defaults(func=_builds_cancel)

    nodes = sub.add_parser("nodes", help="nodes as a dispatcher rates them",
                           description="Nodes known to a dispatcher, with their ratings.")
    nsub = nodes.add_subparsers(dest="nodes_command", metavar="ACTION", required=True)
    nls = nsub.add_parser("ls", help="list nodes with success, agreement, speed and MTBF")
    client_args(nls)
    nls.set_defaults(func=_nodes_ls)


def client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--client-config", type=Path, metavar="FILE")
    parser.add_argument("--url", help="dispatcher URL, https://host:port")
    parser.add_argument("--pin", help="SHA-256 (hex) of the dispatcher's TLS certificate")
    parser.add_argument("--token", help="API token (default: $P2PBUILD_TOKEN or the file)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


# -- client commands ------------------------------------------------------------------------------


def _submit(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    source: Path = args.source
    if not source.is_file():
        raise ConfigError(f"{source} is not a file")
    build_type = args.build_type or ("rpm" if source.name.endswith(".rpm") else "make")
    params = {"name": source.name, "build_type": build_type, "replicas": str(args.replicas)}
    for key in ("arch", "os", "machine", "pool", "lease"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if args.repo:
        params["buildroot"] = json.dumps(_buildroot(args))
    elif args.base_package or args.comps_group:
        raise ConfigError("--base-package and --comps-group need at least one --repo")

    submitted: list[str] = []

    async def main() -> int:
        async with client.http() as http:
            build = await post_source(http, client, source, params)
            submitted.append(build["id"])
            if not args.wait:
                print(json.dumps(build) if args.json else f"submitted build {build['id']}")
                return 0
            if not args.json:
                # First, so that the id survives a Ctrl-C or a lost connection.
                print(f"submitted build {build['id']}; following it (Ctrl-C stops following, "
                      "not the build)", flush=True)
            return await _follow(http, client, build["id"], args.json)

    try:
        status: int = network(main)
    except KeyboardInterrupt:
        if not submitted:
            raise
        print(f"\np2pbuild: stopped following build {submitted[0]}; it goes on: "
              f"p2pbuild builds watch {submitted[0]}", file=sys.stderr)
        return 130
    return status


def _buildroot(args: argparse.Namespace) -> dict[str, Any]:
    repos = []
    for text in args.repo:
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise ConfigError(f"--repo {text!r}: expected NAME=URL[@SHA256]")
        url, at, digest = rest.rpartition("@")
        pinned = bool(at) and len(digest) == 64 and all(
            c in "0123456789abcdef" for c in digest.lower())
        repo: dict[str, str] = {"name": name, "url": url if pinned else rest}
        if pinned:
            repo["repomd_sha256"] = digest.lower()
        repos.append(repo)
    return {"repos": repos, "group": args.comps_group or "",
            "packages": sorted(set(args.base_package))}


async def _follow(http: httpx.AsyncClient, client: Client, build_id: str, as_json: bool) -> int:
    """Print a live progress line (or NDJSON events with ``--json``) until the build ends."""
    tty = sys.stdout.isatty() and not as_json
    started = time.monotonic()
    attempts: dict[str, str] = {}
    build: dict[str, Any] = {}
    async for kind, value in follow_build(http, client, build_id):
        if kind == "build":
            build = value
        elif kind == "reconnecting":
            print(f"{chr(10) if tty else ''}p2pbuild: lost the dispatcher ({value['error']}); "
                  f"reconnecting in {value['retry_in']:g}s", file=sys.stderr, flush=True)
        elif as_json:
            print(json.dumps(value), flush=True)
        else:
            _progress(value, attempts, started, tty)
    if tty:
        print()
    if not as_json:
        print(f"build {build_id}: {build['state']}: {build['reason']}")
        if build["sink_path"]:
            print(f"  stored in {build['sink_path']}")
        if build["report"]:
            print(build["report"])
    return 0 if build["state"] == "verified" else 1


def _progress(event: dict[str, Any], attempts: dict[str, str], started: float, tty: bool) -> None:
    name = event["event"]
    detail = event["detail"]
    node = (event.get("node") or "")[8:16]
    if name == "node-chosen":
        attempts[node] = f"{detail.get('operator')}:chosen"
    elif name.startswith("attempt-"):
        operator = attempts.get(node, node).split(":")[0]
        attempts[node] = f"{operator}:{name[len('attempt-'):]}"
    line = f"[{time.monotonic() - started:6.1f}s] {name:<18} " + " ".join(
        attempts.values()
    )
    if tty:
        print("\r" + line[:150].ljust(150), end="", flush=True)
    else:
        reason = detail.get("reason")
        print(line + (f" ({reason})" if reason else ""), flush=True)


def _builds_ls(args: argparse.Namespace) -> int:
    client = client_from_args(args)

    async def main() -> Any:
        async with client.http() as http:
            params: list[tuple[str, str | int | float | bool | None]] = [("limit", args.limit)]
            params += [("state", s) for s in args.state]
            return check(await http.get("/v1/builds", params=params, headers=client.headers))

    body = network(main)
    if args.json:
        print(json.dumps(body))
        return 0
    print(f"{'ID':<32}  {'STATE':<9}  {'ARCH':<8}  {'USER':<10}  SOURCE / REASON")
    for b in body["builds"]:
        print(f"{b['id']:<32}  {b['state']:<9}  {b['arch']:<8}  {b['user'][:10]:<10}  "
              f"{b['source_name']}  {b['reason']}")
    return 0


def _builds_show(args: argparse.Namespace) -> int:
    client = client_from_args(args)

    async def main() -> Any:
        async with client.http() as http:
            return check(await http.get(f"/v1/builds/{args.build_id}", headers=client.headers))

    b = network(main)
    if args.json:
        print(json.dumps(b))
        return 0
    print(f"build {b['id']}  {b['state']}  {b['reason']}")
    print(f"  source {b['source_name']} sha256 {b['source_sha256']}")
    print(f"  target {b['arch']}/{b['os']} {b['build_type']}, {b['replicas']} replicas, "
          f"user {b['user']}")
    if b["sink_path"]:
        print(f"  stored in {b['sink_path']}")
    for a in b["attempts"]:
        print(f"  attempt {a['id']}: {a['operator']:<12} {a['role']:<11} {a['state']:<10} "
              f"{a['node'][:20]}… {a['reason']}")
    for e in b["events"]:
        print(f"  {time.strftime('%H:%M:%S', time.localtime(e['at']))} {e['event']:<18} "
              f"{e['detail'].get('reason', '')}")
    if b["report"]:
        print(b["report"])
    return 0


def _builds_cancel(args: argparse.Namespace) -> int:
    client = client_from_args(args)

    async def main() -> Any:
        async with client.http() as http:
            return check(
                await http.delete(f"/v1/builds/{args.build_id}", headers=client.headers)
            )

    body = network(main)
    print(json.dumps(body) if args.json else f"cancel requested for {body['id']}")
    return 0


def _node_state(node: dict[str, Any]) -> str:
    leases = node.get("leases") or []
    states = [f"leased ({len(leases)})"] if leases else []
    if node.get("standby"):
        states.append("standby")
    return ", ".join(states) or "-"


def _nodes_ls(args: argparse.Namespace) -> int:
    client = client_from_args(args)

    async def main() -> Any:
        async with client.http() as http:
            return check(await http.get("/v1/nodes", headers=client.headers))

    body = network(main)
    if args.json:
        print(json.dumps(body))
        return 0
    print(f"{'NODE':<19}  {'OPERATOR':<10}  {'ARCH':<8}  {'SCORE':>5}  {'SUCC':>5}  "
          f"{'AGREE':>5}  {'SPEED':>5}  {'MTBF(h)':>8}  {'JOBS':>4}  {'OBS':>5}  STATE")
    for n in body["nodes"]:
        print(f"{n['fingerprint']:<19}  {str(n.get('operator') or '?')[:10]:<10}  "
              f"{n.get('arch') or '?'!s:<8}  {n['score']:>5.2f}  {n['success']:>5.2f}  "
              f"{n['agreement']:>5.2f}  {n['speed']:>5.2f}  {n['mtbf_s'] / 3600:>8.1f}  "
              f"{n['active_jobs']:>4}  {n['observations']:>5.1f}  {_node_state(n)}")
    return 0
