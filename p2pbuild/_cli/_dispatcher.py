"""``p2pbuild dispatcher``, ``submit``, ``builds`` and ``nodes``: run a dispatcher and use it.

Client commands find the dispatcher in a client file (``client.toml``: ``url``,
``tls_sha256``, ``token``), given by ``--client-config``, ``$P2PBUILD_CLIENT_CONFIG`` or
``~/.config/p2pbuild/client.toml``; ``--url``, ``--pin`` and ``--token`` override it.
``dispatcher init`` writes one next to the dispatcher's own configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import tomli_w
import trio

from .._errors import LocalError
from .._identity import Identity, Role
from ..dispatcher._config import hash_token, load_config
from ..dispatcher._errors import ConfigError
from ..dispatcher._service import RunningDispatcher, run_dispatcher
from ..https import generate_tls_material, pinned_client
from ..node._config import parse_host_port

__all__ = ["register"]

_TERMINAL = {"verified", "failed", "cancelled"}


def register(sub: Any) -> None:
    dispatcher = sub.add_parser(
        "dispatcher", help="set up and run a dispatcher",
        description="Set up and run a dispatcher: the service that sends signed jobs to "
        "trusted nodes of different operators and stores builds whose outputs agree.",
    )
    dsub = dispatcher.add_subparsers(dest="dispatcher_command", metavar="ACTION", required=True)
    init = dsub.add_parser(
        "init", help="create a key, TLS certificate, configuration and client file",
        description="Create DIR/dispatcher.key (mode 0600), DIR/tls/, DIR/dispatcher.toml and "
        "DIR/client.toml (URL, certificate pin and a fresh API token). Add the printed key "
        "to the trust list as a dispatcher and put the signed list at DIR/trust-list.bin.",
    )
    init.add_argument("--dir", required=True, type=Path, metavar="DIR")
    init.add_argument("--host", default="127.0.0.1", help="address to listen on")
    init.add_argument("--port", type=int, default=7443)
    init.add_argument("--user", default="admin", help="user name of the API token")
    init.add_argument("--dht-bind", default="0.0.0.0:7421", metavar="HOST:PORT",
                      help="UDP address of the dispatcher's DHT node (default 0.0.0.0:7421; "
                      "port 0 picks a free one)")
    init.add_argument("--bootstrap", action="append", default=[], metavar="HOST:PORT",
                      help="a DHT node to join through (repeatable)")
    init.add_argument("--json", action="store_true", help="machine-readable output")
    init.set_defaults(func=_init)
    run = dsub.add_parser(
        "run", help="run the dispatcher until interrupted",
        description="Run the dispatcher described by a configuration file. Prints one JSON "
        "line (url, port, dht_port, key, tls_sha256) once it listens; stops on SIGTERM or "
        "Ctrl-C, leaving builds in flight to resume at the next start.",
    )
    run.add_argument("--config", required=True, type=Path, metavar="FILE")
    run.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=_run)

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
    submit.add_argument("--wait", action="store_true", help="follow the build to its end")
    _client_args(submit)
    submit.set_defaults(func=_submit)

    builds = sub.add_parser("builds", help="list, show and cancel builds",
                            description="List, show and cancel a dispatcher's builds.")
    bsub = builds.add_subparsers(dest="builds_command", metavar="ACTION", required=True)
    ls = bsub.add_parser("ls", help="list builds, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--state", action="append", default=[])
    _client_args(ls)
    ls.set_defaults(func=_builds_ls)
    show = bsub.add_parser("show", help="one build with its attempts and decisions")
    show.add_argument("build_id", metavar="ID")
    _client_args(show)
    show.set_defaults(func=_builds_show)
    cancel = bsub.add_parser("cancel", help="cancel a build (reaches its nodes)")
    cancel.add_argument("build_id", metavar="ID")
    _client_args(cancel)
    cancel.set_defaults(func=_builds_cancel)

    nodes = sub.add_parser("nodes", help="nodes as a dispatcher rates them",
                           description="Nodes known to a dispatcher, with their ratings.")
    nsub = nodes.add_subparsers(dest="nodes_command", metavar="ACTION", required=True)
    nls = nsub.add_parser("ls", help="list nodes with success, agreement, speed and MTBF")
    _client_args(nls)
    nls.set_defaults(func=_nodes_ls)


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--client-config", type=Path, metavar="FILE")
    parser.add_argument("--url", help="dispatcher URL, https://host:port")
    parser.add_argument("--pin", help="SHA-256 (hex) of the dispatcher's TLS certificate")
    parser.add_argument("--token", help="API token (default: $P2PBUILD_TOKEN or the file)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


@attrs.frozen
class _Client:
    url: str
    pin: bytes
    token: str

    def http(self, timeout: float = 60.0) -> httpx.AsyncClient:
        return pinned_client(self.pin, base_url=self.url, timeout=timeout)

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


def _client(args: argparse.Namespace) -> _Client:
    path = args.client_config or os.environ.get("P2PBUILD_CLIENT_CONFIG") or (
        Path.home() / ".config" / "p2pbuild" / "client.toml"
    )
    document: dict[str, Any] = {}
    if Path(path).is_file():
        try:
            document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read client file {path}: {exc}") from None
    url = args.url or document.get("url")
    pin = args.pin or document.get("tls_sha256")
    token = args.token or os.environ.get("P2PBUILD_TOKEN") or document.get("token")
    if not url or not pin or not token:
        raise ConfigError(
            f"no dispatcher given: pass --url, --pin and --token or write {path} "
            "(p2pbuild dispatcher init creates one)"
        )
    try:
        pin_bytes = bytes.fromhex(str(pin))
    except ValueError:
        raise ConfigError("the pin is the certificate's SHA-256 in hex") from None
    return _Client(str(url), pin_bytes, str(token))


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
            reason = f"{body.get('error')}: {body.get('reason')}"
        except (ValueError, AttributeError):
            reason = response.text[:200]
        raise LocalError(f"dispatcher answered HTTP {response.status_code}: {reason}")
    return response.json()


def _network(call: Any) -> Any:
    try:
        return trio.run(call)
    except httpx.HTTPError as exc:
        raise LocalError(f"cannot reach the dispatcher: {exc}") from None


# -- dispatcher init / run ------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    try:
        dht_host, dht_port = parse_host_port(args.dht_bind, allow_zero=True)
        for item in args.bootstrap:
            parse_host_port(item)
    except ValueError as exc:
        raise ConfigError(f"--dht-bind/--bootstrap: {exc}") from None
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "dispatcher.toml"
    if config_path.exists():
        raise ConfigError(f"{config_path} already exists; not overwriting")
    identity = Identity.generate(Role.DISPATCHER)
    identity.save(directory / "dispatcher.key")
    (directory / "tls").mkdir(exist_ok=True)
    tls = generate_tls_material(directory / "tls", args.host)
    token = secrets.token_urlsafe(32)
    config = {
        "dispatcher": {
            "key": "dispatcher.key", "trust_list": "trust-list.bin", "state_dir": "state",
            "repository": "repo",
        },
        "api": {"host": args.host, "port": args.port, "tls_dir": "tls"},
        "dht": {"host": dht_host, "port": dht_port, "bootstrap": list(args.bootstrap)},
        # Whoever creates the dispatcher runs it: an admin (may cancel any build).
        "clients": [{"user": args.user, "role": "admin", "token_sha256": hash_token(token)}],
    }
    config_path.write_text(
        "# p2pbuild dispatcher; see dispatcher/dispatcher.example.toml for every key.\n"
        + tomli_w.dumps(config)
    )
    url = f"https://{args.host}:{args.port}"
    client_path = directory / "client.toml"
    fd = os.open(client_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(tomli_w.dumps({"url": url, "tls_sha256": tls.sha256.hex(), "token": token}))
    if args.json:
        print(json.dumps({
            "public_key": str(identity.public_key), "config": str(config_path),
            "client_config": str(client_path), "url": url, "tls_sha256": tls.sha256.hex(),
        }))
    else:
        print(f"created dispatcher {identity.public_key.fingerprint} in {directory}")
        print(f"  public key: {identity.public_key}")
        print(f"  config:     {config_path}")
        print(f"  client:     {client_path} (URL, certificate pin, API token; mode 0600)")
        print("next: add the key to the trust list as a dispatcher, save the signed list as "
              f"{directory / 'trust-list.bin'}, then: p2pbuild dispatcher run --config "
              f"{config_path}")
    return 0


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                running: RunningDispatcher = await nursery.start(run_dispatcher, config)
                print(json.dumps({
                    "url": running.url, "port": running.port, "dht_port": running.dht_port,
                    "key": str(running.engine.identity.public_key),
                    "tls_sha256": running.tls.sha256.hex(),
                }), flush=True)
                async for signum in signals:
                    logging.getLogger("p2pbuild.dispatcher").info(
                        "%s: stopping; builds in flight resume at the next start",
                        signal.Signals(signum).name,
                    )
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    return 0


# -- client commands ------------------------------------------------------------------------------


def _submit(args: argparse.Namespace) -> int:
    client = _client(args)
    source: Path = args.source
    if not source.is_file():
        raise ConfigError(f"{source} is not a file")
    build_type = args.build_type or ("rpm" if source.name.endswith(".rpm") else "make")
    params = {"name": source.name, "build_type": build_type, "replicas": str(args.replicas)}
    for key in ("arch", "os", "machine", "pool", "lease"):
        if getattr(args, key):
            params[key] = getattr(args, key)

    async def main() -> int:
        async with client.http() as http:
            build = await post_source(http, client, source, params)
            if not args.wait:
                print(json.dumps(build) if args.json else f"submitted build {build['id']}")
                return 0
            return await _follow(http, client, build["id"], args.json)

    status: int = _network(main)
    return status


async def post_source(
    http: httpx.AsyncClient, client: _Client, source: Path, params: dict[str, str]
) -> Any:
    """Upload ``source`` as a new build (``POST /v1/builds``); the build's JSON. Raises
    :class:`LocalError` for a refusal and ``httpx.HTTPError`` for a network failure."""
    with source.open("rb") as f:
        response = await http.post(
            "/v1/builds", params=params, content=f.read(),
            headers={**client.headers, "content-type": "application/x-rpm"},
        )
    return _check(response)


async def follow_build(
    http: httpx.AsyncClient, client: _Client, build_id: str
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Yield ``("event", event)`` for each of the build's events as it happens, then
    ``("build", build)`` once with the build's final JSON. Reconnects when the event stream
    ends while the build is still open. Raises :class:`LocalError` for a refusal and
    ``httpx.HTTPError`` for a network failure."""
    after = 0
    while True:
        async with http.stream(
            "GET", f"/v1/builds/{build_id}/events", params={"after": after, "follow": "1"},
            headers=client.headers, timeout=httpx.Timeout(60, read=30),
        ) as response:
            if response.status_code >= 400:
                await response.aread()
                _check(response)
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                after = event["id"]
                yield "event", event
        build = _check(await http.get(f"/v1/builds/{build_id}", headers=client.headers))
        if build["state"] in _TERMINAL:
            yield "build", build
            return


