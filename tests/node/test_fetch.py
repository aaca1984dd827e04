"""The threaded pinned file fetch (``fetch_pinned_file``) and the dispatcher's artifact
download over it, against real HTTPS servers on loopback: the pin is checked before any
request byte, bodies are re-hashed, cut off at the bound, refused when truncated, and a
cancelled fetch returns at once."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pbuild import FileDigest
from p2pbuild.dispatcher._errors import (
    ArtifactDigestError,
    NodeRefusedError,
    NodeUnreachableError,
)
from p2pbuild.dispatcher._nodes import PushNodeClient
from p2pbuild.https import (
    BodyTooLongError,
    CertificatePinError,
    TlsMaterial,
    TransferError,
    fetch_pinned_file,
    generate_tls_material,
    serve_asgi,
)
from p2pbuild.https._client import FETCH_BLOCK
from p2pbuild.node._api import NodeApiConfig

pytestmark = pytest.mark.slow

# Larger than one read block and not a multiple of it, so the block loop and the tail run.
BIG = os.urandom(2 * FETCH_BLOCK + 12345)
JOB_ID = bytes(16)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class FileServer:
    """A raw ASGI app: ``/big`` (with Content-Length), ``/chunked`` (no length: chunked),
    ``/endless`` (chunked, never ends), ``/short`` (declares more than it sends),
    ``/trickle`` (one byte, then nothing), ``/missing`` (404 JSON). Counts requests."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        self.requests += 1
        name = scope["path"].rsplit("/", 1)[-1]
        if name == "missing":
            body = b'{"error": "no-such-file", "reason": "no such artifact"}'
            await self._start(send, 404, len(body))
            await send({"type": "http.response.body", "body": body})
            return
        if name in ("big", "big.bin"):
            await self._start(send, 200, len(BIG))
            await _send_in_pieces(send, BIG, 300_000)
            return
        if name == "chunked":
            await self._start(send, 200, None)
            await _send_in_pieces(send, BIG, 100_000)
            return
        if name == "endless":
            await self._start(send, 200, None)
            while True:
                await send({"type": "http.response.body", "body": b"\x02" * 65536,
                            "more_body": True})
        if name == "short":
            await self._start(send, 200, len(BIG))
            await send({"type": "http.response.body", "body": BIG[:1000]})
            return
        if name == "trickle":
            await self._start(send, 200, len(BIG))
            await send({"type": "http.response.body", "body": BIG[:1], "more_body": True})
            await trio.sleep_forever()

    @staticmethod
    async def _start(send: Send, status: int, length: int | None) -> None:
        headers = [(b"content-type", b"application/octet-stream")]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})


