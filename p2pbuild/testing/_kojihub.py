"""A small Koji hub for tests: XML-RPC over HTTP and HTTPS on loopback, files on disk.

No Koji hub is packaged on PyPI or Debian, so the dispatcher's Koji integration is tested
against this one, driven by the real ``koji`` client library and command line. It copies
what ``../shared/koji/hub-transcript.jsonl`` recorded from a real Koji 1.35 hub for the
calls a build host, the ``koji build`` command and a content generator make:

* POST only on ``/kojihub`` (and ``/kojihub/ssllogin`` for ``sslLogin``). A body with
  ``Content-Type: application/octet-stream`` is a raw upload whose parameters are in the
  query string; anything else is XML-RPC (``koji.xmlrpcplus``; keyword arguments travel as a
  trailing struct with ``__starstar``). ``GET /kojifiles/<path>`` serves the hub's files
  (``work/`` uploads, ``packages/`` imported builds), like Koji's ``topurl``.
* Session headers ``Koji-Session-Id``/``-Key``/``-Callnum``: a callnum lower than the last is
  fault 1008, the same one again 1009 (except Koji's retry whitelist); an expired session
  is 1007 (the client logs in again by itself with ``renew``, keeping session id, master and
  exclusivity); ``host.*`` needs an exclusive session (a subsession of one counts).
* Faults: ``koji.GenericError`` subclasses travel with their ``faultCode`` (1000-1024);
  anything else, e.g. a missing metadata key, is fault 1 with the exception's text.
* ``CGImport`` validates like the hub: every required key, a reserved build named by
  ``build_id`` with its token (CG, owning task, ``BUILDING``, NVR checked), sizes and
  checksums recomputed, each RPM's header (``SOURCERPM`` of binaries, NVR of the source
  package) against the build, every buildroot referenced by an output; nothing is recorded
  unless all pass. The build's task and owner come from the metadata, as on the hub.
  ``cancelBuild`` (the owner or an admin) cancels a ``BUILDING`` build, its task and its
  reservation.
* Tasks: ``build`` puts a task in the channel the target policy picks (``*-p2p`` -> ``p2p``
  by default), ``host.getTasks`` assigns free tasks of the host's channels to it (a host
  that refused a task does not get it again), ``cancelTask`` cancels, ``freeTask`` (admin)
  frees.

State (users, hosts, channels, tags, targets, builds, tasks, sessions) is one JSON file in
the data directory, written atomically after every call that changes it, so a hub stopped
or killed between calls restarts on the same directory with everything it had answered.
Test controls are XML-RPC methods under ``testhub.`` (expire sessions, go offline, expire
or crash when a given method arrives, list refusals and calls).

Run as a process: ``python -m p2pbuild.testing._kojihub DATA_DIR [--port N] [--https-port N]``
prints one JSON line with its URLs once it listens.

Module size: one hub, one concept; the session rules, task states and the CG validation
share the state and its lock.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import http.server
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import xmlrpc.client
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import attrs
import koji
import koji.util
import koji.xmlrpcplus
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..koji._rpm import RpmHeaderError, read_rpm_header

__all__ = [
    "HubPki",
    "HubProcess",
    "KojiTestHub",
    "make_hub_pki",
    "seed_hub",
    "write_koji_cli_config",
]

KOJI_VERSION = "1.35.3"
#: Calls the hub lets a client repeat with the same callnum (Koji's RetryWhitelist).
RETRY_WHITELIST = frozenset({
    "host.taskWait", "host.taskUnwait", "host.taskSetWait", "host.updateHost",
    "host.setBuildRootList", "repoInit", "repoDone",
})
LOGIN_METHODS = frozenset({"login", "sslLogin"})
TASK = koji.TASK_STATES
BUILD = koji.BUILD_STATES


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


# -- PKI for HTTPS and sslLogin --------------------------------------------------------------


@attrs.frozen
class HubPki:
    """A throwaway CA, the hub's server certificate and client certificates (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    #: Client name -> one PEM file holding certificate and key (what ``koji`` wants).
    clients: dict[str, Path]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_hub_pki(directory: Path, clients: list[str]) -> HubPki:
    """Write a CA, a server certificate for 127.0.0.1/localhost and one client certificate
    (CN = the name) per entry of ``clients`` into ``directory``."""
    import ipaddress

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    later = now + datetime.timedelta(days=7)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("p2pbuild test koji CA"))
        .issuer_name(_name("p2pbuild test koji CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(cn: str, server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(later)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert, key = issue("127.0.0.1", True)
    (directory / "server.pem").write_bytes(cert)
    (directory / "server.key").write_bytes(key)
    paths = {}
    for cn in clients:
        cert, key = issue(cn, False)
        path = directory / f"client-{cn}.pem"
        path.write_bytes(cert + key)
        path.chmod(0o600)
        paths[cn] = path
    return HubPki(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                  paths)


# -- state -------------------------------------------------------------------------------------


def _empty_state() -> dict[str, Any]:
    return {
        "next": {}, "event": 1, "users": {}, "hosts": {}, "channels": {}, "tags": {},
        "targets": {}, "tasks": {}, "builds": {}, "cgs": {}, "reservations": {},
        "sessions": {}, "policy": [], "tagged": {},
    }


def _state_file(data_dir: Path) -> Path:
    return data_dir / "hub-state.json"


def _load_state(data_dir: Path) -> dict[str, Any]:
    path = _state_file(data_dir)
    if not path.exists():
        return _empty_state()
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def _save_state(data_dir: Path, state: dict[str, Any]) -> None:
    path = _state_file(data_dir)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        json.dump(state, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _new_id(state: dict[str, Any], table: str) -> int:
    value = int(state["next"].get(table, 1))
    state["next"][table] = value + 1
    return value


def seed_hub(
    data_dir: Path,
    *,
    users: dict[str, str],
    admins: tuple[str, ...] = (),
    hosts: dict[str, str] | None = None,
    channels: tuple[str, ...] = ("default", "p2p"),
    host_channels: tuple[str, ...] = ("p2p",),
    tags: tuple[str, ...] = ("f40", "f40-build"),
    targets: dict[str, tuple[str, str]] | None = None,
    policy: tuple[tuple[str, str], ...] = (("*-p2p", "p2p"),),
    cg: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Write a hub's initial state: ``users`` (name -> password, empty for certificate-only
    users), ``hosts`` (host user name -> arches) in ``host_channels``, ``tags``,
    ``targets`` (name -> (build tag, destination tag)), the channel ``policy`` (target glob
    -> channel, first match; no match: ``default``) and ``cg`` (content generator -> users
    granted). What ``koji add-host``, ``add-channel``, ``add-host-to-channel``,
    ``add-tag``, ``add-target`` and ``grant-cg-access`` would have set up."""
    state = _empty_state()
    now = time.time()
    for name, password in users.items():
        uid = _new_id(state, "users")
        state["users"][str(uid)] = {
            "id": uid, "name": name, "password": password, "status": 0, "usertype": 0,
            "krb_principals": [], "perms": ["admin"] if name in admins else [],
        }
    for name in channels:
        cid = _new_id(state, "channels")
        state["channels"][str(cid)] = {"id": cid, "name": name}
    by_channel = {c["name"]: c["id"] for c in state["channels"].values()}
    for name, arches in (hosts or {}).items():
        user = next((u for u in state["users"].values() if u["name"] == name), None)
        if user is None:
            uid = _new_id(state, "users")
            user = {"id": uid, "name": name, "password": "", "status": 0,
                    "krb_principals": [], "perms": []}
            state["users"][str(uid)] = user
        user["usertype"] = koji.USERTYPES["HOST"]
        hid = _new_id(state, "hosts")
        state["hosts"][str(hid)] = {
            "id": hid, "user_id": user["id"], "name": name, "arches": arches,
            "capacity": 50.0, "enabled": True, "ready": False, "task_load": 0.0,
            "update_ts": now, "description": "gateway to p2p volunteer farm", "comment": None,
            "channels": [by_channel[c] for c in host_channels], "data": None,
        }
    for name in tags:
        tid = _new_id(state, "tags")
        state["tags"][str(tid)] = {
            "id": tid, "name": name, "arches": "x86_64", "locked": False, "perm": None,
            "perm_id": None, "maven_support": False, "maven_include_all": False,
            "extra": {}, "taginfo": None,
        }
        state["tagged"][str(tid)] = []
    tag_ids = {t["name"]: t["id"] for t in state["tags"].values()}
    for name, (build_tag, dest_tag) in (targets or {}).items():
        tid = _new_id(state, "targets")
        state["targets"][str(tid)] = {
            "id": tid, "name": name, "build_tag": tag_ids[build_tag],
            "build_tag_name": build_tag, "dest_tag": tag_ids[dest_tag],
            "dest_tag_name": dest_tag,
        }
    state["policy"] = [list(rule) for rule in policy]
    user_ids = {u["name"]: u["id"] for u in state["users"].values()}
    for name, granted in (cg or {}).items():
        cid = _new_id(state, "cgs")
        state["cgs"][str(cid)] = {"id": cid, "name": name,
                                  "users": [user_ids[u] for u in granted]}
    data_dir.mkdir(parents=True, exist_ok=True)
    _save_state(data_dir, state)


# -- one call ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Call:
    method: str
    session: dict[str, Any] | None
    user: dict[str, Any] | None
    client_cn: str | None
    dirty: bool = False


class _Crash(Exception):
    """The test asked the hub to die when this method arrives."""


@attrs.define(eq=False)
class KojiTestHub:
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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/kojihub"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}/kojihub"

    @property
    def topurl(self) -> str:
        return f"http://127.0.0.1:{self.port}/kojifiles"

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

    def __enter__(self) -> KojiTestHub:
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
        if session is None or not secrets.compare_digest(
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
        if call.session is not None:
            call.session["expired"] = True
            call.session["exclusive"] = False
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

    # -- plain lookups --------------------------------------------------------------------------

    def m_getAPIVersion(self, call: _Call) -> int:
        return int(koji.API_VERSION)

    def m_getKojiVersion(self, call: _Call) -> str:
        return KOJI_VERSION

    def _user(self, info: Any, strict: bool = True) -> dict[str, Any] | None:
        for user in self._state["users"].values():
            if user["id"] == info or user["name"] == info:
                return dict(user)
        if strict:
            raise koji.GenericError(f"No such user: {info!r}")
        return None

    @staticmethod
    def _public_user(user: dict[str, Any]) -> dict[str, Any]:
        return {k: user[k] for k in ("id", "name", "status", "usertype", "krb_principals")}

    def m_getLoggedInUser(self, call: _Call) -> dict[str, Any] | None:
        if call.user is None or call.session is None:
            return None
        return {**self._public_user(call.user), "authtype": call.session["authtype"],
                "krb_principal": None}

    def m_getUser(self, call: _Call, userInfo: Any = None, strict: bool = False,
                  krb_princs: bool = True, groups: bool = False) -> dict[str, Any] | None:
        if userInfo is None:
            return self.m_getLoggedInUser(call)
        user = self._user(userInfo, strict)
        return None if user is None else self._public_user(user)

    def _host(self, info: Any, strict: bool = True) -> dict[str, Any] | None:
        for host in self._state["hosts"].values():
            if host["id"] == info or host["name"] == info:
                return cast(dict[str, Any], host)
        if strict:
            raise koji.GenericError(f"No such host: {info!r}")
        return None

    @staticmethod
    def _public_host(host: dict[str, Any]) -> dict[str, Any]:
        return {k: host[k] for k in ("arches", "capacity", "comment", "description",
                                     "enabled", "id", "name", "ready", "task_load",
                                     "update_ts", "user_id")}

    def m_getHost(self, call: _Call, hostInfo: Any, strict: bool = False,
                  event: Any = None) -> dict[str, Any] | None:
        host = self._host(hostInfo, strict)
        return None if host is None else self._public_host(host)

    def _tag(self, info: Any, strict: bool = True) -> dict[str, Any] | None:
        for tag in self._state["tags"].values():
            if tag["id"] == info or tag["name"] == info:
                return cast(dict[str, Any], tag)
        if strict:
            raise koji.GenericError(f"No such tagInfo: {info!r}")
        return None

    def m_getTag(self, call: _Call, tagInfo: Any, strict: bool = False, event: Any = None,
                 blocked: bool = False) -> dict[str, Any] | None:
        tag = self._tag(tagInfo, strict)
        return None if tag is None else dict(tag)

    def _target(self, info: Any, strict: bool = True) -> dict[str, Any] | None:
        for target in self._state["targets"].values():
            if target["id"] == info or target["name"] == info:
                return cast(dict[str, Any], target)
        if strict:
            raise koji.GenericError(f"No such build target: {info}")
        return None

    def m_getBuildTarget(self, call: _Call, info: Any, event: Any = None,
                         strict: bool = False) -> dict[str, Any] | None:
        target = self._target(info, strict)
        return None if target is None else dict(target)

    def m_getChannel(self, call: _Call, channelInfo: Any, strict: bool = False
                     ) -> dict[str, Any] | None:
        for channel in self._state["channels"].values():
            if channelInfo in (channel["id"], channel["name"]):
                return dict(channel)
        if strict:
            raise koji.GenericError(f"No such channel: {channelInfo}")
        return None

    def m_listChannels(self, call: _Call, hostID: Any = None, event: Any = None,
                       enabled: Any = None) -> list[dict[str, Any]]:
        channels = list(self._state["channels"].values())
        if hostID is not None:
            host = self._host(hostID)
            assert host is not None
            channels = [c for c in channels if c["id"] in host["channels"]]
        return [dict(c) for c in channels]

    # -- tasks ----------------------------------------------------------------------------------

    def _task(self, task_id: Any) -> dict[str, Any]:
        task = self._state["tasks"].get(str(task_id))
        if task is None:
            raise koji.GenericError(f"No such task: {task_id}")
        return cast(dict[str, Any], task)

    @staticmethod
    def _task_info(task: dict[str, Any]) -> dict[str, Any]:
        info = {k: task[k] for k in (
            "arch", "awaited", "channel_id", "completion_ts", "create_ts", "host_id", "id",
            "label", "method", "owner", "parent", "priority", "start_ts", "state",
            "waiting", "weight",
        )}
        for key in ("completion", "create", "start"):
            info[f"{key}_time"] = _when(task[f"{key}_ts"])
        return info

    def m_build(self, call: _Call, src: str, target: str, opts: dict[str, Any] | None = None,
                priority: int | None = None, channel: str | None = None) -> int:
        user = self._require_user(call)
        self._target(target)
        if not channel:
            channel = next((c for glob, c in self._state["policy"]
                            if fnmatch.fnmatchcase(target, glob)), "default")
        chan = self.m_getChannel(call, channel, strict=True)
        assert chan is not None
        task_id = _new_id(self._state, "tasks")
        self._state["tasks"][str(task_id)] = {
            "id": task_id, "method": "build", "request": [src, target, opts or {}],
            "state": TASK["FREE"], "owner": user["id"], "host_id": None,
            "channel_id": chan["id"], "arch": "noarch",
            "priority": koji.PRIO_DEFAULT + (priority or 0), "create_ts": time.time(),
            "start_ts": None, "completion_ts": None, "weight": 1.0, "result": None,
            "parent": None, "label": None, "waiting": None, "awaited": None, "refusals": {},
            "assign_ts": None,
        }
        call.dirty = True
        return task_id

    def m_getTaskInfo(self, call: _Call, task_id: Any, request: bool = False,
                      strict: bool = False) -> Any:
        if isinstance(task_id, list):
            return [self.m_getTaskInfo(call, t, request, strict) for t in task_id]
        task = self._state["tasks"].get(str(task_id))
        if task is None:
            if strict:
                raise koji.GenericError(f"No such task: {task_id}")
            return None
        info = self._task_info(task)
        if request:
            info["request"] = task["request"]
        return info

    def m_getTaskChildren(self, call: _Call, task_id: int, request: bool = False,
                          strict: bool = False) -> list[Any]:
        return []

    def m_getTaskResult(self, call: _Call, taskId: int, raise_fault: bool = True) -> Any:
        task = self._task(taskId)
        if task["state"] == TASK["CANCELED"]:
            raise koji.GenericError(f"Task {taskId} is canceled")
        if task["state"] not in (TASK["CLOSED"], TASK["FAILED"]):
            raise koji.GenericError(f"Task {taskId} is not finished")
        try:
            params, _ = xmlrpc.client.loads(task["result"])
        except xmlrpc.client.Fault as fault:
            if raise_fault:
                raise
            return {"faultCode": fault.faultCode, "faultString": fault.faultString}
        return params[0]

    def m_listTaskOutput(self, call: _Call, taskID: int, stat: bool = False,
                         all_volumes: bool = False, strict: bool = False) -> Any:
        directory = self.data_dir / "work" / koji.pathinfo.taskrelpath(taskID)
        if not directory.is_dir():
            return {} if stat else []
        names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                       if p.is_file())
        if stat:
            return {n: {"st_size": str((directory / n).stat().st_size)} for n in names}
        return names

    def m_cancelTask(self, call: _Call, task_id: int, recurse: bool = True) -> bool:
        user = self._require_user(call)
        task = self._task(task_id)
        if task["owner"] != user["id"] and "admin" not in user["perms"]:
            raise koji.ActionNotAllowed(f"Cannot cancel task, not owner of task {task_id}")
        if task["state"] in (TASK["CLOSED"], TASK["FAILED"], TASK["CANCELED"]):
            return False
        task.update(state=TASK["CANCELED"], completion_ts=time.time())
        call.dirty = True
        return True

    def m_freeTask(self, call: _Call, task_id: int) -> None:
        """Admin: free a task (``koji free-task``), whatever host holds it."""
        self._require_admin(call)
        task = self._task(task_id)
        if task["state"] in (TASK["CLOSED"], TASK["CANCELED"], TASK["FAILED"]):
            name = koji.TASK_STATES[task["state"]]
            raise koji.GenericError(f"Cannot free task {task_id}, state is {name}")
        task.update(state=TASK["FREE"], host_id=None)
        call.dirty = True

    # -- host.* -----------------------------------------------------------------------------

    def _free_stale_hosts(self) -> None:
        now = time.time()
        for host in self._state["hosts"].values():
            if now - host["update_ts"] <= self.host_timeout_s:
                continue
            for task in self._state["tasks"].values():
                if task["host_id"] == host["id"] and task["state"] in (
                    TASK["OPEN"], TASK["ASSIGNED"]
                ):
                    task.update(state=TASK["FREE"], host_id=None)

    def m_host_getID(self, call: _Call) -> int:
        return int(self._require_host(call)["id"])

    def m_host_getHost(self, call: _Call) -> dict[str, Any]:
        return self._public_host(self._require_host(call))

    def m_host_updateHost(self, call: _Call, task_load: float, ready: bool,
                          data: dict[str, Any] | None = None) -> None:
        host = self._require_host(call)
        host.update(task_load=float(task_load), ready=bool(ready), update_ts=time.time())
        if data is not None:
            host["data"] = data
        call.dirty = True

    def m_host_getTasks(self, call: _Call) -> list[dict[str, Any]]:
        host = self._require_host(call)
        if host["enabled"] and host["ready"]:
            for task in sorted(self._state["tasks"].values(),
                               key=lambda t: (t["priority"], t["id"])):
                if (task["state"] == TASK["FREE"] and task["channel_id"] in host["channels"]
                        and str(host["id"]) not in task["refusals"]):
                    task.update(state=TASK["ASSIGNED"], host_id=host["id"],
                                assign_ts=time.time())
                    call.dirty = True
        return [
            {k: t[k] for k in ("arch", "channel_id", "create_ts", "host_id", "id", "method",
                               "priority", "state")}
            for t in self._state["tasks"].values()
            if t["host_id"] == host["id"] and t["state"] == TASK["ASSIGNED"]
        ]

    def m_host_getHostTasks(self, call: _Call) -> list[dict[str, Any]]:
        host = self._require_host(call)
        return [{"id": t["id"], "waiting": t["waiting"], "weight": t["weight"]}
                for t in self._state["tasks"].values()
                if t["host_id"] == host["id"] and t["state"] == TASK["OPEN"]]

    def _owned_open(self, call: _Call, task_id: int) -> dict[str, Any]:
        host = self._require_host(call)
        task = self._task(task_id)
        if task["host_id"] != host["id"] or task["state"] != TASK["OPEN"]:
            raise koji.ActionNotAllowed(f"host {host['id']} does not own task {task_id}")
        return task

    def m_host_openTask(self, call: _Call, task_id: int) -> dict[str, Any] | None:
        host = self._require_host(call)
        task = self._task(task_id)
        if task["state"] != TASK["ASSIGNED"] or task["host_id"] != host["id"]:
            return None
        task.update(state=TASK["OPEN"], start_ts=time.time())
        call.dirty = True
        info = self._task_info(task)
        info["request"] = koji.xmlrpcplus.dumps(tuple(task["request"]), "build", allow_none=1)
        return info

    def m_host_setTaskWeight(self, call: _Call, task_id: int, weight: float) -> None:
        self._owned_open(call, task_id)["weight"] = float(weight)
        call.dirty = True

    def _finish(self, call: _Call, task_id: int, response: str, state: int) -> None:
        task = self._owned_open(call, task_id)
        task.update(state=state, result=response, completion_ts=time.time())
        call.dirty = True

    def m_host_closeTask(self, call: _Call, task_id: int, response: str) -> None:
        self._finish(call, task_id, response, TASK["CLOSED"])

    def m_host_failTask(self, call: _Call, task_id: int, response: str) -> None:
        self._finish(call, task_id, response, TASK["FAILED"])

    def m_host_refuseTask(self, call: _Call, task_id: int, soft: bool = True,
                          msg: str = "") -> None:
        host = self._require_host(call)
        task = self._task(task_id)
        if task["host_id"] != host["id"] or task["state"] not in (TASK["OPEN"],
                                                                  TASK["ASSIGNED"]):
            raise koji.ActionNotAllowed(f"host {host['id']} does not own task {task_id}")
        task["refusals"][str(host["id"])] = {"soft": bool(soft), "msg": msg,
                                             "time": time.time()}
        task.update(state=TASK["FREE"], host_id=None, start_ts=None)
        call.dirty = True

    def m_host_freeTasks(self, call: _Call, tasks: list[int]) -> None:
        host = self._require_host(call)
        for task_id in tasks:
            task = self._task(task_id)
            if task["host_id"] == host["id"] and task["state"] in (TASK["OPEN"],
                                                                   TASK["ASSIGNED"]):
                task.update(state=TASK["FREE"], host_id=None)
                call.dirty = True

    def m_host_tagBuild(self, call: _Call, task_id: int, tag: Any, build_id: int,
                        force: bool = False, fromtag: Any = None) -> None:
        self._owned_open(call, task_id)
        taginfo = self._tag(tag)
        assert taginfo is not None
        build = self._build(build_id)
        if build["state"] != BUILD["COMPLETE"]:
            raise koji.TagError(f"build {build['nvr']} not complete: state {build['state']}")
        tagged = self._state["tagged"][str(taginfo["id"])]
        if build["id"] in tagged and not force:
            raise koji.TagError(f"build {build['nvr']} already tagged ({taginfo['name']})")
        tagged.append(build["id"])
        call.dirty = True

    # -- uploads --------------------------------------------------------------------------------

    def _raw_upload(self, call: _Call, query: dict[str, str], body: bytes) -> dict[str, Any]:
        self._require_user(call)
        target = self.path(f"work/{query['filepath']}/{query['filename']}")
        offset = int(query.get("offset", "0"))
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = "r+b" if target.exists() else "wb"
        if offset == 0 and query.get("overwrite") == "1":
            mode = "wb"
        with target.open(mode) as f:
            f.seek(offset)
            f.write(body)
        return {"size": len(body), "fileverify": query.get("fileverify", "adler32"),
                "offset": offset, "hexdigest": "%08x" % (zlib.adler32(body) & 0xFFFFFFFF)}

    def m_checkUpload(self, call: _Call, path: str, name: str, verify: str | None = None,
                      tail: int | None = None, volume: str | None = None
                      ) -> dict[str, Any] | None:
        self._require_user(call)
        target = self.path(f"work/{path}/{name}")
        if not target.is_file():
            return None
        info: dict[str, Any] = {"size": target.stat().st_size, "mtime": target.stat().st_mtime}
        if verify == "adler32":
            info["hexdigest"] = "%08x" % (zlib.adler32(target.read_bytes()) & 0xFFFFFFFF)
        return info

    # -- builds ---------------------------------------------------------------------------------

    def _build(self, info: Any, strict: bool = True) -> dict[str, Any]:
        for build in self._state["builds"].values():
            if build["id"] == info or build["nvr"] == info:
                return cast(dict[str, Any], build)
        if strict:
            raise koji.GenericError(f"No such build: {info!r}")
        return {}

    def _build_info(self, build: dict[str, Any]) -> dict[str, Any]:
        owner = self._user(build["owner_id"])
        assert owner is not None
        cg = self._state["cgs"].get(str(build["cg_id"])) if build["cg_id"] else None
        info = {k: v for k, v in build.items() if k not in ("rpms", "logs", "buildroots")}
        info.update(
            build_id=build["id"], owner_name=owner["name"], package_name=build["name"],
            start_time=_when(build["start_ts"]), completion_time=_when(build["completion_ts"]),
            creation_time=_when(build["creation_ts"]), cg_name=cg["name"] if cg else None,
        )
        return info

    def m_getBuild(self, call: _Call, buildInfo: Any, strict: bool = False
                   ) -> dict[str, Any] | None:
        build = self._build(buildInfo, strict)
        return self._build_info(build) if build else None

    def m_listRPMs(self, call: _Call, buildID: int | None = None, buildrootID: Any = None,
                   imageID: Any = None, componentBuildrootID: Any = None, hostID: Any = None,
                   arches: Any = None, queryOpts: Any = None, draft: Any = None
                   ) -> list[dict[str, Any]]:
        build = self._build(buildID)
        return [dict(r) for r in build["rpms"]]

    def m_getBuildLogs(self, call: _Call, buildinfo: Any) -> list[dict[str, Any]]:
        build = self._build(buildinfo)
        return [dict(log) for log in build["logs"]]

    def m_listTagged(self, call: _Call, tag: Any, event: Any = None, inherit: bool = False,
                     prefix: Any = None, latest: bool = False, package: Any = None,
                     owner: Any = None, type: Any = None, strict: bool = True,
                     extra: bool = False, draft: Any = None) -> list[dict[str, Any]]:
        taginfo = self._tag(tag)
        assert taginfo is not None
        return [
            {**self._build_info(self._build(b)), "tag_id": taginfo["id"],
             "tag_name": taginfo["name"]}
            for b in self._state["tagged"][str(taginfo["id"])]
        ]

    # -- content generators ---------------------------------------------------------------------

    def _cg(self, name: str) -> dict[str, Any]:
        for cg in self._state["cgs"].values():
            if cg["name"] == name:
                return cast(dict[str, Any], cg)
        raise koji.GenericError(f"No such content generator: {name}")

    def _assert_cg(self, call: _Call, name: str) -> dict[str, Any]:
        user = self._require_user(call)
        cg = self._cg(name)
        if user["id"] not in cg["users"]:
            raise koji.ActionNotAllowed(
                f"{user['name']} is not authorized for content generator {name}"
            )
        return cg

    def m_grantCGAccess(self, call: _Call, user: str, cg: str, create: bool = False) -> None:
        self._require_admin(call)
        found = self._user(user)
        assert found is not None
        try:
            entry = self._cg(cg)
        except koji.GenericError:
            if not create:
                raise
            cid = _new_id(self._state, "cgs")
            entry = {"id": cid, "name": cg, "users": []}
            self._state["cgs"][str(cid)] = entry
        if found["id"] not in entry["users"]:
            entry["users"].append(found["id"])
        call.dirty = True

    def m_CGInitBuild(self, call: _Call, cg: str, data: dict[str, Any]) -> dict[str, Any]:
        cginfo = self._assert_cg(call, cg)
        user = self._require_user(call)
        for key in ("name", "version", "release"):
            if key not in data:
                raise koji.GenericError(f"Missing build field: {key}")
        nvr = f"{data['name']}-{data['version']}-{data['release']}"
        existing = self._build(nvr, strict=False)
        if existing and existing["state"] not in (BUILD["FAILED"], BUILD["CANCELED"]):
            raise koji.GenericError(f"Build already exists: {nvr}")
        if existing:
            existing["nvr"] = f"{nvr}#{existing['id']}"  # the name is free again
        build_id = _new_id(self._state, "builds")
        now = time.time()
        self._state["event"] += 1
        self._state["builds"][str(build_id)] = {
            "id": build_id, "name": data["name"], "version": data["version"],
            "release": data["release"], "epoch": data.get("epoch"), "nvr": nvr,
            "state": BUILD["BUILDING"], "task_id": data.get("task_id"),
            "owner_id": data.get("owner", user["id"]), "cg_id": cginfo["id"],
            "source": None, "extra": None, "start_ts": now, "creation_ts": now,
            "completion_ts": None, "creation_event_id": self._state["event"],
            "draft": False, "package_id": 1, "volume_id": 0, "volume_name": "DEFAULT",
            "promoter_id": None, "promoter_name": None, "promotion_time": None,
            "promotion_ts": None, "rpms": [], "logs": [], "buildroots": [],
        }
        token = secrets.token_hex(32)
        self._state["reservations"][str(build_id)] = {"token": token, "cg_id": cginfo["id"]}
        call.dirty = True
        return {"build_id": build_id, "token": token}

    def m_CGRefundBuild(self, call: _Call, cg: str, build_id: int, token: str,
                        state: int = BUILD["FAILED"]) -> None:
        cginfo = self._assert_cg(call, cg)
        build = self._build(build_id)
        reservation = self._state["reservations"].get(str(build["id"]))
        if reservation is None or not secrets.compare_digest(reservation["token"], token):
            raise koji.GenericError(f"Token doesn't match build ID {build['id']}")
        if reservation["cg_id"] != cginfo["id"]:
            raise koji.GenericError(f"Build ID {build['id']} not reserved by {cg}")
        if build["state"] != BUILD["BUILDING"]:
            raise koji.GenericError(f"Build ID {build['id']} is not in BUILDING state")
        if state not in (BUILD["FAILED"], BUILD["CANCELED"]):
            raise koji.GenericError(f"Invalid refund state: {state}")
        build.update(state=state, completion_ts=time.time())
        del self._state["reservations"][str(build["id"])]
        call.dirty = True

    def m_cancelBuild(self, call: _Call, buildID: Any, strict: bool = False) -> bool:
        """The build's owner or an admin cancels a ``BUILDING`` build (``koji cancel
        <nvr>``): its task is cancelled with it, its CG reservation dropped."""
        self._require_user(call)
        user = call.user
        assert user is not None
        build = self._build(buildID, strict)
        if not build:
            return False
        if build["owner_id"] != user["id"] and "admin" not in user["perms"]:
            raise koji.ActionNotAllowed("Cannot cancel build, not owner")
        if build["state"] != BUILD["BUILDING"]:
            return False
        build.update(state=BUILD["CANCELED"], completion_ts=time.time())
        task = self._state["tasks"].get(str(build["task_id"]))
        if task is not None and task["state"] not in (TASK["CLOSED"], TASK["CANCELED"],
                                                      TASK["FAILED"]):
            task.update(state=TASK["CANCELED"], completion_ts=time.time())
        self._state["reservations"].pop(str(build["id"]), None)
        call.dirty = True
        return True

    def m_CGImport(self, call: _Call, metadata: Any, directory: str, token: str | None = None
                   ) -> dict[str, Any]:
        self._require_user(call)
        if isinstance(metadata, str) and not metadata.lstrip().startswith("{"):
            path = self.path(f"work/{directory}/{metadata}")
            try:
                metadata = json.loads(path.read_text())
            except OSError:
                raise koji.GenericError(f"No such file: {directory}/{metadata}") from None
        elif isinstance(metadata, str):
            metadata = json.loads(metadata)
        if not isinstance(metadata, dict):
            raise koji.GenericError("Invalid metadata")
        plan = self._check_import(call, metadata, directory, token)
        return self._commit_import(call, plan)

    def _check_import(self, call: _Call, md: dict[str, Any], directory: str,
                      token: str | None) -> dict[str, Any]:
        """Everything CGImport checks, before anything is recorded (KeyError for a missing
        key travels as fault 1, like the hub's)."""
        if md["metadata_version"] != 0:
            raise koji.GenericError(f"Unknown metadata version: {md['metadata_version']}")
        binfo = md["build"]
        for key in ("name", "version", "release", "source", "extra", "start_time",
                    "end_time"):
            binfo[key]  # a KeyError is the hub's answer (fault 1)
        if not isinstance(binfo["extra"], dict):
            raise koji.GenericError("build extra must be a dict")
        nvr = f"{binfo['name']}-{binfo['version']}-{binfo['release']}"
        # The hub's CG_Importer.prep_build: a reserved build is named by build_id (and the
        # token must come with it); without one, the NVR must be free.
        if binfo.get("build_id"):
            build = self._build(binfo["build_id"])
            reservation = self._state["reservations"].get(str(build["id"]))
            if reservation is None or token is None or not secrets.compare_digest(
                reservation["token"], token
            ):
                raise koji.GenericError(f"Token doesn't match build ID {build['id']}")
            cg_names = {br["content_generator"]["name"] for br in md["buildroots"]}
            if {self._cg(name)["id"] for name in cg_names} != {reservation["cg_id"]}:
                raise koji.GenericError(f"Build ID {build['id']} is not reserved by this CG")
            if build["task_id"] and build["task_id"] != binfo.get("task_id"):
                raise koji.GenericError(f"Build is owned by task {build['task_id']}")
            if build["state"] != BUILD["BUILDING"]:
                raise koji.GenericError(f"Build ID {build['id']} is not in BUILDING state")
            if (build["name"], build["version"], build["release"]) != (
                    binfo["name"], binfo["version"], binfo["release"]):
                raise koji.GenericError(f"Build ({build['id']}) NVR is different")
        elif token is not None:
            raise koji.GenericError("Reservation token given, but no build_id in metadata")
        else:
            build = self._build(nvr, strict=False)
            if build and build["state"] not in (BUILD["FAILED"], BUILD["CANCELED"]):
                raise koji.GenericError(f"Build already exists: {nvr}")
            build = {}
        if binfo.get("owner") is not None:
            self._user(binfo["owner"])  # the hub's get_user(owner, strict=True)
        buildroots = {}
        for br in md["buildroots"]:
            for key in ("id", "host", "content_generator", "container", "tools",
                        "components"):
                br[key]
            br["host"]["os"], br["host"]["arch"]
            br["container"]["type"], br["container"]["arch"]
            self._assert_cg(call, br["content_generator"]["name"])
            br["content_generator"]["version"]
            if br["id"] in buildroots:
                raise koji.GenericError(f"Duplicate buildroot id: {br['id']}")
            buildroots[br["id"]] = br
        used: set[Any] = set()
        outputs = []
        for out in md["output"]:
            for key in ("buildroot_id", "filename", "filesize", "checksum_type", "checksum",
                        "type"):
                out[key]
            if out["buildroot_id"] not in buildroots:
                raise koji.GenericError(f"No such buildroot: {out['buildroot_id']}")
            used.add(out["buildroot_id"])
            relpath = out.get("relpath") or ""
            path = self.path(f"work/{directory}/{relpath}/{out['filename']}")
            if not path.is_file():
                raise koji.GenericError(f"No such file: {path.relative_to(self.data_dir)}")
            data = path.read_bytes()
            if len(data) != out["filesize"]:
                raise koji.GenericError(
                    f"File size {len(data)} for {out['filename']} (expected "
                    f"{out['filesize']}) doesn't match"
                )
            if out["checksum_type"] not in ("md5", "sha256"):
                raise koji.GenericError(f"Unsupported checksum type: {out['checksum_type']}")
            actual = hashlib.new(out["checksum_type"], data).hexdigest()
            if actual != out["checksum"]:
                raise koji.GenericError(
                    f"File checksum mismatch for {out['filename']}: {actual} "
                    f"(expected {out['checksum']})"
                )
            header = None
            if out["type"] == "rpm":
                if not out["filename"].endswith(".rpm"):
                    raise koji.GenericError(f"Not an rpm: {out['filename']}")
                try:
                    header = read_rpm_header(path)
                except RpmHeaderError as exc:
                    raise koji.GenericError(str(exc)) from None
                if header.is_source:
                    if header.nvr != nvr:
                        raise koji.GenericError(
                            f"Build is {nvr}, but srpm is {header.nvr}"
                        )
                elif header.sourcerpm != f"{nvr}.src.rpm":
                    raise koji.GenericError(
                        f"srpm mismatch for {out['filename']}: {header.sourcerpm} "
                        f"(expected {nvr}.src.rpm)"
                    )
            elif out["type"] != "log":
                raise koji.GenericError(f"Unsupported file type: {out['type']}")
            outputs.append((out, path, header, hashlib.md5(data).hexdigest()))
        unused = sorted(set(buildroots) - used, key=str)
        if unused:
            raise koji.GenericError(f"Buildroots not referenced by any output: {unused}")
        return {"md": md, "build": build, "nvr": nvr, "outputs": outputs,
                "buildroots": buildroots}

    def _commit_import(self, call: _Call, plan: dict[str, Any]) -> dict[str, Any]:
        md = plan["md"]
        binfo = md["build"]
        user = self._require_user(call)
        build = plan["build"]
        if not build:
            created = self.m_CGInitBuild(call, md["buildroots"][0]["content_generator"]["name"],
                                         {k: binfo[k] for k in ("name", "version", "release")})
            build = self._build(created["build_id"])
        base = f"packages/{binfo['name']}/{binfo['version']}/{binfo['release']}"
        br_ids = {}
        for local_id in plan["buildroots"]:
            br_ids[local_id] = _new_id(self._state, "buildroots")
        rpms, logs = [], []
        for out, path, header, md5 in plan["outputs"]:
            if header is not None:
                arch = header.arch
                dest = self.path(f"{base}/{arch}/{out['filename']}")
                rpms.append({
                    "arch": arch, "build_id": build["id"], "buildroot_id": br_ids[
                        out["buildroot_id"]], "buildtime": header.buildtime, "draft": False,
                    "epoch": header.epoch, "external_repo_id": 0,
                    "external_repo_name": "INTERNAL", "extra": out.get("extra"),
                    "id": _new_id(self._state, "rpms"), "metadata_only": False,
                    "name": header.name, "nvr": header.nvr, "payloadhash": md5,
                    "release": header.release, "size": out["filesize"],
                    "version": header.version,
                })
            else:
                subdir = out.get("subdir") or "."
                dest = self.path(f"{base}/data/logs/{subdir}/{out['filename']}")
                logs.append({"name": out["filename"], "dir": subdir,
                             "path": f"{base}/data/logs/{subdir}/{out['filename']}"})
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
        metadata_file = self.path(f"{base}/data/metadata.json")
        metadata_file.parent.mkdir(parents=True, exist_ok=True)
        metadata_file.write_text(json.dumps(md, indent=2))
        # The hub's CG_Importer.update_build: owner and task come from the metadata.
        owner = self._user(binfo["owner"]) if binfo.get("owner") is not None else user
        assert owner is not None
        build.update(
            state=BUILD["COMPLETE"], source=binfo["source"], extra=binfo["extra"],
            start_ts=float(binfo["start_time"]), completion_ts=float(binfo["end_time"]),
            rpms=rpms, logs=logs, epoch=binfo.get("epoch"),
            buildroots=[{**br, "id": br_ids[br["id"]]} for br in plan["buildroots"].values()],
            owner_id=owner["id"], task_id=binfo.get("task_id"),
        )
        self._state["reservations"].pop(str(build["id"]), None)
        call.dirty = True
        return self._build_info(build)

    # -- test controls --------------------------------------------------------------------------

    def _test_control(self, method: str, params: list[Any]) -> Any:
        name = method.split(".", 1)[1]
        if name == "expireSessions":
            self._expire_all()
            self._save()
            return True
        if name == "expireOn":
            self._expire_on.add(params[0])
            return True
        if name == "crashOn":
            self._crash_on.add(params[0])
            return True
        if name == "setOffline":
            self._offline = bool(params[0])
            return True
        if name == "taskRefusals":
            return list(self._task(params[0])["refusals"].values())
        if name == "calls":
            return [dict(c) for c in self.calls]
        if name == "state":
            return json.dumps(self._state)
        raise koji.GenericError(f"Invalid method: {method}")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def _make_handler(hub: KojiTestHub) -> type[http.server.BaseHTTPRequestHandler]:
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


@attrs.define(eq=False)
class HubProcess:
    """The hub as a child process (``python -m p2pbuild.testing._kojihub``), for tests that
    kill and restart it. :meth:`start` keeps the ports of the first start, so the URLs stay
    the same across restarts."""

    data_dir: Path
    pki_dir: Path | None = None
    port: int = 0
    https_port: int = 0
    process: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/kojihub"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}/kojihub"

    @property
    def topurl(self) -> str:
        return f"http://127.0.0.1:{self.port}/kojifiles"

    async def start(self) -> None:
        import trio

        argv = [sys.executable, "-m", "p2pbuild.testing._kojihub", str(self.data_dir),
                "--port", str(self.port), "--https-port", str(self.https_port)]
        if self.pki_dir is not None:
            argv += ["--pki", str(self.pki_dir)]
        self.process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await self.process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError("the test hub exited before it listened")
                line += chunk
        info = json.loads(line)
        self.port, self.https_port = int(info["port"]), int(info["https_port"])

    async def wait_exit(self) -> int:
        code: int = await self.process.wait()
        return code

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await self.process.stdin.aclose()
        await self.process.stdout.aclose()
        self.process = None

    def control(self) -> xmlrpc.client.ServerProxy:
        """A plain XML-RPC proxy for the ``testhub.*`` controls and anonymous calls."""
        return xmlrpc.client.ServerProxy(self.url, allow_none=True)


def write_koji_cli_config(path: Path, *, server: str, topurl: str, cert: Path,
                          serverca: Path, profile: str = "koji") -> Path:
    """A config file for the ``koji`` command (``koji -c PATH -p PROFILE ...``) that logs
    in with an SSL client certificate (the CLI takes passwords only on its command line)."""
    lines = [f"[{profile}]", f"server = {server}", f"weburl = {server.rsplit('/', 1)[0]}/koji",
             f"topurl = {topurl}", "poll_interval = 1", "max_retries = 3", "retry_interval = 1",
             "anon_retry = true", "authtype = ssl", f"cert = {cert}", f"serverca = {serverca}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="p2pbuild's test Koji hub")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--https-port", type=int, default=0)
    parser.add_argument("--pki", type=Path, help="directory from make_hub_pki")
    args = parser.parse_args(argv)
    pki = None
    if args.pki is not None:
        pki = HubPki(args.pki / "ca.pem", args.pki / "server.pem", args.pki / "server.key", {})
    hub = KojiTestHub(args.data_dir, args.port, args.https_port, pki, exit_on_crash=True)
    hub.start()
    print(json.dumps({"url": hub.url, "https_url": hub.https_url if pki else None,
                      "topurl": hub.topurl, "port": hub.port, "https_port": hub.https_port}),
          flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin (or kills us)
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
