"""The node daemon's configuration: one TOML file, parsed into a frozen :class:`NodeConfig`.

Every value is checked when the file is loaded, and a bad one is refused with one line that
names the key (``node.toml: limits.slots: must be an integer in [1, 256], got 0``): a
volunteer should never have to read a traceback to fix a typo. Bounds are parameters
(:class:`ConfigBounds`), defaults are what a small volunteer machine wants, and relative
paths are relative to ``node.data_dir`` (so a whole node lives in one directory).

The file format, with every key, is ``node/node.example.toml`` and
:func:`render_config` (what ``p2pbuild node init`` writes). Sections::

    [node]        data_dir, key_file, trust_list, operator, pools, work_dir
    [dht]         bind, bootstrap
    [api]         enabled, bind, endpoint, keep_alive_timeout_s, max_connections,
                  max_connections_per_address       (push mode: inbound HTTPS)
    [pull]        dispatchers = [{url, key, tls_sha256}], poll_timeout_s, heartbeat_s
                  (NAT mode)
    [limits]      slots, time_limit_s, max_output_mb, max_disk_mb, max_source_mb,
                  buildroot_cache_mb
    [capability]  overrides of detected values: arch, os, cpus, cpu_model, memory_mb,
                  disk_mb, machine, build_types
    [records]     status_interval_s, status_lifetime_s, capability_lifetime_s
    [results]     keep_s, max_finished
    [shutdown]    grace_s
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import tomli_w

from .._errors import LocalError, MalformedError
from .._hostport import parse_host_port
from .._identity import PublicKey
from .._jobs import DEFAULT_ARCH, DEFAULT_OS
from .._records import _TOKEN, MAX_CPU_MODEL, MAX_CPUS, MAX_MB, MachineType
from ._ondemand import OnDemandConfig

__all__ = [
    "ApiConfig",
    "CapabilityOverrides",
    "ConfigBounds",
    "ConfigError",
    "DhtSettings",
    "NodeConfig",
    "NodeLimits",
    "PullDispatcher",
    "PullSettings",
    "load_config",
    "parse_config",
    "parse_host_port",
    "render_config",
]

_MAX_CONFIG_BYTES = 256 * 1024
_OPERATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_MB = 1024 * 1024
T = TypeVar("T")


class ConfigError(LocalError):
    """A configuration file that cannot be used; the message is one line naming the key."""

    code = "config"


@attrs.frozen
class ConfigBounds:
    """The ranges a configuration value must fall in; every bound is a parameter."""

    max_slots: int = 256
    max_time_limit_s: int = 24 * 3600
    max_output_mb: int = 4096
    max_disk_mb: int = 16 * 1024 * 1024
    max_source_mb: int = 64 * 1024
    min_status_interval_s: float = 1.0
    max_status_interval_s: float = 3600.0
    #: The record policy's limits (``RecordPolicy.max_lifetime``).
    max_status_lifetime_s: int = 30 * 60
    max_capability_lifetime_s: int = 24 * 3600
    max_keep_s: int = 90 * 24 * 3600
    max_finished: int = 100_000
    max_grace_s: float = 24 * 3600
    max_bootstrap: int = 64
    max_dispatchers: int = 16
    max_poll_timeout_s: float = 600.0
    max_heartbeat_s: float = 600.0


@attrs.frozen
class DhtSettings:
    """Where the node's DHT node listens and whom it joins through."""

    bind: tuple[str, int] = ("0.0.0.0", 7420)
    bootstrap: tuple[tuple[str, int], ...] = ()


@attrs.frozen
class ApiConfig:
    """Push mode: the HTTPS job API. ``endpoint`` is what the capability record advertises
    (``https://host:port``); empty means "derive from ``bind``" (only when it binds one
    concrete address)."""

    enabled: bool = True
    bind: tuple[str, int] = ("0.0.0.0", 8443)
    endpoint: str = ""
    #: Idle keep-alive connections close after this; open connections at most, in all
    #: and from one client address (p2pbuild.https).
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 1000
    max_connections_per_address: int = 64


