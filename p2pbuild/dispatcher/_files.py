"""What a packager fetches of a build through the dispatcher's API: logs and stored files.

Endpoints (authenticated like the rest of the API; ``{id}`` is a build id, a unique
prefix of one, or an NVR)::

    GET /v1/builds/{id}/logs                       the build's logs: per attempt, stored
                                                   ones and, for a running push attempt,
                                                   the live one
    GET /v1/builds/{id}/logs/{attempt}/{name}      one stored log; ``?follow=1`` on a
                                                   running push attempt's ``build.log``
                                                   streams the node's live log
    GET /v1/builds/{id}/files                      a verified build's stored files
                                                   (artifacts, proof, logs, manifest)
    GET /v1/builds/{id}/files/{path}               one of them

Logs come from the dispatcher's own copies (``_logs.py``: fetched from push and pull nodes
alike when a result arrives), so they stay readable after the nodes forgot the job. Only a
running build's live log is read from its node, pinned to the certificate in its record;
pull nodes send logs only with their result.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ._access import Caller
from ._api import ApiAuth
from ._db import AttemptRow, AttemptState
from ._engine import Engine
from ._errors import UnknownBuildError
from ._logs import attempt_logs, from_node, log_dir

__all__ = ["build_file_routes"]


def _safe_file(root: Path, relative: str) -> Path:
    """``root / relative`` when it is a file inside ``root``. Raises UnknownBuildError."""
    if not relative or relative.startswith("/") or "\x00" in relative:
        raise UnknownBuildError("no such file")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise UnknownBuildError(f"no such file {relative[:100]}")
    return path


def _log_rows(engine: Engine, build_id: str, attempts: list[AttemptRow]) -> list[dict[str, Any]]:
    state_dir = engine.config.state_dir
    rows: list[dict[str, Any]] = []
    for attempt in attempts:
        base = log_dir(state_dir, build_id, attempt.id)
        for path in attempt_logs(state_dir, build_id, attempt.id):
            name = path.relative_to(base).as_posix()
            rows.append({
                "attempt": attempt.id, "operator": attempt.operator, "node": attempt.node,
                "state": attempt.state.value, "name": name, "size": path.stat().st_size,
                "live": False, "path": f"/v1/builds/{build_id}/logs/{attempt.id}/{name}",
            })
        if attempt.state is AttemptState.RUNNING and attempt.endpoint:
            rows.append({
                "attempt": attempt.id, "operator": attempt.operator, "node": attempt.node,
                "state": attempt.state.value, "name": "build.log", "size": None, "live": True,
                "path": f"/v1/builds/{build_id}/logs/{attempt.id}/build.log?follow=1",
            })
    return rows


def _live_log(attempt: AttemptRow) -> AsyncIterator[bytes]:
    """The running job's log from its push node, followed until the build ends."""
    return from_node(attempt.tls_sha256, attempt.endpoint,
                     f"/v1/jobs/{attempt.job_id}/log?follow=1")


def _manifest_digests(root: Path) -> dict[str, str]:
    import json

    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return {f"artifacts/{a['name']}": a["sha256"] for a in manifest.get("artifacts", [])
            if isinstance(a, dict) and "name" in a and "sha256" in a}


def _file_rows(build_id: str, root: Path) -> list[dict[str, Any]]:
    digests = _manifest_digests(root)
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        sha = digests.get(name)
        if sha is None:
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
        rows.append({"name": name, "size": path.stat().st_size, "sha256": sha,
                     "path": f"/v1/builds/{build_id}/files/{name}"})
    return rows


def build_file_routes(engine: Engine, auth: ApiAuth) -> list[Route]:
    """The endpoints of the module doc, for the dispatcher's Starlette app."""

    def guarded(
        handler: Callable[[Request, Caller, str], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint of a build's: ``handler`` gets the full id of the build named."""

        async def with_build(request: Request, caller: Caller) -> Response:
            build_id = engine.db.resolve_build(request.path_params["build_id"])
            return await handler(request, caller, build_id)

        return auth.endpoint(with_build)

    async def logs(request: Request, caller: Caller, build_id: str) -> Response:
        attempts = engine.db.attempts(build_id)
        return JSONResponse({"build_id": build_id,
                             "logs": _log_rows(engine, build_id, attempts)})

    async def one_log(request: Request, caller: Caller, build_id: str) -> Response:
        attempt_id = request.path_params["attempt"]
        attempts = {a.id: a for a in engine.db.attempts(build_id)}
        attempt = attempts.get(attempt_id)
        if attempt is None:
            raise UnknownBuildError(f"build {build_id} has no attempt {attempt_id}")
        name = request.path_params["name"]
        follow = request.query_params.get("follow") in ("1", "true", "yes")
        base = log_dir(engine.config.state_dir, build_id, attempt.id)
        stored = base / name
        if (follow and not stored.is_file() and attempt.state is AttemptState.RUNNING
                and attempt.endpoint and name == "build.log"):
            return StreamingResponse(_live_log(attempt),
                                     media_type="text/plain; charset=utf-8")
        path = _safe_file(base, name) if base.is_dir() else None
        if path is None:
            raise UnknownBuildError(
                f"no log {name[:100]} from attempt {attempt_id} (yet)"
                + (": pull-mode nodes send logs with their result"
                   if attempt.active and not attempt.endpoint else "")
            )
        return FileResponse(path, media_type="text/plain; charset=utf-8")

    async def files(request: Request, caller: Caller, build_id: str) -> Response:
        build = engine.db.build(build_id)
        root = Path(build.sink_path) if build.sink_path else None
        rows = _file_rows(build_id, root) if root is not None and root.is_dir() else []
        return JSONResponse({"build_id": build_id, "state": build.state.value,
                             "stored": root is not None, "files": rows})

    async def one_file(request: Request, caller: Caller, build_id: str) -> Response:
        build = engine.db.build(build_id)
        if not build.sink_path:
            raise UnknownBuildError(f"build {build_id} is not stored ({build.state.value})")
        path = _safe_file(Path(build.sink_path), request.path_params["path"])
        return FileResponse(path, media_type="application/octet-stream")

    table = {
        "logs": logs,
        "logs/{attempt:int}/{name:path}": one_log,
        "files": files,
        "files/{path:path}": one_file,
    }
    return [Route(f"/v1/builds/{{build_id}}/{path}", guarded(handler), methods=["GET"])
            for path, handler in table.items()]
