"""Attacks by API clients: authenticated but hostile farm users, and anyone who can open a
TCP connection. Each runs over real HTTPS on loopback against the real servers and fails:

1. stopping or collecting another dispatcher's job on a node (signed job control);
2. cancelling another user's build on the dispatcher, and reading its operational data;
3. holding thousands of idle connections from one address (connection bounds);
4. parallel uploads that together hold more than the in-flight bound (503 + Retry-After);
5. using the dispatcher as a port scanner through a build's source URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio
from waits import wait_until

from p2pbuild import BuildType, Job, JobSpec, Result, ResultState, SourceArtifact, Target
from p2pbuild.dispatcher import (
    RunningDispatcher,
    StaticFinder,
    hash_token,
    load_config,
    run_dispatcher,
)
from p2pbuild.https import (
    generate_tls_material,
    load_tls_material,
    pinned_client,
    pinned_ssl_context,
)
from p2pbuild.node._api import CONTROL_SCHEME, control_header
from p2pbuild.testing import make_trust_list
from p2pbuild.testing._farm import start_push_node
from p2pbuild.testing._runner import InstantRunner

pytestmark = pytest.mark.slow

FIXTURE = make_trust_list(
    dispatchers=(("dispatcher-1", "farm"), ("dispatcher-2", "other-farm")), label="api-"
)
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
OTHER_DISPATCHER = FIXTURE.dispatchers["dispatcher-2"]
NODE = FIXTURE.nodes["node-1"]


def _job(**kwargs: object) -> Job:
    spec = JobSpec(
        source=SourceArtifact("hello.tar.gz", 3, hashlib.sha256(b"abc").digest()),
        build_type=BuildType.MAKE, target=Target("x86_64", "fedora-41"),
    )
    return Job.create(DISPATCHER, spec, issued_at=int(time.time()), lifetime=600,
                      node=NODE.public_key)


# -- 1. job control on a node needs the issuing dispatcher's signature ----------------------------


async def test_node_job_control_needs_the_issuing_dispatchers_signature(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    runner = InstantRunner(gate=trio.Event())
    node = await start_push_node(nursery, tmp_path, NODE, FIXTURE.trust_list, runner)
    running, finished = _job(), _job()
    async with pinned_client(node.tls.sha256, base_url=node.url, timeout=10) as http:
        for job in (running, finished):
            response = await http.post("/v1/jobs", content=job.to_bytes(),
                                       headers={"content-type": "application/msgpack"})
            assert response.status_code == 202
        now = int(time.time())
        forged = bytearray(control_header(DISPATCHER, running.job_id, now).encode())
        forged[-3] = ord("A") if forged[-3] != ord("A") else ord("B")
        attacks = [
            ({}, 401, "unauthenticated"),
            ({"authorization": f"{CONTROL_SCHEME} not-base64!"}, 401, "unauthenticated"),
            ({"authorization": forged.decode()}, 401, "bad-signature"),
            # A dispatcher trusted by the same list, but not the one that issued the job.
            ({"authorization": control_header(OTHER_DISPATCHER, running.job_id, now)}, 403,
             "forbidden"),
            # The right dispatcher, but an order about another job.
            ({"authorization": control_header(DISPATCHER, finished.job_id, now)}, 403,
             "forbidden"),
            ({"authorization": control_header(DISPATCHER, running.job_id, now - 3600)}, 410,
             "expired"),
        ]
        for headers, status, code in attacks:
            response = await http.delete(f"/v1/jobs/{running.id_hex}", headers=headers)
            assert (response.status_code, response.json()["error"]) == (status, code), headers
        # Nothing changed: the job still runs.
        assert (await http.get(f"/v1/jobs/{running.id_hex}")).json()["phase"] == "running"

        # The finished job's files cannot be deleted by an unsigned or foreign request either.
        runner.gate.set()
        with trio.fail_after(10):
            await node.service.wait_result(finished.job_id)
        for headers in ({}, {"authorization":
                             control_header(OTHER_DISPATCHER, finished.job_id, now)}):
            response = await http.delete(f"/v1/jobs/{finished.id_hex}", headers=headers)
            assert response.status_code in (401, 403)
        assert (await http.get(f"/v1/jobs/{finished.id_hex}/result")).status_code == 200

        # The issuing dispatcher's order works, once.
        order = {"authorization": control_header(DISPATCHER, finished.job_id, int(time.time()))}
        response = await http.delete(f"/v1/jobs/{finished.id_hex}", headers=order)
        assert response.status_code == 200 and response.json()["collected"] is True
        assert (await http.get(f"/v1/jobs/{finished.id_hex}/result")).status_code == 404
    rejected = dict(node.service.statistics().rejected)
    assert rejected["unauthenticated"] == 3
    assert rejected["forbidden"] == 3
    assert rejected["bad-signature"] == 1


async def test_a_replayed_order_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    runner = InstantRunner(gate=trio.Event())
    node = await start_push_node(nursery, tmp_path, NODE, FIXTURE.trust_list, runner)
    job = _job()
    async with pinned_client(node.tls.sha256, base_url=node.url, timeout=10) as http:
        await http.post("/v1/jobs", content=job.to_bytes(),
                        headers={"content-type": "application/msgpack"})
        order = {"authorization": control_header(DISPATCHER, job.job_id, int(time.time()))}
        assert (await http.delete(f"/v1/jobs/{job.id_hex}", headers=order)).status_code == 200
        result = Result.from_bytes((await http.get(f"/v1/jobs/{job.id_hex}/result")).content)
        assert result.state is ResultState.CANCELLED
        # Replaying the captured order cannot collect the job's files afterwards.
        replayed = await http.delete(f"/v1/jobs/{job.id_hex}", headers=order)
        assert (replayed.status_code, replayed.json()["error"]) == (409, "replayed")
        assert (await http.get(f"/v1/jobs/{job.id_hex}/result")).status_code == 200


# -- a real dispatcher with three users ------------------------------------------------------

TOKENS = {"alice": "alice-token-not-secret", "mallory": "mallory-token-not-secret",
          "admin": "admin-token-not-secret"}


def _auth(user: str) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKENS[user]}"}


async def start_dispatcher(
    nursery: trio.Nursery, tmp: Path, *, api: dict[str, object] | None = None,
    main: dict[str, object] | None = None, gate: trio.Event | None = None,
) -> RunningDispatcher:
    """A dispatcher on a free loopback port with users alice and mallory (of different
    teams) and an admin, over two push nodes of different operators."""
    finder = StaticFinder(DISPATCHER_FIXTURE.trust_list)
    for name in ("n1", "n2"):
        node = await start_push_node(nursery, tmp / name, DISPATCHER_FIXTURE.nodes[name],
                                     DISPATCHER_FIXTURE.trust_list, InstantRunner(gate=gate))
        finder.put(node.entry())
    DISPATCHER_FIXTURE.dispatchers["dispatcher-1"].save(tmp / "dispatcher.key")
    (tmp / "trust-list.bin").write_bytes(DISPATCHER_FIXTURE.trust_list.to_bytes())
    (tmp / "tls").mkdir()
    generate_tls_material(tmp / "tls")
    config = {
        "dispatcher": {"key": "dispatcher.key", "trust_list": "trust-list.bin", **(main or {})},
        "api": {"port": 0, **(api or {})},
        "clients": [
            {"user": "alice", "team": "team-a", "token_sha256": hash_token(TOKENS["alice"])},
            {"user": "mallory", "team": "team-m",
             "token_sha256": hash_token(TOKENS["mallory"])},
            {"user": "root", "role": "admin", "token_sha256": hash_token(TOKENS["admin"])},
        ],
        "engine": {"backoff_base_s": 0.05},
    }
    (tmp / "dispatcher.toml").write_text(tomli_w.dumps(config))
    running: RunningDispatcher = await nursery.start(
        lambda task_status: run_dispatcher(load_config(tmp / "dispatcher.toml"), finder=finder,
                                           task_status=task_status)
    )
    return running


async def _events_until(
    http: httpx.AsyncClient, build_id: str, user: str, wanted: Callable[[list[dict[str, Any]]],
                                                                        bool],
) -> list[dict[str, Any]]:
    """Follow the build's audit events (as ``user``) until ``wanted`` holds."""
    seen: list[dict[str, Any]] = []
    with trio.fail_after(20):
        async with http.stream("GET", f"/v1/builds/{build_id}/events?follow=1",
                               headers=_auth(user)) as response:
            async for line in response.aiter_lines():
                if line:
                    seen.append(json.loads(line))
                    if wanted(seen):
                        return seen
    raise AssertionError(f"the event stream ended first: {seen}")


