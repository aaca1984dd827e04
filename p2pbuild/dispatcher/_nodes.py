"""How the engine finds nodes and talks to them.

* :class:`NodeFinder`: ``find(query)`` and ``lookup(key)`` over the DHT
  (:class:`DirectoryFinder`) or a fixed list (:class:`StaticFinder`, for tests, benchmarks
  and a dispatcher configured with static nodes).
* :class:`NodeClient`: one node's job API as the engine needs it. :class:`PushNodeClient`
  speaks HTTPS to the node's endpoint with the certificate pinned to the ``tls_sha256`` of its
  signed capability record (``docs/node-api.md``). Large artifacts come through
  :func:`~p2pbuild.https.fetch_pinned_file` (same pin, TLS in a worker thread, several
  times the throughput of the trio client), small ones over the pooled connection; both
  re-hash on arrival and stop at the signed size. Pull-mode nodes are reached through a
  :class:`PullQueue` (``_pull.py``), adapted by :class:`PullNodeClient`.

This module is the one boundary where the network's and the peer's failures become
:class:`NodeError` subclasses: ``httpx`` errors, TLS pin mismatches, refusals, results that
do not parse or are not signed by the node. The engine catches only :class:`NodeError`.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol

import attrs
import httpx
import trio

from .._errors import RemoteError
from .._identity import Identity, PublicKey
from .._jobs import FileDigest, Job, Result
from .._records import Capability, Kind, SignedRecord
from .._trust import TrustList
from ..dht import Directory, DirectoryClosedError, NodeEntry, Query, latest, node_key
from ..https import BodyTooLongError, fetch_pinned_file, pinned_client
from ..node._api import control_header
from ._errors import (
    ArtifactDigestError,
    BadNodeResultError,
    NodeBusyError,
    NodeError,
    NodeRefusedError,
    NodeUnreachableError,
)

__all__ = [
    "DirectoryFinder",
    "NodeClient",
    "NodeConnector",
    "NodeFinder",
    "PullNodeClient",
    "PullQueue",
    "PushNodeClient",
    "SharedDownloads",
    "StaticFinder",
    "download_logs",
    "entry_from_records",
]

MSGPACK = "application/msgpack"
#: What a node keeps of a job: its artifacts and its logs (both named in the result).
FileKind = Literal["artifacts", "logs"]
# Bound on DirectoryFinder's cache (distinct queries; cleared when full).
_MAX_CACHED_QUERIES = 256
#: Downloads up to this size are written to disk without a worker thread.
_INLINE_WRITE_MAX = 64 * 1024
# Bound on PushNodeClient._ended (results of ended jobs not yet asked for).
_MAX_ENDED = 256


class NodeFinder(Protocol):
    async def find(self, query: Query, *, fresh: bool = False) -> list[NodeEntry]:
        """Trusted nodes matching ``query`` with their latest capability and status.
        A finder may answer from a cache a little behind the directory; ``fresh`` asks it
        to look again (views of the farm ask so, to show a stopped node as it leaves)."""
        ...

    async def lookup(self, key: PublicKey) -> NodeEntry | None:
        """The node's current records, or None if it is gone from the directory."""
        ...


