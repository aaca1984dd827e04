"""The pinned client over real TLS on loopback: the certificate with the pinned SHA-256 is
the only one any connection accepts, also once the pinned context is cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from p2pbuild.https import (
    CertificatePinError,
    ServerConfig,
    TlsMaterial,
    fetch_pinned_file,
    generate_tls_material,
    pinned_client,
    serve_asgi,
)

pytestmark = pytest.mark.slow


async def _server(nursery: trio.Nursery, directory: Path) -> tuple[str, TlsMaterial]:
    directory.mkdir()
    tls = generate_tls_material(directory)

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    port = await nursery.start(serve_asgi, Starlette(routes=[Route("/hello", hello)]),
                               ServerConfig(tls=tls))
    return f"https://127.0.0.1:{port}", tls


async def test_only_the_pinned_certificate_is_accepted_even_once_cached(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    good_url, good = await _server(nursery, tmp_path / "good")
    other_url, _ = await _server(nursery, tmp_path / "other")
    async with pinned_client(good.sha256, timeout=10) as client:
        assert (await client.get(f"{good_url}/hello")).text == "hello"
        # The same client (its pinned context cached) refuses another server's certificate.
        with pytest.raises(CertificatePinError):
            await client.get(f"{other_url}/hello")
    # A new client whose first contact is the other server refuses it before any request.
    async with pinned_client(good.sha256, timeout=10) as client:
        with pytest.raises(CertificatePinError):
            await client.get(f"{other_url}/hello")
    # So does the file fetcher, cached or not.
    with pytest.raises(CertificatePinError):
        await fetch_pinned_file(f"{other_url}/hello", good.sha256, tmp_path / "out",
                                max_bytes=100)
    fetched = await fetch_pinned_file(f"{good_url}/hello", good.sha256, tmp_path / "out",
                                      max_bytes=100)
    assert (fetched.status, (tmp_path / "out").read_bytes()) == (200, b"hello")
