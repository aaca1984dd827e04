"""``p2pbuild submit``, ``builds`` and ``nodes``: use a dispatcher's API.

Client commands find the dispatcher in a client file (``client.toml``: ``url``,
``tls_sha256``, ``token``), given by ``--client-config``, ``$P2PBUILD_CLIENT_CONFIG`` or
``~/.config/p2pbuild/client.toml``; ``--url``, ``--pin`` and ``--token`` override it.
``dispatcher init`` writes one next to the dispatcher's own configuration.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from .._errors import LocalError
from .._identity import PublicKey
from ..dispatcher._errors import ConfigError
from ._args import action, client_args, command, elapsed, emit
from ._client import (
    TERMINAL,
    Client,
    Paced,
    call,
    check,
    client_from_args,
    follow_build,
    network,
    network_error,
    open_stream,
    post_source,
)

__all__ = ["register"]


def register(sub: Any) -> None:
    submit = action(sub, "submit", _submit, help="submit a build to a dispatcher")
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
    command(sub, "builds", _builds_actions,
            help="list, show, watch, cancel builds; their logs and files")
    command(sub, "nodes", _nodes_actions, help="nodes as a dispatcher rates them")


def _builds_actions(bsub: Any) -> None:
    """List, show, watch and cancel a dispatcher's builds; read their logs and download their files.
    ID is a build id, a unique start of one (4+ characters) or the source's NVR (hello-1.0-1; the
    newest such build)."""
    ls = action(bsub, "ls", _builds_ls, help="list builds, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--state", action="append", default=[])
    client_args(ls)
    for name, func, help in (
        ("show", _builds_show, "one build with its attempts and decisions"),
        ("cancel", _builds_cancel, "cancel a build (reaches its nodes)"),
        ("watch", _builds_watch, "follow a build to its end (like submit --wait)"),
    ):
        one = action(bsub, name, func, help=help)
        one.add_argument("build_id", metavar="ID")
        client_args(one)
    logs = action(bsub, "logs", _builds_logs, help="print a build's logs (--follow: live)")
    logs.add_argument("build_id", metavar="ID")
    logs.add_argument("--attempt", type=int, metavar="N", help="only this attempt's logs")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="stream the live log of a running attempt until the build ends")
    client_args(logs)
    download = action(
        bsub, "download", _builds_download, help="download a build's RPMs, proofs and logs",
    )
    download.add_argument("build_id", metavar="ID")
    download.add_argument("--dir", type=Path, default=Path("."), metavar="DIR")
    client_args(download)


def _nodes_actions(nsub: Any) -> None:
    """Nodes known to a dispatcher, with their ratings."""
    client_args(action(nsub, "ls", _nodes_ls,
                       help="list nodes with success, agreement, speed and MTBF"))


# -- client commands ------------------------------------------------------------------------------


#: How each build type's source starts: an RPM's lead; gzip, xz, bzip2 or zstd tarballs
#: (a plain tar has "ustar" at offset 257).
_RPM_MAGIC = b"\xed\xab\xee\xdb"
_ARCHIVE_MAGIC = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh", b"\x28\xb5\x2f\xfd")


def _check_source(source: Path, build_type: str) -> None:
    """Refuse a file that cannot be the build type's source before it goes to volunteers.
    Raises :class:`ConfigError`."""
    with source.open("rb") as f:
        head = f.read(512)
    if build_type == "rpm":
        if not head.startswith(_RPM_MAGIC):
            raise ConfigError(f"{source} is not an RPM file (no RPM lead); give a source RPM, "
                              "or --build-type make for a tarball")
        if not source.name.endswith(".src.rpm"):
            raise ConfigError(f"{source} is not named like a source RPM (NAME-VERSION-RELEASE"
                              ".src.rpm)")
    elif not (head.startswith(_ARCHIVE_MAGIC) or head[257:262] == b"ustar"):
        raise ConfigError(f"{source} is not a tarball (gzip, xz, bzip2, zstd or tar) for "
                          "--build-type make")


def _submit(args: argparse.Namespace) -> int:
    """Upload a source RPM (or a tarball for --build-type make) and ask for a build on nodes of
    --replicas different operators."""
    client = client_from_args(args)
    source: Path = args.source
    if not source.is_file():
        raise ConfigError(f"{source} is not a file")
    build_type = args.build_type or ("rpm" if source.name.endswith(".rpm") else "make")
    _check_source(source, build_type)
    if not 2 <= args.replicas <= 8:
        raise ConfigError("--replicas must be 2 to 8: a build is verified by nodes of at "
                          "least two different operators")
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


@attrs.define(eq=False)
class _Progress:
    """What ``--wait`` shows: elapsed time, each attempt's state, the latest event and the
    tail of a running attempt's live log. On a terminal a ``rich`` live display redraws it;
    otherwise one line per event."""

    build_id: str
    tty: bool
    started: float = attrs.field(factory=time.monotonic)
    attempts: dict[str, str] = attrs.field(factory=dict)
    last_event: str = "accepted"
    log_tail: collections.deque[str] = attrs.field(
        factory=lambda: collections.deque(maxlen=_LIVE_LINES))
    log_from: str = ""

    def event(self, event: dict[str, Any]) -> None:
        name = event["event"]
        detail = event["detail"]
        node = (event.get("node") or "")[8:16]
        if name == "node-chosen":
            self.attempts[node] = f"{detail.get('operator')}: chosen"
        elif name.startswith("attempt-"):
            operator = self.attempts.get(node, node).split(":")[0]
            self.attempts[node] = f"{operator}: {name[len('attempt-'):]}"
        reason = detail.get("reason")
        self.last_event = name + (f" ({reason})" if reason else "")
        if not self.tty:
            print(f"[{elapsed(time.monotonic() - self.started):>6}] {name:<18} "
                  + "  ".join(self.attempts.values()) + (f" ({reason})" if reason else ""),
                  flush=True)

    def log_line(self, line: str) -> None:
        self.log_tail.append(line)

    def render(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        head = Text.assemble(
            ("build ", "bold"), (self.build_id[:12], "bold cyan"),
            f"  {elapsed(time.monotonic() - self.started)}  ",
            ("  ".join(self.attempts.values()) or "choosing nodes", "green"),
        )
        parts: list[Any] = [head, Text(f"  {self.last_event}"[:200], style="dim")]
        if self.log_tail:
            parts.append(Text(f"  live log of {self.log_from}:", style="dim"))
            parts += [Text("  | " + line[:200]) for line in self.log_tail]
        return Group(*parts)


_LIVE_LINES = 8


#: A live log silent this long is read again from a new connection (a quiet build and a
#: dead connection look alike; what was received already is skipped, not repeated).
_LOG_IDLE_S = 120.0


async def stream_live_log(
    http: httpx.AsyncClient, client: Client, path: str, sink: Callable[[bytes], None],
    *, idle_s: float = _LOG_IDLE_S, reconnect_for: float = 600.0,
    on_reconnect: Callable[[str], None] | None = None,
) -> None:
    """Feed ``sink`` a running job's live log (``path`` on the dispatcher) until it ends.

    The log is served from its start on every connection, so after a broken connection or
    ``idle_s`` of silence this reconnects and skips the bytes ``sink`` already has. Raises
    :class:`LocalError` for a refusal or once the dispatcher has been unreachable for
    ``reconnect_for`` seconds."""
    received = 0
    lost_since: float | None = None
    while True:
        try:
            async with open_stream(http, client, path,
                                   timeout=httpx.Timeout(30, read=None)) as response:
                lost_since = None
                position = 0
                async for chunk in Paced(response.aiter_bytes(), idle_s):
                    skip = max(0, received - position)
                    position += len(chunk)
                    if skip < len(chunk):
                        sink(chunk[skip:])
                        received += len(chunk) - skip
                return
        except trio.TooSlowError:
            continue  # quiet: ask again, from where we are
        except httpx.TransportError as exc:
            now = trio.current_time()
            lost_since = now if lost_since is None else lost_since
            if now - lost_since > reconnect_for:
                raise LocalError(f"lost the live log for {now - lost_since:.0f}s "
                                 f"({network_error(exc)})") from None
            if on_reconnect is not None:
                on_reconnect(network_error(exc))
            await trio.sleep(2)


async def _tail_live_log(http: httpx.AsyncClient, client: Client, build_id: str,
                         progress: _Progress) -> None:
    """Feed ``progress`` the live log of the build's running push attempt, looking again
    every few seconds (attempts start, end and are replaced)."""
    pending = bytearray()

    def lines(data: bytes) -> None:
        pending.extend(data)
        *complete, rest = bytes(pending).split(b"\n")
        pending[:] = rest
        for line in complete:
            progress.log_line(line.decode("utf-8", errors="replace"))

    while True:
        try:
            listing = check(await http.get(f"/v1/builds/{build_id}/logs",
                                           headers=client.headers))
            live = [row for row in listing["logs"] if row["live"]]
            if live:
                row = live[0]
                progress.log_from = f"{row['operator']} (attempt {row['attempt']})"
                await stream_live_log(http, client, row["path"], lines)
        except (httpx.HTTPError, LocalError):
            pass  # the event stream reports the dispatcher's trouble; the tail is a nicety
        await trio.sleep(3)


async def _follow(http: httpx.AsyncClient, client: Client, build_id: str, as_json: bool) -> int:
    """Follow the build to its end: a live display (or one line per event, or NDJSON events
    with ``--json``), then the outcome with the failure summary. Exit status 0 only for a
    verified build."""
    tty = sys.stdout.isatty() and not as_json
    progress = _Progress(build_id, tty)
    build: dict[str, Any] = {}
    live: Any = None
    if tty:
        from rich.live import Live

        live = Live(get_renderable=progress.render, refresh_per_second=4, transient=True)
        live.start()
    try:
        async with trio.open_nursery() as nursery:
            if tty:
                nursery.start_soon(_tail_live_log, http, client, build_id, progress)
            async for kind, value in follow_build(http, client, build_id):
                if kind == "build":
                    build = value
                elif kind == "reconnecting":
                    print(f"p2pbuild: lost the dispatcher ({value['error']}); reconnecting in "
                          f"{value['retry_in']:g}s", file=sys.stderr, flush=True)
                elif as_json:
                    print(json.dumps(value), flush=True)
                else:
                    progress.event(value)
            nursery.cancel_scope.cancel()
    finally:
        if live is not None:
            live.stop()
    if not as_json:
        took = elapsed(time.monotonic() - progress.started)
        print(f"build {build['id']}: {build['state']} after {took}: {build['reason']}")
        if build["sink_path"]:
            print(f"  stored in {build['sink_path']}")
            print(f"  get it:   p2pbuild builds download {build['id'][:12]}")
        if build["report"]:
            print(build["report"])
        if build["state"] == "failed":
            print(f"  all logs: p2pbuild builds logs {build['id'][:12]}")
    return 0 if build["state"] == "verified" else 1


def _builds_ls(args: argparse.Namespace) -> int:
    params = [("limit", args.limit), *(("state", s) for s in args.state)]
    return emit(args, call(args, "GET", "/v1/builds", params=params), _print_builds)


def _print_builds(body: dict[str, Any]) -> None:
    now = time.time()
    print(f"{'ID':<12}  {'STATE':<9}  {'NVR':<30}  {'SUBMITTED':<16}  {'TOOK':>7}  "
          f"{'ARCH':<8}  {'USER':<10}  REASON")
    for b in body["builds"]:
        nvr = b["source_name"].removesuffix(".src.rpm")
        ended = b["updated_at"] if b["state"] in TERMINAL else now
        submitted = time.strftime("%Y-%m-%d %H:%M", time.localtime(b["created_at"]))
        print(f"{b['id'][:12]:<12}  {b['state']:<9}  {nvr[:30]:<30}  {submitted:<16}  "
              f"{elapsed(ended - b['created_at']):>7}  {b['arch']:<8}  {b['user'][:10]:<10}  "
              f"{b['reason'][:80]}")


def _builds_show(args: argparse.Namespace) -> int:
    return emit(args, call(args, "GET", f"/v1/builds/{args.build_id}"), _print_build)


def _print_build(b: dict[str, Any]) -> None:
    print(f"build {b['id']}  {b['state']}  {b['reason']}")
    print(f"  source {b['source_name']} sha256 {b['source_sha256']}")
    print(f"  target {b['arch']}/{b['os']} {b['build_type']}, {b['replicas']} replicas, "
          f"user {b['user']}")
    if b["sink_path"]:
        print(f"  stored in {b['sink_path']}")
    for number, a in enumerate(b["attempts"], start=1):
        print(f"  attempt {number} (#{a['id']}): {a['operator']:<12} {a['role']:<11} "
              f"{a['state']:<10} {a['node'][:20]}… {a['reason']}")
    for e in b["events"]:
        print(f"  {time.strftime('%H:%M:%S', time.localtime(e['at']))} {e['event']:<18} "
              f"{e['detail'].get('reason', '')}")
    if b["report"]:
        print(b["report"])


def _builds_cancel(args: argparse.Namespace) -> int:
    body = call(args, "DELETE", f"/v1/builds/{args.build_id}")
    return emit(args, body, f"cancel requested for {body['id']}")


def _builds_watch(args: argparse.Namespace) -> int:
    """Follow a build live to its end, as submit --wait does; exit 0 only if it is verified."""
    client = client_from_args(args)

    async def main() -> int:
        async with client.http() as http:
            build = check(await http.get(f"/v1/builds/{args.build_id}",
                                         headers=client.headers))
            return await _follow(http, client, build["id"], args.json)

    status: int = network(main)
    return status


async def _print_stored(http: httpx.AsyncClient, client: Client, rows: list[dict[str, Any]],
                        as_json: bool) -> None:
    for row in rows:
        response = await http.get(row["path"], headers=client.headers)
        if response.status_code >= 400:
            check(response)
        if not as_json:
            print(f"==> attempt #{row['attempt']} on {row['operator']} ({row['state']}): "
                  f"{row['name']} <==", flush=True)
        sys.stdout.write(response.text)
        sys.stdout.flush()


def _builds_logs(args: argparse.Namespace) -> int:
    """Print the logs the build's nodes signed (the dispatcher keeps a copy of each, from push and
    pull nodes). With --follow, stream a running build's live log until it ends."""
    client = client_from_args(args)

    def wanted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if args.attempt is None or r["attempt"] == args.attempt]

    async def main() -> int:
        async with client.http() as http:
            build = check(await http.get(f"/v1/builds/{args.build_id}",
                                         headers=client.headers))
            build_id = build["id"]

            async def listing() -> list[dict[str, Any]]:
                body = check(await http.get(f"/v1/builds/{build_id}/logs",
                                            headers=client.headers))
                rows: list[dict[str, Any]] = wanted(body["logs"])
                return rows

            if not args.follow:
                stored = [r for r in await listing() if not r["live"]]
                if not stored:
                    raise LocalError(f"no logs of build {build_id} yet ({build['state']}"
                                     + (": try --follow" if build["state"] not in TERMINAL
                                        else "") + ")")
                await _print_stored(http, client, stored, args.json)
                return 0
            followed: set[int] = set()

            def write(data: bytes) -> None:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()

            lost_since: float | None = None
            while True:
                try:
                    rows = await listing()
                    live = [r for r in rows if r["live"] and r["attempt"] not in followed]
                    for row in live[:1]:
                        followed.add(row["attempt"])
                        print(f"==> attempt #{row['attempt']} on {row['operator']}: live "
                              f"{row['name']} <==", file=sys.stderr, flush=True)
                        await stream_live_log(
                            http, client, row["path"], write,
                            on_reconnect=lambda why: print(
                                f"p2pbuild: lost the live log ({why}); reconnecting",
                                file=sys.stderr, flush=True),
                        )
                    build = check(await http.get(f"/v1/builds/{build_id}",
                                                 headers=client.headers))
                    lost_since = None
                except httpx.TransportError as exc:
                    now = trio.current_time()
                    lost_since = now if lost_since is None else lost_since
                    if now - lost_since > 600:
                        raise
                    print(f"p2pbuild: lost the dispatcher ({network_error(exc)}); "
                          "reconnecting", file=sys.stderr, flush=True)
                    await trio.sleep(2)
                    continue
                if build["state"] in TERMINAL:
                    # Pull nodes' logs (never live) and attempts not followed, now stored.
                    rest = [r for r in await listing()
                            if not r["live"] and r["attempt"] not in followed]
                    await _print_stored(http, client, rest, args.json)
                    print(f"build {build_id}: {build['state']}: {build['reason']}",
                          file=sys.stderr)
                    return 0 if build["state"] == "verified" else 1
                if not live:
                    await trio.sleep(2)

    status: int = network(main)
    return status