async def _follow(http: httpx.AsyncClient, client: _Client, build_id: str, as_json: bool) -> int:
    """Print a live progress line (or NDJSON events with ``--json``) until the build ends."""
    tty = sys.stdout.isatty() and not as_json
    started = time.monotonic()
    attempts: dict[str, str] = {}
    build: dict[str, Any] = {}
    async for kind, value in follow_build(http, client, build_id):
        if kind == "build":
            build = value
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
    client = _client(args)

    async def main() -> Any:
        async with client.http() as http:
            params: list[tuple[str, str | int | float | bool | None]] = [("limit", args.limit)]
            params += [("state", s) for s in args.state]
            return _check(await http.get("/v1/builds", params=params, headers=client.headers))

    body = _network(main)
    if args.json:
        print(json.dumps(body))
        return 0
    print(f"{'ID':<32}  {'STATE':<9}  {'ARCH':<8}  {'USER':<10}  SOURCE / REASON")
    for b in body["builds"]:
        print(f"{b['id']:<32}  {b['state']:<9}  {b['arch']:<8}  {b['user'][:10]:<10}  "
              f"{b['source_name']}  {b['reason']}")
    return 0


def _builds_show(args: argparse.Namespace) -> int:
    client = _client(args)

    async def main() -> Any:
        async with client.http() as http:
            return _check(await http.get(f"/v1/builds/{args.build_id}", headers=client.headers))

    b = _network(main)
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
    client = _client(args)

    async def main() -> Any:
        async with client.http() as http:
            return _check(
                await http.delete(f"/v1/builds/{args.build_id}", headers=client.headers)
            )

    body = _network(main)
    print(json.dumps(body) if args.json else f"cancel requested for {body['id']}")
    return 0


def _node_state(node: dict[str, Any]) -> str:
    leases = node.get("leases") or []
    return f"leased ({len(leases)})" if leases else "-"


def _nodes_ls(args: argparse.Namespace) -> int:
    client = _client(args)

    async def main() -> Any:
        async with client.http() as http:
            return _check(await http.get("/v1/nodes", headers=client.headers))

    body = _network(main)
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
