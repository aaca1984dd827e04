"""Attacks on jobs and results, over real HTTPS on loopback: each fails, honest nodes still
verify the build, nothing unverified is stored, and the refusal is counted (the node's
``rejected`` counters, the dispatcher engine's ``node_errors``)."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from engine_waits import wait_attempts, wait_build
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from p2pbuild import (
    BuildType,
    Domain,
    FileDigest,
    Job,
    JobSpec,
    MalformedError,
    Result,
    ResultState,
    SourceArtifact,
    Target,
)
from p2pbuild._codec import encode
from p2pbuild.dispatcher._db import AttemptState, BuildState, Database
from p2pbuild.dispatcher._engine import BuildRequest, Engine, EngineConfig
from p2pbuild.dispatcher._nodes import StaticFinder
from p2pbuild.dispatcher._sink import RepositorySink
from p2pbuild.https import CertificatePinError, generate_tls_material, pinned_client, serve_asgi
from p2pbuild.node._api import NodeApiConfig
from p2pbuild.node._archive import extract_tar_gz
from p2pbuild.node._errors import ArchiveLimitError, UnsafeArchiveError
from p2pbuild.testing import make_trust_list
from p2pbuild.testing._farm import node_entry, start_push_node
from p2pbuild.testing._runner import InstantRunner

pytestmark = pytest.mark.slow

NODES = [("alice-1", "alice"), ("bob-1", "bob"), ("mallory-1", "mallory"),
         ("mallory-2", "mallory")]
FIXTURE = make_trust_list(nodes=NODES, label="adv-")
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
MALLORY = FIXTURE.nodes["mallory-1"]
SOURCE = b"source bytes; the instant runner never reads them\n"
GOOD = b"hello\n"


def _job(node: object, **kwargs: object) -> Job:
    spec = JobSpec(
        source=SourceArtifact("hello.tar.gz", 3, hashlib.sha256(b"abc").digest()),
        build_type=BuildType.MAKE, target=Target("x86_64", "fedora-41"),
    )
    args: dict[str, object] = {"issued_at": int(time.time()), "lifetime": 600, "node": node}
    args.update(kwargs)
    identity = args.pop("identity", DISPATCHER)
    return Job.create(identity, spec, **args)  # type: ignore[arg-type]


# -- the node refuses hostile jobs -----------------------------------------------------------------


async def test_node_refuses_replayed_misaddressed_forged_and_endless_jobs(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    node = await start_push_node(nursery, tmp_path / "alice", FIXTURE.nodes["alice-1"],
                                 FIXTURE.trust_list, InstantRunner())
    me = node.identity.public_key
    job = _job(me)
    forged = bytearray(job.to_bytes())
    forged[-10] ^= 1
    outsider = make_trust_list(label="outsider-").dispatchers["dispatcher-1"]
    async with pinned_client(node.tls.sha256, base_url=node.url) as client:
        async def post(body: bytes) -> httpx.Response:
            return await client.post("/v1/jobs", content=body,
                                      headers={"content-type": "application/msgpack"})

        assert (await post(job.to_bytes())).status_code == 202
        cases = {
            "replayed": (job.to_bytes(), 409),
            "wrong-node": (_job(FIXTURE.nodes["bob-1"].public_key).to_bytes(), 421),
            "bad-signature": (bytes(forged), 401),
            "untrusted-key": (_job(me, identity=outsider).to_bytes(), 401),
            "expired": (_job(me, issued_at=int(time.time()) - 7200).to_bytes(), 410),
            "malformed": (b"\x99garbage", 400),
        }
        for code, (body, status) in cases.items():
            response = await post(body)
            assert (response.status_code, response.json()["error"]) == (status, code)

        async def endless() -> AsyncIterator[bytes]:
            while True:
                yield b"\x00" * 65536
                await trio.sleep(0)

        # The node answers 413 once the body passes 16 KiB and closes the connection; the
        # client, still sending, may see the close before the answer.
        try:
            response = await client.post("/v1/jobs", content=endless(),
                                         headers={"content-type": "application/msgpack"})
            assert (response.status_code, response.json()["error"]) == (413, "oversize")
        except httpx.TransportError:
            pass
        # The node keeps working for honest dispatchers.
        assert (await post(_job(me).to_bytes())).status_code == 202
    rejected = dict(node.service.statistics().rejected)
    for code in (*cases, "oversize"):
        assert rejected.get(code, 0) >= 1, code


async def test_tls_certificate_that_does_not_match_the_pin_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    node = await start_push_node(nursery, tmp_path / "alice", FIXTURE.nodes["alice-1"],
                                 FIXTURE.trust_list, InstantRunner())
    (tmp_path / "impostor").mkdir()
    impostor = generate_tls_material(tmp_path / "impostor")
    async with pinned_client(impostor.sha256, base_url=node.url) as client:
        with pytest.raises(CertificatePinError) as caught:
            await client.post("/v1/jobs", content=_job(node.identity.public_key).to_bytes())
    assert caught.value.code == "tls-pin-mismatch"
    # Nothing reached the node: the connection was closed before the request was sent.
    assert node.service.statistics().accepted == 0


# -- the dispatcher refuses hostile results --------------------------------------------------------


def _traversal_result(job: Job) -> bytes:
    """A genuinely signed result whose artifact name climbs out of the directory."""
    unsigned = [1, job.job_id, job.sha256, MALLORY.public_key.raw, "succeeded", 0, 1, 2, {},
                [["../../etc/cron.d/evil", 6, hashlib.sha256(GOOD).digest()]], []]
    signature = MALLORY.sign(Domain.RESULT, encode(unsigned))
    return encode([*unsigned, signature])


class HostileNode:
    """A node of operator mallory that accepts every job and then misbehaves in ``mode``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.jobs: dict[str, Job] = {}

    def result(self, job: Job) -> bytes:
        identity = FIXTURE.nodes["mallory-2"] if self.mode == "wrong-key" else MALLORY
        if self.mode == "traversal":
            return _traversal_result(job)
        return Result.create(
            identity, job, state=ResultState.SUCCEEDED, exit_code=0, started_ms=1, ended_ms=2,
            environment={}, artifacts=[FileDigest("out/hello.txt", len(GOOD),
                                                  hashlib.sha256(GOOD).digest())], logs=[],
        ).to_bytes()

    def app(self) -> Starlette:
        async def submit(request: Request) -> Response:
            job = Job.from_bytes(await request.body())
            self.jobs[job.id_hex] = job
            return JSONResponse({"job_id": job.id_hex, "phase": "running"}, status_code=202)

        async def status(request: Request) -> Response:
            return JSONResponse({"phase": "done", "state": "succeeded"})

        async def log(request: Request) -> Response:
            return Response(b"")

        async def result(request: Request) -> Response:
            job = self.jobs[request.path_params["id"]]
            if self.mode == "endless-result":
                async def endless() -> AsyncIterator[bytes]:
                    while True:
                        yield b"\x01" * 65536
                        await trio.sleep(0)
                return StreamingResponse(endless(), media_type="application/msgpack")
            return Response(self.result(job), media_type="application/msgpack")

        async def artifact(request: Request) -> Response:
            if self.mode == "endless-artifact":
                async def endless() -> AsyncIterator[bytes]:
                    while True:
                        yield b"\x02" * 65536
                        await trio.sleep(0)
                return StreamingResponse(endless())
            # The signed digest is GOOD's; the bytes served are not.
            return Response(b"pwned\n" if self.mode == "digest-mismatch" else GOOD)

        async def cancel(request: Request) -> Response:
            return JSONResponse({"collected": True})

        return Starlette(routes=[
            Route("/v1/jobs", submit, methods=["POST"]),
            Route("/v1/jobs/{id}", status, methods=["GET"]),
            Route("/v1/jobs/{id}", cancel, methods=["DELETE"]),
            Route("/v1/jobs/{id}/log", log),
            Route("/v1/jobs/{id}/result", result),
            Route("/v1/jobs/{id}/artifacts/{name:path}", artifact),
        ])


