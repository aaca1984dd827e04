"""The node daemon over real sockets: DHT on UDP, job API on HTTPS, real builds in bwrap."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from waits import ended_result, follow_log, ready_line

from p2pbuild import (
    BuildType,
    Job,
    JobSpec,
    ResultState,
    SignedRecord,
    SourceArtifact,
    Status,
    Target,
)
from p2pbuild.dht import Directory, Query, node_key, open_directory
from p2pbuild.https import pinned_client
from p2pbuild.node._api import control_header
from p2pbuild.node._daemon import NodeDaemon
from p2pbuild.testing import (
    hello_srpm,
    make_identity,
    make_trust_list,
    network_probe_srpm,
)
from p2pbuild.testing._nodes import node_config, open_node_daemons, serve_files
from p2pbuild.testing._runner import InstantRunner

pytestmark = pytest.mark.slow

FIXTURE = make_trust_list(nodes=(("node-1", "alice"), ("node-2", "bob")))
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
NODE_1 = FIXTURE.nodes["node-1"]
NODE_2 = FIXTURE.nodes["node-2"]


def client(daemon: NodeDaemon) -> httpx.AsyncClient:
    assert daemon.tls is not None
    return pinned_client(daemon.tls.sha256, base_url=daemon.endpoint, timeout=10)


def make_job(daemon: NodeDaemon, **kwargs: object) -> Job:
    """A small make job for ``daemon``'s platform; InstantRunner never fetches it."""
    identity = kwargs.pop("identity", DISPATCHER)
    spec = kwargs.pop("spec", None) or JobSpec(
        SourceArtifact("a.tar.gz", 3, hashlib.sha256(b"abc").digest(), "https://x.invalid/a"),
        BuildType.MAKE,
        Target(daemon.detected.arch, daemon.detected.os),
    )
    args: dict[str, object] = {"issued_at": int(time.time()), "lifetime": 600}
    args.update(kwargs)
    return Job.create(identity, spec, **args)  # type: ignore[arg-type]


async def post(c: httpx.AsyncClient, data: bytes) -> httpx.Response:
    return await c.post("/v1/jobs", content=data, headers={"content-type": "application/msgpack"})


def srpm_job(daemon: NodeDaemon, url: str, path: Path, digest: str, job_id: bytes) -> Job:
    spec = JobSpec(
        SourceArtifact(path.name, path.stat().st_size, bytes.fromhex(digest), url),
        BuildType.RPM,
        Target(daemon.detected.arch, daemon.detected.os),
        options={"check": True, "jobs": 1},
        time_limit_s=120,
    )
    return Job.create(
        DISPATCHER, spec, issued_at=int(time.time()), lifetime=600, job_id=job_id,
        node=daemon.public_key,
    )


