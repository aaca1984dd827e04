"""Attacks by API clients: authenticated but hostile farm users, and anyone who can open a
TCP connection. Each runs over real HTTPS on loopback against the real servers and fails:

1. stopping or collecting another dispatcher's job on a node (signed job control);
2. cancelling another user's build on the dispatcher, and reading its operational data;
3. holding thousands of idle connections from one address (connection bounds);
4. parallel uploads that together hold more than the in-flight bound (503 + Retry-After);
5. using the dispatcher as a port scanner through a build's source URL.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio

from p2pbuild import BuildType, Job, JobSpec, Result, ResultState, SourceArtifact, Target
from p2pbuild.dispatcher import (
    RunningDispatcher,
    StaticFinder,
    hash_token,
    load_config,
    run_dispatcher,
)
from p2pbuild.https import generate_tls_material, pinned_client
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
