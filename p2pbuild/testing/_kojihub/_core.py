"""The hub's core: lifecycle (HTTP and HTTPS listeners), one call under the state lock
(dispatch, multicall, the session headers and their rules), and the session methods.

The methods of the hub are layered on it: ``_catalog`` (users, hosts, tags, targets,
builds), ``_tasks`` (tasks and ``host.*``), ``_cg`` (uploads and the content-generator
import), ``_hub`` (the test controls): each a subclass of the one below.
"""

from __future__ import annotations

import http.server
import json
import secrets
import ssl
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, cast

import attrs
import koji
import koji.util
import koji.xmlrpcplus

from ._http import _make_handler, _Server
from ._pki import HubPki
from ._state import _load_state, _new_id, _save_state
from ._wire import (
    _FAULTABLE,
    LOGIN_METHODS,
    RETRY_WHITELIST,
    HubUrls,
    _Call,
    _Crash,
    _fault,
    _response,
    _when,
)

#: How each table's objects are named besides their id, and how the hub says one is missing.
_NAMED_BY = {
    "users": ("name", "No such user: {!r}"),
    "hosts": ("name", "No such host: {!r}"),
    "tags": ("name", "No such tagInfo: {!r}"),
    "targets": ("name", "No such build target: {}"),
    "channels": ("name", "No such channel: {}"),
    "builds": ("nvr", "No such build: {!r}"),
}