@attrs.define(eq=False)
class DirectoryFinder:
    """A :class:`NodeFinder` over a running DHT :class:`~p2pbuild.dht.Directory`, with a
    directory cache: a query's answer, if it found any node, is reused for
    ``refresh_interval`` seconds (trio's clock), so placing a build does not look facets up
    every time (a node's status in the answer may be that old; the node itself refuses a job
    it has no slot for). With ``sample``, a
    query reads a uniformly random sample of about that many matching nodes
    (:meth:`~p2pbuild.dht.Directory.find_sample`) instead of the whole facet.

    With a ``nursery``, an answer due for a refresh is still returned at once while it is
    read again in the background (stale-while-revalidate, as HTTP caches do), up to
    ``max_stale`` seconds old; placing a build then never waits for the DHT but on the
    first find of a query, a ``fresh`` one, or after a long pause. Without, a due
    refresh is awaited."""

    directory: Directory
    trust_list: TrustList
    refresh_interval: float = 30.0
    sample: int | None = None
    nursery: trio.Nursery | None = None
    max_stale: float = 300.0
    _cache: dict[Query, tuple[float, list[NodeEntry]]] = attrs.field(factory=dict)
    _refreshing: set[Query] = attrs.field(factory=set)

    async def find(self, query: Query, *, fresh: bool = False) -> list[NodeEntry]:
        cached = self._cache.get(query)
        if not fresh and cached is not None:
            age = trio.current_time() - cached[0]
            stale_ok = self.nursery is not None and age < self.max_stale
            if age < self.refresh_interval or stale_ok:
                if age >= self.refresh_interval and query not in self._refreshing:
                    assert self.nursery is not None
                    self._refreshing.add(query)
                    self.nursery.start_soon(self._refresh, query)
                await trio.lowlevel.checkpoint()
                return list(cached[1])
        return await self._read(query)

    async def _read(self, query: Query) -> list[NodeEntry]:
        now = trio.current_time()
        entries: list[NodeEntry]
        if self.sample is not None:
            entries = await self.directory.find_sample(query, self.sample, self.trust_list)
        else:
            entries = await self.directory.find(query, self.trust_list)
        if len(self._cache) >= _MAX_CACHED_QUERIES:
            self._cache.clear()
        if entries:
            self._cache[query] = (now, list(entries))
        return list(entries)

    async def _refresh(self, query: Query) -> None:
        try:
            await self._read(query)
        except DirectoryClosedError:
            pass  # the node stopped: the service is ending
        finally:
            self._refreshing.discard(query)

    async def lookup(self, key: PublicKey) -> NodeEntry | None:
        records = await self.directory.get(node_key(key))
        return entry_from_records([r for r in records if r.publisher == key], self.trust_list)


def entry_from_records(
    records: Sequence[SignedRecord], trust_list: TrustList | None = None
) -> NodeEntry | None:
    """The :class:`NodeEntry` of one publisher's records (latest capability and status),
    or None without a capability."""
    newest = {record.kind: record for record in latest(records).values()}
    capability, status = newest.get(Kind.CAPABILITY), newest.get(Kind.STATUS)
    if capability is None:
        return None
    trust = trust_list.entry(capability.publisher) if trust_list is not None else None
    return NodeEntry(capability.publisher, capability, status, trust)


@attrs.define(eq=False)
class StaticFinder:
    """A fixed set of nodes; :meth:`remove` makes one vanish, :meth:`put` (re)adds one."""

    trust_list: TrustList
    entries: dict[PublicKey, NodeEntry] = attrs.field(factory=dict)

    def put(self, entry: NodeEntry) -> None:
        self.entries[entry.publisher] = attrs.evolve(
            entry, trust=self.trust_list.entry(entry.publisher)
        )

    def remove(self, key: PublicKey) -> None:
        self.entries.pop(key, None)

    async def find(self, query: Query, *, fresh: bool = False) -> list[NodeEntry]:
        await trio.lowlevel.checkpoint()
        return [
            e for _, e in sorted(self.entries.items())
            if query.matches(_capability(e))
        ]

    async def lookup(self, key: PublicKey) -> NodeEntry | None:
        await trio.lowlevel.checkpoint()
        return self.entries.get(key)


def _capability(entry: NodeEntry) -> Capability:
    return entry.capability


