"""The hub's HTTP side: ``POST /kojihub`` (XML-RPC, raw uploads), ``GET /kojifiles``."""

from __future__ import annotations

import http.server
import os
import socket
import urllib.parse
from typing import TYPE_CHECKING, Any

import koji
import koji.util
import koji.xmlrpcplus

from ._wire import _FAULTABLE, KOJI_VERSION, _Crash, _fault, _response

if TYPE_CHECKING:
    from ._core import HubCore


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def _make_handler(hub: HubCore) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "p2pbuild-test-kojihub"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def setup(self) -> None:
            super().setup()
            # Headers and body go out as two writes: without this, Nagle's algorithm and
            # the client's delayed ACK add 40 ms to every call (a real hub's server sends
            # them at once).
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _send(self, status: int, body: bytes, content_type: str = "text/xml") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Koji-Version", KOJI_VERSION)
            self.end_headers()
            self.wfile.write(body)

        def _client_cn(self) -> str | None:
            getpeercert = getattr(self.connection, "getpeercert", None)
            cert = getpeercert() if getpeercert is not None else None
            if not cert:
                return None
            for rdn in cert.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        return str(value)
            return None

        def _crash(self) -> None:
            if hub.exit_on_crash:
                os._exit(17)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if not url.path.startswith("/kojifiles/"):
                self._send(405, b"Method Not Allowed\n", "text/plain")
                return
            try:
                path = hub.path(urllib.parse.unquote(url.path[len("/kojifiles/"):]))
                data = path.read_bytes()
            except (koji.GenericError, OSError):
                self._send(404, b"Not Found\n", "text/plain")
                return
            self._send(200, data, "application/octet-stream")

        def do_POST(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path.rstrip("/") not in ("/kojihub", "/kojihub/ssllogin"):
                self._send(404, b"Not Found\n", "text/plain")
                return
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            headers = {k: v for k, v in self.headers.items()}
            try:
                if self.headers.get("Content-Type") == "application/octet-stream":
                    query = dict(urllib.parse.parse_qsl(url.query))
                    try:
                        result = hub.dispatch("rawUpload", [query], headers, None, upload=body)
                        answer = _response(result)
                    except _Crash:
                        raise
                    except _FAULTABLE as exc:
                        answer = _response(_fault(exc))
                else:
                    answer = hub.handle_xmlrpc(
                        body, headers, url.path.rstrip("/").endswith("ssllogin"),
                        self._client_cn(),
                    )
            except _Crash:
                self._crash()
                return
            self._send(200, answer)

    return Handler
