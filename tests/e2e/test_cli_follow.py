"""``p2pbuild submit --wait`` as a packager runs it: a real child process following a real
farm's build through long quiet stretches and a dispatcher restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest
import trio
from e2e_farm import farm_of, wait_log

from p2pbuild.testing import LocalFarm, NodeSpec, hello_srpm

pytestmark = pytest.mark.slow



def submit_wait(farm: LocalFarm, source: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "p2pbuild", "submit", str(source), "--wait",
         "--client-config", str(farm.client_config), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


async def finish(process: subprocess.Popen[str], timeout: float,
                 read: tuple[str, str] = ("", "")) -> tuple[int, str, str]:
    """Its exit status and output once it exits (``read``: what was read already)."""
    output = list(read)

    async def drain(index: int, stream: IO[str] | None) -> None:
        assert stream is not None
        output[index] += await trio.to_thread.run_sync(stream.read, abandon_on_cancel=True)

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, 0, process.stdout)
            nursery.start_soon(drain, 1, process.stderr)
        code = await trio.to_thread.run_sync(process.wait, abandon_on_cancel=True)
        return code, output[0], output[1]
    process.kill()
    raise AssertionError(f"still running after {timeout:g} s: {output[1][-2000:]}")


async def read_until(stream: IO[str] | None, text: str, timeout: float = 60) -> str:
    """The child's lines up to and including one with ``text`` (what it says as it does
    something: a readiness line, not a guess of how long it takes)."""
    assert stream is not None
    read = ""
    with trio.fail_after(timeout):
        while text not in read:
            line = await trio.to_thread.run_sync(stream.readline, abandon_on_cancel=True)
            assert line, f"its output ended without {text!r}: {read[-2000:]}"
            read += line
    return read


async def test_submit_wait_follows_a_build_quiet_for_longer_than_the_old_30s_limit(
    tmp_path: Path,
) -> None:
    # %build sleeps 40 s: no event for well over 30 s, the old client's silence limit.
    source = hello_srpm(tmp_path / "src", build_seconds=40, release="1.slow").path
    async with farm_of(tmp_path, [NodeSpec("alice-1", "alice"), NodeSpec("bob-1", "bob")]) as farm:
        process = submit_wait(farm, source, "--json")
        status, out, err = await finish(process, 150)
    assert status == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "build-verified"
    assert events[-1]["at"] - events[0]["at"] >= 40
    assert "lost the dispatcher" not in err


async def test_submit_wait_reconnects_across_a_dispatcher_restart(tmp_path: Path) -> None:
    source = hello_srpm(tmp_path / "src", build_seconds=6, release="1.slow").path
    async with farm_of(tmp_path, [NodeSpec("alice-1", "alice"), NodeSpec("bob-1", "bob")]) as farm:
        process = submit_wait(farm, source)
        assert process.stdout is not None
        with trio.fail_after(30):
            first = await trio.to_thread.run_sync(process.stdout.readline)
        assert first.startswith("submitted build "), first
        build_id = first.split()[2].rstrip(";")
        build = await farm.wait_build(
            build_id, lambda b: sum(a["state"] == "running" for a in b["attempts"]) == 2
        )
        # Killed while both build (not while they still fetch the source from it).
        for node in ("alice-1", "bob-1"):
            await wait_log(farm, build, node, b"+ sleep 6")
        farm.kill("dispatcher")
        assert await farm.wait_exit("dispatcher") == -9
        # Started again once the client noticed (rather than after a guessed pause).
        noticed = await read_until(process.stderr, "lost the dispatcher")
        await farm.start("dispatcher")
        status, out, err = await finish(process, 90, (first, noticed))
    assert status == 0, (out, err)
    assert "lost the dispatcher" in err and "reconnecting" in err
    assert f"build {build_id}: verified" in out


async def test_builds_logs_follow_reconnects_without_repeating_lines(tmp_path: Path) -> None:
    source = hello_srpm(tmp_path / "src", build_seconds=12, release="1.slow").path
    async with farm_of(tmp_path, [NodeSpec("alice-1", "alice"), NodeSpec("bob-1", "bob")]) as farm:
        submitted = await farm.submit(source)
        build = await farm.wait_build(
            submitted["id"], lambda b: sum(a["state"] == "running" for a in b["attempts"]) == 2
        )
        first = build["attempts"][0]["id"]
        process = subprocess.Popen(
            [sys.executable, "-m", "p2pbuild", "builds", "logs", submitted["id"][:10],
             "--follow", "--attempt", str(first), "--client-config", str(farm.client_config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # Streaming the live log, both builds in their sleep.
        streamed = await read_until(process.stdout, "+ sleep 12")
        await wait_log(farm, build, farm.node_name(build["attempts"][1]["node"]), b"+ sleep 12")
        farm.kill("dispatcher")
        assert await farm.wait_exit("dispatcher") == -9
        noticed = await read_until(process.stderr, "reconnecting")
        await farm.start("dispatcher")
        status, out, err = await finish(process, 90, (streamed, noticed))
    assert status == 0, (out[-2000:], err)
    assert "reconnecting" in err, err
    # One build's live log, whole, each line once.
    assert out.count("+ sleep 12") == 1, out
    assert out.count("Executing(%build)") == 1, out
