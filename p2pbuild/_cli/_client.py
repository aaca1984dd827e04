"""The client side of the dispatcher's API, shared by ``submit``, ``builds``, ``nodes`` and
the demo: the client file, one-line refusals, and following a build's event stream.

A followed stream survives long builds and short outages: the dispatcher sends an empty
keep-alive line after each quiet interval (announced in the ``p2pbuild-keepalive``
header), the client treats three missed intervals as a dead connection, and reconnects
(resuming after the last event it saw) until the dispatcher has been unreachable for
``reconnect_for`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import attrs
import httpx
import trio

from .._errors import LocalError
from ..dispatcher._api import KEEPALIVE_HEADER
from ..dispatcher._errors import ConfigError
from ..https import pinned_client

__all__ = [
    "TERMINAL", "Client", "Paced", "call", "check", "client_from_args", "follow_build",
    "network", "network_error", "open_stream", "post_source",
]

TERMINAL = frozenset({"verified", "failed", "cancelled"})
#: Keep-alive interval assumed when a dispatcher does not announce one.
DEFAULT_KEEPALIVE_S = 15.0
#: A stream silent for this many keep-alive intervals is dead.
MISSED_KEEPALIVES = 3
T = TypeVar("T")


@attrs.frozen
class Client:
    url: str
    pin: bytes
    token: str

    def http(self, timeout: float = 60.0) -> httpx.AsyncClient:
        return pinned_client(self.pin, base_url=self.url, timeout=timeout)

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


def client_from_args(args: argparse.Namespace) -> Client:
    """The dispatcher named by ``--url/--pin/--token``, ``--client-config``,
    ``$P2PBUILD_CLIENT_CONFIG`` or ``~/.config/p2pbuild/client.toml``. Raises
    :class:`ConfigError`."""
    path = args.client_config or os.environ.get("P2PBUILD_CLIENT_CONFIG") or (
        Path.home() / ".config" / "p2pbuild" / "client.toml"
    )
    document: dict[str, Any] = {}
    if Path(path).is_file():
        try:
            document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read client file {path}: {exc}") from None
    url = args.url or document.get("url")
    pin = args.pin or document.get("tls_sha256")
    token = args.token or os.environ.get("P2PBUILD_TOKEN") or document.get("token")
    if not url or not pin or not token:
        raise ConfigError(
            f"no dispatcher given: pass --url, --pin and --token or write {path} "
            "(p2pbuild dispatcher init creates one)"
        )
    try:
        pin_bytes = bytes.fromhex(str(pin))
    except ValueError:
        raise ConfigError("the pin is the certificate's SHA-256 in hex") from None
    return Client(str(url), pin_bytes, str(token))


def check(response: httpx.Response) -> Any:
    """The response's JSON; a refusal becomes :class:`LocalError` with its reason."""
    if response.status_code >= 400:
        try:
            body = response.json()
            reason = f"{body.get('error')}: {body.get('reason')}"
        except (ValueError, AttributeError):
            reason = response.text[:200]
        raise LocalError(f"dispatcher answered HTTP {response.status_code}: {reason}")
    return response.json()


def network_error(exc: BaseException) -> str:
    """A network failure in words: httpx's own text is often empty (a read timeout)."""
    text = str(exc).strip()
    name = {
        "ReadTimeout": "no answer in time", "ConnectTimeout": "connection timed out",
        "ConnectError": "cannot connect", "RemoteProtocolError": "connection closed",
        "ReadError": "connection broken", "TooSlowError": "stream silent too long",
    }.get(type(exc).__name__, type(exc).__name__)
    return f"{name}: {text}" if text else name


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def network(call: Callable[[], Awaitable[T]]) -> T:
    """``trio.run(call)``, a network failure as a one-line :class:`LocalError`. An error
    from inside a nursery (the live display's) arrives in a group: Ctrl-C anywhere in it is
    a ``KeyboardInterrupt``, and a group of one is that one error."""
    try:
        try:
            return trio.run(call)
        except BaseExceptionGroup as group:
            leaves = _leaves(group)
            if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
                raise KeyboardInterrupt from None
            if len(leaves) == 1:
                raise leaves[0] from None
            raise
    except httpx.HTTPError as exc:
        raise LocalError(f"cannot reach the dispatcher: {network_error(exc)}") from None