EXPECTED_ERROR = {
    "wrong-key": "bad-result",
    "traversal": "bad-result",
    "digest-mismatch": "artifact-digest-mismatch",
    "endless-result": "bad-result",
    "endless-artifact": "artifact-digest-mismatch",
    "pin-mismatch": "node-unreachable",
}


@pytest.mark.parametrize("mode", sorted(EXPECTED_ERROR))
async def test_hostile_node_is_caught_and_honest_nodes_verify(
    nursery: trio.Nursery, tmp_path: Path, mode: str
) -> None:
    hostile = HostileNode(mode)
    (tmp_path / "mallory-tls").mkdir()
    tls = generate_tls_material(tmp_path / "mallory-tls")
    port = await nursery.start(serve_asgi, hostile.app(), NodeApiConfig(tls=tls))
    pin = hashlib.sha256(b"not the certificate").digest() if mode == "pin-mismatch" else tls.sha256
    finder = StaticFinder(FIXTURE.trust_list)
    alice = await start_push_node(nursery, tmp_path / "alice", FIXTURE.nodes["alice-1"],
                                  FIXTURE.trust_list, InstantRunner(artifacts={
                                      "out/hello.txt": GOOD}))
    bob = await start_push_node(nursery, tmp_path / "bob", FIXTURE.nodes["bob-1"],
                                FIXTURE.trust_list, InstantRunner(artifacts={
                                    "out/hello.txt": GOOD}))
    finder.put(alice.entry())
    capability = alice.capability()
    from attrs import evolve
    finder.put(node_entry(MALLORY, evolve(capability, endpoint=f"https://127.0.0.1:{port}",
                                          tls_sha256=pin), alice.status()))
    engine = Engine(
        db=Database.open(tmp_path / "dispatcher.db"), identity=DISPATCHER,
        trust_list=FIXTURE.trust_list, finder=finder, sink=RepositorySink(tmp_path / "repo"),
        config=EngineConfig(state_dir=tmp_path / "state", follow_interval_s=0.5,
                            unreachable_after_s=0.5, backoff_base_s=0.05, backoff_max_s=0.2,
                            node_retry_base_s=0.2, no_node_wait_s=10.0, node_timeout_s=3.0,
                            submit_tries=2),
        rng=random.Random(1),
    )
    await nursery.start(engine.run)
    engine.sources.root.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(SOURCE).hexdigest()
    engine.sources.path(sha).write_bytes(SOURCE)
    build = engine.accept(BuildRequest(source_name="hello-1.0-1.src.rpm", source_sha256=sha,
                                       source_size=len(SOURCE)), "user-1", None)
    with trio.fail_after(30):
        # alice and mallory are the only two operators listed: both get the job.
        await wait_attempts(engine, build.id,
                            lambda rows: any(a.state is AttemptState.LOST for a in rows))
        finder.put(bob.entry())
        await wait_build(engine, build.id, lambda b: b.state.terminal)
    done = engine.db.build(build.id)
    assert done.state is BuildState.VERIFIED, done.reason
    attempts = engine.db.attempts(build.id)
    lost = [a for a in attempts if a.state is AttemptState.LOST]
    assert [a.operator for a in lost] == ["mallory"]
    assert lost[0].reason.startswith(EXPECTED_ERROR[mode]), lost[0].reason
    assert dict(engine.statistics().node_errors).get(EXPECTED_ERROR[mode], 0) >= 1
    verified = {a.operator for a in attempts if a.state is AttemptState.SUCCEEDED}
    assert verified == {"alice", "bob"}
    # Only verified bytes are stored, and nothing outside the repository was written.
    stored = Path(done.sink_path)
    assert (stored / "artifacts" / "out" / "hello.txt").read_bytes() == GOOD
    assert not (tmp_path / "etc").exists()
    files = [p for p in (tmp_path / "repo").rglob("*") if p.is_file()]
    assert all(b"pwned" not in p.read_bytes() for p in files)
    mallory = str(MALLORY.public_key)
    assert engine.ratings.ratings(engine.clock())[mallory].success < 0.9


