"""What one call is on the wire: XML-RPC responses and faults, constants a real
hub uses (``koji.xmlrpcplus``, Koji's retry whitelist), and the call being answered.
"""

from __future__ import annotations

import datetime
import xmlrpc.client
from typing import Any

import attrs
import koji
import koji.util
import koji.xmlrpcplus

KOJI_VERSION = "1.35.3"
#: Calls the hub lets a client repeat with the same callnum (Koji's RetryWhitelist).
RETRY_WHITELIST = frozenset({
    "host.taskWait", "host.taskUnwait", "host.taskSetWait", "host.updateHost",
    "host.setBuildRootList", "repoInit", "repoDone",
})
LOGIN_METHODS = frozenset({"login", "sslLogin"})
TASK = koji.TASK_STATES
BUILD = koji.BUILD_STATES


class HubUrls:
    """The URLs of a hub on loopback, from its ``port`` (HTTP) and ``https_port``."""

    __slots__ = ()
    port: int
    https_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/kojihub"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}/kojihub"

    @property
    def topurl(self) -> str:
        return f"http://127.0.0.1:{self.port}/kojifiles"


def _when(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).isoformat(sep=" ")


#: What a call may raise that the hub answers as a fault: Koji's own errors, and the
#: lookup, type and value errors of malformed input (fault 1, as a real hub's). Anything
#: else is a bug in this hub and propagates.
_FAULTABLE = (koji.GenericError, xmlrpc.client.Fault, LookupError, TypeError, ValueError)


def _response(value: Any) -> bytes:
    """An XML-RPC method response: ``value`` or, for a Fault, the fault."""
    body = value if isinstance(value, xmlrpc.client.Fault) else (value,)
    text: str = koji.xmlrpcplus.dumps(body, methodresponse=1, allow_none=1)
    return text.encode()


def _fault(exc: BaseException) -> xmlrpc.client.Fault:
    if isinstance(exc, xmlrpc.client.Fault):
        return exc
    code = getattr(exc, "faultCode", 1)
    if isinstance(exc, koji.GenericError):
        return xmlrpc.client.Fault(code, str(exc))
    return xmlrpc.client.Fault(code, f"{type(exc)}: {exc}")





@attrs.define(eq=False)
class _Call:
    method: str
    session: dict[str, Any] | None
    user: dict[str, Any] | None
    client_cn: str | None
    dirty: bool = False


class _Crash(Exception):
    """The test asked the hub to die when this method arrives."""

