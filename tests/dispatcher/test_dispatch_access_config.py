"""The dispatcher's configuration for API access and bounds: roles, connection and upload
bounds, the source host allow-list; one-line errors naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from p2pbuild.dispatcher import load_config
from p2pbuild.dispatcher._errors import ConfigError

MINIMAL = '[dispatcher]\nkey = "k"\ntrust_list = "t"\n'
CLIENT = '[[clients]]\nuser = "u"\ntoken_sha256 = "' + "0" * 64 + '"\n'


def test_defaults(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text(MINIMAL + CLIENT)
    config = load_config(path)
    assert config.clients[0].admin is False
    assert (config.keep_alive_timeout_s, config.max_connections,
            config.max_connections_per_address) == (5.0, 1000, 64)
    assert config.max_uploads_in_flight_bytes == 4 * 1024**3
    assert config.source_allow_hosts == ()


def test_roles_bounds_and_allowed_hosts_are_read(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text(
        MINIMAL + 'source_allow_hosts = ["Mirror.Internal", "[fd00::1]"]\n'
        + "[api]\nkeep_alive_timeout_s = 2\nmax_connections = 10\n"
        + "max_connections_per_address = 3\nmax_uploads_in_flight_bytes = 1000\n"
        + CLIENT + 'role = "admin"\n'
    )
    config = load_config(path)
    assert config.clients[0].admin is True
    assert (config.keep_alive_timeout_s, config.max_connections,
            config.max_connections_per_address, config.max_uploads_in_flight_bytes) == (
        2.0, 10, 3, 1000)
    assert config.source_allow_hosts == ("mirror.internal", "fd00::1")


@pytest.mark.parametrize(("toml", "fragment"), [
    (CLIENT + 'role = "root"\n', "role must be user or admin"),
    ("[api]\nmax_connections = 0\n", "max_connections must be positive"),
    ("[api]\nmax_uploads_in_flight_bytes = -1\n", "max_uploads_in_flight_bytes must be positive"),
    ('[api]\nkeep_alive_timeout_s = "5"\n', "keep_alive_timeout_s must be a number"),
])
def test_bad_values_are_one_line_errors(tmp_path: Path, toml: str, fragment: str) -> None:
    path = tmp_path / "d.toml"
    path.write_text(MINIMAL + toml)
    with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_source_allow_hosts_must_be_names(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text('[dispatcher]\nkey = "k"\ntrust_list = "t"\nsource_allow_hosts = [1]\n')
    with pytest.raises(ConfigError, match="source_allow_hosts must be a list of host names"):
        load_config(path)
