"""DHT nodes as separate hosts: Linux network namespaces joined by veth pairs to a bridge,
each node a child process with its own address in 10.201.0.0/24. Records propagate; a link
is cut (partition) and healed. The addresses exist only inside namespaces this test creates
and deletes; no traffic leaves them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CLIENT = str(Path(__file__).with_name("netns_client.py"))
PREFIX = f"p2pb{os.getpid() % 100000}"
BRIDGE_NS = f"{PREFIX}-br"
HOSTS = {f"{PREFIX}-n{i}": f"10.201.0.{i}" for i in (1, 2, 3)}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _netns_permitted() -> str | None:
    probe = f"{PREFIX}-probe"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"'ip netns add' is not permitted here: {exc}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    reason = _netns_permitted()
    if reason is not None:
        pytest.skip(reason)
    created: list[str] = []
    try:
        _ip("netns", "add", BRIDGE_NS)
        created.append(BRIDGE_NS)
        _ip("-n", BRIDGE_NS, "link", "add", "br0", "type", "bridge")
        _ip("-n", BRIDGE_NS, "link", "set", "br0", "up")
        for index, (name, address) in enumerate(HOSTS.items(), start=1):
            _ip("netns", "add", name)
            created.append(name)
            # Both ends are created inside the bridge namespace, then one moves: the pair
            # never exists in this machine's own namespace.
            _ip("-n", BRIDGE_NS, "link", "add", f"v{index}", "type", "veth", "peer", "name",
                "eth0")
            _ip("-n", BRIDGE_NS, "link", "set", "eth0", "netns", name)
            _ip("-n", BRIDGE_NS, "link", "set", f"v{index}", "master", "br0", "up")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
        yield HOSTS
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _in(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _client(ns: str, action: str, bind: str, bootstrap: list[str], label: str,
            seq: int = 1, timeout: float = 15) -> dict[str, object]:
    done = subprocess.run(
        _in(ns, PYTHON, CLIENT, action, bind, *bootstrap, "--label", label, "--seq", str(seq),
            "--timeout", str(timeout)),
        capture_output=True, text=True, timeout=timeout + 20, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_records_propagate_between_hosts_and_survive_a_cut_link(
    namespaces: dict[str, str],
) -> None:
    names = list(namespaces)
    seeds = [f"{addr}:7420" for addr in namespaces.values()]
    servers = []
    try:
        for index, (name, address) in enumerate(namespaces.items()):
            argv = [PYTHON, "-m", "p2pbuild", "dht", "serve", "--bind", f"{address}:7420",
                    "--json", "--log-interval", "0"]
            if index:
                argv += ["--bootstrap", seeds[0]]
            process = subprocess.Popen(_in(name, *argv), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, cwd=ROOT)
            servers.append(process)
            assert process.stdout is not None
            line = process.stdout.readline()  # the start line: it listens
            assert line, process.stderr.read() if process.stderr else ""
        n1, n2, n3 = names
        a1, a2, a3 = namespaces.values()
        published = _client(n2, "publish", a2, [seeds[1], seeds[0]], "netns-pub", seq=1)
        assert published["acks"] >= 3  # type: ignore[operator]
        assert _client(n3, "get", a3, [seeds[2]], "netns-pub")["seqs"] == [1]
        assert _client(n1, "get", a1, [seeds[0]], "netns-pub")["seqs"] == [1]

        # Cut n3's link: it cannot see the update published meanwhile.
        _ip("-n", BRIDGE_NS, "link", "set", "v3", "down")
        published = _client(n2, "publish", a2, [seeds[1], seeds[0]], "netns-pub", seq=2,
                            timeout=15)
        assert published["acks"] >= 2  # type: ignore[operator]
        behind = _client(n3, "get", a3, [seeds[2]], "netns-pub", timeout=15)
        assert 2 not in behind["seqs"]  # type: ignore[operator]

        # Heal: the newer record reaches n3's side (its lookup walks to n1 and n2 again).
        _ip("-n", BRIDGE_NS, "link", "set", "v3", "up")
        deadline = time.monotonic() + 30
        while True:
            healed = _client(n3, "get", a3, [seeds[2], seeds[0]], "netns-pub")
            if healed["seqs"] == [2] or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert healed["seqs"] == [2]
    finally:
        for process in servers:
            process.terminate()
        for process in servers:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
