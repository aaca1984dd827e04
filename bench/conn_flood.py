"""One host floods the dispatcher with idle TLS connections; what does it cost? JSON out.

Runs a real dispatcher as a child process (``p2pbuild dispatcher run``, default
configuration: per-address and total connection bounds, 5 s idle keep-alive), then:

1. baseline: the dispatcher's RSS and the time of ``--submits`` genuine submits (an SRPM
   upload, ``POST /v1/builds``, answered ``202``) from 127.0.0.1;
2. flood: ``--workers`` child processes together open ``--connections`` TCP connections from
   one other address (127.0.0.2; all of 127/8 is loopback), each completing a TLS handshake
   if the server lets it and then sitting idle; with ``--retry-s`` a connection the server
   closed is opened again after that many seconds, for as long as the flood lasts;
3. while the flood opens its connections, a genuine submit every half second; once it holds
   what it could: the dispatcher's RSS, the submits again, and the server's own connection
   counts (``/v1/status``);
4. after: RSS again; then the dispatcher is stopped and its log searched for tracebacks.

Goals (issue "connections one host may hold"): RSS under 200 MB and every genuine submit
under 2 s while the flood is held. The flood needs one file descriptor per connection in
its workers: each worker opens at most ``ulimit -n`` minus a margin (reported).

Usage: ``python bench/conn_flood.py [--short] [--connections N] [--workers N] [--submits N]
[--retry-s S]``. ``--short`` floods with 2,000 connections.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import latency_summary

from p2pbuild.dispatcher import hash_token
from p2pbuild.https import pinned_client
from p2pbuild.testing import make_trust_list
from p2pbuild.testing._farm import write_dispatcher_config

GOAL_RSS_MB = 200.0
GOAL_SUBMIT_S = 2.0
TOKEN = "bench-token-not-secret"
FLOOD_ADDRESS = "127.0.0.2"


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _write_config(directory: Path) -> Path:
    return write_dispatcher_config(
        directory, make_trust_list(), dht={"host": "127.0.0.1", "port": 0},
        clients=[{"user": "bench", "token_sha256": hash_token(TOKEN)}],
    )


async def _submits(url: str, pin: bytes, count: int) -> list[float]:
    times = []
    async with pinned_client(pin, base_url=url, timeout=30) as http:
        for i in range(count):
            started = time.perf_counter()
            response = await http.post(
                "/v1/builds", params={"name": f"bench-{i}-1.src.rpm"},
                content=os.urandom(10_000), headers={"authorization": f"Bearer {TOKEN}"},
            )
            times.append(time.perf_counter() - started)
            if response.status_code != 202:
                raise RuntimeError(f"genuine submit refused: {response.status_code}")
    return times


async def _status(url: str, pin: bytes) -> dict[str, Any]:
    async with pinned_client(pin, base_url=url, timeout=30) as http:
        response = await http.get("/v1/status", headers={"authorization": f"Bearer {TOKEN}"})
        body: dict[str, Any] = response.json()
        return body


async def _read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes:
    while b"\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise RuntimeError(f"child ended: {bytes(buffer)!r}")
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


async def run(args: argparse.Namespace) -> dict[str, Any]:
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    per_worker_max = max(1, soft_limit - 200)
    workers = max(args.workers, -(-args.connections // per_worker_max))
    with tempfile.TemporaryDirectory(prefix="p2pbuild-flood-") as tmp:
        directory = Path(tmp)
        config = _write_config(directory)
        log_path = directory / "dispatcher.log"
        with log_path.open("wb") as log:
            dispatcher = await trio.lowlevel.open_process(
                [sys.executable, "-m", "p2pbuild", "dispatcher", "run", "--config", str(config)],
                stdout=subprocess.PIPE, stderr=log,
            )
        try:
            assert dispatcher.stdout is not None
            info = json.loads(await _read_line(dispatcher.stdout, bytearray()))
            url, pin = info["url"], bytes.fromhex(info["tls_sha256"])
            await _submits(url, pin, 2)  # warm up (imports, first database writes)
            baseline_rss = _rss_mb(dispatcher.pid)
            baseline = await _submits(url, pin, args.submits)

            flood_started = time.perf_counter()
            share = -(-args.connections // workers)
            children = []
            for index in range(workers):
                count = min(share, args.connections - index * share)
                children.append(await trio.lowlevel.open_process(
                    [sys.executable, __file__, "--worker", "--port", str(info["port"]),
                     "--connections", str(count), "--retry-s", str(args.retry_s)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                ))
            reports: list[dict[str, int]] = []
            opening: list[float] = []
            async with trio.open_nursery() as nursery:

                async def submits_while_opening() -> None:
                    while True:
                        opening.extend(await _submits(url, pin, 1))
                        await trio.sleep(0.5)

                nursery.start_soon(submits_while_opening)
                for child in children:
                    assert child.stdout is not None
                    reports.append(json.loads(await _read_line(child.stdout, bytearray())))
                nursery.cancel_scope.cancel()
            flood_s = time.perf_counter() - flood_started
            during_rss = _rss_mb(dispatcher.pid)
            during = await _submits(url, pin, args.submits)
            during_rss = max(during_rss, _rss_mb(dispatcher.pid))
            server = (await _status(url, pin)).get("connections", {})
            for child in children:
                assert child.stdin is not None
                await child.stdin.aclose()
            for child in children:
                await child.wait()
            await trio.sleep(1)
            after_rss = _rss_mb(dispatcher.pid)
        finally:
            dispatcher.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await dispatcher.wait()
            dispatcher.kill()
        log_text = log_path.read_text(errors="replace")
    totals = {key: sum(r[key] for r in reports) for key in reports[0]}
    worst_during = max(during)
    return {
        "benchmark": "conn_flood",
        "mode": "short" if args.short else "full",
        "ulimit_n": soft_limit,
        "flood": {
            "connections": args.connections, "workers": workers, "source": FLOOD_ADDRESS,
            "retry_s": args.retry_s, "seconds_to_open": round(flood_s, 2), **totals,
        },
        "server": server,
        "dispatcher_rss_mb": {
            "baseline": round(baseline_rss, 1), "during_flood": round(during_rss, 1),
            "after_flood": round(after_rss, 1),
        },
        "submit": {
            "baseline": latency_summary(baseline),
            "while_the_flood_opens": {"submits": len(opening), **latency_summary(opening)},
            "during_flood": latency_summary(during),
        },
        "dispatcher_log": {
            "tracebacks": log_text.count("Traceback"),
            "accept_failed_lines": log_text.count("accept failed"),
        },
        "goals": {
            "rss_under_200_mb": during_rss < GOAL_RSS_MB,
            "submit_under_2_s": worst_during < GOAL_SUBMIT_S,
        },
    }


# -- a flood worker ------------------------------------------------------------------------------


async def worker(port: int, connections: int, retry_s: float) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    counts = {"attempted": 0, "refused_at_connect": 0, "closed_before_tls": 0,
              "tls_established": 0}
    opened = trio.Semaphore(500)  # connection attempts in progress at once
    streams: list[trio.abc.Stream] = []
    stop = trio.Event()

    async def one() -> None:
        while True:
            async with opened:
                counts["attempted"] += 1
                try:
                    tcp = await trio.open_tcp_stream("127.0.0.1", port,
                                                     local_address=FLOOD_ADDRESS)
                except OSError:
                    counts["refused_at_connect"] += 1
                    tcp = None
                if tcp is not None:
                    tls = trio.SSLStream(tcp, context, server_hostname="flood")
                    try:
                        with trio.fail_after(30):
                            await tls.do_handshake()
                    except (trio.BrokenResourceError, trio.TooSlowError):
                        counts["closed_before_tls"] += 1
                        await trio.aclose_forcefully(tls)
                    else:
                        counts["tls_established"] += 1
                        streams.append(tls)
                        return  # held idle until the end
            if retry_s <= 0:
                return
            await trio.sleep(retry_s)

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as opening:
            for _ in range(connections):
                opening.start_soon(one)
            if retry_s > 0:
                # With retries the flood never settles: report after one round of tries.
                await trio.sleep(max(5.0, retry_s * 2))
                opening.cancel_scope.cancel()
        print(json.dumps(counts), flush=True)
        nursery.start_soon(_wait_stdin_closed, stop)
        await stop.wait()
    for stream in streams:
        await trio.aclose_forcefully(stream)


async def _wait_stdin_closed(done: trio.Event) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    while await stdin.receive_some(1024):
        pass
    done.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--short", action="store_true")
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--submits", type=int, default=5)
    parser.add_argument("--retry-s", type=float, default=0.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.connections is None:
        args.connections = 2000 if args.short else 20_000
    if args.worker:
        trio.run(worker, args.port, args.connections, args.retry_s)
        return 0
    print(json.dumps(trio.run(run, args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
