"""Pull mode, node side: long-poll a dispatcher for jobs, upload results and artifacts.

A node behind NAT opens no port (design item 14). For each ``[pull]`` dispatcher a
:class:`PullClient` loops: wait for a free build slot, ``POST /v1/pull`` with a fresh
:class:`~p2pbuild.PullAuth` token (the signature proves which node asks; the token is for
that dispatcher only and single-use), and either get ``204`` (no job within the wait) or a
signed job. The job goes through the same admission as a pushed one (trust list, replay,
expiry, what this node can serve) and must be signed by the dispatcher that was polled.
A refused job is reported back (``POST /v1/pull/jobs/<id>/refused``) so the dispatcher can
send it elsewhere.

While the job builds and uploads, the client renews its lease on it
(``POST /v1/pull/jobs/<id>/lease`` with JSON progress: phase, seconds elapsed, log size)
every ``heartbeat_s``, or more often if the dispatcher asked for it in the long-poll's
``X-P2PBuild-Heartbeat-S`` header; a dispatcher that hears nothing for its lease period
gives the job to another node. A renewal answered ``410`` (``withdrawn``: the build was
cancelled or finished without us; ``lease-expired``: we were given up on) stops the build
as a push dispatcher's ``DELETE`` does (:meth:`JobService.cancel`), uploads nothing and
collects the job. Other failed renewals (network, ``404`` while a restarted dispatcher has
not re-offered the job yet) are logged and retried at the next heartbeat: only the
dispatcher decides that a job is lost.

When the build ends the client uploads the signed result
(``PUT /v1/pull/jobs/<id>/result``), then every artifact and log by the name the result
lists (``PUT /v1/pull/jobs/<id>/artifacts/<name>``, streamed). The dispatcher re-hashes
each. After a complete upload the job is collected (its files removed here). Network
errors, and a ``404`` from a restarted dispatcher that has not taken the job up again yet,
are retried with backoff (doubling up to the heartbeat) until the job expires, while the
lease is renewed: a finished result waits for a dispatcher that is away. Any other 4xx is
logged and not retried (after a ``410`` the job is collected: the dispatcher will never
want it).
Every request carries its own token in ``Authorization: P2PBuild-Pull <base64url token>``.
The dispatcher side is ``p2pbuild.dispatcher._pull``; the protocol is in
``docs/node-api.md``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import httpx
import trio

from .._errors import RemoteError, UntrustedKeyError
from .._identity import Identity
from .._jobs import Job, Result
from .._orders import PullAuth
from ..https import CertificatePinError, pinned_client
from ._config import PullDispatcher
from ._service import JobRunningError, JobService, UnavailableError, UnknownJobError

__all__ = ["AUTH_SCHEME", "HEARTBEAT_HEADER", "MIN_HEARTBEAT_S", "PullClient", "auth_header"]

_log = logging.getLogger("p2pbuild.node.pull")
AUTH_SCHEME = "P2PBuild-Pull"
#: The long-poll answer's header with the dispatcher's wanted renewal interval (seconds).
HEARTBEAT_HEADER = "X-P2PBuild-Heartbeat-S"
MSGPACK = "application/msgpack"
_CHUNK = 1024 * 1024


def auth_header(token: PullAuth) -> str:
    """The ``Authorization`` header value carrying ``token``."""
    return f"{AUTH_SCHEME} {base64.urlsafe_b64encode(token.to_bytes()).decode()}"


class _Refused(Exception):
    """The dispatcher answered an upload with a 4xx: retrying will not help."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


#: Lease renewals never come more often than this, whatever a dispatcher asks.
MIN_HEARTBEAT_S = 1.0
# How long a build stopped on the dispatcher's word may take to end before it is left.
_STOP_WAIT_S = 10.0


@attrs.define(eq=False)
class _Lease:
    """One taken job's lease, as the node keeps it."""

    job: Job
    heartbeat_s: float
    started: float
    phase: str = "building"
    #: The dispatcher's 410 code once it said the job is gone.
    gone: str | None = None
    #: A file upload was refused for want of the result: the dispatcher restarted since
    #: it took the result, so the upload starts again with the result.
    resend: bool = False


