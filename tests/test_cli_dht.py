"""``p2pbuild dht serve`` and ``p2pbuild directory ls`` as real child processes over loopback UDP.

The test process publishes records through the Directory API into a network bootstrapped
from a ``dht serve`` child; ``directory ls`` children must find them with the right filters.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from waits import ready_line

from p2pbuild import MachineType, SignedRecord
from p2pbuild.dht import Directory, node_id_for, open_directory
from p2pbuild.testing import example_capability, example_status, make_identity, make_trust_list

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "p2pbuild"]

# (label, arch, os, machine, pools, endpoint, slots_free)
NODES: tuple[tuple[str, str, str, MachineType, tuple[str, ...], str, int], ...] = (
    ("node-1", "x86_64", "fedora-41", MachineType.VM, ("kernel",), "https://127.0.0.1:8443", 3),
    ("node-2", "aarch64", "fedora-41", MachineType.METAL, (), "https://127.0.0.1:8444", 1),
    ("node-3", "x86_64", "debian-12", MachineType.VM, (), "", 0),
)


def _records(label: str, arch: str, os: str, machine: MachineType, pools: tuple[str, ...],
             endpoint: str, slots_free: int) -> list[SignedRecord]:
    identity = make_identity(label)
    now = int(time.time())
    capability = example_capability(arch=arch, os=os, machine=machine, pools=pools,
                                    endpoint=endpoint)
    return [
        SignedRecord.create(identity, capability, seq=1, issued_at=now, lifetime=3600),
        SignedRecord.create(identity, example_status(slots_free=slots_free), seq=1,
                            issued_at=now - 5, lifetime=600),
    ]


@asynccontextmanager
async def _serve_child(*extra: str) -> AsyncIterator[tuple[trio.Process, dict[str, Any]]]:
    process = await trio.lowlevel.open_process(
        [*CLI, "dht", "serve", "--bind", "127.0.0.1:0", "--json", *extra],
        stdout=subprocess.PIPE, cwd=REPO,
    )
    try:
        started = await ready_line(process, "dht serve", timeout=20)
        yield process, started
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(5):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _ls(port: int, *extra: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        result = await trio.run_process(
            [*CLI, "directory", "ls", "--bootstrap", f"127.0.0.1:{port}", "--timeout", "10",
             *extra],
            capture_stdout=True, capture_stderr=True, check=False, cwd=REPO,
        )
    if check:
        assert result.returncode == 0, result.stderr.decode()
    return result


def _labels(result: subprocess.CompletedProcess[bytes]) -> set[str]:
    by_key = {str(make_identity(n[0]).public_key): n[0] for n in NODES}
    nodes = json.loads(result.stdout)["nodes"]
    return {by_key[node["publisher"]] for node in nodes}


async def test_serve_then_ls_finds_published_nodes_with_filters(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        process, started = await stack.enter_async_context(_serve_child("--log-interval", "0"))
        assert len(bytes.fromhex(started["node_id"])) == 20
        port = started["port"]
        seed = ("127.0.0.1", port)
        directories: list[Directory] = []
        for node in NODES:
            identity = make_identity(node[0])
            directory = await stack.enter_async_context(open_directory(
                bootstrap=[seed], node_id=node_id_for(identity.public_key)
            ))
            directories.append(directory)
        for directory, node in zip(directories, NODES, strict=True):
            acknowledged = await directory.publish(_records(*node))
            assert all(count >= 1 for count in acknowledged.values()), acknowledged

        # One at a time: each `ls` joins with a fresh node that holds no records. Running
        # them together, joiners closer to a key than its holders could answer a lookup's
        # quorum with nothing (records reach newly joined nodes only when republished),
        # which is the DHT's business (tests/dht), not this test's.
        queries = {
            "all": ["--json"],
            "x86": ["--arch", "x86_64", "--json"],
            "x86-fedora": ["--arch", "x86_64", "--os", "fedora-41", "--json"],
            "metal": ["--machine", "metal", "--json"],
            "kernel": ["--pool", "kernel", "--json"],
            "fedora-vm": ["--os", "fedora-41", "--machine", "vm", "--json"],
            "none": ["--arch", "s390x", "--json"],
            "table": [],
        }
        results = {name: await _ls(port, *argv) for name, argv in queries.items()}

        assert _labels(results["all"]) == {"node-1", "node-2", "node-3"}
        assert _labels(results["x86"]) == {"node-1", "node-3"}
        assert _labels(results["x86-fedora"]) == {"node-1"}
        assert _labels(results["metal"]) == {"node-2"}
        assert _labels(results["kernel"]) == {"node-1"}
        assert _labels(results["fedora-vm"]) == {"node-1"}
        assert _labels(results["none"]) == set()

        nodes = {n["fingerprint"]: n for n in json.loads(results["all"].stdout)["nodes"]}
        first = nodes[make_identity("node-1").public_key.fingerprint]
        assert first["arch"] == "x86_64" and first["pools"] == ["kernel"]
        assert first["status"]["slots_free"] == 3 and first["status"]["slots_total"] == 4
        assert first["status"]["age_s"] >= 5
        pull = nodes[make_identity("node-3").public_key.fingerprint]
        assert pull["pull_only"] and pull["endpoint"] is None

        table = results["table"].stdout.decode().splitlines()
        assert table[0].split()[:3] == ["PUBLISHER", "ARCH", "OS"]
        assert table[-1] == "3 node(s)"
        row3 = next(line for line in table
                    if line.startswith(make_identity("node-3").public_key.fingerprint))
        assert " pull " in row3 and "0/4" in row3

        # --trust keeps only keys the signed trust list names as nodes.
        fixture = make_trust_list(nodes=(("node-1", "alice"), ("node-2", "bob")))
        trust_file = tmp_path / "trust-list.msgpack"
        trust_file.write_bytes(fixture.trust_list.to_bytes())
        trusted = await _ls(port, "--trust", str(trust_file), "--json")
        assert _labels(trusted) == {"node-1", "node-2"}

        # The bootstrap node took part: it holds records and still runs.
        assert process.returncode is None
        await stack.aclose()
    assert process.returncode == 0  # SIGTERM is a clean stop


BAD_ADDRESSES = [
    (["dht", "serve", "--bind", "nonsense"], "--bind: expected HOST:PORT"),
    (["dht", "serve", "--bind", "127.0.0.1:70000"], "--bind: port 70000"),
    (["dht", "serve", "--bind", "127.0.0.1:7420", "--bootstrap", "x:"],
     "--bootstrap: expected HOST:PORT"),
    (["directory", "ls", "--bootstrap", "127.0.0.1"], "--bootstrap: expected HOST:PORT"),
    (["directory", "ls", "--bootstrap", "127.0.0.1:7420", "--bind", "[::1:5"],
     "--bind: expected HOST:PORT"),
]


async def test_bad_addresses_give_one_line_errors() -> None:
    results: dict[int, subprocess.CompletedProcess[bytes]] = {}

    async def run(index: int, argv: list[str]) -> None:
        results[index] = await trio.run_process(
            [*CLI, *argv], capture_stdout=True, capture_stderr=True, check=False, cwd=REPO
        )

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for index, (argv, _) in enumerate(BAD_ADDRESSES):
                nursery.start_soon(run, index, argv)
    for index, (argv, message) in enumerate(BAD_ADDRESSES):
        stderr = results[index].stderr.decode()
        assert results[index].returncode in (1, 2), argv
        assert stderr.count("\n") == 1 and message in stderr, (argv, stderr)
        assert "Traceback" not in stderr


async def test_bind_in_use_and_unreachable_bootstrap_are_one_line_errors() -> None:
    async with _serve_child("--log-interval", "0") as (_, started):
        taken = f"127.0.0.1:{started['port']}"
        result = await trio.run_process([*CLI, "dht", "serve", "--bind", taken],
                                        capture_stdout=True, capture_stderr=True,
                                        check=False, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.decode() == f"p2pbuild: error: cannot bind UDP {taken}: " \
        "Address already in use\n"

    # Nobody listens on a port we just released.
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    result = await _ls(free, "--timeout", "5", check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and stderr.count("\n") == 1, stderr
    assert "no --bootstrap node answered" in stderr or "did not finish" in stderr
