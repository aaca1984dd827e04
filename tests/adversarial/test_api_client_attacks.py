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
import time
from pathlib import Path

import pytest
import trio

from p2pbuild import BuildType, Job, JobSpec, Result, ResultState, SourceArtifact, Target
from p2pbuild.node._api import CONTROL_SCHEME, control_header
from p2pbuild.node._tls import pinned_client
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
