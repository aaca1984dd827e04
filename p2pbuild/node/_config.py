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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from .._errors import LocalError, MalformedError
from .._hostport import parse_host_port
from .._identity import PublicKey
from .._jobs import DEFAULT_ARCH, DEFAULT_OS
from .._records import _TOKEN, MAX_CPU_MODEL, MAX_CPUS, MAX_MB, MachineType
from .._tables import Fail, shown, table_value
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


def _capped_by(bound: str) -> dict[str, str]:
    """A ``[limits]`` field's metadata: the :class:`ConfigBounds` field that caps it in a
    configuration file (the least is 1)."""
    return {"bound": bound}


@attrs.frozen
class NodeLimits:
    """Concurrency and per-build bounds, each with its default and its bound."""

    slots: int = attrs.field(default=1, metadata=_capped_by("max_slots"))
    time_limit_s: int = attrs.field(default=3600, metadata=_capped_by("max_time_limit_s"))
    max_output_mb: int = attrs.field(default=16, metadata=_capped_by("max_output_mb"))
    max_disk_mb: int = attrs.field(default=8192, metadata=_capped_by("max_disk_mb"))
    max_source_mb: int = attrs.field(default=2048, metadata=_capped_by("max_source_mb"))
    #: Buildroots kept between builds (``<data_dir>/buildroots``), least recently used
    #: evicted past this.
    buildroot_cache_mb: int = attrs.field(default=8192, metadata=_capped_by("max_disk_mb"))


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
#
# Every value is taken by the shared reader (``p2pbuild._tables``), as in the dispatcher's
# file; ``where`` is the file and the table's dotted name (``node.toml: limits.``), so an
# error reads ``node.toml: limits.slots: must be an integer in [1, 256], got 0``.


def _fail(where: str) -> Fail:
    return lambda key, problem: ConfigError(f"{where}{key}: {problem}")


def _get(table: Mapping[str, Any], key: str, kind: type, where: str, default: Any,
         words: str = "") -> Any:
    return table_value(table, key, kind, _fail(where), default, words=words)


