"""What a packager sees through the real CLI (child processes) on a real farm with a push
and a pull node: failure summaries that quote the failing step's log, node refusal reasons,
logs and files fetched through the dispatcher (from the pull node too), build ids by prefix
and NVR, builds and nodes listings."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from waits import wait_until

from p2pbuild.testing import LocalFarm, NodeSpec, hello_srpm, open_local_farm, write_srpm

pytestmark = pytest.mark.slow

COMPILER_ERROR = "hello.c:3:1: error: expected declaration specifiers before '}' token"


async def cli(farm: LocalFarm, *argv: str | Path, cwd: Path | None = None) -> tuple[int, str, str]:
    done = await trio.run_process(
        [sys.executable, "-P", "-m", "p2pbuild", *map(str, argv),
         "--client-config", str(farm.client_config)],
        capture_stdout=True, capture_stderr=True, check=False, cwd=cwd,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def broken_srpm(dest: Path) -> Path:
    return write_srpm(
        dest, name="broken", sources={"hello.c": "int main(void) { return 0; }\n"},
        build=f"echo 'compiling hello.c'\necho \"{COMPILER_ERROR}\" >&2\nexit 1",
        install="true", files=[],
    ).path


def date_stamped_srpm(dest: Path) -> Path:
    """Never reproducible: each build records the time it ran."""
    return write_srpm(
        dest, name="stamped", sources={"README": "stamped\n"},
        build="date +%s%N > stamp", install="install -D -m 0644 stamp "
        "%{buildroot}/usr/share/stamped/stamp", files=["/usr/share/stamped/stamp"],
        noarch=True,
    ).path


def not_a_source_rpm(dest: Path) -> Path:
    """An RPM lead and nothing else: it passes the client's check, a node refuses it."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "fake-1.0-1.src.rpm"
    path.write_bytes(b"\xed\xab\xee\xdb" + b"\x00" * 200)
    return path


