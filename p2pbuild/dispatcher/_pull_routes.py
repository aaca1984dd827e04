"""Pull mode's HTTPS routes: the endpoints of ``_pull.py``'s module doc over a
:class:`~p2pbuild.dispatcher._pull.PullQueue`.

Thin: each route authenticates the node's pull token, reads a bounded body, calls the
queue, and answers; a refusal is the shared one-line JSON with the HTTP status its error
class carries (``p2pbuild.https.refusal``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._errors import MalformedError, OversizeError, RemoteError
from .._identity import PublicKey
from ..https import ServerConfig, TlsMaterial, read_body, refusal, serve_asgi
from ._errors import (
    UnknownPullJobError,
)
from ._pull import (
    _MAX_PROGRESS_BYTES,
    _TRANSIENT,
    HEARTBEAT_HEADER,
    LEASE_HEADER,
    MSGPACK,
    LeaseProgress,
    PullQueue,
)

__all__ = ["make_pull_app", "pull_routes", "serve_pull"]


def _job_id(request: Request) -> bytes:
    text = request.path_params["job_id"]
    try:
        if len(text) == 32:
            return bytes.fromhex(text)
    except ValueError:
        pass
    raise UnknownPullJobError("a job id is 32 hex digits")


def pull_routes(queue: PullQueue) -> list[Route]:
    """The pull endpoints of the module doc, for the dispatcher's Starlette app."""
    lease_headers = {LEASE_HEADER: f"{queue.lease_s:g}", HEARTBEAT_HEADER: f"{queue.heartbeat_s:g}"}

    async def guarded(request: Request, handler: Callable[[PublicKey], Any]) -> Response:
        try:
            node = queue.authenticate(request.headers.get("authorization"))
            response: Response = await handler(node)
            return response
        except RemoteError as exc:
            queue.count_rejection(exc)
            return refusal(exc)
        except ClientDisconnect:
            return Response(status_code=400)

    async def poll(request: Request) -> Response:
        async def handler(node: PublicKey) -> Response:
            try:
                wait = float(request.query_params.get("wait", "30"))
            except ValueError:
                raise MalformedError("wait must be a number of seconds") from None
            wait = min(max(wait, 0.0), queue.max_wait)
            job = await queue.take(node, wait)
            if job is None:
                return Response(status_code=204)
            return Response(job.to_bytes(), media_type=MSGPACK, headers=lease_headers)

        return await guarded(request, handler)

    async def lease(request: Request) -> Response:
        async def handler(node: PublicKey) -> Response:
            job_id = _job_id(request)
            body = await read_body(request, _MAX_PROGRESS_BYTES, queue.body_timeout)
            delivery = queue.renew(node, job_id, LeaseProgress.from_json(body))
            return JSONResponse({
                "job_id": job_id.hex(),
                "state": "delivered" if delivery.done else "taken",
                "lease_s": queue.lease_s,
                "heartbeat_s": queue.heartbeat_s,
            })  # fmt: skip

        return await guarded(request, handler)

    async def put_result(request: Request) -> Response:
        async def handler(node: PublicKey) -> Response:
            job_id = _job_id(request)
            data = await read_body(request, queue.max_result_bytes, queue.body_timeout)
            result = queue.receive_result(node, job_id, data)
            return JSONResponse({"job_id": job_id.hex(), "state": result.state.value})

        return await guarded(request, handler)

    def put_file(kind: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            async def handler(node: PublicKey) -> Response:
                job_id = _job_id(request)
                declared = request.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > queue.max_file_bytes:
                    raise OversizeError(f"upload of {declared} bytes is over the bound")
                item = await queue.receive_file(
                    node, job_id, kind, request.path_params["name"], request.stream()
                )
                return JSONResponse(
                    {"name": item.name, "size": item.size, "sha256": item.sha256.hex()}
                )

            return await guarded(request, handler)

        return endpoint

    async def refused(request: Request) -> Response:
        async def handler(node: PublicKey) -> Response:
            job_id = _job_id(request)
            body = await read_body(request, 4096, queue.body_timeout)
            try:
                value = json.loads(body)
                code, reason = str(value["error"])[:64], str(value.get("reason", ""))[:300]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise MalformedError('a refusal is JSON {"error": code, "reason": text}') from None
            queue.receive_refusal(node, job_id, code, reason)
            return JSONResponse({"job_id": job_id.hex(), "requeued": code in _TRANSIENT})

        return await guarded(request, handler)

    return [
        Route("/v1/pull", poll, methods=["POST"]),
        Route("/v1/pull/jobs/{job_id}/lease", lease, methods=["POST"]),
        Route("/v1/pull/jobs/{job_id}/result", put_result, methods=["PUT"]),
        Route("/v1/pull/jobs/{job_id}/artifacts/{name:path}", put_file("artifacts"),
              methods=["PUT"]),
        Route("/v1/pull/jobs/{job_id}/logs/{name:path}", put_file("logs"), methods=["PUT"]),
        Route("/v1/pull/jobs/{job_id}/refused", refused, methods=["POST"]),
    ]  # fmt: skip


def make_pull_app(queue: PullQueue) -> Starlette:
    """A Starlette app with only the pull endpoints."""
    return Starlette(routes=pull_routes(queue))


async def serve_pull(
    queue: PullQueue,
    tls: TlsMaterial,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve :func:`make_pull_app` over HTTPS until cancelled; ``started(port)``.

    The long-poll holds a request open for up to ``queue.max_wait``, so the server's
    keep-alive and read limits are set above it. Raises :class:`OSError` if the address
    cannot be bound.
    """
    config = ServerConfig(tls=tls, host=host, port=port, keep_alive_timeout=queue.max_wait + 30)
    await serve_asgi(make_pull_app(queue), config, task_status=task_status)