DISPATCHER_FIXTURE = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob")], label="api-d-")


# -- 2. only a build's owner or an admin may cancel it; job ids are for admins -------------------


async def test_other_users_cannot_cancel_a_build_or_see_its_jobs(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    running = await start_dispatcher(nursery, tmp_path, gate=trio.Event())
    async with pinned_client(running.tls.sha256, base_url=running.url, timeout=10) as http:
        submitted = await http.post("/v1/builds", params={"name": "hello-1-1.src.rpm"},
                                    content=b"srpm bytes", headers=_auth("alice"))
        assert submitted.status_code == 202
        build_id = submitted.json()["id"]
        await _events_until(http, build_id, "alice",
                            lambda seen: sum(e["event"] == "node-chosen" for e in seen) == 2)

        # Another team's user may read the build, but not its job ids or node endpoints...
        shown = (await http.get(f"/v1/builds/{build_id}", headers=_auth("mallory"))).json()
        assert shown["user"] == "alice" and len(shown["attempts"]) == 2
        for attempt in shown["attempts"]:
            assert "job_id" not in attempt and "endpoint" not in attempt
        for event in shown["events"]:
            assert "job_id" not in event["detail"], event
        streamed = await _events_until(http, build_id, "mallory",
                                       lambda seen: len(seen) >= len(shown["events"]))
        assert all("job_id" not in e["detail"] for e in streamed)
        nodes = (await http.get("/v1/nodes", headers=_auth("mallory"))).json()["nodes"]
        assert nodes and all("endpoint" not in row for row in nodes)
        # ... and may not cancel it.
        refused = await http.delete(f"/v1/builds/{build_id}", headers=_auth("mallory"))
        assert refused.status_code == 403
        assert refused.json()["error"] == "forbidden"
        assert "\n" not in refused.json()["reason"] and "alice" in refused.json()["reason"]
        build = running.engine.db.build(build_id)
        assert not build.cancel_requested and not build.state.terminal

        # An admin sees the operational data and may cancel any build.
        full = (await http.get(f"/v1/builds/{build_id}", headers=_auth("admin"))).json()
        assert all(len(a["job_id"]) == 32 and a["endpoint"] for a in full["attempts"])
        cancelled = await http.delete(f"/v1/builds/{build_id}", headers=_auth("admin"))
        assert cancelled.status_code == 200
        await _events_until(http, build_id, "alice",
                            lambda seen: seen[-1]["event"] == "build-cancelled")
        # The owner may cancel their own.
        own = await http.post("/v1/builds", params={"name": "hello-1-1.src.rpm"},
                              content=b"srpm bytes 2", headers=_auth("alice"))
        response = await http.delete(f"/v1/builds/{own.json()['id']}", headers=_auth("alice"))
        assert response.status_code == 200


# -- 3. connection bounds: one address cannot hold the server's connections --------------------


async def test_one_address_cannot_hold_more_than_its_share_of_connections(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    running = await start_dispatcher(nursery, tmp_path, api={
        "max_connections_per_address": 8, "keep_alive_timeout_s": 0.5,
    })
    # 40 idle connections from one address (127.0.0.2: the whole of 127/8 is loopback).
    flood: list[trio.SocketStream] = []
    closed = 0  # by the server: reset, before any TLS
    for _ in range(40):
        try:
            flood.append(await trio.open_tcp_stream("127.0.0.1", running.port,
                                                    local_address="127.0.0.2"))
        except OSError:
            closed += 1  # reset so soon that connect() already saw it
    assert running.connections is not None
    connections = running.connections

    def answered() -> int:
        stats = connections.statistics()
        return stats.accepted + sum(n for _, n in stats.refused)

    await wait_until(lambda: answered() >= 40, 10, "the server took or refused all 40")
    stats = running.connections.statistics()
    assert stats.open == 8
    assert dict(stats.refused) == {"max-connections-per-address": 32}

    # The client sees the 32 closed at once, the 8 still open.
    async def probe(stream: trio.SocketStream) -> None:
        nonlocal closed
        with trio.move_on_after(1):
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.receive_some(1)
            closed += 1  # EOF or reset; the 8 admitted ones wait for a TLS hello instead

    async with trio.open_nursery() as probes:
        for stream in flood:
            probes.start_soon(probe, stream)
    assert closed == 32

    # Meanwhile a genuine user from another address is served.
    async with pinned_client(running.tls.sha256, base_url=running.url, timeout=10) as http:
        submitted = await http.post("/v1/builds", params={"name": "hello-1-1.src.rpm"},
                                    content=b"srpm bytes", headers=_auth("alice"))
        assert submitted.status_code == 202
    for stream in flood:
        await stream.aclose()

    # An idle keep-alive connection is closed after keep_alive_timeout_s.
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", running.port, ssl_context=pinned_ssl_context()
    )
    await stream.send_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n"
                          + f"Authorization: Bearer {TOKENS['alice']}\r\n\r\n".encode())
    received = b""
    with trio.fail_after(5):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    await stream.aclose()