def _builds_download(args: argparse.Namespace) -> int:
    """Download what the dispatcher keeps of a build into DIR/<nvr>/: for a verified build its
    artifacts (checked against the manifest's SHA-256), proof and manifest; for every build the
    logs of each attempt (logs/<attempt>-<operator>/)."""
    client = client_from_args(args)

    async def fetch(http: httpx.AsyncClient, path: str, dest: Path,
                    sha256: str | None = None) -> int:
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        partial = dest.with_name(dest.name + ".part")
        async with open_stream(http, client, path) as response:
            with partial.open("wb") as f:
                async for chunk in response.aiter_bytes():
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            partial.unlink()
            raise LocalError(f"{dest.name} arrived with SHA-256 {digest.hexdigest()}, not the "
                             f"{sha256} the dispatcher lists; not kept")
        partial.replace(dest)
        return size

    async def main() -> dict[str, Any]:
        async with client.http(timeout=300) as http:
            build = check(await http.get(f"/v1/builds/{args.build_id}",
                                         headers=client.headers))
            build_id = build["id"]
            files = check(await http.get(f"/v1/builds/{build_id}/files",
                                         headers=client.headers))
            logs = check(await http.get(f"/v1/builds/{build_id}/logs",
                                        headers=client.headers))
            name = (Path(build["sink_path"]).name if build["sink_path"]
                    else build["source_name"].removesuffix(".src.rpm") + f"+{build_id[:8]}")
            root = args.dir / name
            got: list[dict[str, Any]] = []
            for row in files["files"]:
                size = await fetch(http, row["path"], root / row["name"], row["sha256"])
                got.append({"name": row["name"], "size": size})
            # A stored build already holds its verifying nodes' logs, as
            # logs/<n>-<fingerprint>/<name>; the listing adds the other attempts' logs
            # (failed, refused, outvoted).
            stored_logs: set[tuple[str, str]] = set()
            for g in got:
                parts = g["name"].split("/", 2)
                if len(parts) == 3 and parts[0] == "logs":
                    stored_logs.add((parts[1].split("-", 1)[-1], parts[2]))
            for row in logs["logs"]:
                if row["live"]:
                    continue
                fingerprint = PublicKey.from_text(row["node"]).fingerprint.replace(":", "")
                if row["state"] == "succeeded" and (fingerprint, row["name"]) in stored_logs:
                    continue
                relative = f"logs/{row['attempt']}-{row['operator']}/{row['name']}"
                if any(g["name"] == relative for g in got):
                    continue
                size = await fetch(http, row["path"], root / relative)
                got.append({"name": relative, "size": size})
            return {"build": build_id, "state": build["state"], "dir": str(root),
                    "files": got}

    return emit(args, network(main), _print_download)