def call(args: argparse.Namespace, method: str, path: str, *, body: Any = None,
         params: Any = None) -> Any:
    """One request to the dispatcher named by ``args`` (:func:`client_from_args`); the
    answer's JSON. Raises :class:`ConfigError` and :class:`LocalError`."""
    client = client_from_args(args)

    async def main() -> Any:
        async with client.http() as http:
            return check(await http.request(method, path, json=body, params=params,
                                            headers=client.headers))

    return network(main)


@contextlib.asynccontextmanager
async def open_stream(
    http: httpx.AsyncClient, client: Client, path: str, *, params: Any = None,
    timeout: httpx.Timeout | None = None,
) -> AsyncIterator[httpx.Response]:
    """``GET path`` as a stream, its body not yet read. Raises :class:`LocalError` for a
    refusal and ``httpx.HTTPError`` for a network failure."""
    async with http.stream(
        "GET", path, params=params, headers=client.headers,
        timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
    ) as response:
        if response.status_code >= 400:
            await response.aread()
            check(response)
        yield response


@attrs.define(eq=False)
class Paced(Generic[T]):
    """``items`` as they come; ``trio.TooSlowError`` once none has come for ``idle``
    seconds (a quiet stream and a dead connection look alike)."""

    items: AsyncIterator[T]
    idle: float

    def __aiter__(self) -> Paced[T]:
        return self

    async def __anext__(self) -> T:
        with trio.fail_after(self.idle):
            return await anext(self.items)


async def post_source(
    http: httpx.AsyncClient, client: Client, source: Path, params: dict[str, str]
) -> Any:
    """Upload ``source`` as a new build (``POST /v1/builds``); the build's JSON. Raises
    :class:`LocalError` for a refusal and ``httpx.HTTPError`` for a network failure."""
    with source.open("rb") as f:
        response = await http.post(
            "/v1/builds", params=params, content=f.read(),
            headers={**client.headers, "content-type": "application/x-rpm"},
        )
    return check(response)


def _idle_limit(response: httpx.Response) -> float:
    try:
        keepalive = float(response.headers.get(KEEPALIVE_HEADER, DEFAULT_KEEPALIVE_S))
    except ValueError:
        keepalive = DEFAULT_KEEPALIVE_S
    return MISSED_KEEPALIVES * min(max(keepalive, 0.1), 300.0)


async def follow_build(
    http: httpx.AsyncClient, client: Client, build_id: str, *, reconnect_for: float = 600.0,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Yield ``("event", event)`` for each of the build's events as it happens, then
    ``("build", build)`` once with the build's final JSON.

    When the connection breaks or stays silent for three keep-alive intervals, yields
    ``("reconnecting", {"error": text, "retry_in": seconds})`` and reconnects, resuming
    after the last event seen. Raises :class:`LocalError` for a refusal, or once the
    dispatcher has been unreachable for ``reconnect_for`` seconds.
    """
    after = 0
    lost_since: float | None = None
    delay = 0.5
    while True:
        try:
            async with open_stream(
                http, client, f"/v1/builds/{build_id}/events",
                params={"after": after, "follow": "1"}, timeout=httpx.Timeout(60, read=None),
            ) as response:
                lost_since, delay = None, 0.5
                async for line in Paced(response.aiter_lines(), _idle_limit(response)):
                    if not line.strip():
                        continue  # a keep-alive
                    event = json.loads(line)
                    after = event["id"]
                    yield "event", event
            build = check(await http.get(f"/v1/builds/{build_id}", headers=client.headers))
        except (httpx.TransportError, trio.TooSlowError) as exc:
            now = trio.current_time()
            lost_since = now if lost_since is None else lost_since
            if now - lost_since > reconnect_for:
                raise LocalError(
                    f"lost the dispatcher for {now - lost_since:.0f}s ({network_error(exc)}); "
                    f"the build goes on: p2pbuild builds watch {build_id}"
                ) from None
            yield "reconnecting", {"error": network_error(exc), "retry_in": delay}
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        if build["state"] in TERMINAL:
            yield "build", build
            return
