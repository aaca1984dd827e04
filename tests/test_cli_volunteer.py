"""What volunteers and maintainers run, as child processes: a node that says when it is
useless (key not trusted, no DHT), trust-list traps refused, a trust list rolled out to a
running node, key folders created."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest

from p2pbuild import Identity, Role, TrustEntry
from p2pbuild.testing import LocalFarm, NodeSpec

pytestmark = pytest.mark.slow


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pbuild", *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def test_keys_generate_creates_a_missing_folder(tmp_path: Path) -> None:
    out = tmp_path / "home" / ".p2pbuild" / "maintainer.key"
    done = run("keys", "generate", "--role", "maintainer", "--out", out)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert out.parent.stat().st_mode & 0o777 == 0o700


@pytest.fixture
def maintainers(tmp_path: Path) -> Path:
    for name in ("m1", "m2", "m3", "m4", "m5"):
        assert run("keys", "generate", "--role", "maintainer", "--out", f"{name}.key",
                   cwd=tmp_path).returncode == 0
    assert run("trust", "init", "--threshold", "2", "--maintainer", "m1.key.pub",
               "--maintainer", "m2.key.pub", "--maintainer", "m3.key.pub",
               cwd=tmp_path).returncode == 0
    return tmp_path


def test_trust_add_refuses_a_dispatcher_key_as_a_node(maintainers: Path) -> None:
    assert run("keys", "generate", "--role", "dispatcher", "--out", "disp.key",
               cwd=maintainers).returncode == 0
    done = run("trust", "add", "disp.key.pub", "--role", "node", "--operator", "farm",
               cwd=maintainers)
    assert done.returncode == 1
    assert "is a dispatcher key, not a node key" in done.stderr
    assert "--force-role" in done.stderr
    assert run("trust", "add", "disp.key.pub", "--role", "dispatcher", "--operator", "farm",
               cwd=maintainers).returncode == 0
    # Its entry cannot silently become a node's either, even given as bare text.
    key = (maintainers / "disp.key.pub").read_text().split()[0]
    done = run("trust", "add", key, "--role", "node", "--operator", "farm", cwd=maintainers)
    assert done.returncode == 1 and "as a dispatcher of farm" in done.stderr
    done = run("trust", "add", key, "--role", "node", "--operator", "farm", "--force-role",
               cwd=maintainers)
    assert done.returncode == 0, done.stderr


def test_trust_verify_reports_a_v2_under_signed_against_v1(maintainers: Path) -> None:
    for name in ("m1", "m2"):
        assert run("trust", "sign", "--key", f"{name}.key", cwd=maintainers).returncode == 0
    assert run("trust", "verify", cwd=maintainers).returncode == 0
    # v2 hands over to two new maintainers, who sign it with one old one: its own threshold
    # is met, v1's (2 of m1..m3) is not.
    for name in ("m4", "m5"):
        assert run("trust", "add", f"{name}.key.pub", "--role", "maintainer", "--operator",
                   "maintainers", cwd=maintainers).returncode == 0
    assert run("trust", "remove", "m2.key.pub", cwd=maintainers).returncode == 0
    assert run("trust", "remove", "m3.key.pub", cwd=maintainers).returncode == 0
    for name in ("m1", "m4", "m5"):
        done = run("trust", "sign", "--key", f"{name}.key", cwd=maintainers)
        assert done.returncode == 0, done.stderr
    done = run("trust", "verify", cwd=maintainers)
    assert done.returncode == 1, done.stdout
    assert "1 of 2 needed v1 maintainer signatures" in done.stderr
    done = run("trust", "verify", "--json", cwd=maintainers)
    assert json.loads(done.stdout)["valid"] is False
    assert json.loads(done.stdout)["previous"] == 1
    # One more old maintainer signs: a valid rotation.
    assert run("trust", "sign", "--key", "m2.key", cwd=maintainers).returncode == 0
    done = run("trust", "verify", cwd=maintainers)
    assert done.returncode == 0, done.stderr
    assert "a valid successor of v1" in done.stdout


@pytest.fixture
def farm(tmp_path: Path) -> LocalFarm:
    # Created, never started: its bootstrap node does not run, so nothing answers there.
    return LocalFarm.create(tmp_path / "farm", [NodeSpec("alice-1", "alice")])


def untrusted(farm: LocalFarm) -> Path:
    """Give the farm's node a fresh key that no trust list names."""
    directory = farm.root / "nodes" / "alice-1"
    (directory / "node.key").unlink()
    (directory / "node.key.pub").unlink(missing_ok=True)
    Identity.generate(Role.NODE).save(directory / "node.key")
    return directory / "node.toml"


