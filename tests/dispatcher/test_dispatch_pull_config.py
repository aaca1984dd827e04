"""The ``[pull]`` lease settings of the dispatcher's and the node's configuration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from p2pbuild._wiring import load_service_config
from p2pbuild.dispatcher import load_config
from p2pbuild.dispatcher._errors import ConfigError
from p2pbuild.node import ConfigError as NodeConfigError
from p2pbuild.node import parse_config

ROOT = Path(__file__).parents[2]
MINIMAL = '[dispatcher]\nkey = "k"\ntrust_list = "t"\n'


def test_defaults_and_the_example_files() -> None:
    # The example has a [koji] section: the wiring reads the whole file.
    example = load_service_config(ROOT / "dispatcher" / "dispatcher.example.toml").dispatcher
    assert (example.pull_lease_s, example.pull_heartbeat_s) == (60.0, 15.0)
    node = parse_config({"node": {"data_dir": "/srv/node"}})
    assert node.pull.heartbeat_s == 15.0


def test_dispatcher_lease_settings_are_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text(MINIMAL + "[pull]\nlease_s = 3\nheartbeat_s = 1.5\n")
    config = load_config(path)
    assert (config.pull_lease_s, config.pull_heartbeat_s) == (3.0, 1.5)
    path.write_text(MINIMAL)
    assert load_config(path).pull_lease_s == 60.0
    for section, fragment in [
        ("lease_s = 20\nheartbeat_s = 15", "lease_s must be at least twice heartbeat_s (30)"),
        ("lease_s = 7200", "lease_s must be at least twice heartbeat_s (30) and at most 3600"),
        ("heartbeat_s = 0.5", "heartbeat_s must be 1 to 600 seconds"),
        ("heartbeat_s = true", "heartbeat_s must be a number"),
        ('lease_s = "60"', "lease_s must be a number"),
        ("lease = 60", "[pull]: unknown key lease"),
    ]:
        path.write_text(MINIMAL + "[pull]\n" + section + "\n")
        with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
            load_config(path)
        assert "\n" not in str(info.value)


def test_node_heartbeat_is_read_and_checked() -> None:
    config = parse_config({"node": {"data_dir": "/srv/node"}, "pull": {"heartbeat_s": 5}})
    assert config.pull.heartbeat_s == 5.0
    for value, fragment in [
        (0.5, "pull.heartbeat_s: must be a number in [1, 600], got 0.5"),
        (True, "pull.heartbeat_s: must be a number"),
    ]:
        with pytest.raises(NodeConfigError, match=re.escape(fragment)):
            parse_config({"node": {"data_dir": "/srv/node"}, "pull": {"heartbeat_s": value}})