class NodeClient(Protocol):
    """One node's job API. Every method raises only :class:`NodeError` subclasses for
    anything the node or the network does wrong (and ``trio.Cancelled``).

    Push and pull nodes differ only behind it: a pushed job starts when the node accepts
    it, an offered one when the node takes it (:meth:`wait_started`); a push node keeps
    its result, a pull queue forgets it once released (:attr:`keeps_result`, :meth:`release`).
    """

    #: The node keeps its signed result after handing it over, so a restart can fetch it
    #: again; False: the engine's stored copy is the only one (commit it synced).
    @property
    def keeps_result(self) -> bool: ...

    async def submit(self, job: Job) -> None:
        """Hand ``job`` to the node. Returns if the node has it (accepted now, or already:
        a ``replayed`` answer to a job we sent before a restart). Raises
        :class:`NodeBusyError` (try later or elsewhere) or another :class:`NodeError`."""
        ...

    async def resume(self, job: Job) -> None:
        """Re-attach after a dispatcher restart to a job the node already has."""
        ...

    async def wait_started(self, job_id: bytes, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a submitted job to start on the node; True
        once it has (or ended: :meth:`wait_done` then says how)."""
        ...

    async def wait_done(self, job_id: bytes, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the job to end; True when it has."""
        ...

    async def result(self, job_id: bytes) -> Result | None:
        """The authenticated signed result, or None while running."""
        ...

    async def download(self, job_id: bytes, item: FileDigest, dest: Path,
                       kind: FileKind = "artifacts") -> None:
        """Fetch artifact (or, with ``kind="logs"``, log) ``item`` to ``dest``, re-hashing
        it on arrival. Raises :class:`ArtifactDigestError` if size or SHA-256 differ from
        ``item``."""
        ...

    async def release(self, job_id: bytes) -> None:
        """The result and artifacts are stored: the node side may forget the job."""
        ...

    async def cancel(self, job_id: bytes) -> None:
        """Stop the job on the node (it may be running)."""
        ...

    async def withdraw(self, job_id: bytes) -> None:
        """Take back a job not known to have started, or one given up on: no node may
        start it or deliver its result any more, where the client can ensure that."""
        ...

    async def aclose(self) -> None:
        ...



@attrs.define(eq=False)
class _Download:
    done: trio.Event = attrs.field(factory=trio.Event)
    path: Path | None = None


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dest)


@attrs.define(eq=False)
class SharedDownloads:
    """One download per distinct artifact of a build: replicas that signed the same digest
    need not all send the bytes (half the dispatcher's inbound traffic with two replicas).
    The first attempt to want an artifact fetches it; the others wait for it and link its
    file (the same bytes, by the digest they signed; the stored build re-hashes them), or
    fetch it themselves if that failed."""

    _builds: dict[str, dict[tuple[str, int, bytes], _Download]] = attrs.field(factory=dict)

    async def fetch(
        self, build_id: str, client: NodeClient, job_id: bytes, item: FileDigest, dest: Path
    ) -> None:
        """``item`` into ``dest``. Raises :class:`NodeError` as :meth:`NodeClient.download`."""
        key = (item.name, item.size, item.sha256)
        downloads = self._builds.setdefault(build_id, {})
        other = downloads.get(key)
        if other is not None:
            await other.done.wait()
            if other.path is not None:
                try:
                    await trio.to_thread.run_sync(_link, other.path, dest)
                    return
                except OSError:
                    pass  # removed meanwhile, or no hard links here: fetch it
        mine = downloads[key] = _Download()
        try:
            await client.download(job_id, item, dest)
            mine.path = dest
        finally:
            mine.done.set()

    def forget(self, build_id: str) -> None:
        """The build ended (its work files go)."""
        self._builds.pop(build_id, None)


async def download_logs(
    client: NodeClient, job: Job, result: Result, dest: Path
) -> list[tuple[FileDigest, NodeError]]:
    """Fetch every log ``result`` signs into ``dest``, from push and pull nodes alike (the
    stored build keeps them, the Koji import uploads them). Best effort: returns the logs
    that did not arrive as signed, with why."""
    missed = []
    for item in result.logs:
        try:
            await client.download(job.job_id, item, dest / item.name, kind="logs")
        except NodeError as exc:
            missed.append((item, exc))
    return missed

def _refusal(response: httpx.Response, what: str) -> NodeError:
    try:
        body = response.json()
        code = str(body.get("error", "?"))[:64]
        reason = str(body.get("reason", ""))[:200]
    except (ValueError, AttributeError):
        code, reason = "?", ""
    if response.status_code == 503:
        return NodeBusyError(f"{what}: node busy ({code})")
    return NodeRefusedError(
        f"{what}: HTTP {response.status_code} {code} {reason}".strip(), response.status_code, code
    )