async def test_two_nodes_build_the_same_srpm_bit_identically(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    sources = tmp_path / "sources"
    sources.mkdir()
    package = hello_srpm(sources)
    url, _ = await nursery.start(serve_files, sources, tmp_path / "files-tls")
    async with open_node_daemons(tmp_path, [NODE_1, NODE_2], FIXTURE.trust_list) as daemons:
        results = []
        job_id = os.urandom(16)  # the same job id on both: one build, two nodes
        async with trio.open_nursery() as builds:

            async def build(daemon: NodeDaemon) -> None:
                job = srpm_job(daemon, f"{url}/{package.path.name}", package.path,
                               package.sha256, job_id)
                async with client(daemon) as c:
                    assert (await post(c, job.to_bytes())).status_code == 202
                    result = await ended_result(c, job, timeout=90)
                    result.check_answers(job, daemon.public_key)
                    log = (await c.get(f"/v1/jobs/{job.id_hex}/log")).text
                    assert result.state is ResultState.SUCCEEDED, log
                    for item in result.artifacts:
                        body = (await c.get(f"/v1/jobs/{job.id_hex}/artifacts/{item.name}"))
                        assert hashlib.sha256(body.content).digest() == item.sha256
                results.append(result)

            for daemon in daemons:
                builds.start_soon(build, daemon)
    first, second = results
    assert first.node != second.node
    assert [a.name for a in first.artifacts] == [
        f"hello-1.0-1.{daemons[0].detected.arch}.rpm"
    ]
    assert first.artifacts == second.artifacts  # names, sizes and SHA-256 digests


async def test_a_job_reaching_for_the_network_fails(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with open_node_daemons(tmp_path, [NODE_1], FIXTURE.trust_list) as (daemon,):
        # The probe targets the node's own HTTPS port, which listens on the host.
        assert daemon.api_port is not None
        sources = tmp_path / "sources"
        sources.mkdir()
        package = network_probe_srpm(sources, "127.0.0.1", daemon.api_port)
        url, _ = await nursery.start(serve_files, sources, tmp_path / "files-tls")
        job = srpm_job(daemon, f"{url}/{package.path.name}", package.path, package.sha256,
                       os.urandom(16))
        async with client(daemon) as c:
            assert (await post(c, job.to_bytes())).status_code == 202
            result = await ended_result(c, job, timeout=60)
            log = (await c.get(f"/v1/jobs/{job.id_hex}/log")).text
        assert result.state is ResultState.FAILED, log
        assert "\nNETWORK-REACHED\n" not in log  # (the command line itself is echoed)
        assert "Connection refused" in log or "Network is unreachable" in log
        assert result.artifacts == ()


async def test_bad_jobs_are_refused_with_their_status_and_the_node_keeps_serving(
    tmp_path: Path,
) -> None:
    stranger = make_identity("not-on-the-list", DISPATCHER.role)
    async with open_node_daemons(
        tmp_path, [NODE_1], FIXTURE.trust_list, runner=lambda _: InstantRunner()
    ) as (daemon,):
        good = make_job(daemon)
        forged = bytearray(make_job(daemon).to_bytes())
        forged[-1] ^= 1  # the signature's last byte
        other_arch = JobSpec(good.spec.source, BuildType.MAKE, Target("s390x", "fedora-41"))
        cases = [
            ("forged", bytes(forged), 401, "bad-signature"),
            ("expired", make_job(daemon, issued_at=int(time.time()) - 700).to_bytes(), 410,
             "expired"),
            ("untrusted", make_job(daemon, identity=stranger).to_bytes(), 401, "untrusted-key"),
            ("oversize", b"\x00" * 20_000, 413, "oversize"),
            ("wrong arch", make_job(daemon, spec=other_arch).to_bytes(), 422, "unservable"),
            ("wrong node", make_job(daemon, node=NODE_2.public_key).to_bytes(), 421,
             "wrong-node"),
            ("garbage", b"\x93\x01\x02", 400, "malformed"),
        ]
        async with client(daemon) as c:
            assert (await post(c, good.to_bytes())).status_code == 202
            await ended_result(c, good)
            cases.append(("replayed", good.to_bytes(), 409, "replayed"))
            for name, data, status, code in cases:
                response = await post(c, data)
                assert response.status_code == status, (name, response.text)
                body = response.json()
                assert body["error"] == code, name
                assert "\n" not in response.text.strip()
            # Still serving: a fresh job is accepted and runs.
            fresh = make_job(daemon)
            assert (await post(c, fresh.to_bytes())).status_code == 202
            assert (await ended_result(c, fresh)).state is ResultState.SUCCEEDED
            stats = (await c.get("/v1/status")).json()
        for _, _, _, code in cases:
            assert stats["rejected"][code] >= 1
        assert stats["accepted"] == 2


async def test_garbage_on_the_wire_does_not_kill_the_daemon(tmp_path: Path) -> None:
    async with open_node_daemons(
        tmp_path, [NODE_1], FIXTURE.trust_list, runner=lambda _: InstantRunner()
    ) as (daemon,):
        assert daemon.api_port is not None
        port = daemon.api_port
        # Not TLS at all: plain HTTP and random bytes on the TLS port.
        for data in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096), b"\x16\x03\x01\xff"):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(data)
            with trio.move_on_after(0.5):
                try:
                    while await stream.receive_some(4096):
                        pass
                except trio.BrokenResourceError:
                    pass
            await stream.aclose()
        # TLS, then garbage instead of HTTP.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context)
        await tls.send_all(b"\x00\xff NOT HTTP \r\n\r\n" * 100)
        with trio.move_on_after(2):
            try:
                while await tls.receive_some(4096):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await tls.aclose()
        # An unknown path, a bad method, a huge header.
        async with client(daemon) as c:
            assert (await c.get("/nope")).status_code == 404
            assert (await c.put("/v1/jobs")).status_code == 405
        async with client(daemon) as c:
            try:
                huge = await c.get("/v1/status", headers={"x-pad": "a" * 400_000})
            except httpx.HTTPError:
                pass  # dropped: fine
            else:
                assert huge.status_code in (400, 413, 431)
        async with client(daemon) as c:
            job = make_job(daemon)
            assert (await post(c, job.to_bytes())).status_code == 202
            assert (await ended_result(c, job)).state is ResultState.SUCCEEDED