@attrs.define(eq=False)
class HubCore(HubUrls):
    """The hub over ``data_dir``. :meth:`start` listens on loopback (HTTP on ``port``, and
    HTTPS on ``https_port`` when ``pki`` is given; 0 picks a free port); :meth:`stop` stops.
    A stopped hub starts again on the same directory (and, given the same ports, URLs).
    """

    data_dir: Path
    port: int = 0
    https_port: int = 0
    pki: HubPki | None = None
    #: Seconds without ``host.updateHost`` after which a host's tasks are freed.
    host_timeout_s: float = 300.0
    #: In a child process: really exit on ``testhub.crashOn`` (else the connection drops).
    exit_on_crash: bool = False
    _state: dict[str, Any] = attrs.field(factory=dict, init=False)
    _lock: threading.RLock = attrs.field(factory=threading.RLock, init=False)
    _servers: list[http.server.ThreadingHTTPServer] = attrs.field(factory=list, init=False)
    _threads: list[threading.Thread] = attrs.field(factory=list, init=False)
    _offline: bool = attrs.field(default=False, init=False)
    _expire_on: set[str] = attrs.field(factory=set, init=False)
    _crash_on: set[str] = attrs.field(factory=set, init=False)
    calls: list[dict[str, Any]] = attrs.field(factory=list, init=False)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._state = _load_state(self.data_dir)
        handler = _make_handler(self)
        plain = _Server(("127.0.0.1", self.port), handler)
        self.port = plain.server_address[1]
        self._servers = [plain]
        if self.pki is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.pki.server_cert, self.pki.server_key)
            context.load_verify_locations(self.pki.ca)
            context.verify_mode = ssl.CERT_OPTIONAL
            secure = _Server(("127.0.0.1", self.https_port), handler)
            secure.socket = context.wrap_socket(secure.socket, server_side=True)
            self.https_port = secure.server_address[1]
            self._servers.append(secure)
        self._threads = []
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, daemon=True,
                                      kwargs={"poll_interval": 0.05})
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers, self._threads = [], []

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the state (for assertions)."""
        with self._lock:
            copy: dict[str, Any] = json.loads(json.dumps(self._state))
            return copy

    def path(self, relpath: str) -> Path:
        """Where a hub-relative path (``work/...``, ``packages/...``) is on disk; refuses
        paths that leave the data directory (GenericError)."""
        parts = [p for p in relpath.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts) or not parts:
            raise koji.GenericError(f"Invalid path: {relpath}")
        return self.data_dir.joinpath(*parts)

    # -- dispatch -------------------------------------------------------------------------------

    def handle_xmlrpc(self, body: bytes, headers: dict[str, str], ssl_login: bool,
                      client_cn: str | None) -> bytes:
        try:
            params, method = xmlrpc.client.loads(body, use_builtin_types=True)
        except (xmlrpc.client.ResponseError, ValueError) as exc:
            return _response(xmlrpc.client.Fault(1, f"bad request: {exc}"))
        if method is None:
            return _response(xmlrpc.client.Fault(1, "no method"))
        if method == "sslLogin" and not ssl_login:
            client_cn = None
        try:
            result = self.dispatch(method, list(params), headers, client_cn)
            return _response(result)
        except _Crash:
            raise
        except _FAULTABLE as exc:
            return _response(_fault(exc))

    def dispatch(self, method: str, params: list[Any], headers: dict[str, str],
                 client_cn: str | None, *, upload: bytes | None = None) -> Any:
        """Run one call under the state lock; raises the fault's exception."""
        with self._lock:
            record: dict[str, Any] = {"method": method, "callnum": headers.get(
                "Koji-Session-Callnum"), "t": time.time(),
                "session": headers.get("Koji-Session-Id"),
                "thread": threading.get_ident()}
            self.calls.append(record)
            if method in self._crash_on:
                self._crash_on.discard(method)
                raise _Crash(method)
            try:
                result = self._dispatch(method, params, headers, client_cn, upload)
            except _FAULTABLE as exc:
                record["fault"] = _fault(exc).faultCode
                raise
            return result

    def _dispatch(self, method: str, params: list[Any], headers: dict[str, str],
                  client_cn: str | None, upload: bytes | None) -> Any:
        if method.startswith("testhub."):
            return self._test_control(method, params)
        if self._offline:
            raise koji.ServerOffline("server is offline for maintenance")
        call = _Call(method, None, None, client_cn)
        self._authenticate(call, headers)
        if method in self._expire_on:
            self._expire_on.discard(method)
            self._expire_all()
            self._save()
            raise koji.AuthExpired(f"session \"{headers.get('Koji-Session-Id')}\" has expired")
        self._free_stale_hosts()
        result: Any
        if upload is not None:
            result = self._raw_upload(call, params[0], upload)
        elif method == "multiCall":
            result = self._multicall(call, params)
        else:
            result = self._invoke(call, method, params)
        if call.dirty or method in LOGIN_METHODS:
            self._save()
        return result

    def _invoke(self, call: _Call, method: str, params: list[Any]) -> Any:
        func: Callable[..., Any] | None = getattr(self, "m_" + method.replace(".", "_"), None)
        if func is None:
            raise koji.GenericError(f"Invalid method: {method}")
        args, kwargs = koji.decode_args(*params)
        return koji.util.call_with_argcheck(func, [call, *args], kwargs)

    def _multicall(self, call: _Call, params: list[Any]) -> list[Any]:
        out: list[Any] = []
        for item in params[0] if params else []:
            try:
                out.append([self._invoke(call, item["methodName"], list(item["params"]))])
            except _FAULTABLE as exc:
                fault = _fault(exc)
                out.append({"faultCode": fault.faultCode, "faultString": fault.faultString})
        return out

    def _save(self) -> None:
        _save_state(self.data_dir, self._state)

    # -- sessions -------------------------------------------------------------------------------

    def _authenticate(self, call: _Call, headers: dict[str, str]) -> None:
        sid = headers.get("Koji-Session-Id")
        if not sid:
            return
        session = self._state["sessions"].get(sid)
        if session is None or session.get("closed") or not secrets.compare_digest(
            session["key"], headers.get("Koji-Session-Key", "")
        ):
            if call.method in LOGIN_METHODS:
                return
            raise koji.AuthError("Invalid session or bad credentials")
        if call.method in LOGIN_METHODS:
            call.session = session  # may be expired: a renewal
            return
        if session["expired"]:
            raise koji.AuthExpired(f'session "{sid}" has expired')
        callnum = int(headers.get("Koji-Session-Callnum", "0"))
        last = session.get("callnum")
        if last is not None:
            if callnum < last:
                raise koji.SequenceError(f"{last} > {callnum} (session {sid})")
            if callnum == last and call.method not in RETRY_WHITELIST:
                raise koji.RetryError(
                    f"unable to retry call {callnum} (method {call.method}) for session {sid}"
                )
        session["callnum"] = callnum
        call.session = session
        call.user = self._state["users"][str(session["user_id"])]

    def _create_session(self, call: _Call, user: dict[str, Any], authtype: int,
                        renew: bool, exclusive: bool) -> dict[str, Any]:
        old = call.session
        key = f"{user['id']}-{secrets.token_urlsafe(15)}"
        if renew and old is not None and old["user_id"] == user["id"]:
            old.update(key=key, expired=False, callnum=None, renew_ts=time.time())
            if exclusive:
                old["exclusive"] = True
            session = old
        else:
            sid = _new_id(self._state, "sessions") + 100
            session = {
                "id": sid, "key": key, "user_id": user["id"], "callnum": None,
                "exclusive": False, "master": None, "expired": False, "authtype": authtype,
                "start_ts": time.time(), "renew_ts": None,
            }
            self._state["sessions"][str(sid)] = session
        call.dirty = True
        return {"session-id": session["id"], "session-key": key, "header-auth": True}

    def _expire_all(self) -> None:
        for session in self._state["sessions"].values():
            session["expired"] = True

    def _require_user(self, call: _Call) -> dict[str, Any]:
        if call.user is None:
            raise koji.ActionNotAllowed("you must be logged in for this operation")
        return call.user

    def _require_admin(self, call: _Call) -> dict[str, Any]:
        user = self._require_user(call)
        if "admin" not in user["perms"]:
            raise koji.ActionNotAllowed("admin permission required")
        return user

    def _require_host(self, call: _Call) -> dict[str, Any]:
        user = self._require_user(call)
        host = next((h for h in self._state["hosts"].values() if h["user_id"] == user["id"]),
                    None)
        if host is None:
            raise koji.AuthError("No host specified")
        session = call.session
        assert session is not None
        if not session["exclusive"]:
            raise koji.AuthError("This method requires an exclusive session")
        return cast(dict[str, Any], host)

    def m_login(self, call: _Call, user: str, password: str, opts: Any = None,
                renew: bool = False, exclusive: bool = False) -> dict[str, Any]:
        found = self._user(user, strict=False)
        if found is None or not found["password"] or not secrets.compare_digest(
            found["password"], password
        ):
            raise koji.AuthError("invalid username or password")
        if found["status"] != 0:
            raise koji.AuthError(f"logins by {user} are not allowed")
        return self._create_session(call, found, koji.AUTHTYPES["NORMAL"], renew, exclusive)

    def m_sslLogin(self, call: _Call, proxyuser: str | None = None, renew: bool = False,
                   exclusive: bool = False, proxyauthtype: int | None = None
                   ) -> dict[str, Any]:
        if call.client_cn is None:
            raise koji.AuthError("could not get user for SSL login: no client certificate")
        found = self._user(call.client_cn, strict=False)
        if found is None:
            raise koji.AuthError(f"Unknown user: {call.client_cn}")
        return self._create_session(call, found, koji.AUTHTYPES["SSL"], renew, exclusive)

    def m_logout(self, call: _Call, session_id: int | None = None) -> None:
        """Session.logout (Koji 1.35 auth.py): the session and its subsessions are closed;
        a closed session is refused from then on ("Invalid session or bad credentials")."""
        if call.session is not None:
            sid = call.session["id"]
            for session in self._state["sessions"].values():
                if session["id"] == sid or session.get("master") == sid:
                    session.update(expired=True, exclusive=False, closed=True)
            call.dirty = True

    def m_subsession(self, call: _Call) -> dict[str, Any]:
        user = self._require_user(call)
        assert call.session is not None
        master = call.session
        call.session = None
        sinfo = self._create_session(call, user, master["authtype"], False, False)
        # A subsession of the host's exclusive session may make host calls (kojid's task
        # processes do), and outlives a new exclusive login of its master's host.
        self._state["sessions"][str(sinfo["session-id"])].update(
            master=master["id"], exclusive=master["exclusive"]
        )
        return sinfo

    def m_exclusiveSession(self, call: _Call, force: bool = False) -> None:
        user = self._require_user(call)
        assert call.session is not None
        for session in self._state["sessions"].values():
            if (session["user_id"] == user["id"] and session["exclusive"]
                    and session["master"] is None
                    and session["id"] != call.session["id"] and not session["expired"]):
                if not force:
                    raise koji.AuthLockError("Cannot get exclusive session")
                session["expired"] = True
                session["exclusive"] = False
        call.session["exclusive"] = True
        call.dirty = True

    def m_getSessionInfo(self, call: _Call, details: bool = False) -> dict[str, Any] | None:
        if call.session is None:
            return None
        s = call.session
        return {"session-id": s["id"], "user_id": s["user_id"], "authtype": s["authtype"],
                "expired": s["expired"], "exclusive": s["exclusive"], "master": s["master"],
                "callnum": s["callnum"], "start_ts": s["start_ts"],
                "start_time": _when(s["start_ts"]), "renew_ts": s["renew_ts"]}

    def _find(self, table: str, info: Any, strict: bool = True) -> dict[str, Any] | None:
        """The stored object of ``table`` whose id or name (:data:`_NAMED_BY`) is ``info``;
        None if there is none, or with ``strict`` Koji's ``GenericError`` in Koji's words."""
        key, missing = _NAMED_BY[table]
        for item in self._state[table].values():
            if item["id"] == info or item[key] == info:
                return cast(dict[str, Any], item)
        if strict:
            raise koji.GenericError(missing.format(info))
        return None

    def _user(self, info: Any, strict: bool = True) -> dict[str, Any] | None:
        user = self._find("users", info, strict)
        return None if user is None else dict(user)

    # -- provided by the layers above (_tasks, _cg, _hub) ---------------------------------------

    def _free_stale_hosts(self) -> None:
        raise NotImplementedError

    def _raw_upload(self, call: _Call, query: dict[str, str], body: bytes) -> dict[str, Any]:
        raise NotImplementedError

    def _test_control(self, method: str, params: list[Any]) -> Any:
        raise NotImplementedError
