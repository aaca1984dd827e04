"""The node's HTTPS job API over real TLS on loopback, with an in-process runner."""

from __future__ import annotations

import hashlib
import ssl
import time
from pathlib import Path

import attrs
import httpx
import pytest
import trio
from waits import follow_log

from p2pbuild import (
    BuildType,
    Job,
    JobSpec,
    Result,
    ResultState,
    Role,
    SourceArtifact,
    Target,
)
from p2pbuild.https import (
    CertificatePinError,
    TlsMaterial,
    generate_tls_material,
    load_tls_material,
    pinned_client,
)
from p2pbuild.node._api import NodeApiConfig, control_header, serve_node_api
from p2pbuild.node._service import JobService
from p2pbuild.testing import make_identity, make_trust_list
from p2pbuild.testing._runner import InstantRunner

pytestmark = pytest.mark.slow

FIXTURE = make_trust_list()
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
NODE = FIXTURE.nodes["node-1"]
OTHER_NODE = FIXTURE.nodes["node-2"]
SPEC = JobSpec(
    source=SourceArtifact("hello.tar.gz", 3, hashlib.sha256(b"abc").digest()),
    build_type=BuildType.MAKE,
    target=Target("x86_64", "fedora-41"),
)


def make_job(**kwargs: object) -> Job:
    identity = kwargs.pop("identity", DISPATCHER)
    args: dict[str, object] = {
        "issued_at": int(time.time()),
        "lifetime": 600,
        "node": NODE.public_key,
    }
    args.update(kwargs)
    return Job.create(identity, SPEC, **args)  # type: ignore[arg-type]


@attrs.frozen
class Node:
    port: int
    tls: TlsMaterial
    service: JobService
    runner: InstantRunner

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client(self) -> httpx.AsyncClient:
        return pinned_client(self.tls.sha256, base_url=self.url, timeout=10)


async def start_node(
    nursery: trio.Nursery, directory: Path, runner: InstantRunner, **config: object
) -> Node:
    (directory / "tls").mkdir()
    tls = generate_tls_material(directory / "tls", "node-1.example")
    service = JobService(NODE, FIXTURE.trust_list, runner, directory / "work", slots=1)
    api_config = NodeApiConfig(tls=tls, **config)  # type: ignore[arg-type]
    port = await nursery.start(serve_node_api, api_config, service)
    return Node(port, tls, service, runner)


@pytest.fixture
async def node(nursery: trio.Nursery, tmp_path: Path) -> Node:
    return await start_node(
        nursery, tmp_path, InstantRunner(), body_timeout=1.0, keep_alive_timeout=1.0
    )


async def raw_tls(node: Node) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection that checks nothing, for sending raw bytes."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", node.port), context)


async def read_until_closed(tls: trio.SSLStream[trio.SocketStream]) -> bytes:
    """Everything the server sends until it closes (cleanly or not), within 5 s."""
    reply = b""
    with trio.fail_after(5):
        try:
            while chunk := await tls.receive_some(4096):
                reply += bytes(chunk)
        except trio.BrokenResourceError:
            pass
    await tls.aclose()
    return reply


async def wait_done(client: httpx.AsyncClient, job: Job) -> dict[str, object]:
    """The job's status once its live log has ended."""
    with trio.fail_after(5):
        await follow_log(client, job)
    body: dict[str, object] = (await client.get(f"/v1/jobs/{job.id_hex}")).json()
    assert body["phase"] == "done", body
    return body


async def post(client: httpx.AsyncClient, data: bytes) -> httpx.Response:
    return await client.post(
        "/v1/jobs", content=data, headers={"content-type": "application/msgpack"}
    )