def test_node_check_fails_when_its_key_is_not_on_the_trust_list(farm: LocalFarm) -> None:
    config = farm.root / "nodes" / "alice-1" / "node.toml"
    done = run("node", "run", "--config", config, "--check")
    assert done.returncode == 0, done.stderr
    assert "listed as a node of alice" in done.stdout
    config = untrusted(farm)
    done = run("node", "run", "--config", config, "--check")
    assert done.returncode == 1
    assert "is not on trust list v1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


class RunningNode:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.parent / "run.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "p2pbuild", "node", "run", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=self.log.open("wb"), text=True,
        )
        assert self.process.stdout is not None
        self.started = json.loads(self.process.stdout.readline())

    def wait_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


def test_a_running_node_says_it_is_useless_and_status_shows_why(farm: LocalFarm) -> None:
    node = RunningNode(untrusted(farm))
    try:
        node.wait_log("is not on trust list v1")
        node.wait_log("no DHT bootstrap node answered")
        done = run("node", "status", "--config", node.config)
        assert done.returncode == 0, done.stderr
        assert "NOT TRUSTED" in done.stdout
        assert "NO BOOTSTRAP NODE ANSWERS" in done.stdout
        status = json.loads(run("node", "status", "--config", node.config, "--json").stdout)
        assert status["trust"]["listed"] is False
        assert status["dht"]["contacts"] == 0
    finally:
        node.stop()


def test_a_running_node_adopts_the_next_trust_list_on_sighup(farm: LocalFarm) -> None:
    directory = farm.root / "nodes" / "alice-1"
    node = RunningNode(directory / "node.toml")
    try:
        newcomer = Identity.generate(Role.NODE).public_key
        v2 = farm.trust_list.next_version().with_entry(TrustEntry(newcomer, Role.NODE, "bob"))
        v2 = attrs.evolve(v2, signatures=())
        # Signed by one maintainer only: refused, v1 kept.
        (directory / "trust-list.bin").write_bytes(v2.sign(farm.maintainers[0]).to_bytes())
        os.kill(node.process.pid, signal.SIGHUP)
        node.wait_log("not adopted; keeping v1")
        signed = v2.sign(farm.maintainers[0]).sign(farm.maintainers[1])
        (directory / "trust-list.bin").write_bytes(signed.to_bytes())
        os.kill(node.process.pid, signal.SIGHUP)
        node.wait_log("trust list v2 adopted (was v1)")
        status = json.loads(run("node", "status", "--config", node.config, "--json").stdout)
        assert status["dht"]["trust_version_in_use"] == 2
        assert status["trust"]["version"] == 2 and status["trust"]["listed"] is True
        # A replaced file is noticed without a signal too (within 30 s).
        v3 = attrs.evolve(signed.next_version(), signatures=())
        v3 = v3.sign(farm.maintainers[1]).sign(farm.maintainers[2])
        (directory / "trust-list.bin").write_bytes(v3.to_bytes())
        node.wait_log("trust list v3 adopted (was v2)", timeout=45)
    finally:
        node.stop()


def test_dispatcher_init_never_writes_a_wildcard_url(tmp_path: Path) -> None:
    import tomllib

    done = run("dispatcher", "init", "--dir", tmp_path / "a", "--host", "0.0.0.0",
               "--public-url", "https://disp.example.net:7443")
    assert done.returncode == 0, done.stderr
    client = tomllib.loads((tmp_path / "a" / "client.toml").read_text())
    config = tomllib.loads((tmp_path / "a" / "dispatcher.toml").read_text())
    assert client["url"] == config["api"]["public_url"] == "https://disp.example.net:7443"
    done = run("dispatcher", "init", "--dir", tmp_path / "b", "--host", "0.0.0.0")
    assert done.returncode == 0, done.stderr
    url = tomllib.loads((tmp_path / "b" / "client.toml").read_text())["url"]
    assert "0.0.0.0" not in url and url.startswith("https://") and url.endswith(":7443")
