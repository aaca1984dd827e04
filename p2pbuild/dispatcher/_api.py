"""The dispatcher's HTTPS API: a Starlette app served by hypercorn's trio worker.

Endpoints (``docs/dispatcher.md`` has the details)::

    POST   /v1/builds                 submit: SRPM body (query: name, arch, ..., lease), or
                                      JSON {url, sha256, name, arch, ...}
    GET    /v1/builds[?state=&limit=] list builds, newest first
    GET    /v1/builds/{id}            one build with its attempts and audit events
    GET    /v1/builds/{id}/events[?after=N&follow=1]   audit events as NDJSON, following
    DELETE /v1/builds/{id}            cancel (reaches the nodes); its owner or an admin only
    GET    /v1/nodes                  nodes with ratings, MTBF and jobs in flight
    GET    /v1/status                 counters
    GET    /v1/sources/{sha256}       a build's source, for the nodes (no auth: by digest)
    /v1/pull...                       pull-mode nodes (``_pull.py``), when mounted
    /v1/leases...                     leases (``_leasing.py``), when mounted

Authentication (all but sources and pull): ``Authorization: Bearer <token>`` whose SHA-256
a ``[[clients]]`` entry names, or ``Authorization: P2PBuild-Sig <ed25519:key> <unix time>
<base64url signature>`` over ``b"p2pbuild-v1/dispatcher-request\\x00" + METHOD + "\\n" +
path-with-query + "\\n" + time`` by a key the trust list names as maintainer or dispatcher
(the user is its operator) or a ``[[clients]]`` entry names; fresh within 60 s, single use.
A build belongs to the user who submitted it: only its owner or an admin may cancel it;
every user may read builds, but job ids and node endpoints only admins (``_access.py``).
Refusals are one-line JSON ``{"error": code, "reason": text}`` as on nodes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from .._errors import MalformedError, OversizeError, RemoteError
from .._identity import Identity, PublicKey, Role, verify_prefixed
from .._jobs import DEFAULT_ARCH, BuildType
from .._records import MachineType
from .._replay import ReplayCache
from .._trust import TrustList
from ..https import read_body, refusal
from ..https._server import ByteBudget, ConnectionGate
from ._access import Caller, check_may_change, redact_build, redact_event, redact_node
from ._bodies import json_object, optional_text
from ._config import ClientEntry, hash_token
from ._db import BuildState
from ._engine import BuildRequest, Engine
from ._errors import (
    AuthenticationError,
    BadRequestError,
    BusyError,
    UnknownBuildError,
)
from ._request import buildroot_from_json

__all__ = [
    "KEEPALIVE_HEADER", "KEEPALIVE_S", "REQUEST_SIGNATURE_PREFIX", "ApiAuth",
    "make_dispatcher_app", "sign_request",
]

#: Domain prefix of signed API requests (distinct from every ``Domain`` in _identity).
REQUEST_SIGNATURE_PREFIX = b"p2pbuild-v1/dispatcher-request\x00"
SIG_SCHEME = "P2PBuild-Sig"
_WINDOW = 60
#: Seconds of silence after which a followed stream sends an empty keep-alive line.
KEEPALIVE_S = 15.0
#: Response header announcing that interval (clients time out after a few of them).
KEEPALIVE_HEADER = "p2pbuild-keepalive"

def sign_request(identity: Identity, method: str, path: str, now: int) -> str:
    """The ``Authorization`` header value for a signed request (clients use this)."""
    message = REQUEST_SIGNATURE_PREFIX + f"{method.upper()}\n{path}\n{now}".encode()
    signature = identity.signing_key.sign(message).signature
    encoded = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    return f"{SIG_SCHEME} {identity.public_key} {now} {encoded}"


@attrs.define(eq=False)
class ApiAuth:
    """Who may use the API: token hashes and keys from the configuration, and trust-list
    maintainers and dispatchers. ``clock`` gives Unix seconds."""

    clients: Sequence[ClientEntry]
    trust_list: TrustList
    clock: Callable[[], float]
    replay: ReplayCache = attrs.field(factory=ReplayCache)

    def authenticate(self, method: str, path: str, header: str | None) -> Caller:
        """Who sent a request. Raises :class:`AuthenticationError`."""
        scheme, _, value = (header or "").partition(" ")
        if scheme == "Bearer" and value:
            digest = hash_token(value.strip())
            for client in self.clients:
                if client.token_sha256 and hmac.compare_digest(client.token_sha256, digest):
                    return Caller(client.user, client.team, client.admin)
            raise AuthenticationError("unknown token")
        if scheme == SIG_SCHEME and value:
            return self._signed(method, path, value)
        raise AuthenticationError("an Authorization header (Bearer or P2PBuild-Sig) is required")

    def _signed(self, method: str, path: str, value: str) -> Caller:
        parts = value.split()
        if len(parts) != 3 or not parts[1].isdigit():
            raise AuthenticationError("P2PBuild-Sig <key> <time> <signature>")
        try:
            key = PublicKey.from_text(parts[0])
            signature = base64.urlsafe_b64decode(parts[2] + "==")
        except (MalformedError, binascii.Error, ValueError):
            raise AuthenticationError("unreadable key or signature") from None
        issued = int(parts[1])
        now = self.clock()
        if abs(now - issued) > _WINDOW:
            raise AuthenticationError("signed request outside the 60 s window")
        message = REQUEST_SIGNATURE_PREFIX + f"{method.upper()}\n{path}\n{issued}".encode()
        if len(signature) != 64 or not verify_prefixed(key.raw, message, signature):
            raise AuthenticationError("signature does not verify")
        try:
            self.replay.add(signature, issued + _WINDOW + 1, now)
        except RemoteError:
            raise AuthenticationError("signed request replayed") from None
        for client in self.clients:
            if client.key == key:
                return Caller(client.user, client.team, client.admin)
        entry = self.trust_list.entry(key)
        if entry is None or entry.role not in (Role.MAINTAINER, Role.DISPATCHER):
            raise AuthenticationError(f"key {key.fingerprint} may not use this API")
        # The trust list's maintainers run the farm: they are admins here too.
        return Caller(entry.operator, None, entry.role is Role.MAINTAINER)

    async def answer(
        self,
        request: Request,
        handler: Callable[[Caller], Awaitable[Response]],
        refuse: Callable[[RemoteError], Response] = refusal,
    ) -> Response:
        """Answer ``request`` with ``handler(caller)`` once it is authenticated (the caller
        is also ``request.state.caller``): the one guard of every API route. A
        :class:`RemoteError`, the authentication's or the handler's, is answered by
        ``refuse`` (its status and code); a client gone while sending its body, with 400."""
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            caller = self.authenticate(
                request.method, path, request.headers.get("authorization")
            )
            request.state.caller = caller
            return await handler(caller)
        except RemoteError as exc:
            return refuse(exc)
        except ClientDisconnect:
            return Response(status_code=400)

    def endpoint(
        self,
        handler: Callable[[Request, Caller], Awaitable[Response]],
        refuse: Callable[[RemoteError], Response] = refusal,
    ) -> Callable[[Request], Awaitable[Response]]:
        """``handler(request, caller)`` as a Starlette endpoint, guarded by :meth:`answer`."""

        async def endpoint(request: Request) -> Response:
            return await self.answer(request, lambda caller: handler(request, caller), refuse)

        return endpoint


def _query_int(params: Mapping[str, str], name: str, default: int) -> int:
    text = params.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit():
        raise BadRequestError(f"{name} must be a non-negative integer")
    return int(text)


def _json_param(value: str | None, name: str) -> Any:
    if value is None or value == "":
        return None
    try:
        return json.loads(value)
    except ValueError:
        raise BadRequestError(f"{name} must be JSON") from None


def _request_from(fields: Mapping[str, Any], name: str, sha: str, size: int, url: str) -> (
    BuildRequest
):
    def text(key: str) -> str | None:
        return optional_text(fields, key)

    try:
        machine_text = text("machine")
        machine = MachineType(machine_text) if machine_text else None
        build_type = BuildType(text("build_type") or "rpm")
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None
    options = fields.get("options", {})
    if isinstance(options, str):
        options = json_object(options, "options")
    if not isinstance(options, dict):
        raise BadRequestError("options must be an object")
    numbers: dict[str, Any] = {}
    for key, default in (("replicas", 2), ("min_memory_mb", 0), ("min_disk_mb", 0),
                         ("time_limit_s", 3600)):
        value = fields.get(key, default)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadRequestError(f"{key} must be an integer")
        numbers[key] = value
    return BuildRequest(
        source_name=name, source_sha256=sha, source_size=size, build_type=build_type,
        arch=text("arch"), os=text("os"), machine=machine, pool=text("pool"),
        options=options, source_url=url, lease=text("lease"), **numbers,
    )


def _build_json(engine: Engine, build_id: str) -> dict[str, Any]:
    build = engine.db.build(build_id)
    body = build.to_json()
    body["attempts"] = [a.to_json() for a in engine.db.attempts(build_id)]
    body["events"] = [e.to_json() for e in engine.db.audit_entries(build_id)]
    return body


def make_dispatcher_app(
    engine: Engine,
    auth: ApiAuth,
    *,
    max_upload_bytes: int = 1024**3,
    list_arches: Sequence[str] = (DEFAULT_ARCH,),
    extra_routes: Sequence[BaseRoute] = (),
    body_timeout: float = 600.0,
    keepalive_s: float = KEEPALIVE_S,
    uploads: ByteBudget | None = None,
    connections: ConnectionGate | None = None,
) -> Starlette:
    """The ASGI app over ``engine``. ``extra_routes`` are mounted as they are (the pull
    queue's). A followed event stream sends an empty line after ``keepalive_s`` seconds
    without an event, and announces the interval in the ``p2pbuild-keepalive`` header, so
    clients and proxies tell a quiet build from a dead connection. ``uploads`` bounds the
    source bytes of all uploads in flight together (None: four times ``max_upload_bytes``);
    ``connections``, the server's, is reported in ``/v1/status``."""
    if uploads is None:
        uploads = ByteBudget(4 * max_upload_bytes)

    async def guarded(
        request: Request, handler: Callable[[str, str | None], Awaitable[Response]]
    ) -> Response:
        return await auth.answer(request, lambda caller: handler(caller.user, caller.team))

    async def submit(request: Request) -> Response:
        async def handler(user: str, team: str | None) -> Response:
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("application/json"):
                fields = json_object(
                    await read_body(request, 64 * 1024, body_timeout), "body"
                )
                url, sha = fields.get("url"), fields.get("sha256")
                if not isinstance(url, str) or not isinstance(sha, str):
                    raise BadRequestError("url and sha256 are required")
                name = fields.get("name") or url.rstrip("/").rsplit("/", 1)[-1]
                size = fields.get("size", 0)
                if not isinstance(size, int):
                    raise BadRequestError("size must be an integer")
                build_request = _request_from(fields, str(name), sha.lower(), size, url)
                buildroot_body = fields.get("buildroot")
            else:
                params = request.query_params
                name = params.get("name", "")
                buildroot_body = _json_param(params.get("buildroot"), "buildroot")
                sha, size = await _receive_source(request, engine, max_upload_bytes,
                                                  body_timeout, params.get("sha256"), uploads)
                build_request = _request_from(dict(params), name, sha, size, "")
            if buildroot_body is not None:
                # Repositories given without a digest are pinned now, at submission.
                build_request = attrs.evolve(
                    build_request, buildroot=await buildroot_from_json(buildroot_body)
                )
            build = engine.accept(build_request, user, team)
            return JSONResponse(build.to_json(), status_code=202)

        return await guarded(request, handler)

    async def list_builds(request: Request) -> Response:
        async def handler(user: str, team: str | None) -> Response:
            params = request.query_params
            try:
                states = [BuildState(s) for s in params.getlist("state")]
            except ValueError:
                raise BadRequestError("unknown state") from None
            builds = engine.db.builds(states=states, limit=min(_query_int(params, "limit", 50),
                                                               1000))
            return JSONResponse({"builds": [b.to_json() for b in builds]})

        return await guarded(request, handler)

    async def show_build(request: Request) -> Response:
        async def handler(user: str, team: str | None) -> Response:
            body = _build_json(engine, engine.db.resolve_build(request.path_params["build_id"]))
            return JSONResponse(redact_build(body, request.state.caller))

        return await guarded(request, handler)

    async def cancel_build(request: Request) -> Response:
        async def handler(user: str, team: str | None) -> Response:
            build_id = engine.db.resolve_build(request.path_params["build_id"])
            check_may_change(request.state.caller, engine.db.build(build_id))
            build = engine.cancel(build_id, user)
            return JSONResponse(build.to_json())

        return await guarded(request, handler)

    async def events(request: Request) -> Response:
        async def handler(user: str, team: str | None) -> Response:
            build_id = engine.db.resolve_build(request.path_params["build_id"])
            after = _query_int(request.query_params, "after", 0)
            follow = request.query_params.get("follow") in ("1", "true", "yes")
            return StreamingResponse(
                _event_stream(engine, build_id, after, follow, request.state.caller,
                              keepalive_s),
                media_type="application/x-ndjson",
                headers={KEEPALIVE_HEADER: f"{keepalive_s:g}"},
            )

        return await guarded(request, handler)

    async def nodes(request: Request) -> Response:
        async def handler(user: str, team: str | None) -> Response:
            rows = await node_table(engine, list_arches)
            return JSONResponse({"nodes": [redact_node(r, request.state.caller) for r in rows]})

        return await guarded(request, handler)

    async def status(request: Request) -> Response:
        async def handler(user: str, team: str | None) -> Response:
            body = engine.statistics().to_json()
            body["dispatcher"] = str(engine.identity.public_key)
            body["uploads"] = {"bytes_in_flight": uploads.used, "limit": uploads.limit,
                               "refused": uploads.refused}
            if connections is not None:
                body["connections"] = connections.statistics().to_json()
            return JSONResponse(body)

        return await guarded(request, handler)

    async def source(request: Request) -> Response:
        try:
            path = engine.sources.path(request.path_params["sha256"])
        except BadRequestError as exc:
            return refusal(exc)
        if not path.is_file():
            return refusal(UnknownBuildError("no such source"))
        return FileResponse(path, media_type="application/octet-stream")

    routes: list[BaseRoute] = [
        Route("/v1/builds", submit, methods=["POST"]),
        Route("/v1/builds", list_builds, methods=["GET"]),
        Route("/v1/builds/{build_id}", show_build, methods=["GET"]),
        Route("/v1/builds/{build_id}", cancel_build, methods=["DELETE"]),
        Route("/v1/builds/{build_id}/events", events, methods=["GET"]),
        Route("/v1/nodes", nodes, methods=["GET"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/v1/sources/{sha256}", source, methods=["GET"]),
        *extra_routes,
    ]
    return Starlette(routes=routes)


async def node_table(engine: Engine, arches: Sequence[str]) -> list[dict[str, Any]]:
    """Every node we know (from the DHT for ``arches``, and from our ratings), with its
    rating, MTBF, jobs in flight and capability."""
    from ..dht import Query

    now = engine.clock()
    found: dict[str, dict[str, Any]] = {}
    for arch in arches:
        for entry in await engine.finder.find(Query(arch=arch), fresh=True):
            cap = entry.capability
            found[str(entry.publisher)] = {
                "operator": entry.trust.operator if entry.trust else None,
                "arch": cap.arch, "os": cap.os, "machine": cap.machine.value,
                "pools": list(cap.pools), "endpoint": cap.endpoint or "(pull)",
                "in_directory": True,
                "on_demand": cap.on_demand,
                "standby": entry.status is not None and entry.status.standby,
            }
    active = engine.db.active_attempts_by_node()
    leased = {str(k): v for k, v in engine.leases.held_by(now).items()}
    ratings = engine.ratings.ratings(now, found)
    rows = []
    for node, rating in sorted(ratings.items(), key=lambda kv: -kv[1].score):
        row = {"node": node, "fingerprint": PublicKey.from_text(node).fingerprint,
               "in_directory": False, **found.get(node, {})}
        row.update(rating.to_json())
        row["active_jobs"] = active.get(node, 0)
        row["leases"] = leased.get(node, [])
        rows.append(row)
    return rows


async def _event_stream(
    engine: Engine, build_id: str, after: int, follow: bool, caller: Caller,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[bytes]:
    """The build's audit events after ``after`` as NDJSON lines; with ``follow``, until the
    build ends, with an empty line after each ``keepalive_s`` seconds without an event."""
    while True:
        changed = engine.next_change
        # Looked at before the events are read, so the events that made it terminal are
        # among those sent.
        ended = engine.db.build(build_id).state.terminal
        for entry in engine.db.audit_entries(build_id, after=after):
            after = entry.id
            body = redact_event(entry.to_json(), caller)
            yield (json.dumps(body, sort_keys=True) + "\n").encode()
        if not follow or ended:
            return
        with trio.move_on_after(keepalive_s) as quiet:
            await changed.wait()
        if quiet.cancelled_caught:
            yield b"\n"


async def _receive_source(
    request: Request, engine: Engine, limit: int, timeout: float, expected: str | None,
    uploads: ByteBudget,
) -> tuple[str, int]:
    """Stream an uploaded source into the store, refusing it past ``limit`` bytes or
    ``timeout`` seconds, and with :class:`BusyError` (503) while it would take ``uploads``
    past its limit: a declared length is held up front, a chunked body chunk by chunk.
    Returns its SHA-256 (hex) and size."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OversizeError(f"upload of {declared} bytes exceeds {limit}")
    held = int(declared) if declared is not None and declared.isdigit() else 0
    if not uploads.take(held):
        raise BusyError("too many uploads in flight; send it again later")
    root = trio.Path(engine.sources.root)
    partial = root / f".upload-{os.urandom(8).hex()}"
    digest = hashlib.sha256()
    size = 0
    try:
        await root.mkdir(parents=True, exist_ok=True)
        with trio.fail_after(timeout):
            async with await trio.open_file(partial, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise OversizeError(f"upload exceeds {limit} bytes")
                    if size > held:
                        if not uploads.take(size - held):
                            raise BusyError("too many uploads in flight; send it again later")
                        held = size
                    digest.update(chunk)
                    await f.write(chunk)
        sha = digest.hexdigest()
        if expected is not None and expected.lower() != sha:
            raise BadRequestError(f"upload has SHA-256 {sha}, not the declared {expected:.64}")
        await partial.rename(engine.sources.path(sha))
    except trio.TooSlowError:
        raise BadRequestError(f"upload not received within {timeout:g}s") from None
    finally:
        uploads.give(held)
        await partial.unlink(missing_ok=True)
    return sha, size