def test_result_with_a_traversal_name_does_not_parse() -> None:
    job = _job(MALLORY.public_key)
    with pytest.raises(MalformedError):
        Result.from_bytes(_traversal_result(job))


# -- source archives -------------------------------------------------------------------------------


def _tarball(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=9) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_source_archive_bombs_and_escapes_are_refused(tmp_path: Path) -> None:
    bomb = _tarball([("src/zeros", b"\x00" * (64 * 1024 * 1024))])
    assert len(bomb) < 200_000  # 64 MiB in under 200 KB: a compression bomb
    (tmp_path / "bomb.tar.gz").write_bytes(bomb)
    with pytest.raises(ArchiveLimitError) as caught:
        extract_tar_gz(tmp_path / "bomb.tar.gz", tmp_path / "out1", max_members=100,
                       max_bytes=8 * 1024 * 1024)
    assert caught.value.code == "archive-limit"
    written = sum(p.stat().st_size for p in (tmp_path / "out1").rglob("*") if p.is_file())
    assert written <= 8 * 1024 * 1024
    many = _tarball([(f"src/f{i}", b"") for i in range(500)])
    (tmp_path / "many.tar.gz").write_bytes(many)
    with pytest.raises(ArchiveLimitError):
        extract_tar_gz(tmp_path / "many.tar.gz", tmp_path / "out2", max_members=100,
                       max_bytes=1024)
    escape = _tarball([("src/ok", b"x"), ("../../escaped", b"owned")])
    (tmp_path / "escape.tar.gz").write_bytes(escape)
    with pytest.raises(UnsafeArchiveError):
        extract_tar_gz(tmp_path / "escape.tar.gz", tmp_path / "out3", max_members=100,
                       max_bytes=1024)
    assert not (tmp_path.parent / "escaped").exists()
    assert not list(tmp_path.parent.glob("**/escaped"))
