"""The node's HTTPS job API (push mode): a Starlette app served by hypercorn's trio worker.

Endpoints (``docs/node-api.md`` has the details)::

    POST   /v1/jobs                          signed job (application/msgpack) -> 202 + status
    GET    /v1/jobs/{id}                     status (JSON)
    GET    /v1/jobs/{id}/result[?wait=S]     signed result (application/msgpack); 404 until done
                                             (with ``wait``: held until done, at most S s)
    GET    /v1/jobs/{id}/artifacts/{name}    file, with Content-Length and X-Content-SHA256
    GET    /v1/jobs/{id}/logs/{name}         file, likewise
    GET    /v1/jobs/{id}/log[?follow=1]      the live build log (text), following it to the end
    DELETE /v1/jobs/{id}                     cancel a running job; forget a finished one
                                             (only on an order signed by the job's dispatcher)
    GET    /v1/status                        the node's key and the service's statistics
    POST   /v1/wake                          an on-demand node: a dispatcher's signed wake
                                             request (``p2pbuild._wake``) -> 202
    POST   /v1/holds                         a dispatcher's signed lease hold
                                             (``p2pbuild._hold``), shown in the status -> 202
    GET    /metrics                          Prometheus text format (``_metrics.py``)

``DELETE`` needs ``Authorization: P2PBuild-Control <base64url JobControl>``: an order signed by
the dispatcher that issued the job (:class:`~p2pbuild.JobControl`, fresh, single-use, naming
the job). Without one it is refused with 401 (``unauthenticated``, ``bad-signature``), with
another key's with 403 (``forbidden``), and nothing changes. The other job routes only read,
by a job id of 128 random bits that only the job's dispatcher and its admins see; see
``docs/node-api.md`` for why they stay open.

Every refusal is a one-line JSON body ``{"error": code, "reason": "..."}`` whose ``code`` is
the error's (the same as in the service's rejection counters), with the HTTP status the
error class carries (``http_status``; ``p2pbuild.https.refusal``). The job body is read as a
stream and refused with 413 as soon as it passes the bound, before it is buffered whole; a
body that trickles in slower than ``body_timeout`` is refused with 408. Connection bounds,
garbage, plain HTTP on the TLS port, oversized headers and idle connections are the shared
server's (``p2pbuild.https``); its limits are set from :class:`NodeApiConfig`.
"""

from __future__ import annotations

import base64
import binascii
import logging
from pathlib import Path
from typing import Any

import attrs
import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .._errors import (
    OversizeError,
    RemoteError,
)
from .._identity import Identity
from .._jobs import MAX_JOB_SIZE
from .._orders import MAX_JOB_CONTROL_SIZE, JobControl, JobControlAction
from ..https import (
    RequestTimeoutError,
    ServerConfig,
    read_body,
    serve_asgi,
)
from ..https import refusal as _refusal
from ._holds import Holds
from ._metrics import CONTENT_TYPE as METRICS_TYPE
from ._metrics import NodeMetrics
from ._ondemand import OnDemand
from ._service import (
    JobRunningError,
    JobService,
    UnavailableError,
    UnknownJobError,
)

__all__ = [
    "CONTROL_SCHEME",
    "ControlAuthError",
    "NodeApiConfig",
    "control_header",
    "make_app",
    "serve_node_api",
]

_log = logging.getLogger("p2pbuild.node.api")
# How long DELETE on a running job waits for it to stop before answering anyway.
_CANCEL_WAIT_S = 10.0
#: Longest ``GET .../result?wait=S`` the node holds a request open for.
MAX_RESULT_WAIT_S = 300.0


def _result_wait(request: Request) -> float:
    """The ``wait`` query parameter in seconds, within 0..MAX_RESULT_WAIT_S (0 if absent or
    not a number)."""
    try:
        wait = float(request.query_params.get("wait", "0"))
    except ValueError:
        return 0.0
    return min(wait, MAX_RESULT_WAIT_S) if wait > 0 else 0.0
MSGPACK = "application/msgpack"


#: ``Authorization`` scheme of a job control order.
CONTROL_SCHEME = "P2PBuild-Control"


class ControlAuthError(RemoteError):
    """A job control request without a readable signed order."""

    code = "unauthenticated"
    http_status = 401


def control_header(identity: Identity, job_id: bytes, now: int) -> str:
    """The ``Authorization`` value of ``DELETE /v1/jobs/<job_id>``, signed by the job's
    dispatcher ``identity`` at Unix time ``now``."""
    order = JobControl.create(identity, job_id, JobControlAction.DELETE, issued_at=now)
    return f"{CONTROL_SCHEME} {base64.urlsafe_b64encode(order.to_bytes()).decode()}"


