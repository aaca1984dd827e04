"""``p2pbuild dispatcher init`` and ``run``: set up and run a dispatcher.

``dispatcher init`` writes the client file (``client.toml``) that ``submit``, ``builds`` and
``nodes`` (``_builds.py``) read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import tomli_w
import trio

from .._errors import P2PBuildError
from .._identity import Identity, Role
from .._wiring import RunningService, load_service_config, serve_dispatcher
from ..dispatcher._config import hash_token
from ..dispatcher._errors import ConfigError
from ..https import generate_tls_material
from ..node._config import parse_host_port
from ._args import action, command, emit, json_flag
from ._startup import explain_bind_failure

__all__ = ["register"]


def register(sub: Any) -> None:
    command(sub, "dispatcher", _dispatcher_actions, help="set up and run a dispatcher")


def _dispatcher_actions(dsub: Any) -> None:
    """Set up and run a dispatcher: the service that sends signed jobs to trusted nodes of different
    operators and stores builds whose outputs agree."""
    init = action(
        dsub, "init", _init, help="create a key, TLS certificate, configuration and client file",
    )
    init.add_argument("--dir", required=True, type=Path, metavar="DIR")
    init.add_argument("--host", default="127.0.0.1", help="address to listen on")
    init.add_argument("--port", type=int, default=7443)
    init.add_argument("--public-url", metavar="URL",
                      help="https://name:port where clients and nodes reach the dispatcher "
                      "(written to client.toml and [api] public_url; default: "
                      "https://HOST:PORT, or this machine's name when HOST listens on all "
                      "addresses)")
    init.add_argument("--user", default="admin", help="user name of the API token")
    init.add_argument("--dht-bind", default="0.0.0.0:7421", metavar="HOST:PORT",
                      help="UDP address of the dispatcher's DHT node (default 0.0.0.0:7421; "
                      "port 0 picks a free one)")
    init.add_argument("--bootstrap", action="append", default=[], metavar="HOST:PORT",
                      help="a DHT node to join through (repeatable)")
    json_flag(init)
    run = action(dsub, "run", _run, help="run the dispatcher until interrupted")
    run.add_argument("--config", required=True, type=Path, metavar="FILE")
    run.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"])

# -- dispatcher init / run ------------------------------------------------------------------------


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _init(args: argparse.Namespace) -> int:
    """Create DIR/dispatcher.key (mode 0600), DIR/tls/, DIR/dispatcher.toml and DIR/client.toml
    (URL, certificate pin and a fresh API token). Add the printed key to the trust list as a
    dispatcher and put the signed list at DIR/trust-list.bin."""
    directory: Path = args.dir
    try:
        dht_host, dht_port = parse_host_port(args.dht_bind, allow_zero=True)
        for item in args.bootstrap:
            parse_host_port(item)
    except ValueError as exc:
        raise ConfigError(f"--dht-bind/--bootstrap: {exc}") from None
    if args.public_url and not args.public_url.startswith("https://"):
        raise ConfigError("--public-url must start with https://")
    if args.public_url:
        url = args.public_url.rstrip("/")
    elif args.host in ("0.0.0.0", "::", ""):
        # A wildcard is where to listen, not an address anyone can reach.
        url = f"https://{socket.getfqdn()}:{args.port}"
    else:
        url = f"https://[{args.host}]:{args.port}" if ":" in args.host else (
            f"https://{args.host}:{args.port}")
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
            "key_file": "dispatcher.key", "trust_list": "trust-list.bin", "state_dir": "state",
            "repository": "repo",
        },
        # The node's names: bind = "HOST:PORT".
        "api": {"bind": _join(args.host, args.port), "tls_dir": "tls", "public_url": url},
        "dht": {"bind": _join(dht_host, dht_port), "bootstrap": list(args.bootstrap)},
        # Whoever creates the dispatcher runs it: an admin (may cancel any build).
        "clients": [{"user": args.user, "role": "admin", "token_sha256": hash_token(token)}],
    }
    config_path.write_text(
        "# p2pbuild dispatcher; see dispatcher/dispatcher.example.toml for every key.\n"
        + tomli_w.dumps(config)
    )
    client_path = directory / "client.toml"
    fd = os.open(client_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(tomli_w.dumps({"url": url, "tls_sha256": tls.sha256.hex(), "token": token}))
    return emit(args, {
        "public_key": str(identity.public_key), "config": str(config_path),
        "client_config": str(client_path), "url": url, "tls_sha256": tls.sha256.hex(),
    }, f"created dispatcher {identity.public_key.fingerprint} in {directory}\n"
        f"  public key: {identity.public_key}\n"
        f"  config:     {config_path}\n"
        f"  client:     {client_path} (URL, certificate pin, API token; mode 0600)\n"
        "next: add the key to the trust list as a dispatcher, save the signed list as "
        f"{directory / 'trust-list.bin'}, then: p2pbuild dispatcher run --config {config_path}")


def _run(args: argparse.Namespace) -> int:
    """Run the dispatcher described by a configuration file. Prints one JSON line (url, port,
    dht_port, key, tls_sha256) once it listens; stops on SIGTERM or Ctrl-C, leaving builds in
    flight to resume at the next start."""
    config = load_service_config(args.config)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                service: RunningService = await nursery.start(serve_dispatcher, config)
                running = service.dispatcher
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

    main_config = config.dispatcher
    listens = [("[api]", "tcp", main_config.host, main_config.port),
               ("[dht]", "udp", main_config.dht_host, main_config.dht_port)]
    try:
        with explain_bind_failure(args.config, listens):
            trio.run(main)
    except BaseExceptionGroup as group:
        # A refusal from inside the service at start (its state directory held by another
        # dispatcher, say) is one line like the others, not a traceback.
        refused, others = group.split(P2PBuildError)
        if refused is None or others is not None:
            raise
        first: BaseException = refused
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return 0
