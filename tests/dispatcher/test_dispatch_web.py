"""The web view and ``/metrics``: a real dispatcher (HTTPS, SQLite) with in-process push
nodes, read without logging in, as a browser or a script would; and the pure parts (node
liveness, paging, the rating plot) with explicit times.

The browser tests against a farm of real processes are in ``tests/e2e/test_web_browser.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2pbuild._records import Capability, MachineType, Status
from p2pbuild.dispatcher import (
    ConfigError,
    RunningDispatcher,
    StaticFinder,
    hash_token,
    load_config,
    run_dispatcher,
)
from p2pbuild.dispatcher._db import BuildRow, BuildState, Database, ObservationRow
from p2pbuild.dispatcher._plot import rating_history, rating_svg
from p2pbuild.dispatcher._ratings import DEFAULT_MODEL
from p2pbuild.dispatcher._views import NodeSightings, WebReader, builds_view
from p2pbuild.https import pinned_client
from p2pbuild.testing import make_trust_list
from p2pbuild.testing._farm import FarmNode, node_entry, start_push_node, write_dispatcher_config
from p2pbuild.testing._runner import InstantRunner

FIXTURE = make_trust_list(nodes=[("n1", "alice"), ("n2", "bob"), ("n3", "carol")])
TOKEN = "test-token-not-secret"


def write_config(tmp: Path, **api: Any) -> Path:
    return write_dispatcher_config(
        tmp, FIXTURE, api={"port": 0, **api},
        clients=[{"user": "alice-user", "token_sha256": hash_token(TOKEN)}],
        engine={"follow_interval_s": 2, "backoff_base_s": 0.05},
    )


async def start(
    nursery: trio.Nursery, tmp: Path, runners: dict[str, InstantRunner], **api: Any
) -> tuple[Any, dict[str, FarmNode]]:
    finder = StaticFinder(FIXTURE.trust_list)
    nodes = {}
    for name, runner in runners.items():
        node = await start_push_node(nursery, tmp / name, FIXTURE.nodes[name],
                                     FIXTURE.trust_list, runner)
        finder.put(node.entry())
        nodes[name] = node
    config = load_config(write_config(tmp, **api))
    running = await nursery.start(lambda task_status: run_dispatcher(
        config, finder=finder, task_status=task_status))
    return running, nodes


async def submit(http: httpx.AsyncClient, name: str = "hello-1.0-1.src.rpm") -> str:
    response = await http.post("/v1/builds", params={"name": name}, content=b"srpm bytes",
                               headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 202, response.text
    build_id: str = response.json()["id"]
    return build_id


async def wait_for(running: RunningDispatcher, http: httpx.AsyncClient, path: str,
                   check: Any) -> Any:
    """The JSON at ``path`` once ``check`` holds for it, looked at again at each change
    the engine reports (as the pages' own live updates are)."""
    with trio.fail_after(20):
        while True:
            changed = running.engine.next_change
            body = (await http.get(path)).json()
            if check(body):
                return body
            await changed.wait()


@pytest.mark.slow
async def test_pages_need_no_login_and_show_a_build_from_running_to_verified(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    gate = trio.Event()
    runners = {n: InstantRunner(gate=gate, log_lines=(b"compiling hello.c\n", b"done\n"))
               for n in ("n1", "n2")}
    running, nodes = await start(nursery, tmp_path, runners)
    async with pinned_client(running.tls.sha256, base_url=running.url) as http:
        build_id = await submit(http)
        body = await wait_for(running, http, f"/v1/web/builds/{build_id}",
                              lambda b: [a["state"] for a in b["attempts"]] == ["running"] * 2)
        assert body["nvr"] == "hello-1.0-1" and body["owner"] == "alice-user"
        assert body["state"] == "running"

        listing = await http.get("/builds")
        assert listing.status_code == 200 and "text/html" in listing.headers["content-type"]
        assert "hello-1.0-1" in listing.text and "state-running" in listing.text
        assert (await http.get("/")).status_code == 302

        # The live log of a running attempt, streamed from its node through the dispatcher.
        attempt = body["attempts"][0]
        async with http.stream(
            "GET", f"/builds/{build_id}/attempts/{attempt['id']}/log"
        ) as response:
            first = b""
            async for chunk in response.aiter_bytes():
                first += chunk
                if b"compiling" in first:
                    break
        assert b"compiling hello.c" in first

        # Nothing the API keeps for admins: no job ids of running jobs, no node endpoints.
        page = (await http.get(f"/builds/{build_id}")).text
        raw_json = (await http.get(f"/v1/web/builds/{build_id}")).text
        job_ids = [a.job_id.hex() for n in nodes.values() for a in n.runner.runs]  # type: ignore[attr-defined]
        assert len(job_ids) == 2
        for secret in [*job_ids, *(n.url for n in nodes.values())]:
            assert secret not in page and secret not in raw_json
        assert f'data-log-url="/builds/{build_id}/attempts/{attempt["id"]}/log"' in page
        # Signed files wait for the end of the build.
        early = await http.get(f"/builds/{build_id}/attempts/{attempt['id']}/job")
        assert early.status_code == 404

        gate.set()
        body = await wait_for(running, http, f"/v1/web/builds/{build_id}",
                              lambda b: b["state"] == "verified")
        assert sorted(body["verified_by"]) == ["alice", "bob"]
        assert [a["name"] for a in body["artifacts"]] == ["out/hello.txt"]
        assert body["trust_list_version"] == FIXTURE.trust_list.version
        page = (await http.get(f"/builds/{build_id}")).text
        assert "state-verified" in page and "Replicas disagree" not in page

        # Downloads: the artifact from the repository, re-hashed; proof files; logs.
        artifact = await http.get(f"/builds/{build_id}/artifacts/out/hello.txt")
        assert hashlib.sha256(artifact.content).hexdigest() == body["artifacts"][0]["sha256"]
        for proof in body["proof_files"]:
            response = await http.get(f"/builds/{build_id}/proof/{proof['name']}")
            assert response.status_code == 200 and response.content
        assert (await http.get(f"/builds/{build_id}/proof/..%2Fmanifest.json")).status_code == 404
        assert (await http.get(f"/builds/{build_id}/other/hello.txt")).status_code == 404
        assert (await http.get(f"/builds/{build_id}/artifacts/manifest.json")).status_code == 404
        for a in body["attempts"]:
            (log,) = a["result"]["logs"]
            # Kept in the repository with the build; also fetched from the node on request.
            assert log["url"].startswith(f"/builds/{build_id}/logs/")
            for url in (log["url"], f"/builds/{build_id}/attempts/{a['id']}/logs/build.log"):
                response = await http.get(url)
                assert hashlib.sha256(response.content).hexdigest() == log["sha256"]
            signed = await http.get(f"/builds/{build_id}/attempts/{a['id']}/result")
            assert hashlib.sha256(signed.content).hexdigest() == a["result"]["sha256"]
            job = await http.get(f"/builds/{build_id}/attempts/{a['id']}/job")
            assert hashlib.sha256(job.content).hexdigest() == a["job_sha256"]
            other = await http.get(f"/builds/{build_id}/attempts/{a['id']}/other")
            assert other.status_code == 404

        # Filters and the JSON twin of the list.
        listing = (await http.get("/v1/web/builds?state=verified&owner=alice-user")).json()
        assert [b["id"] for b in listing["builds"]] == [build_id]
        assert (await http.get("/v1/web/builds?state=failed")).json()["builds"] == []
        assert (await http.get("/v1/web/builds?owner=nobody")).json()["total"] == 0
        assert (await http.get("/v1/web/builds/nope")).status_code == 404
        assert (await http.get("/builds/nope")).status_code == 404

        # Nodes, one node, trust.
        listed = (await http.get("/v1/web/nodes")).json()
        by_operator = {n["operator"]: n for n in listed["nodes"]}
        assert set(by_operator) == {"alice", "bob"}
        assert by_operator["alice"]["state"] == "online"
        assert by_operator["alice"]["rating"]["agreement"] > 0.9
        assert "endpoint" not in json.dumps(listed) and nodes["n1"].url not in json.dumps(listed)
        key = str(FIXTURE.nodes["n1"].public_key)
        node_page = await http.get(f"/nodes/{key}")
        assert node_page.status_code == 200 and "<svg" in node_page.text
        assert "hello-1.0-1" in node_page.text
        node_json = (await http.get(f"/v1/web/nodes/{key}")).json()
        assert node_json["recent"][0]["build"] == build_id and node_json["history"]
        assert (await http.get("/nodes/ed25519:nonsense")).status_code == 404
        trust = (await http.get("/v1/web/trust")).json()
        assert trust["version"] == FIXTURE.trust_list.version
        assert {r["role"] for r in trust["roles"]} == {"maintainer", "dispatcher", "node"}
        assert "carol" in (await http.get("/trust")).text

        # The public event stream: what happened to the build, without details.
        async with http.stream("GET", "/v1/web/events?after=0") as response:
            lines = []
            async for line in response.aiter_lines():
                lines.append(json.loads(line))
                if lines[-1].get("event") == "build-verified":
                    break
        assert lines[0]["event"] == "hello"
        assert {"accepted", "node-chosen", "build-verified"} <= {e["event"] for e in lines}
        assert all(set(e) <= {"id", "at", "build_id", "event"} for e in lines)

        # Static files are served from the package, nothing from elsewhere.
        script = await http.get("/static/live.js")
        assert script.status_code == 200 and "/v1/web/events" in script.text
        assert "http" not in re.sub(r"//.*", "", script.text)
        assert (await http.get("/static/../_web.py")).status_code == 404


@pytest.mark.slow
async def test_a_mismatch_page_shows_the_differing_file(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    runners = {
        "n1": InstantRunner(artifacts={"out/hello.txt": b"hello\n", "out/same.txt": b"same"}),
        "n3": InstantRunner(artifacts={"out/hello.txt": b"HELLO\n", "out/same.txt": b"same"}),
    }
    running, _ = await start(nursery, tmp_path, runners)
    async with pinned_client(running.tls.sha256, base_url=running.url) as http:
        build_id = await submit(http)
        body = await wait_for(running, http, f"/v1/web/builds/{build_id}",
                              lambda b: b["difference"] is not None)
        difference = body["difference"]
        assert [f["name"] for f in difference["differing"]] == ["out/hello.txt"]
        assert difference["identical"] == ["out/same.txt"]
        assert sorted(g[0]["operator"] for g in difference["groups"]) == ["alice", "carol"]
        digests = {c["sha256"] for c in difference["differing"][0]["groups"]}
        assert digests == {hashlib.sha256(b"hello\n").hexdigest(),
                           hashlib.sha256(b"HELLO\n").hexdigest()}
        page = (await http.get(f"/builds/{build_id}")).text
        assert "Replicas disagree" in page
        assert '<td class="file">out/hello.txt</td>' in page
        listing = (await http.get("/v1/web/builds")).json()
        assert listing["builds"][0]["mismatch"] is True
        metrics = (await http.get("/metrics")).text
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for f in text_string_to_metric_families(metrics) for s in f.samples}
        key = ("p2pbuild_dispatcher_verifications_total", (("outcome", "mismatch"),))
        assert values[key] == 1


@pytest.mark.slow
async def test_metrics_of_the_dispatcher_and_of_a_node_parse(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    running, nodes = await start(nursery, tmp_path, {n: InstantRunner() for n in ("n1", "n2")})
    async with pinned_client(running.tls.sha256, base_url=running.url) as http:
        build_id = await submit(http)
        await wait_for(running, http, f"/v1/web/builds/{build_id}",
                       lambda b: b["state"] == "verified")
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("p2pbuild_dispatcher_builds", (("state", "verified"),))] == 1
    assert samples[("p2pbuild_dispatcher_builds", (("state", "running"),))] == 0
    assert samples[("p2pbuild_dispatcher_queue_length", ())] == 0
    assert samples[("p2pbuild_dispatcher_attempts", (("state", "succeeded"),))] == 2
    assert samples[("p2pbuild_dispatcher_verifications_total", (("outcome", "agreed"),))] == 1
    assert samples[("p2pbuild_dispatcher_verifications_total", (("outcome", "tie-break"),))] == 0
    assert samples[("p2pbuild_dispatcher_nodes", (("state", "online"),))] == 2
    assert samples[("p2pbuild_dispatcher_dispatch_overhead_seconds_count", ())] == 1
    assert 0 <= samples[("p2pbuild_dispatcher_dispatch_overhead_seconds_sum", ())] < 10
    assert families["p2pbuild_dispatcher_dispatch_overhead_seconds"].type == "histogram"

    node = nodes["n1"]
    async with pinned_client(node.tls.sha256, base_url=node.url) as http:
        response = await http.get("/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(response.text) for s in f.samples}
    assert samples[("p2pbuild_node_builds_total", (("state", "succeeded"),))] == 1
    assert samples[("p2pbuild_node_jobs_accepted_total", ())] == 1
    assert samples[("p2pbuild_node_sandbox_seconds_total", ())] >= 0


@pytest.mark.slow
async def test_a_dispatcher_configured_without_the_web_view_serves_none_of_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    running, _ = await start(nursery, tmp_path, {}, web=False)
    async with pinned_client(running.tls.sha256, base_url=running.url) as http:
        for path in ("/builds", "/v1/web/builds", "/nodes", "/trust", "/metrics",
                     "/static/live.js"):
            assert (await http.get(path)).status_code == 404, path
        assert (await http.get("/v1/builds")).status_code == 401  # the API is still there
    (tmp_path / "bad").mkdir()
    with pytest.raises(ConfigError, match="web"):
        load_config(write_config(tmp_path / "bad", web="yes"))


# -- pure parts -----------------------------------------------------------------------------------


def test_a_node_is_offline_two_status_intervals_after_its_last_status() -> None:
    identity = FIXTURE.nodes["n1"]
    sightings = NodeSightings(grace_s=1.0)
    key = str(identity.public_key)

    def entry(issued: int, *, draining: bool = False, running: int = 0) -> Any:
        capability = Capability(arch="x86_64", os="fedora-41", cpus=2, cpu_model="c",
                                memory_mb=1024, disk_mb=1024, machine=MachineType.VM,
                                build_types=("rpm",), pools=())
        status = Status(load_milli=0, slots_total=2, slots_free=2 - running, running=running,
                        uptime_s=10, draining=draining)
        return node_entry(identity, capability, status, now=issued, seq=issued)

    # A node that publishes every 60 s, and once out of turn 5 s after it started.
    first = entry(1000)
    sightings.observe({key: first})
    assert sightings.state(key, first, 1000.0) == "online"
    assert sightings.state(key, first, 1200.0) == "online"  # interval unknown: until it expires
    assert sightings.state(key, first, 1000.0 + 300) == "offline"  # expired (lifetime 300 s)
    for issued in (1005, 1065, 1125):
        latest = entry(issued)
        sightings.observe({key: latest})
    assert sightings.interval(key) == 60.0  # the median of 5, 60, 60
    assert sightings.state(key, latest, 1125.0 + 121.0) == "online"   # 2 * 60 s + 1 s
    assert sightings.state(key, latest, 1125.0 + 121.5) == "offline"
    sightings.observe({key: entry(1185)})
    sightings.observe({key: entry(1186)})  # out of turn again: the interval stays
    assert sightings.interval(key) == 60.0
    assert sightings.state(key, entry(1200, draining=True, running=1), 1200.0) == "draining"
    assert sightings.state(key, entry(1200, draining=True), 1200.0) == "offline"  # leaving
    assert sightings.state(key, None, 1200.0) == "offline"


def test_builds_are_paged_newest_first_and_filtered(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "d.db", synchronous="NORMAL")
    for i in range(120):
        db.insert_build(BuildRow(
            id=f"{i:032x}", created_at=1000.0 + i, updated_at=1000.0 + i,
            user="ann" if i % 2 else "ben", team=None,
            state=BuildState.VERIFIED if i % 3 == 0 else BuildState.FAILED,
            source_name=f"pkg{i}-1.0-1.src.rpm", source_sha256="0" * 64, source_size=1,
            arch="x86_64", os="fedora-41",
        ))
    reader = WebReader(tmp_path / "d.db")
    first = builds_view(reader, 2000.0, per_page=50)
    assert first["total"] == 120 and first["pages"] == 3
    assert [b["nvr"] for b in first["builds"][:2]] == ["pkg119-1.0-1", "pkg118-1.0-1"]
    last = builds_view(reader, 2000.0, page=3, per_page=50)
    assert len(last["builds"]) == 20 and last["builds"][-1]["nvr"] == "pkg0-1.0-1"
    ann = builds_view(reader, 2000.0, owner="ann", states=[BuildState.VERIFIED])
    assert ann["total"] == 20  # odd multiples of 3 below 120
    assert all(b["owner"] == "ann" and b["state"] == "verified" for b in ann["builds"])
    with pytest.raises(Exception, match="readonly"):
        reader.db.execute("DELETE FROM builds")
    reader.close()
    db.close()


def test_rating_history_ends_at_the_current_score_and_plots_as_svg() -> None:
    node = str(FIXTURE.nodes["n2"].public_key)
    observations = [ObservationRow(1000.0 + i, node, "success", 1.0, None) for i in range(5)]
    observations.append(ObservationRow(1010.0, node, "agreement", 0.0, None))
    series = rating_history(observations, None, {"success": 0.9, "agreement": 0.9},
                            DEFAULT_MODEL)
    assert len(series) == 6
    assert series[-1]["agreement"] < series[0]["agreement"]
    assert series[-1]["score"] < series[-2]["score"]
    svg = rating_svg(series)
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and "6 observations" in svg
    assert "no observations yet" in rating_svg([])
    many = [ObservationRow(1000.0 + i, node, "success", 1.0, None) for i in range(1000)]
    assert len(rating_history(many, None, {}, DEFAULT_MODEL, points=50)) == 50


def test_a_difference_in_buildroots_is_shown_when_the_artifacts_are_the_same() -> None:
    from p2pbuild._jobs import (
        BuildrootPackage,
        BuildrootRecord,
        BuildType,
        FileDigest,
        Job,
        JobSpec,
        Result,
        SourceArtifact,
        Target,
    )
    from p2pbuild.dispatcher._db import AttemptRow
    from p2pbuild.dispatcher._views import difference_view

    spec = JobSpec(SourceArtifact("greet-1.0-1.src.rpm", 1, bytes(32)), BuildType.RPM,
                   Target("x86_64", "fedora-41"))
    job = Job.create(FIXTURE.dispatchers["dispatcher-1"], spec, issued_at=1000, lifetime=600)
    package = BuildrootPackage("gcc-14-1.x86_64", hashlib.sha256(b"gcc").digest())
    pairs = []
    for n, (name, repomd) in enumerate((("n1", b"a"), ("n3", b"b")), start=1):
        root = BuildrootRecord((("fedora", hashlib.sha256(repomd).digest()),), (package,))
        result = Result.create(
            FIXTURE.nodes[name], job, state="succeeded", exit_code=0, started_ms=0, ended_ms=1,
            environment={}, artifacts=[FileDigest("x.rpm", 1, hashlib.sha256(b"x").digest())],
            logs=[], buildroot=root,
        )
        attempt = AttemptRow(n, "b", str(result.node), "op" + name, "", b"", "replica", "j" * 32,
                             b"", "succeeded", "", 0.0, None, None)
        pairs.append((attempt, result))
    view = difference_view(pairs, "report")
    assert view["differing"] == [] and view["identical"] == ["x.rpm"]
    assert [b["what"] for b in view["buildroots"]] == ["repository fedora (repomd.xml)"]
    assert view["buildroots"][0]["groups"] == [hashlib.sha256(b"a").hexdigest(),
                                               hashlib.sha256(b"b").hexdigest()]


def test_metrics_count_outcomes_and_overhead_from_the_audit_trail(tmp_path: Path) -> None:
    from p2pbuild.dispatcher._metrics import DispatcherMetrics

    db = Database.open(tmp_path / "d.db", synchronous="NORMAL")

    def build(build_id: str, at: float) -> None:
        db.insert_build(BuildRow(
            id=build_id, created_at=at, updated_at=at, user="ann", team=None,
            state=BuildState.QUEUED, source_name="p-1-1.src.rpm", source_sha256="0" * 64,
            source_size=1, arch="x86_64", os="fedora-41",
        ))

    build("a" * 32, 1000.0)  # replicas disagree, a tie-break decides
    for node in ("n1", "n2"):
        db.audit(1001.0, "node-chosen", "a" * 32, node, role="replica")
    db.audit(1004.0, "attempt-succeeded", "a" * 32, "n1", duration_ms=2500)
    db.audit(1005.0, "attempt-succeeded", "a" * 32, "n2", duration_ms=3000)
    db.audit(1006.0, "build-running", "a" * 32,
             reason="replicas disagree; tie-break on another operator")
    db.audit(1006.5, "node-chosen", "a" * 32, "n3", role="tiebreak")
    db.audit(1009.0, "attempt-succeeded", "a" * 32, "n3", duration_ms=2000)
    reader = WebReader(tmp_path / "d.db")
    metrics = DispatcherMetrics(reader, lambda: {"timed-out": 2})
    metrics.refresh({"online": 3, "standby": 1})
    first = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in text_string_to_metric_families(metrics.render().decode())
             for s in f.samples}
    assert first[("p2pbuild_dispatcher_verifications_total", (("outcome", "mismatch"),))] == 1
    assert first[("p2pbuild_dispatcher_dispatch_overhead_seconds_count", ())] == 0

    db.audit(1010.0, "build-verified", "a" * 32, proof=["n1", "n3"], outliers=["n2"])
    build("b" * 32, 2000.0)  # agreed at once
    db.audit(2003.0, "attempt-succeeded", "b" * 32, "n1", duration_ms=1000)
    db.audit(2003.5, "build-verified", "b" * 32, proof=["n1", "n2"], outliers=[])
    build("c" * 32, 3000.0)
    db.audit(3001.0, "build-failed", "c" * 32, reason="no trusted node has arch=s390x")
    metrics.refresh()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.render().decode())
               for s in f.samples}
    outcome = "p2pbuild_dispatcher_verifications_total"
    assert samples[(outcome, (("outcome", "agreed"),))] == 1
    assert samples[(outcome, (("outcome", "mismatch"),))] == 1
    assert samples[(outcome, (("outcome", "tie-break"),))] == 1
    finished = "p2pbuild_dispatcher_builds_finished_total"
    assert samples[(finished, (("state", "verified"),))] == 2
    assert samples[(finished, (("state", "failed"),))] == 1
    # Overheads: 10 s - 3 s (the longest build of build a) and 3.5 s - 1 s.
    assert samples[("p2pbuild_dispatcher_dispatch_overhead_seconds_count", ())] == 2
    assert samples[("p2pbuild_dispatcher_dispatch_overhead_seconds_sum", ())] == 9.5
    assert samples[("p2pbuild_dispatcher_dispatch_overhead_seconds_bucket",
                    (("le", "5.0"),))] == 1
    assert samples[("p2pbuild_dispatcher_builds", (("state", "queued"),))] == 3  # rows as-is
    assert samples[("p2pbuild_dispatcher_nodes", (("state", "online"),))] == 3
    assert samples[("p2pbuild_dispatcher_nodes", (("state", "standby"),))] == 1
    assert samples[("p2pbuild_dispatcher_node_errors_total", (("code", "timed-out"),))] == 2
    assert ("p2pbuild_dht_lookups_total", ()) not in samples  # no DHT: no DHT families
    reader.close()
    db.close()
