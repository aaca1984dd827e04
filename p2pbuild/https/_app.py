"""What the ASGI apps above share: one-line JSON refusals and bounded request bodies.

A refusal is ``{"error": code, "reason": text}`` with the HTTP status the error class
carries (``http_status``, next to its ``code``: see ``p2pbuild._errors``); every 503 says
when to come back (``Retry-After``).
"""

from __future__ import annotations

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse

from .._errors import OversizeError, P2PBuildError, RemoteError

__all__ = ["RETRY_AFTER_S", "RequestTimeoutError", "read_body", "refusal"]

#: Seconds a 503 asks the client to wait.
RETRY_AFTER_S = 30


class RequestTimeoutError(RemoteError):
    """A request body that did not arrive within the body timeout (a slow client)."""

    code = "request-timeout"
    http_status = 408


def refusal(error: P2PBuildError, **extra: object) -> JSONResponse:
    """The one-line JSON refusal ``{"error": code, "reason": text, **extra}`` for
    ``error``, with its ``http_status``."""
    reason = str(error).replace("\n", " ")[:300]
    status = error.http_status
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"error": error.code, **extra, "reason": reason}, status_code=status,
                        headers=headers)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused as soon as it passes ``limit`` bytes or ``timeout``.

    Raises :class:`OversizeError`, :class:`RequestTimeoutError` and Starlette's
    ``ClientDisconnect``.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OversizeError(f"body of {declared} bytes exceeds {limit}")
    body = bytearray()
    with trio.move_on_after(timeout) as scope:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise OversizeError(f"body exceeds {limit} bytes")
    if scope.cancelled_caught:
        raise RequestTimeoutError(f"request body not received within {timeout:g}s")
    return bytes(body)
