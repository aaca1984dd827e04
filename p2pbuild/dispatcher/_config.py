"""The dispatcher's configuration file (TOML), validated into a frozen value.

Relative paths are relative to the file's directory. Every error is one line naming the key
(:class:`ConfigError`). See ``dispatcher/dispatcher.example.toml`` for every key.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import attrs

from .. import _tables
from .._errors import MalformedError
from .._hostport import parse_host_port
from .._identity import PublicKey
from .._jobs import DEFAULT_ARCH, DEFAULT_OS
from ._engine_config import EngineConfig
from ._errors import ConfigError
from ._leases import Quotas

__all__ = ["ClientEntry", "DispatcherConfig", "hash_token", "load_config"]

_TOKEN = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def hash_token(token: str) -> str:
    """The SHA-256 (hex) under which an API token is stored; tokens are never stored."""
    return hashlib.sha256(token.encode()).hexdigest()


@attrs.frozen
class ClientEntry:
    """One API client: a user with a team, known by a token hash or a signing key. An
    ``admin`` (``role = "admin"``) may cancel any user's build and sees job ids and node
    endpoints; a user (``role = "user"``, the default) only cancels its own builds."""

    user: str
    team: str | None = None
    token_sha256: str | None = None
    key: PublicKey | None = None
    admin: bool = False


@attrs.frozen
class DispatcherConfig:
    path: Path
    key_file: Path
    trust_list_file: Path
    state_dir: Path
    repository: Path
    tls_dir: Path
    host: str = "127.0.0.1"
    port: int = 7443
    public_url: str = ""
    default_arch: str = DEFAULT_ARCH
    default_os: str = DEFAULT_OS
    max_upload_bytes: int = 1024**3
    #: ``[api]``: bytes of all source uploads in flight together; beyond it 503.
    max_uploads_in_flight_bytes: int = 4 * 1024**3
    #: ``[api]``: idle keep-alive connections close after this; open connections at most,
    #: in all and from one client address (p2pbuild.https).
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 1000
    max_connections_per_address: int = 64
    #: ``[dispatcher] source_allow_hosts``: hosts a source URL may name although they
    #: resolve to a loopback, link-local or private address (``_sources.py``).
    source_allow_hosts: tuple[str, ...] = ()
    dht_host: str = "0.0.0.0"
    dht_port: int = 7421
    dht_bootstrap: tuple[tuple[str, int], ...] = ()
    #: Arches ``nodes ls`` looks up in the DHT.
    list_arches: tuple[str, ...] = (DEFAULT_ARCH,)
    clients: tuple[ClientEntry, ...] = ()
    dedicated_pools: Mapping[str, str] = attrs.field(factory=dict)
    engine: Mapping[str, float] = attrs.field(factory=dict)
    synchronous: str = "FULL"
    #: Tables of the roles wired above the dispatcher (``[koji]``), as read: each role
    #: validates its own (``load_config``'s ``extra_sections``).
    sections: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    #: ``[pull]``: a pull node's lease on a taken job, and how often it is told to renew it.
    pull_lease_s: float = 60.0
    pull_heartbeat_s: float = 15.0
    #: ``[leases]``: quotas on the slots users hold.
    lease_quotas: Quotas = attrs.field(factory=Quotas)
    #: ``[on_demand]``: on-demand nodes to keep awake per pool, and how often to tell them.
    keep_awake: Mapping[str, int] = attrs.field(factory=dict)
    keep_awake_interval_s: float = 60.0
    #: ``[api] keepalive_s``: a followed event stream's keep-alive interval.
    keepalive_s: float = 15.0
    #: ``[api] web``: serve the public read-only web view and ``/metrics`` (``_web.py``).
    web: bool = True

    @property
    def database(self) -> Path:
        return self.state_dir / "dispatcher.db"

    @property
    def source_base_url(self) -> str:
        return self.public_url or f"https://{self.host}:{self.port}"


def table_value(
    table: Mapping[str, Any], key: str, kind: type, where: str, default: Any = None
) -> Any:
    """``table[key]`` checked to be a ``kind`` by the shared reader
    (:func:`p2pbuild._tables.table_value`), ``default`` when absent, required when the
    default is None. Raises :class:`ConfigError` naming ``where`` and ``key``
    (``d.toml [api]: port must be an integer, got 'x'``): how the dispatcher's and the
    Koji host's tables are read."""
    return _tables.table_value(
        table, key, kind, lambda name, problem: ConfigError(f"{where}: {name} {problem}"),
        _tables.REQUIRED if default is None else default,
    )