async def _send_in_pieces(send: Send, data: bytes, size: int) -> None:
    """``data`` as a response body in ``size``-byte pieces, then its end."""
    for i in range(0, len(data), size):
        await send({"type": "http.response.body", "body": data[i:i + size], "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def start_server(nursery: trio.Nursery, tmp_path: Path) -> tuple[FileServer, str,
                                                                        TlsMaterial]:
    (tmp_path / "tls").mkdir()
    tls = generate_tls_material(tmp_path / "tls")
    app = FileServer()
    port = await nursery.start(serve_asgi, app, NodeApiConfig(tls=tls))
    return app, f"https://127.0.0.1:{port}", tls


async def test_fetch_writes_and_hashes_the_body(nursery: trio.Nursery, tmp_path: Path) -> None:
    _, url, tls = await start_server(nursery, tmp_path)
    for name in ("big", "chunked"):
        dest = tmp_path / f"{name}.bin"
        fetched = await fetch_pinned_file(f"{url}/{name}", tls.sha256, dest,
                                          max_bytes=len(BIG))
        assert fetched.status == 200
        assert fetched.size == len(BIG)
        assert fetched.sha256 == hashlib.sha256(BIG).digest()
        assert dest.read_bytes() == BIG


async def test_fetch_refuses_another_certificate_before_sending_anything(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    app, url, _ = await start_server(nursery, tmp_path)
    wrong = hashlib.sha256(b"not the certificate").digest()
    dest = tmp_path / "out.bin"
    with pytest.raises(CertificatePinError, match="not the pinned"):
        await fetch_pinned_file(f"{url}/big", wrong, dest, max_bytes=len(BIG))
    assert app.requests == 0
    assert not dest.exists()


async def test_fetch_cuts_bodies_off_at_the_bound(nursery: trio.Nursery, tmp_path: Path) -> None:
    app, url, tls = await start_server(nursery, tmp_path)
    dest = tmp_path / "out.bin"
    # A declared length over the bound: refused before any body byte is written.
    with pytest.raises(BodyTooLongError, match="declares"):
        await fetch_pinned_file(f"{url}/big", tls.sha256, dest, max_bytes=len(BIG) - 1)
    assert not dest.exists()
    # No declared length and no end: cut off as soon as it passes the bound.
    with trio.fail_after(20):
        with pytest.raises(BodyTooLongError, match="passed"):
            await fetch_pinned_file(f"{url}/endless", tls.sha256, dest, max_bytes=300_000)
    assert dest.stat().st_size <= 300_000
    assert app.requests == 2


async def test_fetch_refuses_a_truncated_body(nursery: trio.Nursery, tmp_path: Path) -> None:
    _, url, tls = await start_server(nursery, tmp_path)
    with pytest.raises(TransferError):
        await fetch_pinned_file(f"{url}/short", tls.sha256, tmp_path / "out.bin",
                                max_bytes=len(BIG))


async def test_fetch_reports_other_statuses(nursery: trio.Nursery, tmp_path: Path) -> None:
    _, url, tls = await start_server(nursery, tmp_path)
    dest = tmp_path / "out.bin"
    fetched = await fetch_pinned_file(f"{url}/missing", tls.sha256, dest, max_bytes=10)
    assert fetched.status == 404
    assert b"no-such-file" in fetched.body
    assert not dest.exists()


async def test_fetch_times_out_and_can_be_cancelled(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    _, url, tls = await start_server(nursery, tmp_path)
    dest = tmp_path / "out.bin"
    with pytest.raises(TransferError, match="timed out"):
        await fetch_pinned_file(f"{url}/trickle", tls.sha256, dest, max_bytes=len(BIG),
                                timeout=0.3)
    # Cancelled while the thread is blocked in a read: returns at once, not at the timeout.
    started = trio.current_time()
    with trio.move_on_after(0.3) as scope:
        await fetch_pinned_file(f"{url}/trickle", tls.sha256, dest, max_bytes=len(BIG),
                                timeout=60)
    assert scope.cancelled_caught
    assert trio.current_time() - started < 5


async def test_fetch_speaks_https_only(tmp_path: Path) -> None:
    from p2pbuild import LocalError

    with pytest.raises(LocalError):
        await fetch_pinned_file("http://127.0.0.1:1/x", bytes(32), tmp_path / "x", max_bytes=1)


# 0: every artifact takes the threaded path; the default: small ones the pooled one.
@pytest.mark.parametrize("pooled_max", [0, PushNodeClient.__attrs_attrs__.pooled_download_max
                                        .default])  # fmt: skip
async def test_dispatcher_download_rehashes_and_maps_errors(
    nursery: trio.Nursery, tmp_path: Path, pooled_max: int
) -> None:
    _, url, tls = await start_server(nursery, tmp_path)
    good = FileDigest("big.bin", len(BIG), hashlib.sha256(BIG).digest())
    client = PushNodeClient(url, tls.sha256, timeout=10, pooled_download_max=pooled_max)
    try:
        await client.download(JOB_ID, good, tmp_path / "work" / "big.bin")
        assert (tmp_path / "work" / "big.bin").read_bytes() == BIG
        # Same size, other digest: the signed result does not match what arrived.
        lie = FileDigest("big.bin", len(BIG), hashlib.sha256(b"other").digest())
        with pytest.raises(ArtifactDigestError, match="arrived as"):
            await client.download(JOB_ID, lie, tmp_path / "work" / "lie.bin")
        # The node serves more than the signed size: cut off, not buffered.
        small = FileDigest("big.bin", 1000, hashlib.sha256(BIG[:1000]).digest())
        with pytest.raises(ArtifactDigestError, match="more than the signed"):
            await client.download(JOB_ID, small, tmp_path / "work" / "small.bin")
        endless = FileDigest("endless", 200_000, hashlib.sha256(b"").digest())
        with pytest.raises(ArtifactDigestError, match="more than the signed"):
            await client.download(JOB_ID, endless, tmp_path / "work" / "endless.bin")
        with pytest.raises(NodeRefusedError, match="no-such-file"):
            await client.download(JOB_ID, FileDigest("missing", 1, bytes(32)),
                                  tmp_path / "work" / "missing")
    finally:
        await client.aclose()
    impostor = PushNodeClient(url, hashlib.sha256(b"impostor").digest(), timeout=10,
                              pooled_download_max=pooled_max)
    try:
        with pytest.raises(NodeUnreachableError, match="pinned"):
            await impostor.download(JOB_ID, good, tmp_path / "work" / "impostor.bin")
    finally:
        await impostor.aclose()
