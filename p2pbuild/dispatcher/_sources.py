"""Fetching a build's source from the URL a user gave, without becoming a port scanner.

A user may submit a build by URL; the dispatcher then fetches it from wherever the URL
points, from inside the dispatcher's network. So:

* the URL's host must resolve only to global addresses: a host that resolves to a loopback,
  link-local, private, shared (CGNAT), reserved or multicast address is refused before any
  connection, unless ``allow_hosts`` (``[dispatcher] source_allow_hosts``) names it;
* the address actually connected to is checked again once the answer's head arrives
  (a DNS answer may change between the check and the connection), and nothing of the body
  is read from a refused one;
* redirects are followed by hand, at most :data:`MAX_REDIRECTS`, each target checked the same
  way;
* a failure says only *that* the source could not be fetched, never *why* at the network
  level: a refused connection, a closed port, a reset, a timeout and a server that is not
  HTTP all read the same, so the error text tells nothing about the dispatcher's network.

Raises :class:`SourceUnavailableError` with that one text, or one naming the policy or the
HTTP status of an allowed server.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

import httpx
import trio

from ._errors import SourceUnavailableError

__all__ = ["MAX_REDIRECTS", "address_allowed", "check_source_url", "fetch_source"]

MAX_REDIRECTS = 5
_TIMEOUT_S = 60.0

#: ``(host, port) -> [ip text, ...]``; injected in tests.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def _resolve(host: str, port: int) -> list[str]:
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def address_allowed(text: str) -> bool:
    """Whether a source may be fetched from IP address ``text``: a global unicast address
    (not loopback, link-local, private, shared, reserved, documentation or multicast)."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def _where(parts: urllib.parse.SplitResult) -> tuple[str, int]:
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise SourceUnavailableError("the source URL has a bad port") from None
    if parts.scheme not in ("http", "https") or not host:
        raise SourceUnavailableError("a source URL is http:// or https:// with a host")
    return host, port


async def check_source_url(
    url: str, allow_hosts: Collection[str], resolve: Resolver = _resolve
) -> bool:
    """Check ``url``'s host against the policy of the module doc before connecting.

    Returns True if the host is on ``allow_hosts`` (no address check applies to it).
    Raises :class:`SourceUnavailableError`.
    """
    host, port = _where(urllib.parse.urlsplit(url))
    if host in allow_hosts:
        return True
    try:
        addresses = await resolve(host, port)
    except OSError:
        raise SourceUnavailableError(f"cannot fetch the source from {host}") from None
    if not addresses or not all(address_allowed(a) for a in addresses):
        raise SourceUnavailableError(
            f"cannot fetch the source from {host}: it is not a public address "
            "(loopback, link-local and private addresses are refused unless "
            "[dispatcher] source_allow_hosts names the host)"
        )
    return False


async def fetch_source(
    url: str,
    dest: Path,
    max_bytes: int,
    allow_hosts: Collection[str] = (),
    *,
    resolve: Resolver = _resolve,
) -> tuple[int, str]:
    """GET ``url`` (following checked redirects) into ``dest``; returns the size and the
    SHA-256 (hex) of what was written. Raises :class:`SourceUnavailableError`."""
    async with httpx.AsyncClient(timeout=_TIMEOUT_S, trust_env=False,
                                 follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            allowed = await check_source_url(url, allow_hosts, resolve)
            host = urllib.parse.urlsplit(url).hostname or ""
            try:
                async with client.stream("GET", url) as response:
                    if not allowed:
                        _check_peer(response, host)
                    if response.is_redirect and "location" in response.headers:
                        url = str(response.url.join(response.headers["location"]))
                        continue
                    if response.status_code != 200:
                        raise SourceUnavailableError(
                            f"source URL answered HTTP {response.status_code}"
                        )
                    return await _save(response, dest, max_bytes)
            except httpx.HTTPError:
                # Refused, closed, reset, timed out, not HTTP: one text for all of them.
                raise SourceUnavailableError(f"cannot fetch the source from {host}") from None
    raise SourceUnavailableError(f"more than {MAX_REDIRECTS} redirects")


def _check_peer(response: httpx.Response, host: str) -> None:
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if not peer or not address_allowed(str(peer[0])):
        raise SourceUnavailableError(
            f"cannot fetch the source from {host}: it is not a public address"
        )


async def _save(response: httpx.Response, dest: Path, max_bytes: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    async with await trio.open_file(dest, "wb") as f:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise SourceUnavailableError(f"source is over {max_bytes} bytes")
            digest.update(chunk)
            await f.write(chunk)
    return size, digest.hexdigest()