_get = table_value


def _key_file(main: Mapping[str, Any], where: str) -> str:
    """``[dispatcher] key_file``, the name the node's configuration uses too; ``key`` is
    the older name of the same setting, still read. Both at once is an error."""
    if "key_file" in main and "key" in main:
        raise ConfigError(f"{where}: key_file and key name the same file; keep key_file")
    name = "key" if "key" in main else "key_file"
    value: str = _get(main, name, str, where)
    return value


def _address(text: str, where: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


#: The keys each table may hold; anything else is refused (a misspelled key must not run
#: silently with a default, as the node's configuration does).
_KEYS = {
    "dispatcher": {"key_file", "key", "trust_list", "state_dir", "repository", "default_arch",
                   "default_os", "synchronous", "source_allow_hosts"},
    "api": {"bind", "host", "port", "tls_dir", "public_url", "max_upload_bytes", "keepalive_s",
            "web", "max_uploads_in_flight_bytes", "keep_alive_timeout_s", "max_connections",
            "max_connections_per_address"},
    "dht": {"bind", "host", "port", "bootstrap", "list_arches"},
    "clients": {"user", "team", "role", "token_sha256", "key"},
}


def _refuse_unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {key!r} (known: {', '.join(sorted(allowed))})"
            )


#: The [engine] keys: every number the engine takes (``EngineConfig``'s int and float
#: fields), so a new bound is configurable without a second list to keep up to date.
_ENGINE_KEYS = frozenset(
    f.name for f in attrs.fields(EngineConfig) if f.type in ("int", "float", int, float)
)
_ENGINE_INTS = frozenset(f.name for f in attrs.fields(EngineConfig) if f.type in ("int", int))