@attrs.define(eq=False)
class PushNodeClient:
    """:class:`NodeClient` over HTTPS with a pinned certificate.

    ``max_artifact_bytes`` bounds any single download beyond what the signed result says
    (the result's own size is the exact bound; this caps what a result may claim).
    """

    endpoint: str
    tls_sha256: bytes
    #: The dispatcher's key, which signs job control orders (:meth:`cancel`); without it
    #: the node refuses them.
    identity: Identity | None = None
    clock: Callable[[], float] = time.time
    timeout: float = 30.0
    max_artifact_bytes: int = 4 * 1024**3
    #: Largest reply body other than an artifact (a result is at most 64 KiB).
    max_reply_bytes: int = 256 * 1024
    #: Shared by many attempts (kept by :class:`NodeConnector`): :meth:`aclose` is a no-op
    #: and :meth:`close_shared` closes it.
    shared: bool = False
    #: Artifacts up to this size come over the pooled connection (no TLS handshake);
    #: larger ones through :func:`fetch_pinned_file`, several times faster per byte.
    pooled_download_max: int = 1024 * 1024
    #: The node holds ``GET .../result?wait=`` until the job ends (``docs/node-api.md``);
    #: False once it answered without waiting (it predates that): follow the log instead.
    result_wait: bool = True
    _client: httpx.AsyncClient = attrs.field(init=False)
    #: Results fetched by :meth:`wait_done`, handed out once by :meth:`result`.
    _ended: dict[bytes, Result] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self._client = pinned_client(self.tls_sha256, base_url=self.endpoint, timeout=self.timeout)

    async def aclose(self) -> None:
        if not self.shared:
            await self._client.aclose()
        else:
            await trio.lowlevel.checkpoint()

    async def close_shared(self) -> None:
        await self._client.aclose()

    async def _request(
        self, method: str, path: str, *, held: float = 0.0, **kwargs: object
    ) -> httpx.Response:
        # Read the body as a stream with a bound and a deadline: a node that answers with an
        # endless or trickling body must cost a bounded amount of memory and time. ``held``:
        # seconds the node may hold the answer back on purpose (``?wait=``).
        try:
            with trio.fail_after(2 * self.timeout + held):
                async with self._client.stream(method, path, **kwargs) as streamed:  # type: ignore[arg-type]
                    body = bytearray()
                    async for chunk in streamed.aiter_bytes():
                        body += chunk
                        if len(body) > self.max_reply_bytes:
                            raise BadNodeResultError(
                                f"{method} {path}: the reply body passed {self.max_reply_bytes} "
                                "bytes"
                            )
                return httpx.Response(
                    streamed.status_code, headers=streamed.headers, content=bytes(body),
                    request=streamed.request,
                )
        except trio.TooSlowError:
            raise NodeUnreachableError(f"{method} {path}: the reply took too long") from None
        except httpx.HTTPError as exc:
            raise NodeUnreachableError(f"{method} {path}: {exc.__class__.__name__}") from None
        except RemoteError as exc:  # CertificatePinError
            if isinstance(exc, NodeError):
                raise
            raise NodeUnreachableError(f"{method} {path}: {exc}") from None

    async def submit(self, job: Job) -> None:
        response = await self._request(
            "POST", "/v1/jobs", content=job.to_bytes(), headers={"content-type": MSGPACK}
        )
        if response.status_code == 202:
            return
        error = _refusal(response, "submit")
        if isinstance(error, NodeRefusedError) and error.node_code == "replayed":
            return  # it already has this job: we sent it before a restart
        raise error

    @property
    def keeps_result(self) -> bool:
        return True

    async def resume(self, job: Job) -> None:
        """Nothing to do: the node kept the job across our restart (or answers 404)."""
        await trio.lowlevel.checkpoint()

    async def wait_started(self, job_id: bytes, timeout: float) -> bool:
        """True: a push node starts a job when it accepts it."""
        await trio.lowlevel.checkpoint()
        return True

    async def release(self, job_id: bytes) -> None:
        """Nothing to do: the node keeps its results by its own retention."""
        await trio.lowlevel.checkpoint()

    async def withdraw(self, job_id: bytes) -> None:
        """Nothing to do: a job sent may be running (:meth:`cancel` stops it), and a lost
        node is not asked again."""
        await trio.lowlevel.checkpoint()

    async def status(self, job_id: bytes) -> dict[str, object]:
        response = await self._request("GET", f"/v1/jobs/{job_id.hex()}")
        if response.status_code != 200:
            raise _refusal(response, "status")
        try:
            body = response.json()
        except ValueError:
            raise BadNodeResultError("status is not JSON") from None
        if not isinstance(body, dict):
            raise BadNodeResultError("status is not a JSON object")
        return body

    async def wait_done(self, job_id: bytes, timeout: float) -> bool:
        if self.result_wait:
            # The node answers when the build ends, with the result: one round trip.
            result, waited = await self._fetch_result(job_id, wait=timeout)
            if result is not None:
                self._keep(job_id, result)
                return True
            if waited:
                return False
            self.result_wait = False  # it answered at once: an older node
        # Follow the live log: the node keeps the stream open until the build ends, so the
        # end arrives without polling delay. A quiet build trips the read timeout instead.
        path = f"/v1/jobs/{job_id.hex()}/log?follow=1"
        with trio.move_on_after(timeout):
            try:
                async with self._client.stream(
                    "GET", path, timeout=httpx.Timeout(self.timeout, read=timeout)
                ) as response:
                    if response.status_code != 200:
                        raise _refusal(response, "follow")
                    async for _ in response.aiter_raw():
                        pass
            except httpx.ReadTimeout:
                pass
            except httpx.HTTPError as exc:
                raise NodeUnreachableError(f"follow: {exc.__class__.__name__}") from None
            except RemoteError as exc:
                raise NodeUnreachableError(f"follow: {exc}") from None
        # Ask for the result straight away: when the build has ended (the usual reason the
        # follow returns) that is one round trip instead of a status and then the result.
        result, _ = await self._fetch_result(job_id)
        if result is not None:
            self._keep(job_id, result)
            return True
        status = await self.status(job_id)
        return status.get("phase") == "done"

    def _keep(self, job_id: bytes, result: Result) -> None:
        if len(self._ended) >= _MAX_ENDED:
            self._ended.pop(next(iter(self._ended)))
        self._ended[job_id] = result

    async def result(self, job_id: bytes) -> Result | None:
        ended = self._ended.pop(job_id, None)
        if ended is not None:
            await trio.lowlevel.checkpoint()
            return ended
        result, _ = await self._fetch_result(job_id)
        return result

    async def _fetch_result(self, job_id: bytes, wait: float = 0.0) -> tuple[Result | None, bool]:
        """The result, or None while the job runs; with ``wait``, asked to be held until
        the job ends for that long, and whether the node did (False: it answered at once)."""
        path = f"/v1/jobs/{job_id.hex()}/result"
        if wait:
            response = await self._request(
                "GET", path, held=wait, params={"wait": f"{wait:.3f}"},
                timeout=httpx.Timeout(self.timeout, read=self.timeout + wait),
            )
        else:
            response = await self._request("GET", path)
        if response.status_code == 404:
            try:
                body = response.json()
                if body.get("error") == "not-finished":
                    return None, body.get("waited") is True
            except (ValueError, AttributeError):
                pass
            raise _refusal(response, "result")
        if response.status_code != 200:
            raise _refusal(response, "result")
        try:
            return Result.from_bytes(response.content), bool(wait)
        except RemoteError as exc:
            raise BadNodeResultError(f"result: {exc.code}: {exc}") from None

    async def download(self, job_id: bytes, item: FileDigest, dest: Path,
                       kind: FileKind = "artifacts") -> None:
        # Artifacts can be large: they take the threaded pinned path (fetch_pinned_file),
        # not the trio httpx client; the pin, the size bound and the re-hash are the same.
        if item.size > self.max_artifact_bytes:
            raise ArtifactDigestError(f"{item.name}: {item.size} bytes is over the bound")
        if item.size <= self.pooled_download_max:
            await self._download_pooled(job_id, item, dest, kind)
            return
        await trio.Path(dest.parent).mkdir(parents=True, exist_ok=True)
        url = f"{self.endpoint.rstrip('/')}/v1/jobs/{job_id.hex()}/{kind}/"
        url += urllib.parse.quote(item.name, safe="/")
        try:
            fetched = await fetch_pinned_file(
                url, self.tls_sha256, dest, max_bytes=item.size, timeout=self.timeout
            )
        except BodyTooLongError:
            raise ArtifactDigestError(
                f"{item.name}: more than the signed {item.size} bytes"
            ) from None
        except RemoteError as exc:  # TransferError, CertificatePinError
            raise NodeUnreachableError(f"download {item.name}: {exc}") from None
        if fetched.status != 200:
            raise _refusal(
                httpx.Response(fetched.status, content=fetched.body), f"download {item.name}"
            )
        self._check_arrived(item, fetched.size, fetched.sha256)

    async def _download_pooled(self, job_id: bytes, item: FileDigest, dest: Path,
                               kind: FileKind) -> None:
        # Small: kept in memory (bounded by the signed size) and written in one thread
        # call, rather than a thread hop each to open, write and close the file.
        path = f"/v1/jobs/{job_id.hex()}/{kind}/{item.name}"
        data = bytearray()
        try:
            async with self._client.stream("GET", path) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _refusal(response, f"download {item.name}")
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > item.size:
                        raise ArtifactDigestError(
                            f"{item.name}: more than the signed {item.size} bytes"
                        )
        except httpx.HTTPError as exc:
            raise NodeUnreachableError(f"download {item.name}: {exc.__class__.__name__}") from None
        except RemoteError as exc:
            if isinstance(exc, NodeError):
                raise
            raise NodeUnreachableError(f"download {item.name}: {exc}") from None
        self._check_arrived(item, len(data), hashlib.sha256(data).digest())
        if len(data) <= _INLINE_WRITE_MAX:
            # A log or a small artifact: written in place, in well under a millisecond;
            # a worker-thread hop costs more than that on a busy event loop (it waits for
            # the interpreter lock each way).
            _write_file(dest, data)
        else:
            await trio.to_thread.run_sync(_write_file, dest, data)

    @staticmethod
    def _check_arrived(item: FileDigest, size: int, sha256: bytes) -> None:
        if size != item.size or sha256 != item.sha256:
            raise ArtifactDigestError(
                f"{item.name}: arrived as {size} bytes, SHA-256 {sha256.hex()[:16]}, "
                f"the signed result says {item.size} bytes, {item.sha256.hex()[:16]}"
            )

    async def cancel(self, job_id: bytes) -> None:
        headers = {}
        if self.identity is not None:
            headers["authorization"] = control_header(self.identity, job_id, int(self.clock()))
        response = await self._request("DELETE", f"/v1/jobs/{job_id.hex()}", headers=headers)
        if response.status_code not in (200, 404):
            raise _refusal(response, "cancel")


