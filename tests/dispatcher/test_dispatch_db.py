"""The dispatcher database: WAL, migrations, append-only audit, atomic writes; and the sink."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from p2pbuild import BuildType, FileDigest, Job, JobSpec, Result, SourceArtifact, Target
from p2pbuild.dispatcher._db import MIGRATIONS, BuildRow, BuildState, Database
from p2pbuild.dispatcher._errors import ConfigError, SinkError, UnknownBuildError
from p2pbuild.dispatcher._sink import ProofItem, RepositorySink, nvr_of
from p2pbuild.dispatcher._stored import StoredBuild
from p2pbuild.testing import make_trust_list

FIXTURE = make_trust_list()


def build_row(build_id: str = "b" * 32) -> BuildRow:
    return BuildRow(
        id=build_id, created_at=1.0, updated_at=1.0, user="u", team=None,
        state=BuildState.QUEUED, source_name="hello-1.0-1.src.rpm", source_sha256="0" * 64,
        source_size=1, build_type="rpm", arch="x86_64", os="fedora-41", replicas=2,
    )


def test_wal_migrations_and_reopen(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "d.db")
    assert db.schema_version == len(MIGRATIONS)
    assert db._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    db.insert_build(build_row())
    db.close()
    again = Database.open(tmp_path / "d.db")
    assert again.build("b" * 32).state is BuildState.QUEUED
    assert [e.event for e in again.audit_entries("b" * 32)] == ["accepted"]
    with pytest.raises(UnknownBuildError):
        again.build("c" * 32)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    Database.open(path).close()
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version=99")
    raw.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        Database.open(path)


def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "d.db").write_bytes(b"garbage" * 1000)
    with pytest.raises(ConfigError):
        Database.open(tmp_path / "d.db")


def test_audit_is_append_only(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "d.db")
    db.audit(1.0, "x", detail="y")
    with pytest.raises(sqlite3.IntegrityError), db.transaction() as conn:
        conn.execute("UPDATE audit SET event = 'z'")
    with pytest.raises(sqlite3.IntegrityError), db.transaction() as conn:
        conn.execute("DELETE FROM audit")
    assert [e.event for e in db.audit_entries()] == ["x"]


def test_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "d.db")
    db.insert_build(build_row())
    with pytest.raises(sqlite3.IntegrityError):
        db.insert_build(build_row())  # same id: the audit entry must not stay either
    assert len(db.audit_entries()) == 1


def _proof(tmp_path: Path, content: bytes) -> list[ProofItem]:
    dispatcher = FIXTURE.dispatchers["dispatcher-1"]
    job = Job.create(
        dispatcher,
        JobSpec(SourceArtifact("h.src.rpm", 1, bytes(32)), BuildType.RPM, Target("x", "y")),
        issued_at=1, lifetime=60,
    )
    items = []
    for name in ("node-1", "node-2"):
        files = tmp_path / name
        (files / "RPMS").mkdir(parents=True)
        (files / "RPMS" / "h.rpm").write_bytes(content)
        result = Result.create(
            FIXTURE.nodes[name], job, state="succeeded", exit_code=0, started_ms=0,
            ended_ms=5, environment={},
            artifacts=[FileDigest("RPMS/h.rpm", 3, hashlib.sha256(b"rpm").digest())], logs=[],
        )
        items.append(ProofItem(job, result, name, files))
    return items


def test_sink_is_atomic_and_idempotent(tmp_path: Path) -> None:
    sink = RepositorySink(tmp_path / "repo")
    proof = _proof(tmp_path, b"rpm")
    path = sink.store("a" * 32, "h-1-1.src.rpm", "0" * 64, proof,
                      trust_list=FIXTURE.trust_list, now=5)
    assert path.name == "h-1-1"
    assert (path / "artifacts/RPMS/h.rpm").read_bytes() == b"rpm"
    manifest = json.loads((path / "manifest.json").read_text())
    assert [a["name"] for a in manifest["artifacts"]] == ["RPMS/h.rpm"]
    assert sorted(p.name for p in (path / "proof").iterdir())[0].endswith(".job")
    assert sink.store("a" * 32, "h-1-1.src.rpm", "0" * 64, proof,
                      trust_list=FIXTURE.trust_list, now=6) == path
    other = sink.store("c" * 32, "h-1-1.src.rpm", "0" * 64, proof,
                       trust_list=FIXTURE.trust_list, now=7)
    assert other.name == "h-1-1+" + "c" * 12


def test_sink_syncs_every_file_and_directory_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Crash safety: the build becomes visible (rename) only once all of it is on disk, the
    # staging directory's own name included (the repository directory), so that a power cut
    # after the database says verified finds it to rename again; the rename reaches the
    # disk with settle(), which the engine calls once the database says verified.
    from p2pbuild.dispatcher import _sink

    synced: list[Path] = []
    events: list[tuple[str, object]] = []
    real_fsync, real_rename = _sink._fsync_dir, _sink.os.rename

    def fsync(path: Path) -> None:
        synced.append(Path(path))
        real_fsync(path)

    def rename(src: Path, dest: Path) -> None:
        staged = {Path(src), Path(src).parent, *Path(src).rglob("*")}
        events.append(("rename", staged - set(synced)))
        real_rename(src, dest)

    monkeypatch.setattr(_sink, "_fsync_dir", fsync)
    monkeypatch.setattr(_sink.os, "rename", rename)
    repo = tmp_path / "repo"
    sink = RepositorySink(repo)
    path = sink.store("a" * 32, "h-1-1.src.rpm", "0" * 64, _proof(tmp_path, b"rpm"),
                      trust_list=FIXTURE.trust_list, now=5)
    assert events == [("rename", set())]  # nothing staged was left unsynced
    assert (path / "manifest.json").is_file()
    before = len(synced)
    sink.settle()
    assert synced[before:] == [repo]  # the rename, synced after it


def test_sink_mends_a_verified_build_a_power_cut_took_back(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    sink = RepositorySink(repo)
    path = sink.store("a" * 32, "h-1-1.src.rpm", "0" * 64, _proof(tmp_path, b"rpm"),
                      trust_list=FIXTURE.trust_list, now=5)
    staging = repo / ".incoming-aaaaaaaaaaaaaaaa-k3j"
    path.rename(staging)
    (repo / ".incoming-bbbbbbbbbbbbbbbb-x").mkdir()  # interrupted before its manifest
    assert sink.staged() == {"a" * 32: staging}
    sink.mend(staging, path)
    assert StoredBuild.read(path).build_id == "a" * 32
    assert sink.staged() == {}
    for staging_dir, target, why in [
        (repo / ".incoming-bbbbbbbbbbbbbbbb-x", path, "exists"),
        (repo / ".incoming-bbbbbbbbbbbbbbbb-x", tmp_path / "elsewhere", "not a build directory"),
    ]:
        with pytest.raises(SinkError, match=why):
            sink.mend(staging_dir, target)


def test_sink_refuses_files_that_changed(tmp_path: Path) -> None:
    sink = RepositorySink(tmp_path / "repo")
    with pytest.raises(SinkError, match="no longer matches"):
        sink.store("a" * 32, "h.src.rpm", "0" * 64, _proof(tmp_path, b"xyz"),
                   trust_list=FIXTURE.trust_list, now=5)
    assert list((tmp_path / "repo").iterdir()) == []  # the staging directory is gone


def test_concurrent_stores_of_one_build_agree(tmp_path: Path) -> None:
    # A stopped dispatcher's worker thread may still be storing while the restarted one
    # stores the same build: both calls succeed and return the one stored directory.
    import threading

    sink = RepositorySink(tmp_path / "repo")
    proof = _proof(tmp_path, b"rpm")
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda: paths.append(sink.store(
            "a" * 32, "h-1-1.src.rpm", "0" * 64, proof, trust_list=FIXTURE.trust_list, now=5)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paths) == 4
    assert {p.name for p in paths} == {"h-1-1"}
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["h-1-1"]
    assert (paths[0] / "artifacts/RPMS/h.rpm").read_bytes() == b"rpm"


def test_nvr() -> None:
    assert nvr_of("hello-1.0-1.src.rpm") == "hello-1.0-1"
    assert nvr_of("hello-1.0.tar.gz") == "hello-1.0"
    assert nvr_of("../../etc") == "_.._etc"


def test_example_config_loads() -> None:
    from p2pbuild._wiring import load_service_config

    service = load_service_config(
        Path(__file__).parents[2] / "dispatcher" / "dispatcher.example.toml"
    )
    config = service.dispatcher
    assert service.koji is not None and service.koji.channel == "p2p"
    assert config.port == 7443
    assert config.dedicated_pools == {"team-x-metal": "team-x"}
    assert any(c.key is not None for c in config.clients)
    assert config.dht_bootstrap[0] == ("seed1.example.org", 7420)


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    from p2pbuild.dispatcher import load_config

    path = tmp_path / "d.toml"
    for text, fragment in [
        ("[dispatcher]\n", "key_file is required"),
        ('[dispatcher]\nkey="k"\ntrust_list="t"\n[nope]\n', "unknown section [nope]"),
        ('[dispatcher]\nkey="k"\ntrust_list="t"\n[api]\nport="x"\n', "port must be an integer"),
        ('[dispatcher]\nkey="k"\ntrust_list="t"\n[[clients]]\nuser="u"\n', "exactly one"),
        ("not toml [", "not valid TOML"),
        # The one HOST:PORT parser: the same bounds as the node's and the CLI's.
        ('[dispatcher]\nkey="k"\ntrust_list="t"\n[dht]\nbootstrap=["h:99999"]\n',
         "port 99999 is not in 1..65535"),
        ('[dispatcher]\nkey="k"\ntrust_list="t"\n[dht]\nbootstrap=["::1:7420"]\n',
         "expected HOST:PORT"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
            load_config(path)
        assert "\n" not in str(info.value)


def test_concurrent_stores_of_two_builds_of_one_nvr_both_land(tmp_path: Path) -> None:
    import threading

    sink = RepositorySink(tmp_path / "repo")
    proof = _proof(tmp_path, b"rpm")
    paths: dict[str, Path] = {}

    def store(build_id: str) -> None:
        paths[build_id] = sink.store(build_id, "h-1-1.src.rpm", "0" * 64, proof,
                                     trust_list=FIXTURE.trust_list, now=5)

    for _ in range(10):
        for path in (tmp_path / "repo").glob("h-1-1*"):
            shutil.rmtree(path)
        paths.clear()
        threads = [threading.Thread(target=store, args=(c * 32,)) for c in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(paths) == 2
        assert len({p.name for p in paths.values()}) == 2
        assert sorted(p.name for p in (tmp_path / "repo").iterdir())[0] == "h-1-1"


def test_engine_keys_are_the_engine_configs_numbers(tmp_path: Path) -> None:
    import attrs

    from p2pbuild.dispatcher import load_config
    from p2pbuild.dispatcher._engine import EngineConfig

    numbers = {f.name: f.type for f in attrs.fields(EngineConfig) if f.type in ("int", "float")}
    path = tmp_path / "d.toml"
    path.write_text('[dispatcher]\nkey="k"\ntrust_list="t"\n[engine]\n'
                    + "".join(f"{name} = 3\n" for name in numbers))
    engine = load_config(path).engine
    assert set(engine) == set(numbers)
    for name, kind in numbers.items():
        assert type(engine[name]).__name__ == kind, name
    path.write_text('[dispatcher]\nkey="k"\ntrust_list="t"\n[engine]\nstate_dir = 1\n')
    with pytest.raises(ConfigError, match="unknown key state_dir"):
        load_config(path)


def test_the_key_file_has_the_nodes_name_and_the_older_name_still_reads(tmp_path: Path) -> None:
    from p2pbuild.dispatcher import load_config

    path = tmp_path / "d.toml"
    path.write_text('[dispatcher]\nkey_file="k"\ntrust_list="t"\n')
    assert load_config(path).key_file == tmp_path / "k"
    path.write_text('[dispatcher]\nkey="old"\ntrust_list="t"\n')
    assert load_config(path).key_file == tmp_path / "old"
    path.write_text('[dispatcher]\nkey="old"\nkey_file="k"\ntrust_list="t"\n')
    with pytest.raises(ConfigError, match="key_file and key name the same file"):
        load_config(path)


def test_counting_active_attempts_reads_only_active_ones(tmp_path: Path) -> None:
    # Every selection asks how many pending or running attempts each node has: the query
    # plan searches the state index rather than scanning every attempt ever made.
    db = Database.open(tmp_path / "d.db")
    statements: list[str] = []
    db._db.set_trace_callback(statements.append)
    assert db.active_attempts_by_node() == {}
    db._db.set_trace_callback(None)
    [query] = [s for s in statements if "FROM attempts" in s]
    plan = db._db.execute(f"EXPLAIN QUERY PLAN {query}").fetchall()
    assert any("USING INDEX attempts_state" in row[-1] for row in plan), plan