@attrs.frozen
class PullDispatcher:
    """A dispatcher to long-poll: its base URL, its key (jobs must be signed by it, and pull
    tokens are made for it) and optionally the SHA-256 of its TLS certificate to pin (else
    the system's CAs verify it)."""

    url: str
    key: PublicKey
    tls_sha256: bytes | None = None


@attrs.frozen
class PullSettings:
    dispatchers: tuple[PullDispatcher, ...] = ()
    #: How long one long-poll request may wait for a job.
    poll_timeout_s: float = 30.0
    #: Renew the lease on a taken job at least this often (more often if the dispatcher
    #: asks for it when it hands out the job).
    heartbeat_s: float = 15.0


@attrs.frozen
class NodeLimits:
    """Concurrency and per-build bounds."""

    slots: int = 1
    time_limit_s: int = 3600
    max_output_mb: int = 16
    max_disk_mb: int = 8192
    max_source_mb: int = 2048
    #: Buildroots kept between builds (``<data_dir>/buildroots``), least recently used
    #: evicted past this.
    buildroot_cache_mb: int = 8192


@attrs.frozen
class CapabilityOverrides:
    """Values that replace detected ones in the capability record (None: detect)."""

    arch: str | None = None
    os: str | None = None
    cpus: int | None = None
    cpu_model: str | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    machine: MachineType | None = None
    build_types: tuple[str, ...] | None = None


@attrs.frozen
class NodeConfig:
    """A node's whole configuration; build with :func:`load_config` or :func:`parse_config`.

    All paths are absolute.
    """

    data_dir: Path
    key_file: Path
    trust_list: Path
    work_dir: Path
    operator: str = ""
    pools: tuple[str, ...] = ()
    dht: DhtSettings = DhtSettings()
    api: ApiConfig = ApiConfig()
    pull: PullSettings = PullSettings()
    limits: NodeLimits = NodeLimits()
    capability: CapabilityOverrides = CapabilityOverrides()
    status_interval_s: float = 60.0
    status_lifetime_s: int = 300
    capability_lifetime_s: int = 24 * 3600
    keep_s: int = 7 * 24 * 3600
    max_finished: int = 256
    grace_s: float = 300.0
    #: ``[on_demand]``: sleep when idle, woken by dispatchers (``_ondemand.py``).
    on_demand: OnDemandConfig | None = None
    #: Where the file was read from (for messages), if it was.
    source: Path | None = None

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "state.sqlite3"

    @property
    def run_file(self) -> Path:
        """Written while the daemon runs: its pid and bound ports (``node status``)."""
        return self.data_dir / "run.json"


# -- parsing ------------------------------------------------------------------------------------