async def test_accepted_job_runs_and_artifacts_rehash(node: Node) -> None:
    job = make_job()
    async with node.client() as client:
        response = await post(client, job.to_bytes())
        assert response.status_code == 202
        assert response.json()["job_id"] == job.id_hex
        assert response.json()["phase"] in ("running", "done")
        status = await wait_done(client, job)
        assert status["state"] == "succeeded"

        response = await client.get(f"/v1/jobs/{job.id_hex}/result")
        assert response.headers["content-type"] == "application/msgpack"
        result = Result.from_bytes(response.content)
        result.check_answers(job, NODE.public_key)
        assert result.state is ResultState.SUCCEEDED
        assert [a.name for a in result.artifacts] == ["out/hello.txt"]

        for kind, digest in [("artifacts", result.artifacts[0]), ("logs", result.logs[0])]:
            response = await client.get(f"/v1/jobs/{job.id_hex}/{kind}/{digest.name}")
            assert response.status_code == 200
            assert int(response.headers["content-length"]) == digest.size
            assert bytes.fromhex(response.headers["x-content-sha256"]) == digest.sha256
            assert hashlib.sha256(response.content).digest() == digest.sha256

        response = await client.get(f"/v1/jobs/{job.id_hex}/log")
        assert response.text == "building\ndone\n"
        missing = await client.get(f"/v1/jobs/{job.id_hex}/artifacts/../../tls/tls-key.pem")
        assert missing.status_code == 404
        assert (await client.get(f"/v1/jobs/{'0' * 32}")).status_code == 404
        assert (await client.get("/v1/jobs/nothex")).status_code == 404
        status_body = (await client.get("/v1/status")).json()
    assert status_body["accepted"] == 1
    assert status_body["node"] == str(NODE.public_key)


