"""The dispatcher service: HTTPS API, CLI client commands, and a real build on two operators."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio
from engine_waits import wait_build

from p2pbuild._cli import main as cli_main
from p2pbuild.dispatcher import StaticFinder, hash_token, load_config, run_dispatcher, sign_request
from p2pbuild.https import pinned_client
from p2pbuild.node._runner import ExecutorRunner
from p2pbuild.testing import hello_srpm, make_trust_list
from p2pbuild.testing._farm import start_push_node, write_dispatcher_config
from p2pbuild.testing._runner import InstantRunner

pytestmark = pytest.mark.slow

FIXTURE = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob"), ("n3", "carol")])
TOKEN = "test-token-not-secret"


def write_config(tmp: Path) -> Path:
    return write_dispatcher_config(
        tmp, FIXTURE,
        clients=[{"user": "alice", "team": "team-a", "token_sha256": hash_token(TOKEN)}],
        engine={"follow_interval_s": 2, "backoff_base_s": 0.05},
    )


async def start(nursery: trio.Nursery, tmp: Path, runner_factory: object) -> tuple[object, Path]:
    finder = StaticFinder(FIXTURE.trust_list)
    for name in ("n1", "n2"):
        node = await start_push_node(
            nursery, tmp / name, FIXTURE.nodes[name], FIXTURE.trust_list,
            runner_factory(),  # type: ignore[operator]
        )
        finder.put(node.entry())
    config = load_config(write_config(tmp))
    running = await nursery.start(lambda task_status: run_dispatcher(
        config, finder=finder, task_status=task_status))
    client_file = tmp / "client.toml"
    client_file.write_text(tomli_w.dumps(
        {"url": running.url, "tls_sha256": running.tls.sha256.hex(), "token": TOKEN}
    ))
    return running, client_file


async def cli(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return cli_main(list(argv))

    status = await trio.to_thread.run_sync(run)
    return status, out.getvalue()


async def failed(running: Any, http: httpx.AsyncClient, build_id: str) -> dict[str, Any]:
    """The build as the API shows it once the engine says it failed (no polling: the
    engine's change events)."""
    with trio.fail_after(10):
        await wait_build(running.engine, build_id, lambda b: b.state.terminal)
    body: dict[str, Any] = (await http.get(
        f"/v1/builds/{build_id}", headers={"authorization": f"Bearer {TOKEN}"}
    )).json()
    assert body["state"] == "failed", body
    return body

async def test_api_and_cli(nursery: trio.Nursery, tmp_path: Path) -> None:
    running, client_file = await start(nursery, tmp_path, InstantRunner)
    source = tmp_path / "hello-1.0-1.src.rpm"
    # An RPM lead, so that the client sends it (the in-process runner does not read it).
    source.write_bytes(b"\xed\xab\xee\xdb srpm bytes")
    status, out = await cli("submit", str(source), "--wait", "--json",
                            "--client-config", str(client_file))
    assert status == 0, out
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "accepted"
    assert events[-1]["event"] == "build-verified"
    build_id = events[0]["build_id"]
    status, out = await cli("builds", "ls", "--json", "--client-config", str(client_file))
    assert json.loads(out)["builds"][0]["id"] == build_id
    status, out = await cli("builds", "show", build_id, "--client-config", str(client_file))
    assert "verified by" in out
    status, out = await cli("nodes", "ls", "--json", "--client-config", str(client_file))
    nodes = json.loads(out)["nodes"]
    assert {n["operator"] for n in nodes} == {"alice", "bob"}
    status, out = await cli("nodes", "ls", "--client-config", str(client_file))
    assert "alice" in out and "MTBF" in out

    async with pinned_client(running.tls.sha256, base_url=running.url) as http:
        # No or a wrong token: 401 with a one-line JSON refusal.
        response = await http.get("/v1/builds")
        assert response.status_code == 401
        assert response.json()["error"] == "unauthenticated"
        response = await http.get("/v1/builds", headers={"authorization": "Bearer nope"})
        assert response.status_code == 401
        # A request signed by a trusted dispatcher key (the Koji adapter's way).
        path = "/v1/builds?limit=1"
        header = sign_request(FIXTURE.dispatchers["dispatcher-1"], "GET", path,
                              int(running.engine.clock()))
        response = await http.get(path, headers={"authorization": header})
        assert response.status_code == 200
        assert (await http.get(path, headers={"authorization": header})).status_code == 401
        # Sources are served by digest, for nodes.
        sha = json.loads((await http.get(
            f"/v1/builds/{build_id}", headers={"authorization": f"Bearer {TOKEN}"}
        )).text)["source_sha256"]
        assert (await http.get(f"/v1/sources/{sha}")).content == b"\xed\xab\xee\xdb srpm bytes"
        assert (await http.get(f"/v1/sources/{'0' * 64}")).status_code == 404
        # Constraints nothing matches: a failed build that says why.
        response = await http.post(
            "/v1/builds", params={"name": "x.src.rpm", "arch": "s390x"}, content=b"x",
            headers={"authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 202
        failed_id = response.json()["id"]
        body = await failed(running, http, failed_id)
        assert body["reason"] == "no trusted node has arch=s390x"
        # Upload bounds and declared digests are enforced.
        response = await http.post(
            "/v1/builds", params={"name": "x.src.rpm", "sha256": "0" * 64}, content=b"x",
            headers={"authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 400
        # A URL build whose URL does not answer fails with the reason.
        response = await http.post(
            "/v1/builds",
            json={"url": "https://127.0.0.1:1/none.src.rpm", "sha256": "1" * 64},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 202


@pytest.mark.skipif(shutil.which("bwrap") is None or shutil.which("rpmbuild") is None,
                    reason="needs bwrap and rpmbuild")
async def test_real_rpm_build_verified_on_two_operators(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    running, client_file = await start(nursery, tmp_path, ExecutorRunner)
    package = hello_srpm(tmp_path / "src", noarch=True)
    status, out = await cli("submit", str(package.path), "--wait", "--json",
                            "--client-config", str(client_file))
    events = [json.loads(line) for line in out.splitlines()]
    assert status == 0, events[-3:]
    build_id = events[0]["build_id"]
    build = running.engine.db.build(build_id)
    stored = Path(build.sink_path)
    rpms = list((stored / "artifacts").rglob("*.rpm"))
    assert rpms, list(stored.rglob("*"))
    manifest = json.loads((stored / "manifest.json").read_text())
    assert {n["operator"] for n in manifest["verified_by"]} == {"alice", "bob"}


async def test_unreachable_url_source_fails(nursery: trio.Nursery, tmp_path: Path) -> None:
    running, _ = await start(nursery, tmp_path, InstantRunner)
    async with pinned_client(running.tls.sha256, base_url=running.url) as http:
        response = await http.post(
            "/v1/builds",
            json={"url": "https://127.0.0.1:1/none.src.rpm", "sha256": "1" * 64},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
        build_id = response.json()["id"]
        body = await failed(running, http, build_id)
    assert body["reason"].startswith("source: cannot fetch the source")
    assert isinstance(httpx, object)