def _refuse_unknown(table: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """Refuse keys nobody reads: a misspelt key must not be silently ignored."""
    unknown = set(table) - set(known)
    for key in table:
        if key in unknown:
            raise _fail(where)(key, "unknown key")


def _section(table: Mapping[str, Any], key: str, where: str) -> tuple[dict[str, Any], str]:
    """The table ``key`` ({} when absent) and how errors name its keys."""
    return _get(table, key, dict, where, {}, "a table"), f"{where}{key}."


def _integer(table: Mapping[str, Any], key: str, where: str, default: int | None,
             low: int, high: int) -> Any:
    """An integer in ``[low, high]``; None, unchecked, when absent with no default."""
    value = _get(table, key, int, where, default, f"an integer in [{low}, {high}]")
    if value is not None and not low <= value <= high:
        raise _fail(where)(key, f"must be an integer in [{low}, {high}], got {value}")
    return value


def _number(table: Mapping[str, Any], key: str, where: str, default: float, low: float,
            high: float) -> float:
    value: float = _get(table, key, float, where, default, f"a number in [{low:g}, {high:g}]")
    if not low <= value <= high:
        raise _fail(where)(
            key, f"must be a number in [{low:g}, {high:g}], got {table.get(key, value)}"
        )
    return value


def _numbers(table: Mapping[str, Any], where: str, cls: type,
             ranges: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """The keys of ``ranges``, each read as ``cls``'s field of that name (an int or a
    float, its default when absent) and checked to lie in its range."""
    fields = attrs.fields_dict(cls)
    values: dict[str, Any] = {}
    for key, (low, high) in ranges.items():
        default: Any = fields[key].default
        if fields[key].type in (int, "int"):
            values[key] = _integer(table, key, where, default, int(low), int(high))
        else:
            values[key] = _number(table, key, where, default, low, high)
    return values


def _text(table: Mapping[str, Any], key: str, where: str, default: Any = "") -> Any:
    value = _get(table, key, str, where, default)
    if value is not None and not value.isprintable():
        raise _fail(where)(key, "must be printable text")
    return value


_TOKEN_RULE = "must match [a-z0-9][a-z0-9._+-]{0,63}"


def _token(table: Mapping[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    if key in table and (not isinstance(value, str) or not _TOKEN.fullmatch(value)):
        raise _fail(where)(key, f"{shown(value)} {_TOKEN_RULE}")
    return value


def _tokens(table: Mapping[str, Any], key: str, where: str,
            default: tuple[str, ...] | None, limit: int = 16) -> Any:
    value = _get(table, key, list, where, default, "a list of strings")
    if value is default:
        return default
    if len(value) > limit:
        raise _fail(where)(key, f"must have at most {limit} entries")
    for item in value:
        if not isinstance(item, str) or not _TOKEN.fullmatch(item):
            raise _fail(where)(key, f"{shown(item)} {_TOKEN_RULE}")
    return tuple(sorted(set(value)))


def _path(table: Mapping[str, Any], key: str, where: str, default: str,
          base: Path | None) -> Path:
    text = _text(table, key, where, default)
    if not text:
        raise _fail(where)(key, "must not be empty")
    path = Path(text).expanduser()
    if not path.is_absolute():
        if base is None:
            raise _fail(where)(key, "must be an absolute path")
        path = base / path
    return path


def _address(text: object, key: str, where: str, *, allow_zero: bool,
             words: str = "a string") -> tuple[str, int]:
    if not isinstance(text, str):
        raise _fail(where)(key, f"{shown(text)} is not {words}")
    try:
        return parse_host_port(text, allow_zero=allow_zero)
    except ValueError as exc:
        raise _fail(where)(key, str(exc)) from None


def _bind(table: Mapping[str, Any], where: str, cls: type) -> Any:
    """``bind = "HOST:PORT"`` (port 0: any free port), ``cls``'s default when absent."""
    if "bind" not in table:
        default: Any = attrs.fields_dict(cls)["bind"].default
        return tuple(default)
    return _address(_text(table, "bind", where), "bind", where, allow_zero=True)


def _https_url(table: Mapping[str, Any], key: str, where: str, *, required: bool) -> str:
    url: str = _text(table, key, where)
    if not url:
        if required:
            raise _fail(where)(key, "is required")
        return ""
    if not url.startswith("https://") or " " in url or len(url) > 200:
        raise _fail(where)(
            key, f"must be an https:// URL of at most 200 characters: {url!r:.60}"
        )
    return url.rstrip("/")


def _sha256_hex(table: Mapping[str, Any], key: str, where: str) -> bytes | None:
    text = _text(table, key, where)
    if not text:
        return None
    cleaned = text.replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", cleaned):
        raise _fail(where)(key, "must be a SHA-256 in 64 hex digits")
    return bytes.fromhex(cleaned)


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(attrs.fields_dict(cls))


_SECTIONS = ("node", "dht", "api", "pull", "limits", "capability", "records", "results",
             "shutdown", "on_demand")


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

    node = _node(*_section(document, "node", where), base_dir)

    dht, w = _section(document, "dht", where)
    dht_bind = _bind(dht, w, DhtSettings)
    bootstrap_texts = _get(dht, "bootstrap", list, w, [], "a list of HOST:PORT strings")
    if len(bootstrap_texts) > bounds.max_bootstrap:
        raise _fail(w)("bootstrap", f"must have at most {bounds.max_bootstrap} entries")
    bootstrap = tuple(
        _address(item, "bootstrap", w, allow_zero=False, words="a HOST:PORT string")
        for item in bootstrap_texts
    )
    _refuse_unknown(dht, _fields(DhtSettings), w)

    api_table, wa = _section(document, "api", where)
    api = ApiConfig(
        enabled=_get(api_table, "enabled", bool, wa, True),
        bind=_bind(api_table, wa, ApiConfig),
        endpoint=_https_url(api_table, "endpoint", wa, required=False),
        **_numbers(api_table, wa, ApiConfig, {
            "keep_alive_timeout_s": (0.1, 600.0),
            "max_connections": (1, 1_000_000),
            "max_connections_per_address": (1, 1_000_000),
        }),
    )
    _refuse_unknown(api_table, _fields(ApiConfig), wa)

    pull_table, w = _section(document, "pull", where)
    entries = _get(pull_table, "dispatchers", list, w, [], "an array of tables")
    if len(entries) > bounds.max_dispatchers:
        raise _fail(w)("dispatchers", f"must have at most {bounds.max_dispatchers}")
    pull = PullSettings(
        tuple(_pull_dispatcher(entry, f"{w}dispatchers[{i}]") for i, entry in
              enumerate(entries)),
        **_numbers(pull_table, w, PullSettings, {
            "poll_timeout_s": (1.0, bounds.max_poll_timeout_s),
            "heartbeat_s": (1.0, bounds.max_heartbeat_s),
        }),
    )
    _refuse_unknown(pull_table, _fields(PullSettings), w)
    if not api.enabled and not pull.dispatchers:
        raise _fail(wa)(
            "enabled", "is false and [pull] names no dispatchers: the node could take no job"
        )

    limits_table, w = _section(document, "limits", where)
    limits = NodeLimits(**_numbers(limits_table, w, NodeLimits, {
        f.name: (1, getattr(bounds, f.metadata["bound"])) for f in attrs.fields(NodeLimits)
    }))
    _refuse_unknown(limits_table, _fields(NodeLimits), w)

    records, w = _section(document, "records", where)
    numbers = _numbers(records, w, NodeConfig, {
        "status_interval_s": (bounds.min_status_interval_s, bounds.max_status_interval_s),
        "status_lifetime_s": (2, bounds.max_status_lifetime_s),
        "capability_lifetime_s": (60, bounds.max_capability_lifetime_s),
    })
    if numbers["status_lifetime_s"] <= numbers["status_interval_s"]:
        raise _fail(w)(
            "status_lifetime_s",
            f"must be longer than status_interval_s ({numbers['status_interval_s']:g}), or "
            "the status expires between republications",
        )
    _refuse_unknown(records, numbers, w)

    results, w = _section(document, "results", where)
    kept = _numbers(results, w, NodeConfig, {"keep_s": (1, bounds.max_keep_s),
                                             "max_finished": (1, bounds.max_finished)})
    _refuse_unknown(results, kept, w)
    numbers.update(kept)

    shutdown, w = _section(document, "shutdown", where)
    grace = _numbers(shutdown, w, NodeConfig, {"grace_s": (0.0, bounds.max_grace_s)})
    _refuse_unknown(shutdown, grace, w)
    numbers.update(grace)

    _refuse_unknown(document, _SECTIONS, where)

    return NodeConfig(
        **node,
        dht=DhtSettings(dht_bind, bootstrap),
        api=api,
        pull=pull,
        limits=limits,
        capability=_capability(*_section(document, "capability", where)),
        on_demand=_on_demand(*_section(document, "on_demand", where))
        if "on_demand" in document else None,
        source=source,
        **numbers,
    )


def _node(table: Mapping[str, Any], w: str, base_dir: Path | None) -> dict[str, Any]:
    """``[node]``: the node's paths (relative ones in ``data_dir``, which defaults to
    ``base_dir``), its operator's name and its pools."""
    data_dir = _path(table, "data_dir", w, str(base_dir) if base_dir else "", None)
    values: dict[str, Any] = {"data_dir": data_dir}
    for key, default in (("key_file", "node.key"), ("trust_list", "trust-list.bin"),
                         ("work_dir", "work")):
        values[key] = _path(table, key, w, default, data_dir)
    operator = _text(table, "operator", w)
    if operator and not _OPERATOR.fullmatch(operator):
        raise _fail(w)("operator", "must match [A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
    values.update(operator=operator, pools=_tokens(table, "pools", w, ()))
    _refuse_unknown(table, values, w)
    return values


def _pull_dispatcher(entry: object, name: str) -> PullDispatcher:
    """One ``[[pull.dispatchers]]`` entry, named ``pull.dispatchers[i]`` in errors."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{name}: must be a table")
    w = f"{name}."
    url = _https_url(entry, "url", w, required=True)
    try:
        key = PublicKey.from_text(_text(entry, "key", w))
    except MalformedError as exc:
        raise _fail(w)("key", f"must be an ed25519:... public key ({exc})") from None
    dispatcher = PullDispatcher(url, key, _sha256_hex(entry, "tls_sha256", w))
    _refuse_unknown(entry, _fields(PullDispatcher), w)
    return dispatcher


def _capability(table: Mapping[str, Any], w: str) -> CapabilityOverrides:
    """``[capability]``: overrides of detected values, None for each key not given."""
    machine_text = _text(table, "machine", w)
    if machine_text and machine_text not in {m.value for m in MachineType}:
        raise _fail(w)("machine", f"must be 'vm' or 'metal', got {machine_text!r:.40}")
    cpu_model = _text(table, "cpu_model", w, None)
    if cpu_model is not None and len(cpu_model) > MAX_CPU_MODEL:
        raise _fail(w)("cpu_model", f"must be at most {MAX_CPU_MODEL} characters")
    build_types = _tokens(table, "build_types", w, None)
    if build_types is not None and not set(build_types) <= {"make", "rpm", "rpm.dnf"}:
        raise _fail(w)("build_types", "may name only 'rpm', 'rpm.dnf' and 'make'")
    overrides = CapabilityOverrides(
        arch=_token(table, "arch", w),
        os=_token(table, "os", w),
        cpus=_integer(table, "cpus", w, None, 1, MAX_CPUS - 1),
        cpu_model=cpu_model,
        memory_mb=_integer(table, "memory_mb", w, None, 0, MAX_MB - 1),
        disk_mb=_integer(table, "disk_mb", w, None, 0, MAX_MB - 1),
        machine=MachineType(machine_text) if machine_text else None,
        build_types=build_types,
    )
    _refuse_unknown(table, _fields(CapabilityOverrides), w)
    return overrides


def _on_demand(table: Mapping[str, Any], w: str) -> OnDemandConfig:
    """``[on_demand] idle_s, wake_s, wake_url, hook`` (``docs/node-operations.md``)."""
    numbers = _numbers(table, w, OnDemandConfig, {"idle_s": (1.0, 7 * 24 * 3600.0),
                                                  "wake_s": (1, 3600)})
    wake_url = _text(table, "wake_url", w)
    if wake_url and (not wake_url.startswith("https://") or len(wake_url) > 200):
        raise _fail(w)("wake_url", "must be an https:// URL of at most 200 characters")
    try:
        hook = tuple(shlex.split(_text(table, "hook", w)))
    except ValueError as exc:
        raise _fail(w)("hook", f"cannot be split into words: {exc}") from None
    if hook and not Path(hook[0]).is_absolute():
        raise _fail(w)("hook", "must start with an absolute path")
    _refuse_unknown(table, ("idle_s", "wake_s", "wake_url", "hook"), w)
    return OnDemandConfig(wake_url=wake_url, hook=hook, **numbers)


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