def _print_download(body: dict[str, Any]) -> None:
    print(f"build {body['build']} ({body['state']}): {len(body['files'])} file(s) in "
          f"{body['dir']}")
    for item in body["files"]:
        print(f"  {item['name']}  ({item['size']} bytes)")


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
            body = check(await http.get("/v1/nodes", headers=client.headers))
            # Liveness as the dispatcher's web view judges it (online, draining, offline,
            # from the status records' cadence) and when each node was last seen.
            response = await http.get("/v1/web/nodes")
            if response.status_code == 200:
                seen = {row["node"]: row for row in response.json().get("nodes", [])}
                for node in body["nodes"]:
                    row = seen.get(node["node"], {})
                    node["state"] = row.get("state", "offline")
                    node["last_seen"] = row.get("last_seen")
            return body

    return emit(args, network(main), _print_nodes)


def _print_nodes(body: dict[str, Any]) -> None:
    now = time.time()
    print(f"{'NODE':<19}  {'OPERATOR':<10}  {'ARCH':<8}  {'STATE':<8}  {'SEEN':>8}  "
          f"{'SCORE':>5}  {'SUCC':>5}  {'AGREE':>5}  {'SPEED':>5}  {'MTBF(h)':>8}  "
          f"{'JOBS':>4}  LEASES")
    for n in body["nodes"]:
        seen = n.get("last_seen")
        ago = f"{elapsed(now - seen)} ago" if seen else "never"
        print(f"{n['fingerprint']:<19}  {str(n.get('operator') or '?')[:10]:<10}  "
              f"{n.get('arch') or '?'!s:<8}  {n.get('state', '?'):<8}  {ago:>8}  "
              f"{n['score']:>5.2f}  {n['success']:>5.2f}  {n['agreement']:>5.2f}  "
              f"{n['speed']:>5.2f}  {n['mtbf_s'] / 3600:>8.1f}  {n['active_jobs']:>4}  "
              f"{_node_state(n)}")