@attrs.define(eq=False)
class PullClient:
    """Long-polls one dispatcher for ``service``; run with ``nursery.start(client.run)``.

    ``retry_delay`` is the first backoff after a failed request (doubling up to
    ``max_retry_delay``); ``upload_attempts`` bounds the tries of a refusal report. A
    finished job's result and files are tried until the job expires (``_with_retries``).
    ``heartbeat_s`` is the longest interval between lease renewals of a taken job.
    """

    dispatcher: PullDispatcher
    identity: Identity
    service: JobService
    poll_timeout: float = 30.0
    clock: Callable[[], float] = time.time
    retry_delay: float = 1.0
    max_retry_delay: float = 60.0
    upload_attempts: int = 5
    heartbeat_s: float = 15.0
    #: Jobs received, uploads completed, failures, lease renewals accepted, builds stopped
    #: because the dispatcher said the job is gone (for tests and status).
    received: int = attrs.field(default=0, init=False)
    uploaded: int = attrs.field(default=0, init=False)
    failures: int = attrs.field(default=0, init=False)
    renewals: int = attrs.field(default=0, init=False)
    stopped: int = attrs.field(default=0, init=False)
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
                        polled = await self._poll(client)
                    except (httpx.HTTPError, CertificatePinError, _Refused) as exc:
                        self.failures += 1
                        _log.warning("polling %s failed: %s", self.dispatcher.url, exc)
                        await trio.sleep(delay)
                        delay = min(delay * 2, self.max_retry_delay)
                        continue
                    delay = self.retry_delay
                    if polled is not None:
                        self._admit(client, polled[0], uploads, polled[1])
            # Draining: the loop ended, the uploads nursery waits for deliveries.

    async def _poll(self, client: httpx.AsyncClient) -> tuple[bytes, float] | None:
        """A job's bytes and the heartbeat to renew its lease at, or None (no job)."""
        response = await client.post(
            "/v1/pull",
            params={"wait": f"{self.poll_timeout:g}"},
            headers=self._auth(),
        )
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise _Refused(f"HTTP {response.status_code}: {response.text[:200]}")
        return response.content, self._heartbeat(response.headers.get(HEARTBEAT_HEADER))

    def _heartbeat(self, asked: str | None) -> float:
        """Our heartbeat, or the dispatcher's if it asks for more often (not below
        :data:`MIN_HEARTBEAT_S`)."""
        heartbeat = self.heartbeat_s
        with contextlib.suppress(ValueError, TypeError):
            value = float(asked)  # type: ignore[arg-type]
            if math.isfinite(value):
                heartbeat = min(heartbeat, value)
        return max(heartbeat, MIN_HEARTBEAT_S)

    def _admit(
        self, client: httpx.AsyncClient, data: bytes, uploads: trio.Nursery, heartbeat: float
    ) -> None:
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
        self._start_upload(uploads, self._deliver, client, job, heartbeat)

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

    async def _with_retries(
        self, what: str, attempt: Callable[[], Awaitable[None]], lease: _Lease | None = None
    ) -> bool:
        """Run ``attempt`` until it succeeds (True), is refused or runs out of tries
        (False). A ``410`` refusal marks ``lease`` gone.

        With a ``lease`` (a finished job's result and files) the tries do not run out:
        they go on, the delay doubling up to the lease's heartbeat, until the job expires,
        and a ``404`` (a restarted dispatcher that has not taken the job up again yet) is
        tried again too. A dispatcher that is away for a while (a restart, an upgrade)
        then finds the result waiting, rather than building the job again elsewhere."""
        delay = self.retry_delay
        tries = 0
        while True:
            try:
                await attempt()
                return True
            except _Refused as exc:
                _log.warning("%s refused by %s: %s", what, self.dispatcher.url, exc)
                if exc.status == 410 and lease is not None:
                    lease.gone = exc.code or "gone"
                if exc.code == "no-result-yet" and lease is not None:
                    lease.resend = True
                if exc.status != 404 or lease is None:
                    return False
            except (httpx.HTTPError, CertificatePinError) as exc:
                _log.warning("%s to %s failed: %s", what, self.dispatcher.url, exc)
            self.failures += 1
            tries += 1
            if lease is None and tries >= self.upload_attempts:
                return False
            if lease is not None:
                if self.clock() + delay >= lease.job.expires_at:
                    _log.warning("%s: job %s expires; giving up", what, lease.job.id_hex)
                    return False
                delay = min(delay, lease.heartbeat_s)
            await trio.sleep(delay)
            delay = min(delay * 2, self.max_retry_delay)

    async def _refuse(self, client: httpx.AsyncClient, job: Job, code: str, reason: str) -> None:
        async def attempt() -> None:
            response = await client.post(
                f"/v1/pull/jobs/{job.id_hex}/refused",
                json={"error": code, "reason": reason.replace("\n", " ")[:300]},
                headers=self._auth(),
            )
            _check(response)

        await self._with_retries(f"refusal of {job.id_hex}", attempt)

    async def _deliver(self, client: httpx.AsyncClient, job: Job, heartbeat: float) -> None:
        """Hold the lease while the job builds and uploads; then collect the job. If the
        dispatcher says the job is gone, stop the build and upload nothing."""
        lease = _Lease(job, heartbeat, self.clock())
        delivered = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_lease, client, lease, nursery.cancel_scope)
            delivered = await self._upload(client, job, lease)
            nursery.cancel_scope.cancel()
        if lease.gone is not None:
            await self._stop(job, lease.gone)
        elif delivered:
            self.uploaded += 1
            with contextlib.suppress(UnknownJobError):  # already expired or evicted
                self.service.collect(job.job_id)

    async def _keep_lease(
        self, client: httpx.AsyncClient, lease: _Lease, delivery: trio.CancelScope
    ) -> None:
        """Renew ``lease`` every heartbeat until cancelled. On ``410`` cancel the build and
        ``delivery`` (the upload), and note why in ``lease.gone``."""
        job = lease.job
        next_at = trio.current_time()
        while True:
            next_at += lease.heartbeat_s
            await trio.sleep_until(next_at)
            try:
                with trio.move_on_after(lease.heartbeat_s):
                    response = await client.post(
                        f"/v1/pull/jobs/{job.id_hex}/lease",
                        json=self._progress(lease),
                        headers=self._auth(),
                    )
                    if response.status_code == 410:
                        lease.gone = _error_code(response) or "gone"
                        _log.info("dispatcher %s says job %s is %s: stopping it",
                                  self.dispatcher.url, job.id_hex, lease.gone)
                        with contextlib.suppress(UnknownJobError):
                            self.service.cancel(job.job_id)
                        delivery.cancel()
                        return
                    if response.status_code == 200:
                        self.renewals += 1
                        continue
                    _log.warning("lease renewal of %s: HTTP %d %s", job.id_hex,
                                 response.status_code, response.text[:200])
            except (httpx.HTTPError, CertificatePinError) as exc:
                _log.warning("lease renewal of %s to %s failed: %s",
                             job.id_hex, self.dispatcher.url, exc)
            self.failures += 1

    def _progress(self, lease: _Lease) -> dict[str, object]:
        progress: dict[str, object] = {
            "phase": lease.phase,
            "elapsed_s": max(int(self.clock() - lease.started), 0),
        }
        with contextlib.suppress(UnknownJobError):
            progress["log_bytes"] = self.service.status(lease.job.job_id).log_bytes
        return progress

    async def _stop(self, job: Job, why: str) -> None:
        """The dispatcher no longer wants ``job``: let the cancelled build end, then forget
        it and its files."""
        self.stopped += 1
        with contextlib.suppress(UnknownJobError):
            with trio.move_on_after(_STOP_WAIT_S):
                await self.service.wait_result(job.job_id)
            with contextlib.suppress(JobRunningError):
                self.service.collect(job.job_id)
        _log.info("job %s stopped and forgotten (%s)", job.id_hex, why)

    async def _upload(self, client: httpx.AsyncClient, job: Job, lease: _Lease) -> bool:
        """Wait for the result, upload it and its files; True when all arrived."""
        result = await self.service.wait_result(job.job_id)
        lease.phase = "uploading"

        async def put_result() -> None:
            response = await client.put(
                f"/v1/pull/jobs/{job.id_hex}/result",
                content=result.to_bytes(),
                headers={**self._auth(), "content-type": MSGPACK},
            )
            _check(response)

        while True:
            if not await self._with_retries(f"result of {job.id_hex}", put_result, lease):
                return False
            if await self._put_files(client, job, result, lease):
                return True
            if not lease.resend:
                return False
            lease.resend = False
            _log.info("job %s: the dispatcher lost the result; sending it again", job.id_hex)

    async def _put_files(
        self, client: httpx.AsyncClient, job: Job, result: Result, lease: _Lease
    ) -> bool:
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

                if not await self._with_retries(f"{kind[:-1]} {digest.name}", put_file, lease):
                    return False
        return True

    def _file(self, job: Job, result: Result, kind: str, name: str) -> Path | None:
        try:
            found = self.service.file(job.job_id, kind, name)
        except UnknownJobError:
            return None
        return None if found is None else found[1]


def _error_code(response: httpx.Response) -> str:
    """The ``error`` code of a one-line JSON refusal, or ""."""
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("error", ""))[:64] if isinstance(body, dict) else ""


def _check(response: httpx.Response) -> None:
    if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
        raise _Refused(
            f"HTTP {response.status_code}: {response.text[:200]}", response.status_code,
            _error_code(response),
        )
    response.raise_for_status()


async def _read_chunks(path: Path) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb") as f:
        while chunk := await f.read(_CHUNK):
            yield chunk
