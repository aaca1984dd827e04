"""``p2pbuild submit --wait`` as a packager runs it: a real child process following a real
farm's build through long quiet stretches and a dispatcher restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from e2e_farm import farm_of

from p2pbuild.testing import LocalFarm, NodeSpec, hello_srpm

pytestmark = pytest.mark.slow



def submit_wait(farm: LocalFarm, source: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "p2pbuild", "submit", str(source), "--wait",
         "--client-config", str(farm.client_config), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


async def finish(process: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    with trio.fail_after(timeout):
        while process.poll() is None:
            await trio.sleep(0.2)
    out, err = process.communicate()
    return process.returncode, out, err


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
        await farm.wait_build(
            build_id, lambda b: sum(a["state"] == "running" for a in b["attempts"]) == 2
        )
        farm.kill("dispatcher")
        assert await farm.wait_exit("dispatcher") == -9
        await trio.sleep(1.0)
        await farm.start("dispatcher")
        status, out, err = await finish(process, 90)
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
        await trio.sleep(3)  # streaming the live log, the build in its sleep
        farm.kill("dispatcher")
        assert await farm.wait_exit("dispatcher") == -9
        await trio.sleep(1.0)
        await farm.start("dispatcher")
        status, out, err = await finish(process, 90)
    assert status == 0, (out[-2000:], err)
    assert "reconnecting" in err, err
    # One build's live log, whole, each line once.
    assert out.count("+ sleep 12") == 1, out
    assert out.count("Executing(%build)") == 1, out
