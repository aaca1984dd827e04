"""The node's TOML configuration: defaults, validation with one-line errors naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from p2pbuild import MachineType
from p2pbuild.node import ConfigBounds, ConfigError, load_config, parse_config, render_config


def test_rendered_config_loads_with_sensible_defaults(tmp_path: Path) -> None:
    text = render_config(data_dir=tmp_path, operator="alice", pools=("team-a",),
                         bootstrap=("seed.example:7420",), endpoint="https://n.example:8443")
    path = tmp_path / "node.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.data_dir == tmp_path
    assert config.key_file == tmp_path / "node.key"
    assert config.trust_list == tmp_path / "trust-list.bin"
    assert config.work_dir == tmp_path / "work"
    assert config.operator == "alice" and config.pools == ("team-a",)
    assert config.dht.bootstrap == (("seed.example", 7420),)
    assert config.api.enabled and config.api.endpoint == "https://n.example:8443"
    assert (config.api.keep_alive_timeout_s, config.api.max_connections,
            config.api.max_connections_per_address) == (5.0, 1000, 64)
    assert config.limits.slots == 1 and config.limits.time_limit_s == 3600
    assert config.status_interval_s == 60 and config.status_lifetime_s == 300
    assert config.capability.arch is None  # detect unless overridden


def test_rendered_config_keeps_quotes_and_backslashes(tmp_path: Path) -> None:
    odd = tmp_path / 'a "quoted" \\ dir, déjà'
    path = tmp_path / "node.toml"
    path.write_text(render_config(data_dir=odd, operator="o.brien", pools=("a", "b")))
    config = load_config(path)
    assert config.data_dir == odd
    assert config.operator == "o.brien" and config.pools == ("a", "b")


def test_overrides_and_relative_paths(tmp_path: Path) -> None:
    config = parse_config(
        {
            "node": {"data_dir": str(tmp_path), "work_dir": "/srv/builds"},
            "capability": {"arch": "s390x", "machine": "metal", "cpus": 64,
                           "build_types": ["rpm"]},
            "limits": {"slots": 4},
        }
    )
    assert config.work_dir == Path("/srv/builds")
    assert config.capability.arch == "s390x"
    assert config.capability.machine is MachineType.METAL
    assert config.capability.cpus == 64 and config.capability.build_types == ("rpm",)
    assert config.limits.slots == 4


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[limits]\nslots = 0", "limits.slots: must be an integer in [1, 256], got 0"),
        ("[limits]\nslots = true", "limits.slots: must be an integer"),
        ('[limits]\nslots = "2"', "limits.slots: must be an integer"),
        ("[limits]\nslotz = 2", "limits.slotz: unknown key"),
        ('[dht]\nbind = "nowhere"', "dht.bind: expected HOST:PORT"),
        ('[dht]\nbootstrap = ["a:99999"]', "dht.bootstrap: port 99999"),
        ('[api]\nendpoint = "http://x"', "api.endpoint: must be an https:// URL"),
        ("[api]\nmax_connections = 0", "api.max_connections: must be an integer in [1,"),
        ("[api]\nmax_connections_per_address = -1", "api.max_connections_per_address: must be"),
        ("[api]\nkeep_alive_timeout_s = 0", "api.keep_alive_timeout_s: must be"),
        ('[node]\npools = ["Team A"]', "node.pools: 'Team A' must match"),
        ('[capability]\nmachine = "cloud"', "capability.machine: must be 'vm' or 'metal'"),
        ('[capability]\nbuild_types = ["cmake"]', "capability.build_types: may name only"),
        ("[records]\nstatus_interval_s = 600\nstatus_lifetime_s = 300",
         "records.status_lifetime_s: must be longer than status_interval_s"),
        ('[[pull.dispatchers]]\nurl = "https://d.example"\nkey = "nope"',
         "pull.dispatchers[0].key: must be an ed25519:... public key"),
        ("[api]\nenabled = false", "api.enabled: is false and [pull] names no dispatchers"),
        ("limits = 3", "limits: must be a table"),
        ("[limits\n", "not valid TOML"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(tmp_path: Path, toml: str, needle: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert needle in message
    assert str(path) in message
    assert "\n" not in message


def test_bounds_are_parameters(tmp_path: Path) -> None:
    document = tomllib.loads("[limits]\nslots = 300")
    with pytest.raises(ConfigError):
        parse_config(document, base_dir=tmp_path)
    config = parse_config(document, base_dir=tmp_path, bounds=ConfigBounds(max_slots=512))
    assert config.limits.slots == 300


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")



def test_the_buildroot_cache_bound_is_configurable(tmp_path: Path) -> None:
    rendered = tomllib.loads(render_config(data_dir=tmp_path, operator="alice"))
    assert rendered["limits"]["buildroot_cache_mb"] == 8192
    config = parse_config({"node": {"data_dir": str(tmp_path)},
                           "limits": {"buildroot_cache_mb": 512}})
    assert config.limits.buildroot_cache_mb == 512
    with pytest.raises(ConfigError, match=r"limits\.buildroot_cache_mb"):
        parse_config({"node": {"data_dir": str(tmp_path)}, "limits": {"buildroot_cache_mb": 0}})


def test_absent_keys_take_the_documented_defaults(tmp_path: Path) -> None:
    config = parse_config({"node": {"data_dir": str(tmp_path)}})
    assert config.dht.bind == ("0.0.0.0", 7420)
    assert config.api.bind == ("0.0.0.0", 8443)
    assert (config.pull.poll_timeout_s, config.pull.heartbeat_s) == (30.0, 15.0)
    assert (config.keep_s, config.max_finished, config.grace_s) == (7 * 24 * 3600, 256, 300.0)
    assert config.capability_lifetime_s == 24 * 3600
    on_demand = parse_config({"node": {"data_dir": str(tmp_path)}, "on_demand": {}}).on_demand
    assert on_demand is not None and (on_demand.idle_s, on_demand.wake_s) == (600.0, 120)