async def test_rejections_have_codes_and_statuses(node: Node) -> None:
    accepted = make_job()
    forged = bytearray(make_job().to_bytes())
    forged[-1] ^= 0x01
    stranger = make_identity("stranger", Role.DISPATCHER)
    cases = [
        (bytes(forged), 401, "bad-signature"),
        (make_job(identity=stranger).to_bytes(), 401, "untrusted-key"),
        (make_job(issued_at=int(time.time()) - 700).to_bytes(), 410, "expired"),
        (make_job(node=OTHER_NODE.public_key).to_bytes(), 421, "wrong-node"),
        (b"\x93\x01\x02", 400, "malformed"),
        (b"\x00" * 20_000, 413, "oversize"),
    ]
    async with node.client() as client:
        assert (await post(client, accepted.to_bytes())).status_code == 202
        await wait_done(client, accepted)
        cases.append((accepted.to_bytes(), 409, "replayed"))
        for data, status, code in cases:
            response = await post(client, data)
            assert response.status_code == status, code
            assert response.json()["error"] == code
            assert response.text.count("\n") == 0

        # An oversize body without Content-Length (chunked) is cut off while streaming:
        # the 413 arrives while the client is still sending.
        tls = await raw_tls(node)
        await tls.send_all(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(20):
            await tls.send_all(b"400\r\n" + b"\x00" * 1024 + b"\r\n")
        with trio.fail_after(5):
            assert (await tls.receive_some(4096)).startswith(b"HTTP/1.1 413")
        await tls.aclose()
        stats = (await client.get("/v1/status")).json()
    assert stats["rejected"] == {
        "bad-signature": 1,
        "expired": 1,
        "malformed": 1,
        "oversize": 2,
        "replayed": 1,
        "untrusted-key": 1,
        "wrong-node": 1,
    }
    assert len(node.runner.runs) == 1


async def test_busy_follow_and_cancel(nursery: trio.Nursery, tmp_path: Path) -> None:
    gate = trio.Event()
    node = await start_node(nursery, tmp_path, InstantRunner(gate=gate))
    first, second = make_job(), make_job()
    async with node.client() as client:
        assert (await post(client, first.to_bytes())).status_code == 202
        busy = await post(client, second.to_bytes())
        assert busy.status_code == 503
        assert busy.json()["error"] == "no-free-slot"
        assert busy.headers["retry-after"] == "30"

        received = []
        async with client.stream("GET", f"/v1/jobs/{first.id_hex}/log?follow=1") as response:
            async for chunk in response.aiter_bytes():
                received.append(chunk)
                if b"".join(received) == b"building\n":
                    gate.set()  # let the build finish; the stream must then end by itself
        assert b"".join(received) == b"building\ndone\n"
        await wait_done(client, first)

        # The slot is free again, and the refused job was not burned by the 503.
        assert (await post(client, second.to_bytes())).status_code == 202
        await wait_done(client, second)

        node.runner.gate = trio.Event()
        third = make_job()
        assert (await post(client, third.to_bytes())).status_code == 202
        cancelled = await client.delete(
            f"/v1/jobs/{third.id_hex}",
            headers={"authorization": control_header(DISPATCHER, third.job_id, int(time.time()))},
        )
        assert cancelled.status_code == 200
        status = await wait_done(client, third)
        assert status["state"] == "cancelled"
        result = Result.from_bytes((await client.get(f"/v1/jobs/{third.id_hex}/result")).content)
        assert result.state is ResultState.CANCELLED and result.artifacts == ()


async def test_result_wait_holds_the_answer_until_the_job_ends(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = trio.Event()
    node = await start_node(nursery, tmp_path, InstantRunner(gate=gate))
    job = make_job()
    path = f"/v1/jobs/{job.id_hex}/result"
    async with node.client() as client:
        assert (await post(client, job.to_bytes())).status_code == 202
        # Without wait, or a wait that runs out: not finished, and whether it waited.
        at_once = await client.get(path)
        assert at_once.status_code == 404
        assert at_once.json() == {
            "error": "not-finished", "reason": "the job is still running", "waited": False
        }
        ran_out = await client.get(path, params={"wait": "0.05"})
        assert ran_out.status_code == 404 and ran_out.json()["waited"] is True
        # Not a number, or not positive: answered at once.
        for wait in ("soon", "-1", "nan"):
            assert (await client.get(path, params={"wait": wait})).json()["waited"] is False

        held = trio.Event()
        wait_result = JobService.wait_result

        async def holding(self: JobService, job_id: bytes) -> Result:
            held.set()
            return await wait_result(self, job_id)

        monkeypatch.setattr(JobService, "wait_result", holding)
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await client.get(path, params={"wait": "30"}))

        async with trio.open_nursery() as asking:
            asking.start_soon(ask)
            await held.wait()  # the request is held by the node...
            assert answers == []
            gate.set()  # ... until the build ends: then the answer is the result
        assert answers[0].status_code == 200
        assert Result.from_bytes(answers[0].content).state is ResultState.SUCCEEDED


async def test_server_survives_garbage_and_plain_http(node: Node) -> None:
    # Garbage instead of a TLS ClientHello.
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    await stream.send_all(b"\x16\x03\x01\x00\x05hello" + bytes(range(256)))
    with trio.fail_after(5):
        while await stream.receive_some(4096):
            pass
    await stream.aclose()
    # Plain HTTP on the TLS port.
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    await stream.send_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        while await stream.receive_some(4096):
            pass
    await stream.aclose()
    # Valid TLS, then garbage HTTP, then an oversized header.
    for payload in (b"\x00\xffNOT HTTP\r\n\r\n", b"GET / HTTP/1.1\r\nX: " + b"a" * 40_000):
        tls = await raw_tls(node)
        await tls.send_all(payload)
        reply = await read_until_closed(tls)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4")
    # A partial request head is dropped after the keep-alive timeout (1 s here), and a
    # body that never completes is refused with 408 after the body timeout (1 s here).
    tls = await raw_tls(node)
    await tls.send_all(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n")
    assert await read_until_closed(tls) == b""
    tls = await raw_tls(node)
    await tls.send_all(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
    with trio.fail_after(5):
        reply = bytes(await tls.receive_some(4096))
    assert reply.startswith(b"HTTP/1.1 408")
    await tls.aclose()

    # After all that, the server still serves.
    job = make_job()
    async with node.client() as client:
        assert (await post(client, job.to_bytes())).status_code == 202
        assert (await client.get("/v1/status")).json()["rejected"] == {"request-timeout": 1}


async def test_pinned_client_refuses_another_certificate(node: Node, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = generate_tls_material(tmp_path / "other")
    assert other.sha256 != node.tls.sha256
    assert load_tls_material(tmp_path / "tls") == node.tls
    job = make_job()
    async with pinned_client(other.sha256, base_url=node.url) as client:
        with pytest.raises(CertificatePinError) as info:
            await post(client, job.to_bytes())
        assert info.value.code == "tls-pin-mismatch"
    # Nothing reached the service: not even a rejection was counted.
    stats = node.service.statistics()
    assert stats.accepted == 0 and stats.rejected == ()
    # The same job through the right pin is accepted (so it was not replay-burned either).
    async with node.client() as client:
        assert (await post(client, job.to_bytes())).status_code == 202
