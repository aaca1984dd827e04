"""``p2pbuild node init | run | status``: set up, run and inspect a volunteer node.

``init`` writes a commented config, a node key (mode 0600) and a self-signed TLS
certificate into one directory and prints what to send to the farm's maintainers.
``run`` runs the daemon until SIGTERM or SIGINT (a second signal skips the grace period);
it prints one JSON line once the node is up. ``status`` asks the running daemon over its
local HTTPS API (pinned to the node's own certificate) and falls back to the state file
when the daemon is not running.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from .._errors import LocalError, MalformedError, RemoteError
from .._identity import Identity, Role
from ..https import CertificatePinError, generate_tls_material, load_tls_material, pinned_client
from ..node._config import ConfigError, load_config, parse_host_port, render_config
from ..node._daemon import load_trust_file, trust_problem
from ..node._serve import serve_node
from ..node._state import NodeState
from ._args import action, command, emit, json_flag
from ._startup import explain_bind_failure

__all__ = ["register"]

_DEFAULT_DIR = "/var/lib/p2pbuild-node"


def register(sub: Any) -> None:
    command(sub, "node", _node_actions, help="set up and run a volunteer build node")


def _node_actions(node_sub: Any) -> None:
    """Set up, run and inspect a p2pbuild volunteer build node."""
    init = action(node_sub, "init", _init, help="write a config, a node key and a TLS certificate")
    init.add_argument("--dir", type=Path, default=Path(_DEFAULT_DIR), metavar="DIR",
                      help=f"the node's directory (default {_DEFAULT_DIR})")
    init.add_argument("--operator", default="", metavar="NAME",
                      help="your operator name as the maintainers know you")
    init.add_argument("--pool", action="append", default=[], metavar="POOL",
                      help="a pool this node serves (repeatable)")
    init.add_argument("--bootstrap", action="append", default=[], metavar="HOST:PORT",
                      help="a DHT node to join through (repeatable)")
    init.add_argument("--dht-bind", default="0.0.0.0:7420", metavar="HOST:PORT",
                      help="UDP address of the node's DHT port (default 0.0.0.0:7420; port 0 "
                      "picks a free one)")
    init.add_argument("--listen", default="0.0.0.0:8443", metavar="HOST:PORT",
                      help="address of the HTTPS job API (default 0.0.0.0:8443)")
    init.add_argument("--endpoint", default="", metavar="URL",
                      help="the https://host:port dispatchers reach this node at")
    init.add_argument("--hostname", default="localhost",
                      help="host name for the TLS certificate (default localhost)")
    init.add_argument("--trust-list", default="trust-list.bin", metavar="FILE",
                      help="where the farm's signed trust list will be (default: in DIR)")
    init.add_argument("--pull-only", action="store_true",
                      help="no inbound HTTPS: take jobs by polling dispatchers ([pull])")

    run = action(node_sub, "run", _run, help="run the node daemon")
    run.add_argument("--config", type=Path, required=True, metavar="FILE")
    run.add_argument("--check", action="store_true",
                     help="only check the config, key, certificate and trust list, then exit")
    run.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"])

    status = action(node_sub, "status", _status, help="report the node's state")
    status.add_argument("--config", type=Path,
                        default=Path(_DEFAULT_DIR) / "node.toml", metavar="FILE")
    json_flag(status)


# -- init ---------------------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    """Create DIR with node.toml (commented), node.key (mode 0600) and its .pub, and tls/ (a
    self-signed certificate). Never overwrites a key."""
    directory: Path = args.dir.resolve()
    config_path = directory / "node.toml"
    key_path = directory / "node.key"
    for option, items in (("--bootstrap", args.bootstrap), ("--dht-bind", [args.dht_bind]),
                          ("--listen", [args.listen])):
        for item in items:
            try:
                parse_host_port(item, allow_zero=option != "--bootstrap")
            except ValueError as exc:
                raise MalformedError(f"{option}: {exc}") from None
    if config_path.exists() or key_path.exists():
        raise LocalError(f"{directory} already holds a node (node.toml or node.key); not "
                         "overwriting it")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    text = render_config(
        data_dir=directory,
        operator=args.operator,
        pools=tuple(sorted(set(args.pool))),
        trust_list=args.trust_list,
        bootstrap=tuple(args.bootstrap),
        dht_bind=args.dht_bind,
        api_bind=args.listen,
        endpoint=args.endpoint,
        api_enabled=not args.pull_only,
    )
    identity = Identity.generate(Role.NODE)
    pub_path = identity.save(key_path)
    tls_dir = directory / "tls"
    tls_dir.mkdir(exist_ok=True)
    tls = generate_tls_material(tls_dir, args.hostname)
    config_path.write_text(text, encoding="utf-8")
    # The file must load; a failure here is a bug in render_config, better found now.
    try:
        load_config(config_path)
    except ConfigError as exc:
        if not args.pull_only:
            raise
        # A pull-only node needs a [pull] dispatcher before it can run: say so.
        print(f"note: {exc}", file=sys.stderr)
    print(f"node directory:   {directory}")
    print(f"config:           {config_path}")
    print(f"node key:         {key_path} (mode 0600; keep it secret)")
    print(f"public key:       {identity.public_key}")
    print(f"fingerprint:      {identity.public_key.fingerprint}")
    print(f"TLS certificate:  {tls.cert_path} (SHA-256 {tls.sha256.hex()})")
    print()
    steps = [
        f"Send {pub_path.name} (the line above) and your operator name to the farm's\n"
        "     maintainers; they add this key to the signed trust list.",
        f"Put the farm's trust list at {directory / args.trust_list}.",
    ]
    # Only what the options left unset.
    if not args.bootstrap:
        steps.append("In the config, set [dht] bootstrap (the farm's seed nodes, HOST:PORT).")
    if args.pull_only:
        steps.append("In the config, name the farm's dispatchers under [pull] dispatchers.")
    elif not args.endpoint and _listens_everywhere(args.listen):
        steps.append("In the config, set [api] endpoint (the https:// URL dispatchers reach "
                     "this node at).")
    steps.append(f"Start it: p2pbuild node run --config {config_path}")
    print("Next steps:")
    for number, step in enumerate(steps, 1):
        print(f"  {number}. {step}")
    return 0


def _listens_everywhere(listen: str) -> bool:
    """Whether ``--listen`` names all addresses, so the node cannot derive its URL."""
    host = parse_host_port(listen, allow_zero=True)[0]
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


# -- run ----------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    """Run the node daemon until SIGTERM or SIGINT. On the first signal it publishes that it is
    draining, lets running builds finish for shutdown.grace_s, hands the rest back and exits 0; a
    second signal hands back at once."""
    config = load_config(args.config)
    if args.check:
        identity = Identity.load(config.key_file)
        trust = load_trust_file(config.trust_list, time.time())
        problem = trust_problem(trust, identity.public_key)
        if problem is not None:
            raise ConfigError(problem)
        if config.api.enabled:
            load_tls_material(config.tls_dir)
        print(f"{args.config}: OK (listed as a node of "
              f"{trust.require(identity.public_key, Role.NODE).operator} on trust list "
              f"v{trust.version})")
        return 0
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    listens = [("[dht] bind", "udp", *config.dht.bind)]
    if config.api.enabled:
        listens.append(("[api] bind", "tcp", *config.api.bind))
    with explain_bind_failure(args.config, listens):
        status: int = trio.run(serve_node, config)
    return status


# -- status -------------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    """Ask the running daemon (local HTTPS, pinned to its certificate); if it is not running, read
    its state file."""
    config = load_config(args.config)
    report: dict[str, Any] = {"config": str(args.config), "running": False}
    try:
        run_info = json.loads(config.run_file.read_text())
    except (OSError, ValueError):
        run_info = None
    if run_info is not None and run_info.get("api_port") and run_info.get("tls_sha256"):
        try:
            live = trio.run(_ask, int(run_info["api_port"]), bytes.fromhex(run_info["tls_sha256"]))
        except (httpx.HTTPError, CertificatePinError, ValueError) as exc:
            report["error"] = f"daemon not answering: {exc.__class__.__name__}"
        else:
            report.update(running=True, source="api", pid=run_info.get("pid"))
            report.update(node=live.get("node"), endpoint=run_info.get("endpoint"), daemon=live)
    elif run_info is not None:
        report.update(source="run-file", pid=run_info.get("pid"), node=run_info.get("node"))
        report["running"] = _pid_alive(run_info.get("pid"))
    report["trust"] = _trust_report(config)
    if run_info is not None and report["running"] and "dht_contacts" in run_info:
        report["dht"] = {"contacts": run_info["dht_contacts"],
                         "bootstrap": run_info.get("dht_bootstrap", []),
                         "as_of": run_info.get("updated_at"),
                         "trust_version_in_use": run_info.get("trust_version")}
    if report.get("source") != "api" and config.state_file.exists():
        try:
            with NodeState.open(config.state_file) as state:
                report["state"] = state.statistics()
        except (LocalError, RemoteError) as exc:
            report["error"] = str(exc)
    return emit(args, report, _print_status, indent=2, sort_keys=True)


def _trust_report(config: Any) -> dict[str, Any]:
    """The trust list file as this node sees it: valid or why not, and whether this node's
    key is on it as a node."""
    try:
        identity = Identity.load(config.key_file)
        trust = load_trust_file(config.trust_list, time.time())
    except (LocalError, RemoteError) as exc:
        return {"valid": False, "problem": str(exc)}
    problem = trust_problem(trust, identity.public_key)
    entry = trust.entry(identity.public_key)
    return {"valid": True, "version": trust.version, "expires_at": trust.expires_at,
            "listed": problem is None, "problem": problem,
            "operator": entry.operator if entry is not None else None}


async def _ask(port: int, pin: bytes) -> dict[str, Any]:
    async with pinned_client(pin, base_url=f"https://127.0.0.1:{port}", timeout=5) as client:
        response = await client.get("/v1/status")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _print_status(report: dict[str, Any]) -> None:
    print(f"config:   {report['config']}")
    print(f"running:  {'yes' if report['running'] else 'no'}"
          + (f" (pid {report['pid']})" if report.get("pid") else ""))
    live = report.get("daemon")
    if live:
        print(f"node:     {report.get('node')}")
        print(f"endpoint: {report.get('endpoint') or 'pull only'}")
        print(f"slots:    {live.get('free_slots')} free of {live.get('slots')}, "
              f"{live.get('running')} running"
              + (f", {live['leased_slots']} leased" if live.get("leased_slots") else "")
              + (", standby" if live.get("standby") else "")
              + (", draining" if live.get("draining") else ""))
        for held in live.get("leases") or []:
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(held["until"]))
            print(f"leased:   lease {held['lease']} of dispatcher {held['dispatcher']} "
                  f"until {until} UTC")
        print(f"jobs:     {live.get('accepted')} accepted, {live.get('finished')} finished "
              "results kept")
        rejected = live.get("rejected") or {}
        if rejected:
            print("rejected: " + ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())))
    trust = report["trust"]
    if not trust["valid"]:
        print(f"trust:    NOT USABLE: {trust['problem']}")
    else:
        expires = time.strftime("%Y-%m-%d", time.gmtime(trust["expires_at"]))
        listed = (f"this node listed as a node of {trust['operator']}" if trust["listed"]
                  else f"NOT TRUSTED: {trust['problem']}")
        print(f"trust:    v{trust['version']} (expires {expires}); {listed}")
    dht = report.get("dht")
    if dht is not None:
        alone = dht["contacts"] == 0
        print(f"dht:      {dht['contacts']} contact(s)"
              + (f"; NO BOOTSTRAP NODE ANSWERS ({', '.join(dht['bootstrap'])}): dispatchers "
                 "cannot find this node" if alone and dht["bootstrap"] else "")
              + (f" (trust list v{dht['trust_version_in_use']} in use)"
                 if dht.get("trust_version_in_use") not in (None, trust.get("version"))
                 else ""))
    state = report.get("state")
    if state:
        print(f"state:    {state['finished']} finished result(s), {state['unfinished']} "
              f"interrupted job(s), {state['replay_ids']} replay id(s), "
              f"{state['starts']} start(s)")
    if report.get("error"):
        print(f"note:     {report['error']}")
