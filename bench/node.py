"""Node job API benchmark: dispatch latency and artifact download throughput over HTTPS.

Runs a node's job service and HTTPS API (hypercorn's trio worker, TLS on loopback) in this
process and measures, printing one JSON document:

* **dispatch latency**: from just before a signed job is POSTed until the build process
  would start, p50/p99/max, on a reused TLS connection (``warm``) and on a fresh TCP+TLS
  connection per job (``cold``, handshake included). The end point is recorded by an
  in-process runner the moment the job service calls ``runner.run()``: that is where the
  real runner starts the executor (the source fetch and ``bwrap`` start come after it and
  are the executor's cost, not dispatch). Jobs are signed before the clock starts; the
  node's whole admission (parse, signature check, trust list, replay cache, the SQLite
  state write, slot) is inside the measurement.
* **artifact throughput**: a finished job's artifact downloaded with the client the
  dispatcher uses (:func:`p2pbuild.https.fetch_pinned_file`: pinned TLS in a worker
  thread, hashed with SHA-256 on arrival and compared with the signed result). The headline
  writes the body to ``/dev/null``, so that it measures the transfer and not this machine's
  disk; the same download into a real file is reported beside it, and so is the pinned
  httpx client on trio's TLS stream (the path used before, hashing only). The three
  alternate in one run against the same server. The raw SHA-256 throughput of this machine
  on the same size is reported too.

* **buildroot setup**: a repository of 20 generated noarch packages (one requiring the
  other 19, 64 KiB of files each) made with rpmbuild + createrepo_c and served over HTTPS on
  loopback; :class:`p2pbuild.node.BuildrootCache` prepares the root for a build that
  requires the top package. ``cold`` (empty cache: pin, metadata, resolve, download, install
  with ``dnf --installroot`` in bubblewrap) is reported with its download/install split;
  ``warm`` (the same root again: ``repomd.xml`` fetched and checked, metadata parsed from
  the cache, resolved, found) as p50/p99/max.

Goals (issue 4): dispatch p50 at most 3 ms warm and 10 ms cold; artifact transfer at least
250 MB/s on loopback. Buildroot (design item 12): warm setup p50 at most 1 s. Usage:
``python bench/node.py [--short] [--jobs N] [--mb M]``; ``--short`` (CI) takes a few
seconds plus one cold buildroot.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import latency_summary

from p2pbuild import (
    BuildrootSpec,
    BuildType,
    FileDigest,
    Job,
    JobSpec,
    Repository,
    Result,
    ResultState,
    SourceArtifact,
    Target,
)
from p2pbuild.https import fetch_pinned_file, generate_tls_material, pinned_client
from p2pbuild.node import (
    BuildrootCache,
    Dep,
    JobService,
    NodeApiConfig,
    NodeState,
    serve_node_api,
)
from p2pbuild.node._service import JobFilter, LocalFile, LogSink, RunReport
from p2pbuild.testing import make_trust_list, serve_files

FIXTURE = make_trust_list()
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
NODE = FIXTURE.nodes["node-1"]
MB = 1_000_000
END_EVENT = (
    "runner.run() entered (in-process recording runner): where the real ExecutorRunner "
    "starts fetching and building; no bwrap process is started"
)


@attrs.define(eq=False)
class RecordingRunner:
    """Records when each build would start; optionally writes one artifact of ``size``."""

    artifact_path: Path | None = None
    started: dict[bytes, float] = attrs.field(factory=dict)
    event: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, job: Job, workdir: Path, log: LogSink) -> RunReport:
        self.started[job.job_id] = time.perf_counter()
        self.event.set()
        artifacts: tuple[LocalFile, ...] = ()
        if self.artifact_path is not None:
            digest = await trio.to_thread.run_sync(_file_digest, self.artifact_path)
            artifacts = (LocalFile(digest, self.artifact_path),)
        return RunReport(ResultState.SUCCEEDED, 0, {}, artifacts=artifacts)


def _file_digest(path: Path) -> FileDigest:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return FileDigest("big.bin", path.stat().st_size, h.digest())


SPEC = JobSpec(
    SourceArtifact("a.tar.gz", 3, hashlib.sha256(b"abc").digest(), "https://x.invalid/a"),
    BuildType.MAKE,
    Target("x86_64", "fedora-41"),
)


def _jobs(count: int) -> list[Job]:
    now = int(time.time())
    return [Job.create(DISPATCHER, SPEC, issued_at=now, lifetime=3600) for _ in range(count)]


async def _dispatch_one(client: Any, runner: RecordingRunner, job: Job) -> float:
    runner.event = trio.Event()
    t0 = time.perf_counter()
    response = await client.post(
        "/v1/jobs", content=job.raw, headers={"content-type": "application/msgpack"}
    )
    if response.status_code != 202:
        raise RuntimeError(f"job refused: {response.status_code} {response.text}")
    while job.job_id not in runner.started:
        await runner.event.wait()
        runner.event = trio.Event()
    return runner.started[job.job_id] - t0


async def _bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tls_dir = work / "tls"
    tls_dir.mkdir()
    tls = generate_tls_material(tls_dir, "localhost")
    runner = RecordingRunner()
    state = NodeState.open(work / "state.sqlite3")
    service = JobService(
        NODE, FIXTURE.trust_list, runner, work / "jobs", slots=64, max_finished=64,
        store=state,
        job_filter=JobFilter({"x86_64"}, {"fedora-41"}, {"make", "rpm"}, 1 << 30),
    )  # fmt: skip
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_node_api, NodeApiConfig(tls=tls), service)
        url = f"https://127.0.0.1:{port}"

        # Warm: one connection for every job (after a few warm-up requests).
        jobs = _jobs(args.jobs + 20)
        async with pinned_client(tls.sha256, base_url=url) as client:
            for job in jobs[:20]:
                await _dispatch_one(client, runner, job)
            warm = [await _dispatch_one(client, runner, job) for job in jobs[20:]]
        # Cold: a new TCP connection and TLS handshake per job.
        cold = []
        for job in _jobs(args.cold_jobs):
            async with pinned_client(tls.sha256, base_url=url) as client:
                cold.append(await _dispatch_one(client, runner, job))
        results["dispatch"] = {
            "end_event": END_EVENT,
            "warm": {"jobs": len(warm), **latency_summary(warm)},
            "cold": {"jobs": len(cold), **latency_summary(cold)},
        }

        # Artifact download with SHA-256 verification.
        size = args.mb * MB
        big = work / "big.bin"
        with big.open("wb") as f:
            block = os.urandom(MB)
            for _ in range(args.mb):
                f.write(block)
        runner.artifact_path = big
        (job,) = _jobs(1)
        async with pinned_client(tls.sha256, base_url=url, timeout=120) as client:
            await _dispatch_one(client, runner, job)
            await service.wait_result(job.job_id)
            result = Result.from_bytes((await client.get(f"/v1/jobs/{job.id_hex}/result")).content)
        expected = result.artifacts[0]
        # The downloader is another process, as a dispatcher is: client and server do not
        # share this process's one trio thread.
        done = await trio.run_process(
            [sys.executable, __file__, "--download", f"{url}/v1/jobs/{job.id_hex}/artifacts/"
             f"big.bin", "--pin", tls.sha256.hex(), "--expect", expected.sha256.hex(),
             "--size", str(expected.size), "--downloads", str(args.downloads),
             "--dest", str(work / "downloaded.bin")],
            capture_stdout=True,
        )  # fmt: skip
        downloaded = json.loads(done.stdout)
        rates = downloaded["mb_s"]
        httpx_rates = sorted(downloaded["httpx_mb_s"])
        file_rates = sorted(downloaded["file_mb_s"])
        data = big.read_bytes()[: min(size, 256 * MB)]
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        sha_rate = len(data) / (time.perf_counter() - t0) / MB
        rates.sort()
        results["artifact"] = {
            "bytes": size,
            "downloads": len(rates),
            "verified": True,
            "throughput_mb_s_median": round(rates[len(rates) // 2], 1),
            "throughput_mb_s_best": round(rates[-1], 1),
            "client": "fetch_pinned_file (worker thread, http.client) into /dev/null",
            "into_file_mb_s_median": round(file_rates[len(file_rates) // 2], 1),
            "httpx_stream_mb_s_median": round(httpx_rates[len(httpx_rates) // 2], 1),
            "speedup_vs_httpx_stream": round(
                rates[len(rates) // 2] / httpx_rates[len(httpx_rates) // 2], 2
            ),
            "sha256_only_mb_s": round(sha_rate, 1),
        }
        nursery.cancel_scope.cancel()
    state.close()
    return results


def _goals(results: Mapping[str, Any]) -> dict[str, Any]:
    warm = results["dispatch"]["warm"]["p50_ms"]
    cold = results["dispatch"]["cold"]["p50_ms"]
    rate = results["artifact"]["throughput_mb_s_median"]
    root = results["buildroot"]["warm"]["p50_ms"]
    return {
        "dispatch_warm_p50_ms": {"goal": 3.0, "measured": warm, "met": warm <= 3.0},
        "dispatch_cold_p50_ms": {"goal": 10.0, "measured": cold, "met": cold <= 10.0},
        "artifact_mb_s": {"goal": 250.0, "measured": rate, "met": rate >= 250.0},
        "buildroot_warm_p50_ms": {"goal": 1000.0, "measured": root, "met": root <= 1000.0},
    }


_BENCH_PACKAGES = 20


def _bench_repository(work: Path) -> Path:
    """One rpmbuild run making ``bench-top`` (requiring the others) and 19 more noarch
    packages of 64 KiB of files each, then createrepo_c; returns the repository."""
    names = [f"bench-pkg{i:02d}" for i in range(1, _BENCH_PACKAGES)]
    blob = "x" * (64 * 1024 - 1) + "\n"
    spec = ["Name: bench-top", "Version: 1.0", "Release: 1", "Summary: bench",
            "License: MIT", "BuildArch: noarch", *(f"Requires: {n}" for n in names),
            "%description", "bench", ""]
    for name in names:
        spec += [f"%package -n {name}", "Summary: bench", f"%description -n {name}", "bench",
                 f"%files -n {name}", f"/usr/share/bench/{name}.txt", ""]
    spec += ["%install", "mkdir -p %{buildroot}/usr/share/bench"]
    spec += [f"cp {work}/blob %{{buildroot}}/usr/share/bench/{n}.txt" for n in names]
    spec += ["cp " + f"{work}/blob %{{buildroot}}/usr/share/bench/top.txt", "",
             "%files", "/usr/share/bench/top.txt", ""]
    (work / "blob").write_text(blob)
    (work / "bench.spec").write_text("\n".join(spec))
    repo = work / "www" / "repo"
    repo.mkdir(parents=True)
    subprocess.run(
        ["rpmbuild", "-bb", "--define", f"_topdir {work}/top", "--define",
         f"_rpmdir {repo}", "--define", "_binary_payload w9.gzdio", str(work / "bench.spec")],
        check=True, capture_output=True,
    )
    subprocess.run(["createrepo_c", "--quiet", "--no-database", str(repo)], check=True,
                   capture_output=True)
    return repo


async def _buildroot_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    repo = await trio.to_thread.run_sync(_bench_repository, work)
    digest = hashlib.sha256((repo / "repodata" / "repomd.xml").read_bytes()).digest()
    cold: list[dict[str, float]] = []
    warm: list[float] = []
    async with trio.open_nursery() as nursery:
        base, _ = await nursery.start(serve_files, work / "www", work / "repo-tls")
        spec = BuildrootSpec((Repository("bench", f"{base}/repo/", digest),))
        requires = [Dep("bench-top")]
        for index in range(args.cold_roots):
            cache = BuildrootCache(work / f"cache-{index}")
            t0 = time.perf_counter()
            async with cache.use(spec, requires) as prepared:
                total = time.perf_counter() - t0
            step = prepared.step
            if step.cache_hit or len(step.packages) != _BENCH_PACKAGES + 1:
                raise RuntimeError(f"unexpected cold root: {step}")
            cold.append({"total_s": total, "metadata_s": step.metadata_s,
                         "download_s": step.download_s, "install_s": step.install_s,
                         "downloaded_bytes": step.downloaded_bytes})
        for _ in range(args.warm_roots):
            t0 = time.perf_counter()
            async with cache.use(spec, requires) as prepared:
                warm.append(time.perf_counter() - t0)
            if not prepared.step.cache_hit:
                raise RuntimeError("the warm root was not a cache hit")
        nursery.cancel_scope.cancel()
    median = sorted(cold, key=lambda c: c["total_s"])[len(cold) // 2]
    return {
        "packages": _BENCH_PACKAGES,
        "installed": _BENCH_PACKAGES + 1,  # plus the host base package
        "cold": {
            "runs": len(cold),
            "median_total_s": round(median["total_s"], 2),
            "metadata_and_resolve_s": round(median["metadata_s"], 2),
            "download_s": round(median["download_s"], 2),
            "install_s": round(median["install_s"], 2),
            "downloaded_bytes": int(median["downloaded_bytes"]),
        },
        "warm": {"runs": len(warm), **latency_summary(warm)},
    }


async def _download(args: argparse.Namespace) -> dict[str, list[float]]:
    """The downloader child: fetch ``args.download`` ``args.downloads`` times with each
    client, alternating, hashing and verifying each; return MB/s per download."""
    pin = bytes.fromhex(args.pin)
    rates: dict[str, list[float]] = {"mb_s": [], "file_mb_s": [], "httpx_mb_s": []}
    async with pinned_client(pin, timeout=120) as client:
        for _ in range(args.downloads):
            # The dispatcher's client (worker thread, hashed on arrival), without and with
            # a real file.
            for key, dest in (("mb_s", Path(os.devnull)), ("file_mb_s", Path(args.dest))):
                t0 = time.perf_counter()
                fetched = await fetch_pinned_file(
                    args.download, pin, dest, max_bytes=args.size, timeout=120
                )
                elapsed = time.perf_counter() - t0
                if fetched.status != 200 or fetched.size != args.size or (
                    fetched.sha256.hex() != args.expect
                ):
                    raise RuntimeError("downloaded artifact does not match the signed result")
                rates[key].append(fetched.size / elapsed / MB)
            # The previous path: the pinned httpx client on trio's TLS stream, hashing only.
            t0 = time.perf_counter()
            h = hashlib.sha256()
            received = 0
            async with client.stream("GET", args.download) as response:
                async for chunk in response.aiter_raw(1 << 20):
                    h.update(chunk)
                    received += len(chunk)
            elapsed = time.perf_counter() - t0
            if received != args.size or h.hexdigest() != args.expect:
                raise RuntimeError("downloaded artifact does not match the signed result")
            rates["httpx_mb_s"].append(received / elapsed / MB)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--download", help=argparse.SUPPRESS)
    parser.add_argument("--pin", help=argparse.SUPPRESS)
    parser.add_argument("--expect", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    parser.add_argument("--short", action="store_true", help="CI mode: a few seconds")
    parser.add_argument("--jobs", type=int, help="warm dispatches (default 1000; 200 short)")
    parser.add_argument("--cold-jobs", type=int, help="cold dispatches (default 300; 50 short)")
    parser.add_argument("--mb", type=int, help="artifact size in MB (default 512; 64 short)")
    parser.add_argument("--downloads", type=int, help="downloads (default 5; 3 short)")
    parser.add_argument("--cold-roots", type=int, help="cold buildroots (default 3; 1 short)")
    parser.add_argument("--warm-roots", type=int, help="warm buildroots (default 50; 10 short)")
    args = parser.parse_args()
    args.cold_roots = args.cold_roots or (1 if args.short else 3)
    args.warm_roots = args.warm_roots or (10 if args.short else 50)
    args.jobs = args.jobs or (200 if args.short else 1000)
    args.cold_jobs = args.cold_jobs or (50 if args.short else 300)
    args.mb = args.mb or (64 if args.short else 512)
    args.downloads = args.downloads or (3 if args.short else 5)
    if args.download:
        print(json.dumps(trio.run(_download, args)))
        return
    with tempfile.TemporaryDirectory(prefix="p2pbuild-bench-node-") as tmp:
        started = time.perf_counter()
        results = trio.run(_bench, args, Path(tmp))
        (Path(tmp) / "buildroot").mkdir()
        results["buildroot"] = trio.run(_buildroot_bench, args, Path(tmp) / "buildroot")
    print(json.dumps({
        "benchmark": "node",
        "mode": "short" if args.short else "full",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        **results,
        "goals": _goals(results),
        "wall_s": round(time.perf_counter() - started, 1),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
