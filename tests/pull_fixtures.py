"""What the pull-mode tests share: keys, a job, a queue on the virtual clock, a queue
served over loopback HTTPS, a taken job, and uploads as a stream."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio

from p2pbuild import BuildType, Identity, Job, JobSpec, PullAuth, SourceArtifact, Target
from p2pbuild.dispatcher._pull import PullQueue
from p2pbuild.dispatcher._pull_routes import serve_pull
from p2pbuild.https import TlsMaterial, generate_tls_material
from p2pbuild.node._pull import auth_header
from p2pbuild.testing import make_trust_list

FIXTURE = make_trust_list()
DISPATCHER = FIXTURE.dispatchers["dispatcher-1"]
NODE_1 = FIXTURE.nodes["node-1"]
NODE_2 = FIXTURE.nodes["node-2"]
SOURCE = SourceArtifact("a.tar.gz", 3, hashlib.sha256(b"abc").digest(), "https://x.invalid/a")
T0 = float(int(time.time()))
ARTIFACT = b"the built thing\n"


def clock() -> float:
    """Unix time that moves with trio's (virtual) clock."""
    return T0 + trio.current_time()


def make_queue(tmp_path: Path, **kwargs: object) -> PullQueue:
    """A queue on :func:`clock` with its uploads under ``tmp_path``."""
    return PullQueue(
        DISPATCHER.public_key, FIXTURE.trust_list, tmp_path / "uploads", clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )


async def serve_queue(
    nursery: trio.Nursery, tmp_path: Path, **kwargs: object
) -> tuple[PullQueue, str, TlsMaterial]:
    """A queue (``kwargs`` as for :class:`PullQueue`, real clock unless given) served over
    loopback HTTPS; returns it with its base URL and TLS material."""
    (tmp_path / "dispatcher-tls").mkdir()
    tls = generate_tls_material(tmp_path / "dispatcher-tls", "localhost")
    queue = PullQueue(
        DISPATCHER.public_key, FIXTURE.trust_list, tmp_path / "uploads",
        **kwargs,  # type: ignore[arg-type]
    )
    port = await nursery.start(serve_pull, queue, tls)
    return queue, f"https://127.0.0.1:{port}", tls


def pull_overrides(url: str, tls: TlsMaterial, poll: float = 5) -> dict[str, object]:
    return {
        "pull": {
            "dispatchers": [
                {"url": url, "key": str(DISPATCHER.public_key), "tls_sha256": tls.sha256.hex()}
            ],
            "poll_timeout_s": poll,
        }
    }


async def serve_moved_queue(
    nursery: trio.Nursery, tmp_path: Path, **kwargs: object
) -> tuple[PullQueue, str, TlsMaterial, list[float]]:
    """:func:`serve_queue` on Unix time plus an offset the test moves the queue's clock by
    (setting ``offset[0]``): the queue, its URL, TLS material and ``offset``."""
    offset = [0.0]
    queue, url, tls = await serve_queue(
        nursery, tmp_path, clock=lambda: time.time() + offset[0], **kwargs
    )
    return queue, url, tls, offset


def auth(identity: Identity = NODE_1, now: Callable[[], float] = time.time) -> dict[str, str]:
    """A pull token of ``identity`` for :data:`DISPATCHER` issued at ``now()``, as request
    headers."""
    token = PullAuth.create(identity, DISPATCHER.public_key, issued_at=int(now()))
    return {"authorization": auth_header(token)}


def job_for(node: Identity | None = None, *, issued_at: int | None = None) -> Job:
    """A signed make job for ``node`` (None: any node), issued now on :func:`clock`."""
    spec = JobSpec(SOURCE, BuildType.MAKE, Target("x86_64", "fedora-41"), time_limit_s=3600)
    return Job.create(
        DISPATCHER, spec, issued_at=int(clock()) if issued_at is None else issued_at,
        lifetime=4200, node=node.public_key if node is not None else None,
    )


async def taken(queue: PullQueue, node: Identity, for_node: Identity | None = None) -> Job:
    """A job offered for ``for_node`` (None: any node) and taken by ``node``."""
    job = job_for(for_node)
    queue.offer(for_node.public_key if for_node else None, job)
    assert await queue.take(node.public_key, 0) == job
    return job


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    """An upload body as the routes stream it."""
    yield data
