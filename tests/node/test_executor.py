"""The build executors, for real: rpmbuild and make inside bubblewrap on this machine."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest
import trio
from waits import wait_until

from p2pbuild import RemoteError
from p2pbuild.node import (
    BUILDHOST,
    BadBuildSpecError,
    BadSourceError,
    BuildOutcome,
    BuildSpec,
    BuildState,
    BuildType,
    Executor,
    Limits,
    SourceDigestError,
    UnsafeArchiveError,
    run_build,
)
from p2pbuild.testing import (
    FIXED_EPOCH,
    SourcePackage,
    disk_filler_tarball,
    hello_srpm,
    hello_tarball,
    network_probe_command,
    network_probe_srpm,
    network_probe_tarball,
    output_flood_tarball,
    sleeper_tarball,
    write_tarball,
)

LIMITS = Limits(time_limit=60, max_output_bytes=1 << 20, max_disk_bytes=256 << 20)
# The changelog date of every generated SRPM: rpm stores it as noon UTC of that day.
CHANGELOG_EPOCH = FIXED_EPOCH + 12 * 3600


def _spec(kind: BuildType, source: SourcePackage, **options: object) -> BuildSpec:
    return BuildSpec(kind, source.path, source.sha256, **options)  # type: ignore[arg-type]


def _log(outcome: BuildOutcome) -> bytes:
    return outcome.logs[0].path.read_bytes()


def _processes_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    return pids


async def test_sandbox_check_reports_bwrap_version(tmp_path: Path) -> None:
    version = await Executor(tmp_path / "work").check()
    assert version[0].isdigit()
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("noarch", [False, True], ids=["arch", "noarch"])
async def test_same_srpm_on_two_nodes_gives_identical_rpms(tmp_path: Path, noarch: bool) -> None:
    srpm = hello_srpm(tmp_path / "srpm", noarch=noarch)
    spec = _spec(BuildType.RPM, srpm)
    outcomes: dict[str, BuildOutcome] = {}
    copies: dict[str, dict[str, bytes]] = {}

    async def node(name: str) -> None:
        # Two executors with their own work roots: what two volunteers' machines do.
        executor = Executor(tmp_path / name, LIMITS)
        async with executor.build(spec) as outcome:
            outcomes[name] = outcome
            copies[name] = {a.name: a.path.read_bytes() for a in outcome.artifacts}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(node, "node-a")
        nursery.start_soon(node, "node-b")

    a, b = outcomes["node-a"], outcomes["node-b"]
    assert a.state is b.state is BuildState.SUCCEEDED, _log(a)[-2000:]
    arch = "noarch" if noarch else os.uname().machine
    name = f"hello{'-noarch' if noarch else ''}-1.0-1.{arch}.rpm"
    assert [f.name for f in a.artifacts] == [name]
    assert [(f.name, f.size, f.sha256) for f in a.artifacts] == [
        (f.name, f.size, f.sha256) for f in b.artifacts
    ]
    assert copies["node-a"] == copies["node-b"]  # bit for bit, not just the digests
    assert a.source_date_epoch == CHANGELOG_EPOCH
    assert a.to_wire()["artifacts"] == b.to_wire()["artifacts"]
    assert {"arch", "bwrap", "os_id", "os_version_id", "rpm"} <= set(a.environment)

    # The reproducibility macros took effect.
    rpm_file = tmp_path / name
    rpm_file.write_bytes(copies["node-a"][name])
    query = subprocess.run(
        ["rpm", "-qp", "--nosignature", "--qf", "%{BUILDHOST} %{BUILDTIME}", str(rpm_file)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert query.stdout == f"{BUILDHOST} {CHANGELOG_EPOCH}"
    # Both work roots are gone with the `async with` blocks.
    assert list((tmp_path / "node-a").iterdir()) == []
    assert list((tmp_path / "node-b").iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", [BuildType.RPM, BuildType.MAKE])
async def test_the_sandbox_has_no_network(tmp_path: Path, kind: BuildType) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted = 0

    async def accept() -> None:
        nonlocal accepted
        while True:
            stream = await listeners[0].accept()
            accepted += 1
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        # Control: the very same probe, outside the sandbox, reaches the listener.
        control = await trio.run_process(
            network_probe_command("127.0.0.1", port), capture_stdout=True, check=False
        )
        assert control.returncode == 0
        assert b"NETWORK-REACHED" in control.stdout
        await trio.testing.wait_all_tasks_blocked()
        assert accepted == 1

        if kind is BuildType.RPM:
            source = network_probe_srpm(tmp_path / "srpm", "127.0.0.1", port)
        else:
            source = network_probe_tarball(tmp_path / "probe.tar.gz", "127.0.0.1", port)
        outcome = await run_build(_spec(kind, source), tmp_path / "work", LIMITS)
        nursery.cancel_scope.cancel()

    log = _log(outcome)
    assert outcome.state is BuildState.FAILED
    assert b"\nNETWORK-REACHED\n" not in log  # the echo of the command line is fine
    assert b"Connection refused" in log or b"unreachable" in log
    assert accepted == 1


@pytest.mark.slow
async def test_make_build_runs_configure_make_and_check(tmp_path: Path) -> None:
    source = hello_tarball(tmp_path / "hello.tar.gz")
    lines: list[bytes] = []

    async def follow(chunk: bytes) -> None:
        lines.append(chunk)

    outcome = await run_build(_spec(BuildType.MAKE, source), tmp_path / "w", LIMITS, log=follow)
    log = _log(outcome)
    assert outcome.state is BuildState.SUCCEEDED, log
    assert outcome.exit_status == 0
    assert b"configured" in log
    assert b"make check passed" in log
    assert b"".join(lines) == log  # followed live, byte for byte
    [artifact] = outcome.artifacts
    assert artifact.name == "hello"
    assert artifact.path.read_bytes() == b'#!/bin/sh\necho "hello from p2pbuild"\n'
    assert outcome.source_date_epoch == FIXED_EPOCH
    assert outcome.environment["make"].startswith("GNU Make")
    assert not (tmp_path / "w" / "scratch").exists()
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["input", "results"]

    skipped = await run_build(_spec(BuildType.MAKE, source, check=False), tmp_path / "w2", LIMITS)
    assert skipped.state is BuildState.SUCCEEDED
    assert b"make check passed" not in _log(skipped)


@pytest.mark.slow
async def test_the_sandbox_hides_the_host(tmp_path: Path) -> None:
    checks = [
        "test ! -e /etc/shadow",
        "test ! -e /root",
        "test ! -e /home",
        f"test ! -e {tmp_path}",
        "! touch /usr/p2pbuild-escape 2>/dev/null",
        'test "$$(cat /proc/sys/kernel/hostname)" = p2pbuild',
        'test "$$HOME" = /build/home',
        'test -z "$${SSH_AUTH_SOCK:-}"',
        "touch /tmp/ok /build/ok",
        "test -e /build/tmp/ok",
        "echo ALL-CHECKS-PASSED",
    ]
    makefile = "all:\n" + "".join(f"\t{c}\n" for c in checks) + "check:\n\ttrue\n"
    source = write_tarball(tmp_path / "probe.tar.gz", "probe-1.0", {"Makefile": makefile})
    outcome = await run_build(_spec(BuildType.MAKE, source), tmp_path / "w", LIMITS)
    assert outcome.state is BuildState.SUCCEEDED, _log(outcome)
    assert b"ALL-CHECKS-PASSED" in _log(outcome)


@pytest.mark.slow
async def test_time_limit_kills_the_whole_process_tree(tmp_path: Path) -> None:
    marker = str(secrets.randbelow(10**12)).zfill(12)
    source = sleeper_tarball(tmp_path / "sleeper.tar.gz", marker)
    limits = Limits(time_limit=2.0, max_disk_bytes=64 << 20)
    outcome: BuildOutcome | None = None

    async def build() -> None:
        nonlocal outcome
        outcome = await run_build(_spec(BuildType.MAKE, source), tmp_path / "w", limits)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(build)
        # Not vacuous: the sleepers, daemonized ones included, do run before the limit.
        await wait_until(lambda: len(_processes_with(marker)) >= 4, 10,
                         "the four sleepers run")
    assert outcome is not None
    assert outcome.state is BuildState.TIMED_OUT
    assert outcome.reason == "time"
    assert 2000 <= outcome.timings.duration_ms < 6000
    await wait_until(lambda: not _processes_with(marker), 5, "every sleeper is gone")
    assert not (tmp_path / "w" / "scratch").exists()


@pytest.mark.slow
async def test_cancelling_a_build_kills_it_and_cleans_up(tmp_path: Path) -> None:
    marker = str(secrets.randbelow(10**12)).zfill(12)
    source = sleeper_tarball(tmp_path / "sleeper.tar.gz", marker)
    executor = Executor(tmp_path / "work", LIMITS)
    with trio.move_on_after(1.5):
        async with executor.build(_spec(BuildType.MAKE, source)):
            pytest.fail("the build cannot finish")
    await wait_until(lambda: not _processes_with(marker), 5, "every sleeper is gone")
    assert list((tmp_path / "work").iterdir()) == []
    assert executor.statistics().busy == 0


@pytest.mark.slow
async def test_output_limit_caps_the_log_and_stops_the_build(tmp_path: Path) -> None:
    source = output_flood_tarball(tmp_path / "flood.tar.gz")
    cap = 64 * 1024
    followed: list[bytes] = []

    async def follow(chunk: bytes) -> None:
        followed.append(chunk)

    limits = Limits(time_limit=30, max_output_bytes=cap, max_disk_bytes=64 << 20)
    outcome = await run_build(_spec(BuildType.MAKE, source), tmp_path / "w", limits, log=follow)
    assert outcome.state is BuildState.LIMIT_EXCEEDED
    assert outcome.reason == "output"
    assert outcome.artifacts == ()
    [log] = outcome.logs
    assert log.size == cap
    assert log.path.read_bytes().endswith(b"output limit reached, build stopped]\n")
    assert b"".join(followed) == log.path.read_bytes()
    assert outcome.timings.duration_ms < 10_000


@pytest.mark.slow
async def test_disk_limit_stops_the_build(tmp_path: Path) -> None:
    source = disk_filler_tarball(tmp_path / "filler.tar.gz")
    limits = Limits(time_limit=30, max_disk_bytes=4 << 20, disk_poll_interval=0.1)
    outcome = await run_build(_spec(BuildType.MAKE, source), tmp_path / "w", limits)
    assert outcome.state is BuildState.LIMIT_EXCEEDED
    assert outcome.reason == "disk"
    assert not (tmp_path / "w" / "scratch").exists()


async def test_source_digest_mismatch_is_rejected(tmp_path: Path) -> None:
    source = hello_tarball(tmp_path / "hello.tar.gz")
    spec = BuildSpec(BuildType.MAKE, source.path, "0" * 64)
    with pytest.raises(SourceDigestError) as info:
        await run_build(spec, tmp_path / "w", LIMITS)
    assert isinstance(info.value, RemoteError)
    assert info.value.code == "source-digest-mismatch"
    assert not (tmp_path / "w" / "scratch").exists()
    assert list((tmp_path / "w" / "input").iterdir()) == []


async def test_unsafe_archive_is_rejected_before_building(tmp_path: Path) -> None:
    source = write_tarball(tmp_path / "evil.tar.gz", "..", {"escaped": "boo"})
    with pytest.raises(UnsafeArchiveError):
        await run_build(_spec(BuildType.MAKE, source), tmp_path / "w", LIMITS)
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "w" / "scratch").exists()


async def test_a_tarball_is_not_a_source_rpm(tmp_path: Path) -> None:
    source = hello_tarball(tmp_path / "hello.tar.gz")
    with pytest.raises(BadSourceError):
        await run_build(_spec(BuildType.RPM, source), tmp_path / "w", LIMITS)
    assert not (tmp_path / "w" / "scratch").exists()


async def test_oversized_source_is_rejected(tmp_path: Path) -> None:
    source = hello_tarball(tmp_path / "hello.tar.gz")
    limits = Limits(max_source_bytes=10)
    with pytest.raises(BadSourceError):
        await run_build(_spec(BuildType.MAKE, source), tmp_path / "w", limits)


@pytest.mark.parametrize(
    "options",
    [
        {"source_sha256": "ABC"},
        {"with_features": ["x; rm -rf /"]},
        {"with_features": ["docs"], "without_features": ["docs"]},
        {"target_arch": "x86_64 --define"},
        {"jobs": 0},
        {"source_date_epoch": -1},
    ],
)
def test_build_spec_rejects_options_outside_the_allow_list(
    tmp_path: Path, options: dict[str, object]
) -> None:
    fields: dict[str, object] = {"source_sha256": "0" * 64, **options}
    with pytest.raises(BadBuildSpecError):
        BuildSpec(BuildType.RPM, tmp_path / "x.src.rpm", **fields)  # type: ignore[arg-type]


def test_make_builds_take_no_rpm_options(tmp_path: Path) -> None:
    with pytest.raises(BadBuildSpecError):
        BuildSpec(BuildType.MAKE, tmp_path / "x.tar.gz", "0" * 64, target_arch="x86_64")


@pytest.mark.slow
async def test_slots_bound_concurrent_builds(tmp_path: Path) -> None:
    source = hello_tarball(tmp_path / "hello.tar.gz")
    executor = Executor(tmp_path / "work", LIMITS, slots=1)
    busiest = 0

    async def one() -> None:
        nonlocal busiest
        async with executor.build(_spec(BuildType.MAKE, source)) as outcome:
            assert outcome.state is BuildState.SUCCEEDED
            busiest = max(busiest, len(list((tmp_path / "work").iterdir())))
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    assert busiest == 1
    assert executor.statistics().slots == 1
    assert list((tmp_path / "work").iterdir()) == []


async def test_builds_outlive_the_thread_that_would_have_started_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bwrap runs with --die-with-parent (PR_SET_PDEATHSIG), which fires when the *thread*
    # that forked it exits. trio's cached worker threads exit after IDLE_TIMEOUT (10 s) of
    # idleness; shortened here, a sandbox started from one was killed within a second. Only
    # the time limit may end this build.
    monkeypatch.setattr(trio._core._thread_cache, "IDLE_TIMEOUT", 0.2)
    source = sleeper_tarball(tmp_path / "sleeper.tar.gz", str(secrets.randbelow(10**12)).zfill(12))
    limits = Limits(time_limit=2.5, max_disk_bytes=64 << 20)
    outcome = await run_build(_spec(BuildType.MAKE, source), tmp_path / "w", limits)
    assert outcome.state is BuildState.TIMED_OUT, _log(outcome)[-400:]
    assert outcome.reason == "time"
    assert outcome.timings.duration_ms >= 2500