def _control_order(header: str | None) -> bytes:
    scheme, _, value = (header or "").partition(" ")
    if scheme != CONTROL_SCHEME or not value:
        raise ControlAuthError(
            f"an Authorization: {CONTROL_SCHEME} <order> header signed by the job's "
            "dispatcher is required"
        )
    if len(value) > 2 * MAX_JOB_CONTROL_SIZE:
        raise OversizeError("job control order too large")
    try:
        return base64.urlsafe_b64decode(value.strip().encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ControlAuthError("the job control order is not base64url") from None




@attrs.frozen
class NodeApiConfig(ServerConfig):
    """Where and how the API listens: an HTTPS server's configuration and bounds
    (:class:`~p2pbuild.https.ServerConfig`; ``port`` 0 picks a free port), and the node
    API's own bounds on a request."""

    #: Largest job body accepted (a job is at most 16 KiB; see docs/jobs.md).
    max_job_bytes: int = MAX_JOB_SIZE
    #: Time allowed to receive a whole request body.
    body_timeout: float = 10.0


def _job_id(request: Request) -> bytes:
    text = request.path_params["job_id"]
    if len(text) != 32:
        raise UnknownJobError("a job id is 32 hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise UnknownJobError("a job id is 32 hex digits") from None


class _FileResponse(FileResponse):
    # Starlette reads 64 KiB at a time; larger reads mean fewer thread hops per megabyte.
    chunk_size = 1024 * 1024


#: Files up to this size are read whole in one worker-thread call and sent as one body;
#: Starlette's FileResponse takes a thread hop each to stat, open, read and close.
SMALL_FILE = 1024 * 1024
#: ... and those up to this size without a worker thread.
INLINE_READ = 64 * 1024


def _read_small(path: Path, size: int) -> bytes | None:
    """The file's bytes if it is exactly ``size`` bytes long (its signed size), else None:
    then it is served as before, whatever it holds, and the client's re-hash judges it."""
    try:
        with path.open("rb") as f:
            data = f.read(size + 1)
    except OSError:
        return None
    return data if len(data) == size else None


def make_app(
    service: JobService, config: NodeApiConfig, on_demand: OnDemand | None = None
) -> Starlette:
    """The ASGI app over ``service`` (and ``POST /v1/wake`` for an on-demand node).
    Refusals are JSON; see the module doc."""
    holds = Holds(service.identity.public_key, lambda: service.trust_list)

    async def submit(request: Request) -> Response:
        try:
            data = await read_body(request, config.max_job_bytes, config.body_timeout)
        except (OversizeError, RequestTimeoutError) as exc:
            service.count_rejection(exc)
            return _refusal(exc)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening
        try:
            status = service.submit(data)
        except (RemoteError, UnavailableError) as exc:
            return _refusal(exc)
        return JSONResponse(status.to_json(), status_code=202)

    async def job_status(request: Request) -> Response:
        try:
            return JSONResponse(service.status(_job_id(request)).to_json())
        except UnknownJobError as exc:
            return _refusal(exc)

    async def job_result(request: Request) -> Response:
        # With ?wait=S the answer comes when the job ends (or after S seconds): its
        # dispatcher learns of the end and has the result in one round trip.
        wait = _result_wait(request)
        try:
            job_id = _job_id(request)
            result = service.result(job_id)
            if result is None and wait:
                with trio.move_on_after(wait):
                    result = await service.wait_result(job_id)
        except UnknownJobError as exc:
            return _refusal(exc)
        if result is None:
            return JSONResponse(
                {"error": "not-finished", "reason": "the job is still running",
                 "waited": bool(wait)},
                status_code=404,
            )
        return Response(result.to_bytes(), media_type=MSGPACK)

    def file_endpoint(kind: str) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                found = service.file(_job_id(request), kind, request.path_params["name"])
            except UnknownJobError as exc:
                return _refusal(exc)
            if found is None:
                return JSONResponse(
                    {"error": "no-such-file", "reason": f"no such {kind[:-1]} (yet)"},
                    status_code=404,
                )
            digest, path = found
            headers = {"X-Content-SHA256": digest.sha256.hex()}
            if digest.size <= SMALL_FILE and request.method == "GET":
                # A log or small artifact is read in place: a worker-thread hop costs more.
                data = (
                    _read_small(path, digest.size)
                    if digest.size <= INLINE_READ
                    else await trio.to_thread.run_sync(_read_small, path, digest.size)
                )
                if data is not None:
                    return Response(data, media_type="application/octet-stream",
                                    headers=headers)
            return _FileResponse(path, media_type="application/octet-stream", headers=headers)

        return endpoint

    async def live_log(request: Request) -> Response:
        follow = request.query_params.get("follow") in ("1", "true", "yes")
        try:
            job_id = _job_id(request)
            service.status(job_id)
        except UnknownJobError as exc:
            return _refusal(exc)
        return StreamingResponse(
            service.follow_log(job_id, follow=follow), media_type="text/plain; charset=utf-8"
        )

    async def cancel(request: Request) -> Response:
        # A running job is cancelled (it ends with a signed "cancelled" result); a finished
        # one is forgotten with its files: its dispatcher has collected what it needs.
        try:
            job_id = _job_id(request)
            try:
                order = _control_order(request.headers.get("authorization"))
            except RemoteError as exc:
                service.count_rejection(exc)
                raise
            service.authorize(job_id, order, JobControlAction.DELETE)
            status = service.status(job_id)
            if service.result(job_id) is None:
                service.cancel(job_id)
                # Answer once the job has really stopped (its signed "cancelled" result
                # exists), so a dispatcher that saw 200 knows the slot is free; bounded,
                # because a build process may take a moment to die.
                with trio.move_on_after(_CANCEL_WAIT_S):
                    await service.wait_result(job_id)
                return JSONResponse(service.status(job_id).to_json())
            service.collect(job_id)
        except (UnknownJobError, JobRunningError, RemoteError) as exc:
            return _refusal(exc)
        body = status.to_json()
        body["collected"] = True
        return JSONResponse(body)

    async def node_status(request: Request) -> Response:
        body = service.statistics().to_json()
        body["node"] = str(service.identity.public_key)
        body["free_slots"] = service.free_slots
        if on_demand is not None:
            body["standby"] = on_demand.standby
        leases = holds.active(service.clock())
        body["leases"] = leases
        body["leased_slots"] = len(leases)
        return JSONResponse(body)

    async def hold(request: Request) -> Response:
        # A dispatcher's signed lease hold (p2pbuild._hold): shown in the status above.
        try:
            data = await read_body(request, 1024, config.body_timeout)
            accepted = holds.accept(data, service.clock())
        except RemoteError as exc:
            return _refusal(exc)
        except ClientDisconnect:
            return Response(status_code=400)
        return JSONResponse({"lease": accepted.lease, "held": not accepted.releases},
                            status_code=202)

    async def wake(request: Request) -> Response:
        # A dispatcher's signed wake request (p2pbuild._wake): refused unless fresh, for
        # this node, by a trusted dispatcher and not seen before.
        if on_demand is None:
            return JSONResponse({"error": "not-on-demand", "reason": "this node is always on"},
                                status_code=404)
        try:
            data = await read_body(request, 1024, config.body_timeout)
            on_demand.accept(data, service.clock())
        except RemoteError as exc:
            return _refusal(exc)
        except ClientDisconnect:
            return Response(status_code=400)
        await on_demand.wake("wake request")
        return JSONResponse({"standby": on_demand.standby}, status_code=202)

    node_metrics = NodeMetrics(service.statistics)

    async def metrics(request: Request) -> Response:
        return Response(node_metrics.render(), media_type=METRICS_TYPE)

    routes = [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/jobs", submit, methods=["POST"]),
        Route("/v1/jobs/{job_id}", job_status, methods=["GET"]),
        Route("/v1/jobs/{job_id}", cancel, methods=["DELETE"]),
        Route("/v1/jobs/{job_id}/result", job_result, methods=["GET"]),
        Route("/v1/jobs/{job_id}/artifacts/{name:path}", file_endpoint("artifacts")),
        Route("/v1/jobs/{job_id}/logs/{name:path}", file_endpoint("logs")),
        Route("/v1/jobs/{job_id}/log", live_log, methods=["GET"]),
        Route("/v1/status", node_status, methods=["GET"]),
        Route("/v1/wake", wake, methods=["POST"]),
        Route("/v1/holds", hold, methods=["POST"]),
    ]
    return Starlette(routes=routes)


async def serve_node_api(
    config: NodeApiConfig,
    service: JobService,
    *,
    on_demand: OnDemand | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``service`` and serve its HTTPS API until cancelled (with ``on_demand``, also
    its standby watch and ``POST /v1/wake``).

    Calls ``task_status.started(port)`` with the bound TCP port once listening. Raises
    :class:`OSError` if the address cannot be bound; errors of single connections never
    end it.
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        if on_demand is not None:
            await nursery.start(on_demand.run, service.activity)
        port = await nursery.start(serve_asgi, make_app(service, config, on_demand), config)
        task_status.started(port)