def load_config(path: Path, extra_sections: Collection[str] = ()) -> DispatcherConfig:
    """Read and validate the configuration at ``path``. The ``extra_sections`` (the
    roles wired above the dispatcher: ``koji``) are kept as read, in
    :attr:`DispatcherConfig.sections`; any other unknown section is an error. Raises
    :class:`ConfigError`."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = path.absolute().parent

    def rel(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    known = {
        "dispatcher", "api", "dht", "clients", "pools", "engine", "pull", "leases",
        "on_demand", *extra_sections,
    }
    for key in document:
        if key not in known:
            raise ConfigError(f"{path}: unknown section [{key}]")
    main = _get(document, "dispatcher", dict, str(path))
    api = _get(document, "api", dict, str(path), {})
    dht = _get(document, "dht", dict, str(path), {})
    w = f"{path} [dispatcher]"
    for name, table in (("dispatcher", main), ("api", api), ("dht", dht)):
        _refuse_unknown(table, _KEYS[name], f"{path} [{name}]")
    clients = []
    for index, item in enumerate(_get(document, "clients", list, str(path), [])):
        where = f"{path} [[clients]] #{index + 1}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: must be a table")
        _refuse_unknown(item, _KEYS["clients"], where)
        token = _get(item, "token_sha256", str, where, "") or None
        key_text = _get(item, "key", str, where, "") or None
        if token is not None and not _HEX64.fullmatch(token):
            raise ConfigError(f"{where}: token_sha256 must be 64 lowercase hex digits")
        if (token is None) == (key_text is None):
            raise ConfigError(f"{where}: give exactly one of token_sha256 and key")
        try:
            public = PublicKey.from_text(key_text) if key_text else None
        except MalformedError as exc:
            raise ConfigError(f"{where}: key: {exc}") from None
        team = _get(item, "team", str, where, "") or None
        role = _get(item, "role", str, where, "user")
        if role not in ("user", "admin"):
            raise ConfigError(f"{where}: role must be user or admin")
        clients.append(
            ClientEntry(_get(item, "user", str, where), team, token, public, role == "admin")
        )
    pools = _get(document, "pools", dict, str(path), {})
    for pool, team in pools.items():
        if not _TOKEN.fullmatch(pool) or not isinstance(team, str):
            raise ConfigError(f"{path} [pools]: {pool} = team name (a string)")
    engine = _get(document, "engine", dict, str(path), {})
    for key, value in engine.items():
        if key not in _ENGINE_KEYS:
            raise ConfigError(f"{path} [engine]: unknown key {key}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{path} [engine]: {key} must be a non-negative number")
    engine = {k: int(v) if k in _ENGINE_INTS else float(v) for k, v in engine.items()}
    public_url = _get(api, "public_url", str, f"{path} [api]", "")
    if public_url and not public_url.startswith("https://"):
        raise ConfigError(f"{path} [api]: public_url must start with https://")
    api_host, port = _bind(api, f"{path} [api]", "127.0.0.1", 7443)
    dht_host, dht_port = _bind(dht, f"{path} [dht]", "0.0.0.0", 7421)
    keepalive_s = _get(api, "keepalive_s", float, f"{path} [api]", 15.0)
    if not 0.1 <= keepalive_s <= 300.0:
        raise ConfigError(f"{path} [api]: keepalive_s must be 0.1 to 300 seconds")
    synchronous = _get(main, "synchronous", str, w, "FULL")
    if synchronous not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError(f"{w}: synchronous must be FULL, NORMAL or EXTRA")
    lease_s, heartbeat_s = _pull_section(document, path)
    wa = f"{path} [api]"
    bounds: dict[str, Any] = {
        "max_uploads_in_flight_bytes": _get(api, "max_uploads_in_flight_bytes", int, wa,
                                            4 * 1024**3),
        "keep_alive_timeout_s": _get(api, "keep_alive_timeout_s", float, wa, 5.0),
        "max_connections": _get(api, "max_connections", int, wa, 1000),
        "max_connections_per_address": _get(api, "max_connections_per_address", int, wa, 64),
    }
    for key, value in bounds.items():
        if value <= 0:
            raise ConfigError(f"{wa}: {key} must be positive")
    allow_hosts = _get(main, "source_allow_hosts", list, w, [])
    if not all(isinstance(h, str) and h and h.isprintable() for h in allow_hosts):
        raise ConfigError(f"{w}: source_allow_hosts must be a list of host names")
    return DispatcherConfig(
        path=path,
        key_file=rel(_key_file(main, w)),
        trust_list_file=rel(_get(main, "trust_list", str, w)),
        state_dir=rel(_get(main, "state_dir", str, w, "state")),
        repository=rel(_get(main, "repository", str, w, "repo")),
        tls_dir=rel(_get(api, "tls_dir", str, f"{path} [api]", "tls")),
        host=api_host,
        port=port,
        public_url=public_url,
        default_arch=_get(main, "default_arch", str, w, DEFAULT_ARCH),
        default_os=_get(main, "default_os", str, w, DEFAULT_OS),
        max_upload_bytes=_get(api, "max_upload_bytes", int, f"{path} [api]", 1024**3),
        web=_get(api, "web", bool, f"{path} [api]", True),
        source_allow_hosts=tuple(h.lower().strip("[]") for h in allow_hosts),
        **bounds,
        dht_host=dht_host,
        dht_port=dht_port,
        dht_bootstrap=tuple(
            _address(a, f"{path} [dht] bootstrap")
            for a in _get(dht, "bootstrap", list, f"{path} [dht]", [])
        ),
        list_arches=tuple(_get(dht, "list_arches", list, f"{path} [dht]", [DEFAULT_ARCH])),
        clients=tuple(clients),
        dedicated_pools=dict(pools),
        engine=dict(engine),
        synchronous=synchronous,
        sections={name: _get(document, name, dict, str(path), {}) for name in extra_sections
                  if name in document},
        pull_lease_s=lease_s,
        pull_heartbeat_s=heartbeat_s,
        **_leases_section(document, path),
        **_on_demand_section(document, path),
        keepalive_s=keepalive_s,
    )


def _on_demand_section(document: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """``[on_demand] keep_awake = {pool = n}, interval_s``: each named pool keeps ``n`` of
    its on-demand nodes awake (pre-allocated); the others may sleep."""
    table = _get(document, "on_demand", dict, str(path), {})
    w = f"{path} [on_demand]"
    for key in table:
        if key not in ("keep_awake", "interval_s"):
            raise ConfigError(f"{w}: unknown key {key}")
    keep = _get(table, "keep_awake", dict, w, {})
    for pool, count in keep.items():
        if not _TOKEN.fullmatch(pool) or not isinstance(count, int) or isinstance(
            count, bool
        ) or not 0 <= count <= 1000:
            raise ConfigError(f"{w}: keep_awake: {pool} = a number of nodes (0 to 1000)")
    interval = _get(table, "interval_s", float, w, 60.0)
    if not 1.0 <= interval <= 3600.0:
        raise ConfigError(f"{w}: interval_s must be 1 to 3600 seconds")
    return {"keep_awake": dict(keep), "keep_awake_interval_s": interval}


def _leases_section(document: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """``[leases] max_slots_per_user, max_slots_per_team, max_duration_s``."""
    table = _get(document, "leases", dict, str(path), {})
    w = f"{path} [leases]"
    known = {"max_slots_per_user", "max_slots_per_team", "max_duration_s"}
    for key in table:
        if key not in known:
            raise ConfigError(f"{w}: unknown key {key}")
    numbers: dict[str, int] = {}
    for key in ("max_slots_per_user", "max_slots_per_team", "max_duration_s"):
        if key in table:
            numbers[key] = _get(table, key, int, w)
            if numbers[key] < 1:
                raise ConfigError(f"{w}: {key} must be a positive integer")
    return {"lease_quotas": Quotas(**numbers)}


def _bind(table: Mapping[str, Any], where: str, host: str, port: int) -> tuple[str, int]:
    """A listening address: ``bind = "HOST:PORT"`` as in the node's configuration (port 0:
    any free port), or the older ``host`` and ``port`` keys, not both."""
    if "bind" in table:
        if "host" in table or "port" in table:
            raise ConfigError(f"{where}: give bind, or host and port, not both")
        try:
            return parse_host_port(_get(table, "bind", str, where), allow_zero=True)
        except ValueError as exc:
            raise ConfigError(f"{where}: bind: {exc}") from None
    host = _get(table, "host", str, where, host)
    port = _get(table, "port", int, where, port)
    if not 0 <= port < 65536:
        raise ConfigError(f"{where}: port must be 0 to 65535")
    return host, port


def _pull_section(document: Mapping[str, Any], path: Path) -> tuple[float, float]:
    """``[pull] lease_s, heartbeat_s``: a heartbeat of 1 to 600 s and a lease of at least two
    heartbeats (one lost renewal is not fatal), at most an hour."""
    table = _get(document, "pull", dict, str(path), {})
    w = f"{path} [pull]"
    for key in table:
        if key not in ("lease_s", "heartbeat_s"):
            raise ConfigError(f"{w}: unknown key {key}")
    heartbeat_s = _get(table, "heartbeat_s", float, w, 15.0)
    lease_s = _get(table, "lease_s", float, w, 60.0)
    if not 1.0 <= heartbeat_s <= 600.0:
        raise ConfigError(f"{w}: heartbeat_s must be 1 to 600 seconds")
    if not 2 * heartbeat_s <= lease_s <= 3600.0:
        raise ConfigError(
            f"{w}: lease_s must be at least twice heartbeat_s ({2 * heartbeat_s:g}) and at "
            "most 3600 seconds"
        )
    return lease_s, heartbeat_s
