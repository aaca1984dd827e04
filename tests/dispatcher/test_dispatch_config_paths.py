"""Files named in the dispatcher's configuration, when the file itself is given by a
relative path (``p2pbuild dispatcher run --config disp/dispatcher.toml``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pbuild.dispatcher import load_config

MINIMAL = '[dispatcher]\nkey = "dispatcher.key"\ntrust_list = "trust-list.bin"\n'


def test_a_relative_config_path_gives_absolute_file_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stored builds' directories are kept in the database: relative to the directory
    # the dispatcher happened to start in, they would be lost to a restart from another.
    (tmp_path / "disp").mkdir()
    (tmp_path / "disp" / "dispatcher.toml").write_text(MINIMAL)
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("disp/dispatcher.toml"))
    here = tmp_path / "disp"
    assert config.repository == here / "repo"
    assert config.state_dir == here / "state"
    assert config.key_file == here / "dispatcher.key"
    assert config.trust_list_file == here / "trust-list.bin"
    assert config.tls_dir == here / "tls"
