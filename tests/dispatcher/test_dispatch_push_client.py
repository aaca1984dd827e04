"""The push client's round trips after a build ends: a node holds ``GET .../result?wait=``
until the job ends, so the end and the result come in one round trip, and the engine's
result() then costs nothing. An older node, which answers at once, is followed instead: the
end of the followed log is answered by fetching the result at once (no status request in
between); a job whose follow returns while it still runs falls back to status."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from p2pbuild import BuildType, Job, JobSpec, Result, ResultState, SourceArtifact, Target
from p2pbuild.dispatcher._nodes import PushNodeClient
from p2pbuild.https import generate_tls_material, serve_asgi
from p2pbuild.node._api import NodeApiConfig
from p2pbuild.testing import make_trust_list

pytestmark = pytest.mark.slow

FIXTURE = make_trust_list()
NODE = FIXTURE.nodes["node-1"]
SPEC = JobSpec(SourceArtifact("a.tar.gz", 3, hashlib.sha256(b"abc").digest()),
               BuildType.MAKE, Target("x86_64", "fedora-41"))


def make_job() -> Job:
    return Job.create(FIXTURE.dispatchers["dispatcher-1"], SPEC, issued_at=int(time.time()),
                      lifetime=600, node=NODE.public_key)


class FakeNode:
    def __init__(self) -> None:
        self.results: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        #: Holds ``?wait=`` requests (here: as if the wait ran out); False: an older node.
        self.waits = True

    def app(self) -> Starlette:
        async def log(request: Request) -> Response:
            self.requests["log"] += 1
            return Response(b"done\n")

        async def result(request: Request) -> Response:
            self.requests["result"] += 1
            raw = self.results.get(request.path_params["id"])
            if raw is None:
                body: dict[str, object] = {"error": "not-finished", "reason": "running"}
                if self.waits:
                    body["waited"] = "wait" in request.query_params
                return JSONResponse(body, status_code=404)
            return Response(raw, media_type="application/msgpack")

        async def status(request: Request) -> Response:
            self.requests["status"] += 1
            return JSONResponse({"phase": "running"})

        return Starlette(routes=[
            Route("/v1/jobs/{id}/log", log),
            Route("/v1/jobs/{id}/result", result),
            Route("/v1/jobs/{id}", status),
        ])


async def test_wait_done_fetches_the_result_in_the_same_round_trip(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    fake = FakeNode()
    tls = generate_tls_material(tmp_path)
    port = await nursery.start(serve_asgi, fake.app(), NodeApiConfig(tls=tls))
    client = PushNodeClient(f"https://127.0.0.1:{port}", tls.sha256, timeout=10)
    try:
        job = make_job()
        signed = Result.create(NODE, job, state=ResultState.SUCCEEDED, exit_code=0,
                               started_ms=1, ended_ms=2, environment={}, artifacts=[],
                               logs=[])
        fake.results[job.id_hex] = signed.to_bytes()
        assert await client.wait_done(job.job_id, 5)
        got: Any = await client.result(job.job_id)
        assert got == signed
        assert fake.requests == Counter({"result": 1})
        # Handed out once: asking again goes to the node.
        assert await client.result(job.job_id) == signed
        assert fake.requests["result"] == 2
        # Still running when the node's wait runs out: not done, nothing is cached.
        running = make_job()
        fake.requests.clear()
        assert not await client.wait_done(running.job_id, 5)
        assert fake.requests == Counter({"result": 1})
        assert await client.result(running.job_id) is None
        assert client.result_wait

        # An older node answers at once: the client follows the log from then on.
        fake.waits = False
        fake.requests.clear()
        assert not await client.wait_done(running.job_id, 5)
        assert not client.result_wait
        assert fake.requests == Counter({"result": 2, "log": 1, "status": 1})
        fake.requests.clear()
        assert await client.wait_done(job.job_id, 5)
        assert fake.requests == Counter({"log": 1, "result": 1})
        assert await client.result(job.job_id) == signed
        assert fake.requests["result"] == 1
    finally:
        await client.aclose()