async def test_restart_keeps_finished_results_and_still_refuses_replays(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    gate = trio.Event()
    config = node_config(tmp_path / "node", NODE_1, FIXTURE.trust_list)
    scope = trio.CancelScope()

    async def run_daemon(
        runner: InstantRunner, task_status: trio.TaskStatus[NodeDaemon]
    ) -> None:
        from p2pbuild.node import run_node

        with scope:
            await run_node(config, runner=runner, task_status=task_status)

    daemon: NodeDaemon = await nursery.start(run_daemon, InstantRunner())
    first_seq = daemon.status_record.seq if daemon.status_record else 0
    async with client(daemon) as c:
        finished = make_job(daemon)
        assert (await post(c, finished.to_bytes())).status_code == 202
        result = await ended_result(c, finished)
        artifact = result.artifacts[0]
    # A second node run, with a build that is still going when the daemon is cancelled.
    scope.cancel()
    await daemon.wait_stopped()
    scope = trio.CancelScope()
    daemon = await nursery.start(run_daemon, InstantRunner(gate=gate))
    async with client(daemon) as c:
        running = make_job(daemon)
        assert (await post(c, running.to_bytes())).status_code == 202
        with trio.fail_after(10):  # at the gate, after its first log line
            await follow_log(c, running, until=b"building\n")
        assert (await c.get(f"/v1/jobs/{running.id_hex}")).json()["phase"] == "running"
    scope.cancel()
    await daemon.wait_stopped()

    scope = trio.CancelScope()
    daemon = await nursery.start(run_daemon, InstantRunner())
    assert daemon.status_record is not None and daemon.status_record.seq > first_seq
    async with client(daemon) as c:
        again = await ended_result(c, finished)
        assert again.raw == result.raw
        body = await c.get(f"/v1/jobs/{finished.id_hex}/artifacts/{artifact.name}")
        assert hashlib.sha256(body.content).digest() == artifact.sha256
        response = await post(c, finished.to_bytes())
        assert response.status_code == 409
        assert response.json()["error"] == "replayed"
        handed_back = await ended_result(c, running)
        assert handed_back.state is ResultState.HANDED_BACK
        assert (await post(c, running.to_bytes())).status_code == 409
        # Collected: DELETE of a finished job forgets it and its files.
        order = control_header(DISPATCHER, finished.job_id, int(time.time()))
        collected = await c.delete(f"/v1/jobs/{finished.id_hex}",
                                   headers={"authorization": order})
        assert collected.json()["collected"] is True
        assert (await c.get(f"/v1/jobs/{finished.id_hex}/result")).status_code == 404
    scope.cancel()


def _status_of(records: list[SignedRecord]) -> Status | None:
    statuses = [r for r in records if isinstance(r.body, Status)]
    if not statuses:
        return None
    body = max(statuses, key=lambda r: r.seq).body
    assert isinstance(body, Status)
    return body


async def _find(directory: Directory, arch: str) -> list[str]:
    """Who publishes ``arch``: the node's ready line comes after its first publish."""
    with trio.fail_after(10):
        found = await directory.find(Query(arch=arch))
    return [str(entry.publisher) for entry in found]


async def test_node_init_and_run_as_a_child_process(tmp_path: Path) -> None:
    node_dir = tmp_path / "node"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    python = [sys.executable, "-m", "p2pbuild"]
    done = await trio.run_process(
        [*python, "node", "init", "--dir", str(node_dir), "--operator", "alice",
         "--pool", "team-a"],
        capture_stdout=True, env=env,
    )  # fmt: skip
    assert b"public key:" in done.stdout
    assert (node_dir / "node.key").stat().st_mode & 0o777 == 0o600
    assert (node_dir / "tls" / "tls-cert.pem").exists()
    assert (node_dir / "tls" / "tls-key.pem").stat().st_mode & 0o777 == 0o600
    text = (node_dir / "node.toml").read_text()
    assert text.startswith("# p2pbuild volunteer node configuration.")

    # Trust the generated key, and point the node at a DHT started here.
    from p2pbuild import PublicKey, TrustEntry
    from p2pbuild.testing import make_trust_list as make

    public = PublicKey.from_text((node_dir / "node.key.pub").read_text().split()[0])
    fixture = make(nodes=())
    trust = fixture.trust_list
    entries = tuple(sorted([*trust.entries, TrustEntry(public, "node", "alice")],
                           key=lambda e: e.key))
    import attrs

    trust = attrs.evolve(trust, entries=entries, signatures=())
    for maintainer in fixture.maintainers[: trust.threshold]:
        trust = trust.sign(maintainer)
    (node_dir / "trust-list.bin").write_bytes(trust.to_bytes())

    async with open_directory("127.0.0.1", 0) as seed:
        host, port = seed.address
        text = (
            text.replace('bind = "0.0.0.0:7420"', 'bind = "127.0.0.1:0"')
            .replace('bind = "0.0.0.0:8443"', 'bind = "127.0.0.1:0"')
            .replace("bootstrap = []", f'bootstrap = ["{host}:{port}"]')
            .replace("status_interval_s = 60", "status_interval_s = 1")
        )
        (node_dir / "node.toml").write_text(text)
        config = str(node_dir / "node.toml")
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                lambda task_status: trio.run_process(
                    [*python, "node", "run", "--config", config],
                    stdout=trio.subprocess.PIPE if hasattr(trio, "subprocess") else -1,
                    check=False, env=env, task_status=task_status,
                )
            )  # fmt: skip
            ready = await ready_line(process, "node run", timeout=20)
            assert ready["node"] == str(public)
            assert ready["endpoint"].startswith("https://127.0.0.1:")
            assert str(public) in await _find(seed, ready["arch"])
            found = await seed.find(Query(pool="team-a"))
            assert [str(e.publisher) for e in found] == [str(public)]

            # node status, live over the pinned local API.
            status = await trio.run_process(
                [*python, "node", "status", "--config", config, "--json"],
                capture_stdout=True, env=env,
            )  # fmt: skip
            report = json.loads(status.stdout)
            assert report["running"] is True and report["node"] == str(public)

            process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                await process.wait()
            assert process.returncode == 0
        records = await seed.get(node_key(public))
        last = _status_of(records)
        assert last is not None and last.draining is True
        assert not (node_dir / "run.json").exists()
    status = await trio.run_process(
        [*python, "node", "status", "--config", config, "--json"], capture_stdout=True, env=env
    )
    report = json.loads(status.stdout)
    assert report["running"] is False
    assert report["state"]["starts"] == 1
