"""The keys and trust commands, driven through ``main(argv)`` and once as a real child
process. The demo, which runs a whole farm, is tested in ``tests/e2e``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2pbuild import PublicKey, TrustList
from p2pbuild._cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def deployment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("m1", "m2", "m3"):
        assert run(capsys, "keys", "generate", "--role", "maintainer", "--out", name)[0] == 0
    assert run(capsys, "keys", "generate", "--role", "node", "--out", "n1")[0] == 0
    status, _, _ = run(capsys, "trust", "init", "--threshold", "2",
                       "--maintainer", "m1.pub", "--maintainer", "m2.pub",
                       "--maintainer", "m3.pub")
    assert status == 0
    return tmp_path


def test_keys_generate_writes_0600_and_show_matches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, "keys", "generate", "--role", "node",
                         "--out", str(tmp_path / "k"), "--json")
    assert status == 0
    created = json.loads(out)
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    status, out, _ = run(capsys, "keys", "show", str(tmp_path / "k"), "--json")
    assert status == 0
    shown = json.loads(out)
    assert shown == {"public_key": created["public_key"],
                     "fingerprint": created["fingerprint"], "role": "node"}
    assert PublicKey.from_text(shown["public_key"]).fingerprint == shown["fingerprint"]
    status, out, _ = run(capsys, "keys", "show", str(tmp_path / "k.pub"), "--json")
    assert json.loads(out) == shown
    assert "secret" not in out


def test_keys_generate_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "keys", "generate", "--role", "node", "--out", str(tmp_path / "k"))[0] == 0
    before = (tmp_path / "k").read_bytes()
    status, _, err = run(capsys, "keys", "generate", "--role", "node", "--out",
                         str(tmp_path / "k"))
    assert status == 1
    assert "already exists" in err and err.count("\n") == 1
    assert (tmp_path / "k").read_bytes() == before


def test_world_readable_key_is_refused_with_the_fix(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (deployment / "m1").chmod(0o644)
    status, _, err = run(capsys, "trust", "sign", "--key", "m1")
    assert status == 1
    assert "chmod 600" in err


def test_trust_workflow_sign_verify_rotate(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "trust", "add", "n1.pub", "--role", "node", "--operator", "alice",
               "--arch", "x86_64", "--pool", "team-a")[0] == 0
    assert run(capsys, "trust", "verify")[0] == 1  # unsigned
    assert run(capsys, "trust", "sign", "--key", "m1")[0] == 0
    status, out, _ = run(capsys, "trust", "verify", "--json")
    assert status == 1
    assert json.loads(out)["code"] == "under-signed"
    assert run(capsys, "trust", "sign", "--key", "m2")[0] == 0
    assert run(capsys, "trust", "verify")[0] == 0

    # Editing a published list archives it and starts v2, which needs the v1 threshold.
    status, out, _ = run(capsys, "trust", "remove", "n1.pub")
    assert status == 0 and "archived signed v1" in out
    assert (deployment / "trust-list.v1.msgpack").exists()
    assert run(capsys, "trust", "sign", "--key", "m3")[0] == 0
    assert run(capsys, "trust", "verify", "--previous", "trust-list.v1.msgpack")[0] == 1
    assert run(capsys, "trust", "sign", "--key", "m2")[0] == 0
    assert run(capsys, "trust", "verify", "--previous", "trust-list.v1.msgpack")[0] == 0

    v2 = TrustList.from_bytes((deployment / "trust-list.msgpack").read_bytes())
    assert v2.version == 2
    assert all(entry.operator != "alice" for entry in v2.entries)
    # Rollback: v1 offered as the successor of v2.
    status, _, err = run(capsys, "trust", "verify", "-f", "trust-list.v1.msgpack",
                         "--previous", "trust-list.msgpack")
    assert status == 1 and "not newer" in err


def test_a_node_key_cannot_sign_the_trust_list(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(capsys, "trust", "sign", "--key", "n1")
    assert status == 1
    assert "not a maintainer key" in err


def test_trust_show_table_and_json(deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "trust", "add", "n1.pub", "--role", "node", "--operator", "alice")
    status, out, _ = run(capsys, "trust", "show")
    assert status == 0
    assert out.splitlines()[1].split()[:3] == ["FINGERPRINT", "ROLE", "OPERATOR"]
    assert "under-signed" in out.splitlines()[0]
    status, out, _ = run(capsys, "trust", "show", "--json")
    shown = json.loads(out)
    assert shown["threshold"] == 2 and shown["maintainers"] == 3
    assert sorted(e["role"] for e in shown["entries"]) == ["maintainer"] * 3 + ["node"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["trust", "add", "nonsense", "--role", "node", "--operator", "x"], "neither"),
        (["trust", "add", "n1.pub", "--role", "node", "--operator", "bad name"], "operator"),
        (["trust", "add", "n1.pub", "--role", "node", "--operator", "x", "--arch", "X/Y"],
         "arches"),
        (["trust", "set", "--threshold", "4"], "threshold"),
        (["trust", "set", "--days", "0"], "--days"),
        (["trust", "verify", "-f", "missing.msgpack"], "No such file"),
        (["trust", "init", "--threshold", "1", "--maintainer", "m1.pub"], "already exists"),
        (["keys", "show", "ed25519:short"], "43 base64"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    deployment: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, _, err = run(capsys, *argv)
    assert status == 1
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_garbage_trust_file_is_a_clear_error(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (deployment / "junk").write_bytes(b"\x93\x01\x02" + b"\xff" * 50)
    status, _, err = run(capsys, "trust", "show", "-f", "junk")
    assert status == 1
    assert err.startswith("p2pbuild: error: trust list junk:")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["keys", "generate", "--role", "wizard", "--out", "x"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_real_child_process_gives_one_line_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "p2pbuild", "trust", "show", "-f", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("p2pbuild: error: cannot read trust list")
    assert "Traceback" not in result.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "p2pbuild", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    for command in ("keys", "trust", "demo"):
        assert command in help_text


def test_node_and_dispatcher_init_take_their_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomllib

    status, _, _ = run(capsys, "node", "init", "--dir", str(tmp_path / "n"), "--operator", "a",
                       "--dht-bind", "127.0.0.1:0", "--listen", "127.0.0.1:8450",
                       "--bootstrap", "127.0.0.1:7420")
    assert status == 0
    node = tomllib.loads((tmp_path / "n" / "node.toml").read_text())
    assert node["dht"]["bind"] == "127.0.0.1:0"
    assert node["dht"]["bootstrap"] == ["127.0.0.1:7420"]
    assert node["api"]["bind"] == "127.0.0.1:8450"
    status, _, _ = run(capsys, "dispatcher", "init", "--dir", str(tmp_path / "d"),
                       "--dht-bind", "127.0.0.1:0", "--bootstrap", "127.0.0.1:7420")
    assert status == 0
    dispatcher = tomllib.loads((tmp_path / "d" / "dispatcher.toml").read_text())
    assert dispatcher["dht"] == {"bind": "127.0.0.1:0", "bootstrap": ["127.0.0.1:7420"]}
    status, _, err = run(capsys, "node", "init", "--dir", str(tmp_path / "x"),
                         "--listen", "nowhere")
    assert status == 1
    assert "--listen" in err
    assert not (tmp_path / "x").exists()


def test_node_init_next_steps_name_only_what_is_still_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Everything given (the README's quick tour): nothing left to set in the config.
    status, out, _ = run(capsys, "node", "init", "--dir", str(tmp_path / "given"),
                         "--operator", "a", "--bootstrap", "127.0.0.1:7420",
                         "--dht-bind", "127.0.0.1:0", "--listen", "127.0.0.1:8450")
    assert status == 0
    assert "[dht] bootstrap" not in out and "[api] endpoint" not in out
    assert "trust-list.bin" in out and "node run --config" in out
    # Defaults: no seed, listening on all addresses without a URL.
    status, out, _ = run(capsys, "node", "init", "--dir", str(tmp_path / "bare"))
    assert status == 0
    assert "[dht] bootstrap" in out and "[api] endpoint" in out
    # An endpoint given: only the seed is missing.
    status, out, _ = run(capsys, "node", "init", "--dir", str(tmp_path / "url"),
                         "--endpoint", "https://node1.example.org:8443")
    assert status == 0
    assert "[dht] bootstrap" in out and "[api] endpoint" not in out
    # Pull only: the dispatchers to poll, never an endpoint.
    status, out, _ = run(capsys, "node", "init", "--dir", str(tmp_path / "pull"),
                         "--bootstrap", "127.0.0.1:7420", "--pull-only")
    assert status == 0
    assert "[pull] dispatchers" in out
    assert "[api] endpoint" not in out and "[dht] bootstrap" not in out