async def test_a_packager_gets_reasons_logs_and_files(tmp_path: Path) -> None:
    specs: Sequence[NodeSpec] = [NodeSpec("alice-1", "alice"),
                                 NodeSpec("bob-pull", "bob", pull=True)]
    farm = LocalFarm.create(tmp_path / "farm", specs)
    async with open_local_farm(farm):
        with trio.fail_after(60):
            await farm.start_all()

        # A build that fails: the summary quotes the compiler error from both operators.
        status, out, err = await cli(farm, "submit", broken_srpm(tmp_path / "src"), "--wait")
        assert status == 1, (out, err)
        assert "failed" in out
        assert out.count(COMPILER_ERROR) >= 2, out
        assert "--- alice" in out and "--- bob" in out
        assert "p2pbuild builds logs" in out

        # Its logs by NVR, from the push node and from the pull node.
        status, out, err = await cli(farm, "builds", "logs", "broken-1.0-1")
        assert status == 0, err
        assert COMPILER_ERROR in out
        assert "on alice" in out and "on bob" in out

        # A node's refusal reaches the packager.
        status, out, err = await cli(farm, "submit", not_a_source_rpm(tmp_path / "fake"),
                                     "--wait")
        assert status == 1, (out, err)
        assert "bad-source: not a source RPM" in out

        # Outputs that differ, and no third operator to break the tie: it fails at once,
        # and says so, rather than waiting for a node that cannot exist.
        status, out, err = await cli(farm, "submit", date_stamped_srpm(tmp_path / "st"),
                                     "--wait", "--json")
        assert status == 1, (out, err)
        stamped_id = json.loads(out.splitlines()[0])["build_id"]
        status, out, err = await cli(farm, "builds", "show", stamped_id, "--json")
        shown = json.loads(out)
        assert shown["reason"].startswith("replicas disagree and the trust list names no node "
                                          "of another operator"), shown["reason"]
        assert "no-node-yet" not in [e["event"] for e in shown["events"]]
        status, out, err = await cli(farm, "builds", "ls")
        assert "replicas disagree" in out

        # A verified build: by id prefix and NVR, listed, downloaded with its proof and logs.
        hello = hello_srpm(tmp_path / "hello").path
        status, out, err = await cli(farm, "submit", hello, "--wait", "--json")
        assert status == 0, err
        build_id = json.loads(out.splitlines()[0])["build_id"]
        status, out, err = await cli(farm, "builds", "show", build_id[:6], "--json")
        assert status == 0, err
        assert json.loads(out)["id"] == build_id
        status, out, err = await cli(farm, "builds", "ls")
        assert status == 0, err
        assert "hello-1.0-1" in out and "broken-1.0-1" in out and build_id[:12] in out
        status, out, err = await cli(farm, "builds", "download", "hello-1.0-1", "--dir",
                                     tmp_path / "got", "--json")
        assert status == 0, err
        got = json.loads(out)
        names = {f["name"] for f in got["files"]}
        assert "manifest.json" in names
        rpms = [n for n in names if n.startswith("artifacts/") and n.endswith(".rpm")]
        assert rpms
        assert any(n.startswith("proof/") for n in names)
        # Each node's log once: the stored copy under the node's fingerprint, not again
        # from the logs listing.
        logs = sorted(n for n in names if n.startswith("logs/"))
        bob = farm.node_keys["bob-pull"].fingerprint.replace(":", "")
        assert len(logs) == 2 and all(n.endswith("/build.log") for n in logs), logs
        assert any(bob in n for n in logs), logs
        manifest = json.loads((Path(got["dir"]) / "manifest.json").read_text())
        for artifact in manifest["artifacts"]:
            data = (Path(got["dir"]) / "artifacts" / artifact["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == artifact["sha256"]

        # Watching a finished build prints its outcome at once.
        status, out, err = await cli(farm, "builds", "watch", build_id[:8])
        assert status == 0, err
        assert f"build {build_id}: verified" in out

        # Ctrl-C while following: the build id is there, and how to follow it again. The
        # follower gets SIGINT as a terminal's foreground job does: a suite run in the
        # background of a shell without job control inherits it ignored, and so would
        # the follower (it then follows to the end and exits 0).
        process = await trio.lowlevel.open_process(
            [sys.executable, "-P", "-m", "p2pbuild", "submit",
             str(hello_srpm(tmp_path / "again", release="2").path), "--wait",
             "--client-config", str(farm.client_config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert process.stdout is not None and process.stderr is not None
        first = b""
        with trio.fail_after(30):
            while b"\n" not in first:
                first += await process.stdout.receive_some(4096)
        assert first.startswith(b"submitted build ")
        process.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await process.wait() == 130
        err_bytes = b""
        while chunk := await process.stderr.receive_some(4096):
            err_bytes += chunk
        again_id = first.split()[2].rstrip(b";").decode()
        assert f"it goes on: p2pbuild builds watch {again_id}" in err_bytes.decode()
        assert b"Traceback" not in err_bytes
        await farm.wait_build(again_id)  # it went on

        # Cancelling a finished build says so.
        status, out, err = await cli(farm, "builds", "cancel", build_id[:8])
        assert status == 1
        assert "already ended (verified)" in err

        # Nodes with their liveness; a stopped node is listed as offline, not unchanged.
        status, out, err = await cli(farm, "nodes", "ls")
        assert status == 0, err
        assert "online" in out and " ago" in out
        await farm.stop("alice-1")
        alice = str(farm.node_keys["alice-1"])

        async def alice_offline() -> bool:
            status, out, err = await cli(farm, "nodes", "ls", "--json")
            assert status == 0, err
            rows = {n["node"]: n for n in json.loads(out)["nodes"]}
            return bool(rows[alice]["state"] == "offline")

        # What the dispatcher hears from the directory: nothing tells the CLI.
        await wait_until(alice_offline, 60, "nodes ls lists alice-1 as offline", every=1)


async def test_submit_refuses_what_cannot_be_built(tmp_path: Path) -> None:
    farm = LocalFarm.create(tmp_path / "farm", [NodeSpec("alice-1", "alice")])
    notes = tmp_path / "notes.txt"
    notes.write_text("remember the milk\n")
    status, _, err = await cli(farm, "submit", notes, "--build-type", "rpm")
    assert status == 1 and "is not an RPM file" in err
    status, _, err = await cli(farm, "submit", notes)
    assert status == 1 and "is not a tarball" in err
    hello = hello_srpm(tmp_path / "hello").path
    status, _, err = await cli(farm, "submit", hello, "--replicas", "1")
    assert status == 1 and "replicas must be 2 to 8" in err
