"""A stored build as a typed value: what the sink writes is what every reader reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pbuild.dispatcher import SinkError, StoredBuild, StoredFile, StoredProof

HEX = "ab" * 32


def stored(path: Path = Path()) -> StoredBuild:
    proof = StoredProof(
        node="ed25519:x", fingerprint="aaaa:bbbb", operator="alice", job="proof/1-aaaabbbb.job",
        result="proof/1-aaaabbbb.result", job_id="00" * 16, environment={"os_id": "debian"},
        duration_ms=12, logs=(StoredFile("build.log", 3, HEX),),
    )
    return StoredBuild(
        build_id="b" * 32, nvr="hello-1-1", source_name="hello-1-1.src.rpm",
        source_sha256=HEX, stored_at=1.5, trust_list_version=3,
        artifacts=(StoredFile("RPMS/h.rpm", 5, HEX),), verified_by=(proof,), user="u",
        arch="x86_64", os="fedora-41", build_type="rpm", path=path,
    )


def test_round_trip_through_the_manifest_file(tmp_path: Path) -> None:
    value = stored(tmp_path)
    (tmp_path / "manifest.json").write_bytes(value.to_bytes())
    read = StoredBuild.read(tmp_path)
    assert read == value and read.path == tmp_path
    proof = read.verified_by[0]
    assert proof.stem == "1-aaaabbbb" and proof.log_dir == "logs/1-aaaabbbb"
    assert read.log_path(proof, proof.logs[0]) == tmp_path / "logs/1-aaaabbbb/build.log"
    assert read.artifact_path("RPMS/h.rpm") == tmp_path / "artifacts/RPMS/h.rpm"
    # The file is the format-1 manifest every earlier reader knew.
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format"] == 1 and data["source"] == {"name": "hello-1-1.src.rpm",
                                                      "sha256": HEX}


def test_a_manifest_from_before_logs_were_kept_reads_with_none(tmp_path: Path) -> None:
    data = stored().to_json()
    for proof in data["verified_by"]:
        del proof["logs"]
    assert StoredBuild.from_json(data).verified_by[0].logs == ()


@pytest.mark.parametrize("change", [
    lambda d: d.update(format=2),
    lambda d: d.pop("artifacts"),
    lambda d: d["artifacts"][0].update(name="../escape"),
    lambda d: d["artifacts"][0].update(sha256="nothex"),
    lambda d: d["verified_by"][0].update(job="/abs"),
])
def test_a_bad_manifest_is_a_sink_error(change: object) -> None:
    data = stored().to_json()
    change(data)  # type: ignore[operator]
    with pytest.raises(SinkError):
        StoredBuild.from_json(data)


def test_an_unreadable_manifest_is_a_sink_error(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="cannot read the manifest"):
        StoredBuild.read(tmp_path)
    (tmp_path / "manifest.json").write_text("[1]")
    with pytest.raises(SinkError, match="not an object"):
        StoredBuild.read(tmp_path)
