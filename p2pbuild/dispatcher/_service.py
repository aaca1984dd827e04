"""Run a dispatcher: identity, trust list, database, DHT, engine, pull queue and HTTPS API.

``run_dispatcher(config)`` is what ``p2pbuild dispatcher run`` calls; tests and the demo
call it in a nursery (``await nursery.start(run_dispatcher, config)``).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from typing import Any

import attrs
import trio

from .._errors import RemoteError
from .._identity import Identity, Role
from .._trust import TrustList, read_trust_list
from ..dht import open_directory
from ..https import TlsMaterial, load_tls_material
from ..https._server import ByteBudget, ConnectionGate, ServerConfig, serve_asgi
from ._api import ApiAuth, make_dispatcher_app
from ._config import DispatcherConfig
from ._db import Database
from ._engine import Engine, EngineConfig
from ._errors import ConfigError
from ._files import build_file_routes
from ._leases import LeaseBook
from ._leasing import LeaseService, lease_routes, load_leases
from ._nodes import DirectoryFinder, NodeConnector, NodeFinder
from ._pull import PullQueue
from ._pull_routes import pull_routes
from ._sink import RepositorySink
from ._waking import KeepAwake
from ._web import WebView, web_routes

__all__ = ["RunningDispatcher", "load_identity_and_trust", "run_dispatcher"]

_log = logging.getLogger("p2pbuild.dispatcher")


@attrs.frozen
class RunningDispatcher:
    """What :func:`run_dispatcher` reports once it listens."""

    port: int
    url: str
    tls: TlsMaterial
    engine: Engine
    dht_port: int | None
    leases: LeaseService | None = None
    #: The API server's connection counts.
    connections: ConnectionGate | None = None


def load_identity_and_trust(config: DispatcherConfig, now: float) -> tuple[Identity, TrustList]:
    """The dispatcher's key and the verified trust list naming it as a dispatcher.

    Raises :class:`ConfigError` (or the key file's :class:`KeyFileError`).
    """
    identity = Identity.load(config.key_file)
    try:
        trust_list = read_trust_list(config.trust_list_file, error=ConfigError)
        trust_list.verify(now)
        trust_list.require(identity.public_key, Role.DISPATCHER)
    except RemoteError as exc:
        raise ConfigError(f"trust list {config.trust_list_file}: {exc}") from None
    return identity, trust_list


async def run_dispatcher(
    config: DispatcherConfig,
    *,
    finder: NodeFinder | None = None,
    clock: Any = time.time,
    task_status: trio.TaskStatus[RunningDispatcher] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dispatcher until cancelled; ``task_status.started(RunningDispatcher)`` once
    the API listens. ``finder`` replaces the DHT (tests, static setups).

    Raises :class:`ConfigError`, :class:`KeyFileError` or :class:`OSError` (address in use)
    at start; afterwards only local failures (database, repository directory) end it.
    """
    identity, trust_list = load_identity_and_trust(config, clock())
    tls = load_tls_material(config.tls_dir)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    db = Database.open(config.database, synchronous=config.synchronous)
    db.replace_tokens(
        "config",
        [(c.token_sha256, c.user, c.team) for c in config.clients if c.token_sha256],
    )
    queue = PullQueue(
        identity.public_key, trust_list, config.state_dir / "pull", clock=clock,
        lease_s=config.pull_lease_s, heartbeat_s=config.pull_heartbeat_s,
    )
    async with trio.open_nursery() as nursery:
        dht_port = None
        if finder is None:
            directory = await nursery.start(_directory, config)
            dht_port = directory.address[1]
            finder = DirectoryFinder(directory, trust_list, nursery=nursery)
        engine_options: dict[str, Any] = dict(config.engine)  # typed as its fields
        engine = Engine(
            db=db,
            identity=identity,
            trust_list=trust_list,
            finder=finder,
            sink=RepositorySink(config.repository),
            config=EngineConfig(
                state_dir=config.state_dir,
                public_url=config.source_base_url,
                default_arch=config.default_arch,
                default_os=config.default_os,
                dedicated_pools=config.dedicated_pools,
                source_allow_hosts=config.source_allow_hosts,
                **engine_options,
            ),
            connector=NodeConnector(queue),
            clock=clock,
            rng=random.SystemRandom(),
            leases=_lease_book(db, config),
        )
        auth = ApiAuth(config.clients, trust_list, clock)
        leases = LeaseService(engine)
        connections = ConnectionGate(config.max_connections, config.max_connections_per_address)
        app = make_dispatcher_app(
            engine, auth, max_upload_bytes=config.max_upload_bytes,
            uploads=ByteBudget(config.max_uploads_in_flight_bytes), connections=connections,
            list_arches=config.list_arches,
            extra_routes=[*pull_routes(queue), *lease_routes(leases, auth),
                          *build_file_routes(engine, auth),
                          *(web_routes(WebView(engine, config.list_arches))
                            if config.web else ())],
            keepalive_s=config.keepalive_s,
        )
        api_config = ServerConfig(
            tls=tls, host=config.host, port=config.port,
            keep_alive_timeout=config.keep_alive_timeout_s,
            max_connections=config.max_connections,
            max_connections_per_address=config.max_connections_per_address,
        )
        port = await nursery.start(
            functools.partial(serve_asgi, app, api_config, gate=connections)
        )
        host = f"[{config.host}]" if ":" in config.host else config.host
        if not config.public_url:
            # Nodes fetch sources from us: with port 0 only now do we know the URL.
            engine.config = attrs.evolve(engine.config, public_url=f"https://{host}:{port}")
        await nursery.start(engine.run)
        await nursery.start(leases.run)
        if config.keep_awake:
            keep = KeepAwake(identity, finder, config.keep_awake, clock,
                             config.keep_awake_interval_s)
            await nursery.start(keep.run)
        _log.info("dispatcher %s listening on %s:%d", identity.public_key.fingerprint, host, port)
        task_status.started(
            RunningDispatcher(
                port, f"https://{host}:{port}", tls, engine, dht_port, leases=leases,
                connections=connections,
            )
        )


def _lease_book(db: Database, config: DispatcherConfig) -> LeaseBook:
    book = LeaseBook(config.lease_quotas)
    book.load(load_leases(db))
    return book


async def _directory(
    config: DispatcherConfig, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    async with open_directory(
        config.dht_host, config.dht_port, bootstrap=config.dht_bootstrap
    ) as directory:
        task_status.started(directory)
        await trio.sleep_forever()