async def test_running_out_of_file_descriptors_costs_no_traceback(tmp_path: Path) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, str(Path(__file__).with_name("emfile_server.py")), str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert process.stdin and process.stdout and process.stderr
        lines = _Lines(process.stdout)
        port = json.loads(await lines.next())["port"]
        tls = load_tls_material(tmp_path)
        await process.stdin.send_all(b"exhaust\n")
        assert await lines.next() == "exhausted"
        # Connections wait in the kernel while the server cannot accept them.
        queued = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(20)]
        await trio.sleep(1)  # the server's accept loop runs into EMFILE ten times
        await process.stdin.send_all(b"release\n")
        assert await lines.next() == "released"
        async with pinned_client(tls.sha256, base_url=f"https://127.0.0.1:{port}",
                                 timeout=10) as http:
            assert (await http.get("/v1/status")).json() == {"ok": True}
        for stream in queued:
            await stream.aclose()
        await process.stdin.send_all(b"quit\n")
        errors = b""
        with trio.fail_after(10):
            while data := await process.stderr.receive_some(1 << 16):
                errors += data
            await process.wait()
    finally:
        process.kill()
    text = errors.decode()
    assert "Traceback" not in text, text
    warnings = [line for line in text.splitlines() if "accept failed" in line]
    assert len(warnings) == 1 and "EMFILE" in warnings[0], text