def _write_file(path: Path, data: bytes | bytearray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class PullQueue(Protocol):
    """What the engine needs from the pull-mode queue (``_pull.PullQueue``): jobs offered to
    one node, taken when it long-polls, kept alive by the node's lease renewals, answered by
    the signed result and artifacts it uploads (re-hashed by the queue as they stream in)."""

    def offer(self, node: PublicKey | None, job: Job) -> object: ...

    def resume(self, node: PublicKey, job: Job) -> object: ...

    def withdraw(self, job_id: bytes) -> None: ...

    def delivery(self, job_id: bytes) -> object | None: ...

    async def wait_taken(self, job_id: bytes) -> None: ...

    async def wait_result(self, job_id: bytes) -> Result: ...

    def artifact(self, job_id: bytes, name: str) -> Path | None: ...

    def log(self, job_id: bytes, name: str) -> Path | None: ...

    def release(self, job_id: bytes) -> None: ...


@attrs.define(eq=False)
class PullNodeClient:
    """:class:`NodeClient` for a pull-mode node, over a :class:`PullQueue`.

    :meth:`submit` offers the job; it runs once the node took it (:meth:`wait_started`; the
    engine records the attempt ``running`` only then). A node that took a job and stops
    renewing its lease ends :meth:`wait_done` with ``lease-expired``
    (``_pull.LeaseExpiredError``). The queue lives in memory: after a dispatcher restart
    :meth:`resume` puts a running job back as taken by its node with a fresh lease, so a
    node still building it renews and uploads as before, and one that died is lost a lease
    period later.
    """

    queue: PullQueue
    node: PublicKey
    _results: dict[bytes, Result] = attrs.field(factory=dict, init=False)

    async def submit(self, job: Job) -> None:
        await trio.lowlevel.checkpoint()
        try:
            self.queue.offer(self.node, job)
        except RemoteError as exc:  # NodeBusyError: the queue is full
            raise _as_node_error(exc, 400) from None

    async def resume(self, job: Job) -> None:
        await trio.lowlevel.checkpoint()
        if self.queue.delivery(job.job_id) is None:
            self.queue.resume(self.node, job)

    @property
    def keeps_result(self) -> bool:
        return False

    async def wait_started(self, job_id: bytes, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the node to take the offered job; True once
        it has (or the job ended: :meth:`wait_done` then says how)."""
        with trio.move_on_after(timeout):
            try:
                await self.queue.wait_taken(job_id)
            except RemoteError as exc:
                raise _as_node_error(exc) from None
            return True
        return False

    async def wait_done(self, job_id: bytes, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            try:
                self._results[job_id] = await self.queue.wait_result(job_id)
            except RemoteError as exc:
                raise _as_node_error(exc) from None
            return True
        return False

    async def result(self, job_id: bytes) -> Result | None:
        await trio.lowlevel.checkpoint()
        return self._results.get(job_id)

    async def download(self, job_id: bytes, item: FileDigest, dest: Path,
                       kind: FileKind = "artifacts") -> None:
        find = self.queue.artifact if kind == "artifacts" else self.queue.log
        path = find(job_id, item.name)
        if path is None:
            raise ArtifactDigestError(f"{item.name}: not uploaded by the node")
        data = await trio.Path(path).read_bytes()
        # The queue checked the upload; check again what we are about to keep.
        if len(data) != item.size or hashlib.sha256(data).digest() != item.sha256:
            raise ArtifactDigestError(f"{item.name}: upload does not match the signed digest")
        dest.parent.mkdir(parents=True, exist_ok=True)
        await trio.Path(dest).write_bytes(data)

    async def release(self, job_id: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.queue.release(job_id)

    async def cancel(self, job_id: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.queue.withdraw(job_id)

    async def withdraw(self, job_id: bytes) -> None:
        await self.cancel(job_id)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _as_node_error(exc: RemoteError, status: int = 404) -> NodeError:
    """A pull queue's error as the engine's :class:`NodeError` (a lost lease is one)."""
    if isinstance(exc, NodeError):
        return exc
    return NodeRefusedError(f"pull queue: {exc}", status, exc.code)


@attrs.define(eq=False)
class NodeConnector:
    """Makes the right :class:`NodeClient` for a node: push when it has an endpoint, pull
    through ``pull_queue`` otherwise."""

    pull_queue: PullQueue | None = None
    timeout: float = 30.0
    #: Signs job control orders to push nodes (the engine sets its own when None).
    identity: Identity | None = None
    #: One pinned HTTPS client (and connection pool) per node endpoint and certificate:
    #: a TLS context and handshake per attempt costs more than the rest of a small build.
    _push: dict[tuple[str, bytes], PushNodeClient] = attrs.field(factory=dict, init=False)

    @property
    def pull_available(self) -> bool:
        return self.pull_queue is not None

    def client(self, node: PublicKey, endpoint: str, tls_sha256: bytes) -> NodeClient:
        """Raises :class:`NodeUnreachableError` for a pull-only node without a queue."""
        if endpoint:
            key = (endpoint, tls_sha256)
            client = self._push.get(key)
            if client is None:
                client = PushNodeClient(
                    endpoint, tls_sha256, self.identity, timeout=self.timeout, shared=True
                )
                self._push[key] = client
            return client
        if self.pull_queue is None:
            raise NodeUnreachableError("pull-only node, and this dispatcher has no pull queue")
        return PullNodeClient(self.pull_queue, node)

    async def aclose(self) -> None:
        """Close the shared push clients."""
        clients, self._push = list(self._push.values()), {}
        for client in clients:
            await client.close_shared()
