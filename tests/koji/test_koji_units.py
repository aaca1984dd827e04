"""The [koji] configuration section and the CG metadata mapping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import tomli_w

from p2pbuild._wiring import load_service_config
from p2pbuild.dispatcher import ConfigError
from p2pbuild.koji import CG_VERSION, NodeProof, OutputFile, build_metadata, host_os

EXAMPLE = Path(__file__).resolve().parents[3] / "shared" / "koji" / "cg-metadata-example.json"


def write(tmp: Path, koji: dict[str, object]) -> Path:
    path = tmp / "dispatcher.toml"
    path.write_text(tomli_w.dumps({"dispatcher": {"key": "k", "trust_list": "t"},
                                   "koji": koji}))
    return path


def test_koji_section(tmp_path: Path) -> None:
    base = {"server": "https://hub/kojihub/", "topurl": "https://hub/kojifiles",
            "host": "gw", "password_file": "pw", "poll_interval_s": 2}
    config = load_service_config(write(tmp_path, base)).koji
    assert config is not None
    assert config.server == "https://hub/kojihub"
    assert config.password_file == tmp_path / "pw"
    assert config.poll_interval_s == 2.0 and config.channel == "p2p"
    assert load_service_config(write(tmp_path, {})).koji is None
    for bad, message in [
        ({"authtype": "kerberos"}, "authtype must be password or ssl"),
        ({"nope": 1}, "unknown key nope"),
        ({"password_file": None}, "authtype password needs password_file"),
        ({"authtype": "ssl"}, "authtype ssl needs cert"),
        ({"server": "hub"}, "server must be an http"),
    ]:
        koji = {k: v for k, v in {**base, **bad}.items() if v is not None}
        with pytest.raises(ConfigError, match=message):
            load_service_config(write(tmp_path, koji))


def node(name: str, operator: str) -> NodeProof:
    return NodeProof(
        node=f"ed25519:{name}", fingerprint="aaaa:bbbb:cccc:dddd", operator=operator,
        job_id="00" * 16, job_sha256="11" * 32, result_sha256="22" * 32,
        environment={"arch": "x86_64", "os": "fedora-41", "rpm": "4.20"},
        started_ms=1, ended_ms=2, artifacts={"x.rpm": "33" * 32},
        files=(OutputFile("build.log", 3, "44" * 32, "log", "noarch", f"{name}dir"),),
    )


def example_metadata() -> dict[str, Any]:
    return build_metadata(
        name="hello", version="1.0", release="1", epoch=None, source="cli-build/x.src.rpm",
        start_time=1, end_time=2, content_generator="p2p-build",
        packages=[OutputFile("hello-1.0-1.src.rpm", 5, "55" * 32, "rpm", "src"),
                  OutputFile("hello-1.0-1.x86_64.rpm", 6, "66" * 32, "rpm", "x86_64")],
        nodes=[node("a", "alice"), node("b", "bob")], extra={"p2pbuild": {"n": 2}},
    )


def test_metadata_has_the_keys_of_the_verified_example() -> None:
    # The example is the metadata a real hub accepted, kept next to this repository.
    if not EXAMPLE.exists():
        pytest.skip(f"{EXAMPLE} is absent: the metadata keys are not compared with it")
    metadata = example_metadata()
    example = json.loads(EXAMPLE.read_text())
    assert set(metadata) == set(example)
    assert set(metadata["build"]) == set(example["build"])
    assert set(metadata["buildroots"][0]) == set(example["buildroots"][0])
    for out in metadata["output"]:
        assert set(example["output"][0]) <= set(out)


def test_metadata_has_the_shape_the_hub_accepted() -> None:
    metadata = example_metadata()
    assert [b["id"] for b in metadata["buildroots"]] == [1, 2]
    assert {o["buildroot_id"] for o in metadata["output"]} == {1, 2}
    assert metadata["buildroots"][1]["extra"]["p2pbuild"]["operator"] == "bob"
    assert metadata["buildroots"][0]["content_generator"] == {"name": "p2p-build",
                                                              "version": CG_VERSION}
    logs = [o for o in metadata["output"] if o["type"] == "log"]
    assert [o["subdir"] for o in logs] == ["adir", "bdir"]
    assert metadata["build"]["extra"]["typeinfo"] == {"rpm": None}
    with pytest.raises(ValueError, match="at least one"):
        build_metadata(name="h", version="1", release="1", epoch=None, source="s",
                       start_time=0, end_time=0, content_generator="c", packages=[],
                       nodes=[], extra={})


def test_buildroot_host_os_comes_from_the_nodes_os_release() -> None:
    # The nodes sign os_id / os_version_id (/etc/os-release); Koji shows e.g. "Fedora-40".
    assert host_os({"os_id": "debian", "os_version_id": "12", "arch": "x86_64"}) == "debian-12"
    assert host_os({"os_id": "arch"}) == "arch"
    assert host_os({"os": "fedora-41"}) == "fedora-41"
    assert host_os({}) == "unknown"
    proof = attrs.evolve(node("a", "alice"), environment={"os_id": "fedora",
                                                          "os_version_id": "41"})
    metadata = build_metadata(
        name="h", version="1", release="1", epoch=None, source="s", start_time=0,
        end_time=0, content_generator="c", packages=[], nodes=[proof], extra={})
    assert metadata["buildroots"][0]["host"] == {"os": "fedora-41", "arch": "noarch"}
