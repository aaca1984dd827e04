"""Pull mode, node side: long-poll a dispatcher for jobs, upload results and artifacts.

A node behind NAT opens no port (design item 14). For each ``[pull]`` dispatcher a
:class:`PullClient` loops: wait for a free build slot, ``POST /v1/pull`` with a fresh
:class:`~p2pbuild.PullAuth` token (the signature proves which node asks; the token is for
that dispatcher only and single-use), and either get ``204`` (no job within the wait) or a
signed job. The job goes through the same admission as a pushed one (trust list, replay,
expiry, what this node can serve) and must be signed by the dispatcher that was polled.
A refused job is reported back (``POST /v1/pull/jobs/<id>/refused``) so the dispatcher can
send it elsewhere.

When the build ends the client uploads the signed result
(``PUT /v1/pull/jobs/<id>/result``), then every artifact and log by the name the result
lists (``PUT /v1/pull/jobs/<id>/artifacts/<name>``, streamed). The dispatcher re-hashes
each. After a complete upload the job is collected (its files removed here). Network
errors are retried with backoff; a dispatcher that refuses an upload with a 4xx is logged
and not retried. Every request carries its own token in
``Authorization: P2PBuild-Pull <base64url token>``. The dispatcher side is
``p2pbuild.dispatcher._pull``; the protocol is in ``docs/node-operations.md``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import httpx
import trio

from .._errors import RemoteError, UntrustedKeyError
from .._identity import Identity
from .._jobs import Job, PullAuth, Result
from ._config import PullDispatcher
from ._service import JobService, UnavailableError, UnknownJobError
from ._tls import CertificatePinError, pinned_client

__all__ = ["AUTH_SCHEME", "PullClient", "auth_header"]

_log = logging.getLogger("p2pbuild.node.pull")
AUTH_SCHEME = "P2PBuild-Pull"
MSGPACK = "application/msgpack"
_CHUNK = 1024 * 1024


def auth_header(token: PullAuth) -> str:
    """The ``Authorization`` header value carrying ``token``."""
    return f"{AUTH_SCHEME} {base64.urlsafe_b64encode(token.to_bytes()).decode()}"


class _Refused(Exception):
    """The dispatcher answered an upload with a 4xx: retrying will not help."""


@attrs.define(eq=False)
class PullClient:
    """Long-polls one dispatcher for ``service``; run with ``nursery.start(client.run)``.

    ``retry_delay`` is the first backoff after a failed request (doubling up to
    ``max_retry_delay``); ``upload_attempts`` bounds the tries per upload.
    """

    dispatcher: PullDispatcher
    identity: Identity
    service: JobService
    poll_timeout: float = 30.0
    clock: Callable[[], float] = time.time
    retry_delay: float = 1.0
    max_retry_delay: float = 60.0
    upload_attempts: int = 5
    #: Jobs received, uploads completed, and failures by kind (for tests and status).
    received: int = attrs.field(default=0, init=False)
    uploaded: int = attrs.field(default=0, init=False)
    failures: int = attrs.field(default=0, init=False)
    _poll_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _uploads: int = attrs.field(default=0, init=False)
    _uploads_done: trio.Event = attrs.field(factory=trio.Event, init=False)

    def _client(self) -> httpx.AsyncClient:
        timeout = self.poll_timeout + 30.0
        if self.dispatcher.tls_sha256 is not None:
            return pinned_client(
                self.dispatcher.tls_sha256, base_url=self.dispatcher.url, timeout=timeout
            )
        return httpx.AsyncClient(base_url=self.dispatcher.url, timeout=timeout, trust_env=False)

    def _auth(self) -> dict[str, str]:
        token = PullAuth.create(self.identity, self.dispatcher.key, issued_at=int(self.clock()))
        return {"authorization": auth_header(token)}

    def stop_polling(self) -> None:
        """Stop asking for jobs (the node drains); uploads in progress go on."""
        self._poll_scope.cancel()

    async def wait_uploads(self) -> None:
        """Return once no upload is in progress."""
        while self._uploads:
            await self._uploads_done.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll and deliver until cancelled. Nothing the dispatcher sends ends it."""
        async with self._client() as client, trio.open_nursery() as uploads:
            task_status.started()
            with self._poll_scope:
                delay = self.retry_delay
                while True:
                    await self.service.wait_free_slot()
                    try:
                        data = await self._poll(client)
                    except (httpx.HTTPError, CertificatePinError, _Refused) as exc:
                        self.failures += 1
                        _log.warning("polling %s failed: %s", self.dispatcher.url, exc)
                        await trio.sleep(delay)
                        delay = min(delay * 2, self.max_retry_delay)
                        continue
                    delay = self.retry_delay
                    if data is not None:
                        self._admit(client, data, uploads)
            # Draining: the loop ended, the uploads nursery waits for deliveries.

    async def _poll(self, client: httpx.AsyncClient) -> bytes | None:
        response = await client.post(
            "/v1/pull",
            params={"wait": f"{self.poll_timeout:g}"},
            headers=self._auth(),
        )
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise _Refused(f"HTTP {response.status_code}: {response.text[:200]}")
        return response.content

    def _admit(self, client: httpx.AsyncClient, data: bytes, uploads: trio.Nursery) -> None:
        self.received += 1
        try:
            job = Job.from_bytes(data)
        except RemoteError as exc:
            _log.warning("dispatcher %s sent a malformed job: %s", self.dispatcher.url, exc)
            self.service.count_rejection(exc)
            return
        try:
            if job.dispatcher != self.dispatcher.key:
                raise UntrustedKeyError(
                    f"job signed by {job.dispatcher.fingerprint}, not by the dispatcher polled"
                )
            self.service.submit(data)
        except (RemoteError, UnavailableError) as exc:
            if isinstance(exc, UntrustedKeyError):
                self.service.count_rejection(exc)
            _log.info("refusing pulled job %s: %s: %s", job.id_hex, exc.code, exc)
            self._start_upload(uploads, self._refuse, client, job, exc.code, str(exc))
            return
        self._start_upload(uploads, self._deliver, client, job)

    def _start_upload(
        self, nursery: trio.Nursery, fn: Callable[..., Awaitable[None]], *args: object
    ) -> None:
        self._uploads += 1

        async def task() -> None:
            try:
                await fn(*args)
            finally:
                self._uploads -= 1
                if not self._uploads:
                    self._uploads_done.set()
                    self._uploads_done = trio.Event()

        nursery.start_soon(task)

    async def _with_retries(self, what: str, attempt: Callable[[], Awaitable[None]]) -> bool:
        delay = self.retry_delay
        for _ in range(self.upload_attempts):
            try:
                await attempt()
                return True
            except _Refused as exc:
                _log.warning("%s refused by %s: %s", what, self.dispatcher.url, exc)
                return False
            except (httpx.HTTPError, CertificatePinError) as exc:
                _log.warning("%s to %s failed: %s", what, self.dispatcher.url, exc)
            self.failures += 1
            await trio.sleep(delay)
            delay = min(delay * 2, self.max_retry_delay)
        return False

    async def _refuse(self, client: httpx.AsyncClient, job: Job, code: str, reason: str) -> None:
        async def attempt() -> None:
            response = await client.post(
                f"/v1/pull/jobs/{job.id_hex}/refused",
                json={"error": code, "reason": reason.replace("\n", " ")[:300]},
                headers=self._auth(),
            )
            _check(response)

        await self._with_retries(f"refusal of {job.id_hex}", attempt)

    async def _deliver(self, client: httpx.AsyncClient, job: Job) -> None:
        result = await self.service.wait_result(job.job_id)

        async def put_result() -> None:
            response = await client.put(
                f"/v1/pull/jobs/{job.id_hex}/result",
                content=result.to_bytes(),
                headers={**self._auth(), "content-type": MSGPACK},
            )
            _check(response)

        if not await self._with_retries(f"result of {job.id_hex}", put_result):
            return
        for kind, items in (("artifacts", result.artifacts), ("logs", result.logs)):
            for digest in items:
                found = self._file(job, result, kind, digest.name)
                if found is None:
                    continue

                async def put_file(
                    kind: str = kind, name: str = digest.name, path: Path = found
                ) -> None:
                    response = await client.put(
                        f"/v1/pull/jobs/{job.id_hex}/{kind}/{name}",
                        content=_read_chunks(path),
                        headers={
                            **self._auth(),
                            "content-type": "application/octet-stream",
                            "content-length": str(path.stat().st_size),
                        },
                    )
                    _check(response)

                if not await self._with_retries(f"{kind[:-1]} {digest.name}", put_file):
                    return
        self.uploaded += 1
        with contextlib.suppress(UnknownJobError):  # already expired or evicted
            self.service.collect(job.job_id)

    def _file(self, job: Job, result: Result, kind: str, name: str) -> Path | None:
        try:
            found = self.service.file(job.job_id, kind, name)
        except UnknownJobError:
            return None
        return None if found is None else found[1]


def _check(response: httpx.Response) -> None:
    if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
        raise _Refused(f"HTTP {response.status_code}: {response.text[:200]}")
    response.raise_for_status()


async def _read_chunks(path: Path) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb") as f:
        while chunk := await f.read(_CHUNK):
            yield chunk