class _Lines:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        with trio.fail_after(30):
            while b"\n" not in self._buffer:
                data = await self._stream.receive_some(4096)
                if not data:
                    raise EOFError(self._buffer)
                self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


# -- 4. uploads: a bound on all bytes in flight together ----------------------------------------


async def test_parallel_uploads_beyond_the_in_flight_bound_get_503(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    running = await start_dispatcher(nursery, tmp_path, api={
        "max_upload_bytes": 1_000_000, "max_uploads_in_flight_bytes": 1_500_000,
    })
    gate = trio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        # A chunked upload (no Content-Length) that holds 900 kB until the gate opens.
        for _ in range(9):
            yield b"x" * 100_000
        await gate.wait()

    async def chunked(size: int) -> AsyncIterator[bytes]:
        for _ in range(size // 100_000):
            yield b"y" * 100_000

    async with pinned_client(running.tls.sha256, base_url=running.url, timeout=30) as http:
        async with trio.open_nursery() as uploads:
            first: list[httpx.Response] = []

            async def upload() -> None:
                first.append(await http.post(
                    "/v1/builds", params={"name": "big-1-1.src.rpm"}, content=slow_body(),
                    headers=_auth("alice"),
                ))

            uploads.start_soon(upload)
            async def streaming() -> bool:
                status = await http.get("/v1/status", headers=_auth("admin"))
                return _in_flight(status) >= 900_000

            await wait_until(streaming, 10, "the first upload is 900 kB in")
            # A second upload with a declared length that would pass the bound: 503 at once,
            # before its body is read (hypercorn says "100 Continue" first, whatever comes).
            refused = await _raw_request(running, (
                "POST /v1/builds?name=b-1-1.src.rpm HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {TOKENS['mallory']}\r\n"
                "Content-Length: 700000\r\nExpect: 100-continue\r\n\r\n"
            ))
            if refused.startswith(b"HTTP/1.1 100"):
                refused = refused.split(b"\r\n\r\n", 1)[1]
            assert refused.startswith(b"HTTP/1.1 503"), refused
            assert b"\r\nretry-after: 30\r\n" in refused.lower()
            assert b'"error":"busy"' in refused
            # A chunked one is refused as soon as it would pass the bound. The client may
            # see the 503 or, still sending, a closed connection; nothing of it is kept.
            try:
                answer = await http.post("/v1/builds", params={"name": "c-1-1.src.rpm"},
                                         content=chunked(700_000), headers=_auth("mallory"))
                assert answer.status_code == 503 and answer.json()["error"] == "busy"
            except httpx.TransportError:
                pass
            status = (await http.get("/v1/status", headers=_auth("admin"))).json()["uploads"]
            assert status == {"bytes_in_flight": 900_000, "limit": 1_500_000, "refused": 2}
            gate.set()
        assert first[0].status_code == 202
        # Once the first is in, the bytes are free again.
        status = (await http.get("/v1/status", headers=_auth("admin"))).json()
        assert status["uploads"]["bytes_in_flight"] == 0
        assert not list((tmp_path / "state" / "sources").glob(".upload-*"))
        again = await http.post("/v1/builds", params={"name": "c-1-1.src.rpm"},
                                content=b"z" * 700_000, headers=_auth("mallory"))
        assert again.status_code == 202


async def _raw_request(running: RunningDispatcher, head: str) -> bytes:
    """Send a request head over TLS and read the answer until the server closes or 5 s."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", running.port,
                                                 ssl_context=pinned_ssl_context())
    await stream.send_all(head.encode())
    answer = b""
    with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                break
    await trio.aclose_forcefully(stream)
    return answer


def _in_flight(response: httpx.Response) -> int:
    value: int = response.json()["uploads"]["bytes_in_flight"]
    return value


# -- 5. source URLs: no fetching from the dispatcher's own network, no port scanning -----------


async def _listener(nursery: trio.Nursery, reply: bytes | None) -> tuple[int, list[int]]:
    """A TCP server on a free loopback port that counts connections and answers each with
    ``reply`` (None: closes at once); returns its port and the list it counts into."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    seen: list[int] = []

    async def handle(stream: trio.SocketStream) -> None:
        seen.append(1)
        if reply is not None:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.receive_some(65536)
                await stream.send_all(reply)
        await stream.aclose()

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return int(listeners[0].socket.getsockname()[1]), seen


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _url_build_reason(http: httpx.AsyncClient, url: str, sha256: str = "1" * 64) -> str:
    response = await http.post("/v1/builds", json={"url": url, "sha256": sha256},
                               headers=_auth("alice"))
    assert response.status_code == 202
    build_id = response.json()["id"]
    events = await _events_until(http, build_id, "alice",
                                 lambda seen: seen[-1]["event"].startswith("build-"))
    assert events[-1]["event"] == "build-failed", events[-1]
    reason: str = (await http.get(f"/v1/builds/{build_id}", headers=_auth("alice"))).json()[
        "reason"]
    return reason


async def test_source_urls_cannot_reach_the_dispatchers_network(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    open_port, seen = await _listener(nursery, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    closed_port = _closed_port()
    running = await start_dispatcher(nursery, tmp_path)
    async with pinned_client(running.tls.sha256, base_url=running.url, timeout=30) as http:
        reasons = {
            await _url_build_reason(http, f"http://{host}:{port}/x.src.rpm")
            for host in ("127.0.0.1", "localhost", "[::1]", "10.0.0.1", "169.254.169.254")
            for port in (open_port, closed_port)
        }
    # Refused before any connection, by the host's address class, whatever the port: one
    # reason per host, the same for the open and the closed port.
    assert seen == []
    assert len(reasons) == 5, reasons
    assert all(r.startswith("source: cannot fetch the source from ")
               and "is not a public address" in r for r in reasons), reasons


async def test_allowed_source_hosts_do_not_tell_closed_from_refusing_ports(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    source = b"abc"
    serving, _ = await _listener(
        nursery, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n" + source
    )
    hanging_up, seen = await _listener(nursery, None)  # a port that answers, not with HTTP
    running = await start_dispatcher(nursery, tmp_path,
                                     main={"source_allow_hosts": ["127.0.0.1"]})
    async with pinned_client(running.tls.sha256, base_url=running.url, timeout=30) as http:
        closed = await _url_build_reason(http, f"http://127.0.0.1:{_closed_port()}/x.src.rpm")
        answering = await _url_build_reason(http, f"http://127.0.0.1:{hanging_up}/x.src.rpm")
        assert seen  # the allowed host was really connected to
        assert closed == answering == "source: cannot fetch the source from 127.0.0.1"
        # An allowed host serves a source as any other.
        response = await http.post(
            "/v1/builds", headers=_auth("alice"),
            json={"url": f"http://127.0.0.1:{serving}/x.src.rpm",
                  "sha256": hashlib.sha256(source).hexdigest()},
        )
        build_id = response.json()["id"]
        await _events_until(http, build_id, "alice",
                            lambda seen: seen[-1]["event"] == "source-fetched")