class _Reader:
    """Takes values out of one TOML table, checking each; reports the full key on error."""

    def __init__(self, table: Mapping[str, Any], prefix: str, where: str) -> None:
        self._table = dict(table)
        self._prefix = prefix
        self._where = where

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self._where}{self._prefix}{key}: {message}")

    def _take(self, key: str, default: T, kind: type | tuple[type, ...], what: str) -> Any:
        if key not in self._table:
            return default
        value = self._table.pop(key)
        # bool is an int in Python; an integer key must not accept true/false.
        if (isinstance(value, bool) and bool not in _as_tuple(kind)) or not isinstance(
            value, kind
        ):
            raise self.fail(key, f"must be {what}, got {_show(value)}")
        return value

    def text(self, key: str, default: str = "") -> str:
        value: str = self._take(key, default, str, "a string")
        if not value.isprintable():
            raise self.fail(key, "must be printable text")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value: bool = self._take(key, default, bool, "true or false")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value: int = self._take(key, default, int, f"an integer in [{low}, {high}]")
        if not low <= value <= high:
            raise self.fail(key, f"must be an integer in [{low}, {high}], got {value}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self._take(key, default, (int, float), f"a number in [{low:g}, {high:g}]")
        if not low <= value <= high:
            raise self.fail(key, f"must be a number in [{low:g}, {high:g}], got {value}")
        return float(value)

    def tokens(self, key: str, default: tuple[str, ...] | None, limit: int = 16) -> Any:
        value = self._take(key, default, list, "a list of strings")
        if value is default:
            return default
        if len(value) > limit:
            raise self.fail(key, f"must have at most {limit} entries")
        for item in value:
            if not isinstance(item, str) or not _TOKEN.fullmatch(item):
                raise self.fail(
                    key, f"{_show(item)} must match [a-z0-9][a-z0-9._+-]{{0,63}}"
                )
        return tuple(sorted(set(value)))

    def token(self, key: str) -> str | None:
        if key not in self._table:
            return None
        value = self._table.pop(key)
        if not isinstance(value, str) or not _TOKEN.fullmatch(value):
            raise self.fail(key, f"{_show(value)} must match [a-z0-9][a-z0-9._+-]{{0,63}}")
        return value

    def path(self, key: str, default: str, base: Path | None) -> Path:
        text = self.text(key, default)
        if not text:
            raise self.fail(key, "must not be empty")
        path = Path(text).expanduser()
        if not path.is_absolute():
            if base is None:
                raise self.fail(key, "must be an absolute path")
            path = base / path
        return path

    def address(self, key: str, default: tuple[str, int], *, allow_zero: bool) -> tuple[str, int]:
        if key not in self._table:
            return default
        text = self.text(key)
        try:
            return parse_host_port(text, allow_zero=allow_zero)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def table(self, key: str) -> _Reader:
        value = self._take(key, {}, dict, "a table")
        return _Reader(value, f"{self._prefix}{key}.", self._where)

    def list_of_tables(self, key: str) -> list[_Reader]:
        value = self._take(key, [], list, "an array of tables")
        readers = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.fail(f"{key}[{i}]", "must be a table")
            readers.append(_Reader(item, f"{self._prefix}{key}[{i}].", self._where))
        return readers

    def has(self, key: str) -> bool:
        return key in self._table

    def done(self) -> None:
        """Refuse keys nobody asked for: a misspelt key must not be silently ignored."""
        for key in self._table:
            raise self.fail(key, "unknown key")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _show(value: object) -> str:
    return f"{value!r:.60}"


def _https_url(reader: _Reader, key: str, *, required: bool) -> str:
    url = reader.text(key, "")
    if not url:
        if required:
            raise reader.fail(key, "is required")
        return ""
    if not url.startswith("https://") or " " in url or len(url) > 200:
        raise reader.fail(key, f"must be an https:// URL of at most 200 characters: {url!r:.60}")
    return url.rstrip("/")


def _sha256_hex(reader: _Reader, key: str) -> bytes | None:
    text = reader.text(key, "")
    if not text:
        return None
    cleaned = text.replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", cleaned):
        raise reader.fail(key, "must be a SHA-256 in 64 hex digits")
    return bytes.fromhex(cleaned)


def parse_config(
    document: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    bounds: ConfigBounds = ConfigBounds(),
    source: Path | None = None,
) -> NodeConfig:
    """Build a :class:`NodeConfig` from a parsed TOML document.

    ``node.data_dir`` defaults to ``base_dir`` (the config file's directory); relative paths
    are taken from ``node.data_dir``. Raises :class:`ConfigError` naming the first bad key.
    """
    where = f"{source}: " if source is not None else ""
    root = _Reader(document, "", where)

    node = root.table("node")
    data_dir = node.path("data_dir", str(base_dir) if base_dir else "", None)
    key_file = node.path("key_file", "node.key", data_dir)
    trust_list = node.path("trust_list", "trust-list.bin", data_dir)
    work_dir = node.path("work_dir", "work", data_dir)
    operator = node.text("operator", "")
    if operator and not _OPERATOR.fullmatch(operator):
        raise node.fail("operator", "must match [A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
    pools = node.tokens("pools", ())
    node.done()

    dht_table = root.table("dht")
    dht_bind = dht_table.address("bind", DhtSettings.bind, allow_zero=True)
    bootstrap_texts = dht_table._take("bootstrap", [], list, "a list of HOST:PORT strings")
    if len(bootstrap_texts) > bounds.max_bootstrap:
        raise dht_table.fail("bootstrap", f"must have at most {bounds.max_bootstrap} entries")
    bootstrap = []
    for item in bootstrap_texts:
        if not isinstance(item, str):
            raise dht_table.fail("bootstrap", f"{_show(item)} is not a HOST:PORT string")
        try:
            bootstrap.append(parse_host_port(item))
        except ValueError as exc:
            raise dht_table.fail("bootstrap", str(exc)) from None
    dht_table.done()

    api_table = root.table("api")
    api = ApiConfig(
        enabled=api_table.boolean("enabled", True),
        bind=api_table.address("bind", ApiConfig.bind, allow_zero=True),
        endpoint=_https_url(api_table, "endpoint", required=False),
        keep_alive_timeout_s=api_table.number("keep_alive_timeout_s", 5.0, 0.1, 600.0),
        max_connections=api_table.integer("max_connections", 1000, 1, 1_000_000),
        max_connections_per_address=api_table.integer(
            "max_connections_per_address", 64, 1, 1_000_000
        ),
    )
    api_table.done()

    pull_table = root.table("pull")
    dispatchers = []
    readers = pull_table.list_of_tables("dispatchers")
    if len(readers) > bounds.max_dispatchers:
        raise pull_table.fail("dispatchers", f"must have at most {bounds.max_dispatchers}")
    for reader in readers:
        url = _https_url(reader, "url", required=True)
        key_text = reader.text("key", "")
        try:
            key = PublicKey.from_text(key_text)
        except MalformedError as exc:
            raise reader.fail("key", f"must be an ed25519:... public key ({exc})") from None
        dispatchers.append(PullDispatcher(url, key, _sha256_hex(reader, "tls_sha256")))
        reader.done()
    pull = PullSettings(
        tuple(dispatchers),
        pull_table.number("poll_timeout_s", 30.0, 1.0, bounds.max_poll_timeout_s),
        pull_table.number("heartbeat_s", 15.0, 1.0, bounds.max_heartbeat_s),
    )
    pull_table.done()
    if not api.enabled and not pull.dispatchers:
        raise api_table.fail(
            "enabled", "is false and [pull] names no dispatchers: the node could take no job"
        )

    limits_table = root.table("limits")
    limits = NodeLimits(
        slots=limits_table.integer("slots", 1, 1, bounds.max_slots),
        time_limit_s=limits_table.integer("time_limit_s", 3600, 1, bounds.max_time_limit_s),
        max_output_mb=limits_table.integer("max_output_mb", 16, 1, bounds.max_output_mb),
        max_disk_mb=limits_table.integer("max_disk_mb", 8192, 1, bounds.max_disk_mb),
        max_source_mb=limits_table.integer("max_source_mb", 2048, 1, bounds.max_source_mb),
        buildroot_cache_mb=limits_table.integer("buildroot_cache_mb", 8192, 1,
                                                bounds.max_disk_mb),
    )
    limits_table.done()

    cap = root.table("capability")
    machine_text = cap.text("machine", "") if cap.has("machine") else ""
    if machine_text and machine_text not in {m.value for m in MachineType}:
        raise cap.fail("machine", f"must be 'vm' or 'metal', got {machine_text!r:.40}")
    cpus = cap.integer("cpus", -1, 1, MAX_CPUS - 1) if cap.has("cpus") else None
    memory_mb = cap.integer("memory_mb", -1, 0, MAX_MB - 1) if cap.has("memory_mb") else None
    disk_mb = cap.integer("disk_mb", -1, 0, MAX_MB - 1) if cap.has("disk_mb") else None
    cpu_model = cap.text("cpu_model") if cap.has("cpu_model") else None
    if cpu_model is not None and len(cpu_model) > MAX_CPU_MODEL:
        raise cap.fail("cpu_model", f"must be at most {MAX_CPU_MODEL} characters")
    build_types = cap.tokens("build_types", None)
    if build_types is not None and not set(build_types) <= {"make", "rpm", "rpm.dnf"}:
        raise cap.fail("build_types", "may name only 'rpm', 'rpm.dnf' and 'make'")
    overrides = CapabilityOverrides(
        arch=cap.token("arch"),
        os=cap.token("os"),
        cpus=cpus,
        cpu_model=cpu_model,
        memory_mb=memory_mb,
        disk_mb=disk_mb,
        machine=MachineType(machine_text) if machine_text else None,
        build_types=build_types,
    )
    cap.done()

    records = root.table("records")
    status_interval = records.number(
        "status_interval_s", 60.0, bounds.min_status_interval_s, bounds.max_status_interval_s
    )
    status_lifetime = records.integer(
        "status_lifetime_s", 300, 2, bounds.max_status_lifetime_s
    )
    if status_lifetime <= status_interval:
        raise records.fail(
            "status_lifetime_s",
            f"must be longer than status_interval_s ({status_interval:g}), or the status "
            "expires between republications",
        )
    capability_lifetime = records.integer(
        "capability_lifetime_s", 24 * 3600, 60, bounds.max_capability_lifetime_s
    )
    records.done()

    results = root.table("results")
    keep_s = results.integer("keep_s", 7 * 24 * 3600, 1, bounds.max_keep_s)
    max_finished = results.integer("max_finished", 256, 1, bounds.max_finished)
    results.done()

    shutdown = root.table("shutdown")
    grace_s = shutdown.number("grace_s", 300.0, 0.0, bounds.max_grace_s)
    shutdown.done()
    on_demand = _on_demand(root.table("on_demand")) if root.has("on_demand") else None
    root.done()

    return NodeConfig(
        data_dir=data_dir,
        key_file=key_file,
        trust_list=trust_list,
        work_dir=work_dir,
        operator=operator,
        pools=pools,
        dht=DhtSettings(dht_bind, tuple(bootstrap)),
        api=api,
        pull=pull,
        limits=limits,
        capability=overrides,
        status_interval_s=status_interval,
        status_lifetime_s=status_lifetime,
        capability_lifetime_s=capability_lifetime,
        keep_s=keep_s,
        max_finished=max_finished,
        grace_s=grace_s,
        on_demand=on_demand,
        source=source,
    )


def _on_demand(table: _Reader) -> OnDemandConfig:
    """``[on_demand] idle_s, wake_s, wake_url, hook`` (``docs/node-operations.md``)."""
    idle_s = table.number("idle_s", 600.0, 1.0, 7 * 24 * 3600.0)
    wake_s = table.integer("wake_s", 120, 1, 3600)
    wake_url = table.text("wake_url", "")
    if wake_url and (not wake_url.startswith("https://") or len(wake_url) > 200):
        raise table.fail("wake_url", "must be an https:// URL of at most 200 characters")
    hook_text = table.text("hook", "")
    try:
        hook = tuple(shlex.split(hook_text))
    except ValueError as exc:
        raise table.fail("hook", f"cannot be split into words: {exc}") from None
    if hook and not Path(hook[0]).is_absolute():
        raise table.fail("hook", "must start with an absolute path")
    table.done()
    return OnDemandConfig(idle_s=idle_s, wake_s=wake_s, wake_url=wake_url, hook=hook)


def load_config(
    path: Path,
    *,
    bounds: ConfigBounds = ConfigBounds(),
) -> NodeConfig:
    """Read and check the TOML file ``path``.

    Raises :class:`ConfigError` with one line naming the file and the key (or the TOML
    syntax error's line) for any problem, including a missing or unreadable file.
    """
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(
        document, base_dir=path.resolve().parent, bounds=bounds, source=path
    )


# -- writing ----------------------------------------------------------------------------------


def _toml_value(value: str | bool | list[str] | tuple[str, ...]) -> str:
    """``value`` as TOML (tomli_w escapes it), for the template's ``key = value`` lines."""
    line = tomli_w.dumps({"v": list(value) if isinstance(value, tuple) else value})
    return line.removeprefix("v = ").strip()


def render_config(
    *,
    data_dir: Path,
    operator: str = "",
    pools: tuple[str, ...] = (),
    trust_list: str = "trust-list.bin",
    dht_bind: str = "0.0.0.0:7420",
    bootstrap: tuple[str, ...] = (),
    api_bind: str = "0.0.0.0:8443",
    endpoint: str = "",
    api_enabled: bool = True,
) -> str:
    """The commented TOML that ``p2pbuild node init`` writes. The result parses with
    :func:`parse_config` (the tests check it)."""
    return f"""\
# p2pbuild volunteer node configuration.
# Every key is optional unless marked; values shown are the defaults or what
# 'p2pbuild node init' chose. Relative paths are relative to node.data_dir.
# Check the file with: p2pbuild node run --config THIS_FILE --check

[node]
# Where the node keeps its key, TLS certificate, state database and build directories.
data_dir = {_toml_value(str(data_dir))}
# The node's private ed25519 key (mode 0600). Its public half (node.key.pub) is what
# you send to the farm's maintainers so they add it to the trust list.
key_file = "node.key"
# The signed trust list of the farm (from the farm's keys/ folder). Required to run.
trust_list = {_toml_value(trust_list)}
# Your operator name as the maintainers know you (informational here; the trust list
# is authoritative).
operator = {_toml_value(operator)}
# Pools this node serves (dedicated to a team), e.g. ["team-a"]. Empty: general pool.
pools = {_toml_value(pools)}
# Build work directories; free disk here is what the node advertises.
work_dir = "work"

[dht]
# UDP address of the node's DHT node.
bind = {_toml_value(dht_bind)}
# DHT nodes to join through, e.g. ["seed1.example.org:7420"].
bootstrap = {_toml_value(bootstrap)}

[api]
# Push mode: dispatchers connect to this HTTPS endpoint. Set enabled = false on a node
# behind NAT and use [pull] instead.
enabled = {_toml_value(api_enabled)}
bind = {_toml_value(api_bind)}
# The URL dispatchers use, as advertised in the capability record. Empty: derived from
# bind when it names one address; required when bind is 0.0.0.0 or ::.
endpoint = {_toml_value(endpoint)}
# Connection bounds: idle keep-alive connections close after keep_alive_timeout_s; at
# most max_connections are open, max_connections_per_address from one client address.
# keep_alive_timeout_s = 5
# max_connections = 1000
# max_connections_per_address = 64

[pull]
# Pull mode: long-poll these dispatchers for jobs (works behind NAT, no open port).
# dispatchers = [
#   {{ url = "https://dispatch.example.org:9443", key = "ed25519:...", tls_sha256 = "" }},
# ]
dispatchers = []
poll_timeout_s = 30
# While building a pulled job, renew its lease this often (or as often as the dispatcher
# asks, if more often); a dispatcher that hears nothing for its lease period gives the job
# to another node.
heartbeat_s = 15

[limits]
# Builds at once.
slots = 1
# Longest build in seconds; a job may ask for less, never more.
time_limit_s = 3600
# Build log cap, scratch disk cap and largest source, in MiB.
max_output_mb = 16
max_disk_mb = 8192
max_source_mb = 2048
# Clean buildroots kept between builds (rpm.dnf), in MiB; least recently used go first.
buildroot_cache_mb = 8192

[capability]
# Detected automatically; uncomment to override what the capability record says.
# arch = "{DEFAULT_ARCH}"
# os = "{DEFAULT_OS}"
# cpus = 4
# cpu_model = "..."
# memory_mb = 8192
# disk_mb = 100000
# machine = "vm"            # or "metal"
# build_types = ["make", "rpm"]

[records]
# The status record (load, free slots) is republished this often, and lives this long.
status_interval_s = 60
status_lifetime_s = 300
# The capability record's lifetime; it is republished at half of it.
capability_lifetime_s = 86400

[results]
# Finished results and artifacts are kept this long (or until collected), also across
# restarts, and at most this many.
keep_s = 604800
max_finished = 256

[shutdown]
# On SIGTERM the node publishes that it is draining, lets running builds finish for up
# to this long, then hands the rest back to their dispatchers.
grace_s = 300
"""
