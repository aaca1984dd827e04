"""Leases in the running dispatcher: persistence, the expiry timer and the HTTPS routes.

The decisions are ``_leases.py``'s (pure). This module does their I/O: it looks the nodes
up in the directory, writes every change to the ``leases`` table together with its audit
entry in one transaction (``lease-requested``, ``lease-granted``, ``lease-refused``,
``lease-extended``, ``lease-done``, ``lease-expired``; each with ``lease`` in its detail),
ends leases when their time is up, and tells each push node of a lease by a signed hold
(``p2pbuild._hold``) so the node shows the leased slot in its own status. The engine reads
the same :class:`LeaseBook` (``Engine.leases``) when it selects nodes.

Routes (authenticated as the rest of the API, ``_api.py``)::

    POST   /v1/leases               JSON {arch, count, duration_s, os?, machine?, pool?,
                                    build_type?, operators: "distinct"|"same"} -> 201 lease
    GET    /v1/leases               the caller's leases (an admin's: everyone's)
    GET    /v1/leases/{id}          one lease with its audit events
    POST   /v1/leases/{id}/extend   JSON {by_s} -> the lease
    DELETE /v1/leases/{id}          return it (done) -> the lease

A refusal is ``{"error": "lease-refused", "constraint": ..., "reason": one line}`` with
status 409 (404 ``unknown-lease``, 400 for a malformed request).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._errors import RemoteError
from .._hold import LeaseHold
from .._identity import PublicKey
from .._jobs import BuildType
from .._records import MachineType
from ..dht import Query
from ..https import pinned_client, refusal
from ._bodies import json_object, optional_text
from ._db import Database
from ._errors import BadRequestError
from ._leases import (
    Lease,
    LeasedNode,
    LeaseRefusedError,
    LeaseRequest,
    LeaseState,
    OperatorMode,
    UnknownLeaseError,
)

if TYPE_CHECKING:
    from ._access import Caller
    from ._api import ApiAuth
    from ._engine import Engine

__all__ = ["LeaseService", "insert_lease", "lease_routes", "load_leases", "update_lease"]

_log = logging.getLogger("p2pbuild.dispatcher.leases")


# -- persistence --------------------------------------------------------------------------------


def _request_json(request: LeaseRequest) -> str:
    return json.dumps({
        "arch": request.arch, "os": request.os, "count": request.count,
        "duration_s": request.duration_s,
        "machine": request.machine.value if request.machine else None,
        "pool": request.pool, "build_type": request.build_type.value,
        "operators": request.operators.value,
    }, sort_keys=True)


def _request_from_json(text: str) -> LeaseRequest:
    d = json.loads(text)
    return LeaseRequest(
        arch=d["arch"], count=d["count"], duration_s=d["duration_s"], os=d["os"],
        machine=MachineType(d["machine"]) if d["machine"] else None, pool=d["pool"],
        build_type=BuildType(d["build_type"]), operators=OperatorMode(d["operators"]),
    )


def _lease_from_row(row: sqlite3.Row) -> Lease:
    nodes = tuple(LeasedNode(PublicKey.from_text(k), op) for k, op in json.loads(row["nodes"]))
    return Lease(
        id=row["id"], user=row["user"], team=row["team"],
        request=_request_from_json(row["request"]), nodes=nodes,
        created_at=row["created_at"], expires_at=row["expires_at"],
        state=LeaseState(row["state"]), ended_at=row["ended_at"],
    )


def load_leases(db: Database) -> list[Lease]:
    """Every lease in the database (the engine loads them into its book at start)."""
    with db.transaction(durable=False) as conn:
        rows = conn.execute("SELECT * FROM leases ORDER BY created_at").fetchall()
    return [_lease_from_row(r) for r in rows]


def _lease_detail(lease: Lease) -> dict[str, Any]:
    return {
        "lease": lease.id, "user": lease.user, "team": lease.team,
        "nodes": [str(n.key) for n in lease.nodes],
        "operators": sorted(lease.operators), "expires_at": lease.expires_at,
    }


def insert_lease(db: Database, lease: Lease, now: float) -> None:
    """Store a granted lease and its ``lease-granted`` audit entry in one commit."""
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO leases (id, user, team, state, request, nodes, created_at, "
            "expires_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (lease.id, lease.user, lease.team, lease.state.value, _request_json(lease.request),
             json.dumps([[str(n.key), n.operator] for n in lease.nodes]), lease.created_at,
             lease.expires_at, lease.ended_at),
        )
        db._audit(conn, now, "lease-granted", **_lease_detail(lease))


def update_lease(db: Database, lease: Lease, event: str, now: float, **detail: Any) -> None:
    """Store a lease's new state or expiry and its audit entry ``event`` in one commit."""
    with db.transaction() as conn:
        conn.execute(
            "UPDATE leases SET state = ?, expires_at = ?, ended_at = ? WHERE id = ?",
            (lease.state.value, lease.expires_at, lease.ended_at, lease.id),
        )
        db._audit(conn, now, event, lease=lease.id, user=lease.user,
                  expires_at=lease.expires_at, **detail)


def lease_events(db: Database, lease_id: str) -> list[dict[str, Any]]:
    """The audit entries of one lease, oldest first."""
    with db.transaction(durable=False) as conn:
        rows = conn.execute(
            "SELECT * FROM audit WHERE json_extract(detail, '$.lease') = ? ORDER BY id",
            (lease_id,),
        ).fetchall()
    return [
        {"id": r["id"], "at": r["at"], "event": r["event"], "build_id": r["build_id"],
         "detail": json.loads(r["detail"])}
        for r in rows
    ]


# -- the service ----------------------------------------------------------------------------------


@attrs.define(eq=False)
class LeaseService:
    """Grants, extends, returns and expires leases for the API, persisted and audited.

    Admins (``role = "admin"`` clients, trust-list maintainers: ``_access.py``) see and may
    return every lease. Start :meth:`run` in the
    dispatcher's nursery: it ends leases when their time is up.
    """

    engine: Engine
    #: How long one lease hold may take to reach a node (best effort).
    hold_timeout_s: float = 10.0
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    #: Holds delivered to and refused by nodes (``p2pbuild._hold``).
    holds_sent: int = attrs.field(default=0, init=False)
    holds_failed: int = attrs.field(default=0, init=False)

    @property
    def db(self) -> Database:
        return self.engine.db

    def _clock(self) -> float:
        return self.engine.clock()

    async def request(self, request: LeaseRequest, user: str, team: str | None) -> Lease:
        """Grant ``request`` for ``user`` or raise :class:`LeaseRefusedError` (audited
        either way)."""
        engine = self.engine
        self.db.audit(self._clock(), "lease-requested", None, None, user=user, team=team,
                      request=json.loads(_request_json(request)))
        query = Query(arch=request.arch, os=request.os, machine=request.machine,
                      pool=request.pool)
        entries = await engine.finder.find(query)
        if not entries and query != Query(arch=request.arch):
            entries = await engine.finder.find(Query(arch=request.arch))
        candidates = engine.candidates(entries)
        now = self._clock()
        lease_id = "L" + os.urandom(8).hex()
        try:
            lease = engine.leases.request(
                lease_id, request, user, team, candidates, engine.rng, now,
                dedicated_pools=engine.config.dedicated_pools,
            )
        except LeaseRefusedError as exc:
            self.db.audit(now, "lease-refused", None, None, user=user, team=team,
                          constraint=exc.constraint, reason=str(exc))
            raise
        insert_lease(self.db, lease, now)
        self._poke()
        self._tell_nodes(lease)
        return lease

    def extend(self, lease_id: str, user: str, by_s: int) -> Lease:
        """Raises :class:`UnknownLeaseError`, :class:`LeaseRefusedError`."""
        now = self._clock()
        lease = self.engine.leases.extend(lease_id, user, by_s, now)
        update_lease(self.db, lease, "lease-extended", now, by_s=by_s)
        self._poke()
        self._tell_nodes(lease)
        return lease

    def done(self, lease_id: str, user: str, *, admin: bool = False) -> Lease:
        """Return a lease (its user's, or any for an ``admin``). Raises
        :class:`UnknownLeaseError`, :class:`LeaseRefusedError`."""
        now = self._clock()
        lease = self.engine.leases.done(lease_id, user, now, admin=admin)
        update_lease(self.db, lease, "lease-done", now, by=user)
        self._poke()
        self._tell_nodes(lease)
        self.engine.leases_changed()
        return lease

    def expire_due(self) -> list[Lease]:
        """End, persist and audit every lease whose time is up; returns them."""
        now = self._clock()
        expired = self.engine.leases.expire_due(now)
        for lease in expired:
            update_lease(self.db, lease, "lease-expired", now,
                         nodes=[str(n.key) for n in lease.nodes])
            self._tell_nodes(lease)
        if expired:
            self.engine.leases_changed()
        return expired

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(
        self, *, max_sleep_s: float = 60.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """End leases as their time comes, until cancelled. Sleeps until the next expiry
        (at most ``max_sleep_s``, as the clock may be adjusted) or a change."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                changed = self._changed
                self.expire_due()
                upcoming = self.engine.leases.next_expiry()
                delay = max_sleep_s if upcoming is None else upcoming - self._clock()
                with trio.move_on_after(min(max(delay, 0.0), max_sleep_s)):
                    await changed.wait()

    def _tell_nodes(self, lease: Lease) -> None:
        """Send each push node of ``lease`` a signed hold (until the lease's expiry, or a
        release once it ended), in the background; nodes show it in their status."""
        if self._nursery is None:
            return
        for node in lease.nodes:
            self._nursery.start_soon(self._send_hold, lease, node.key)

    async def _send_hold(self, lease: Lease, key: PublicKey) -> None:
        engine = self.engine
        with trio.move_on_after(self.hold_timeout_s):
            entry = await engine.finder.lookup(key)
            if entry is None or entry.capability.pull_only:
                return  # a pull node has no route to be told on
            now = int(self._clock())
            until = int(lease.expires_at) if lease.active_at(now) else now
            hold = LeaseHold.create(engine.identity, key, lease.id, until, issued_at=now)
            cap = entry.capability
            try:
                async with pinned_client(cap.tls_sha256, base_url=cap.endpoint,
                                         timeout=self.hold_timeout_s) as http:
                    response = await http.post("/v1/holds", content=hold.to_bytes())
            except (httpx.HTTPError, RemoteError) as exc:
                _log.info("lease hold for %s not delivered: %s", key.fingerprint, exc)
                self.holds_failed += 1
                return
            if response.status_code == 202:
                self.holds_sent += 1
            else:
                _log.info("lease hold refused by %s: %s", key.fingerprint, response.text[:200])
                self.holds_failed += 1


# -- routes -----------------------------------------------------------------------------------


def _refuse(error: RemoteError) -> Response:
    if isinstance(error, LeaseRefusedError):
        return refusal(error, constraint=error.constraint)
    return refusal(error)


def _int(fields: dict[str, Any], key: str) -> int:
    value = fields.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequestError(f"{key} must be an integer")
    return value


def parse_lease_request(fields: Any) -> LeaseRequest:
    """A :class:`LeaseRequest` from the API's JSON body. Raises :class:`BadRequestError`."""
    if not isinstance(fields, dict):
        raise BadRequestError("body must be a JSON object")
    known = {"arch", "os", "machine", "pool", "count", "duration_s", "build_type", "operators"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise BadRequestError(f"unknown field {unknown[0]}")
    arch = optional_text(fields, "arch")
    if arch is None:
        raise BadRequestError("arch is required")
    try:
        machine = optional_text(fields, "machine")
        os_name, pool = optional_text(fields, "os"), optional_text(fields, "pool")
        # The facet values must be valid DHT facets (tokens).
        Query(arch=arch, os=os_name, pool=pool)
        return LeaseRequest(
            arch=arch, os=os_name, pool=pool,
            count=_int(fields, "count"), duration_s=_int(fields, "duration_s"),
            machine=MachineType(machine) if machine else None,
            build_type=BuildType(optional_text(fields, "build_type") or "rpm"),
            operators=OperatorMode(optional_text(fields, "operators") or "distinct"),
        )
    except (ValueError, RemoteError) as exc:
        if isinstance(exc, BadRequestError):
            raise
        raise BadRequestError(str(exc)) from None


def lease_routes(service: LeaseService, auth: ApiAuth) -> list[Route]:
    """The lease endpoints of the module doc, for the dispatcher's Starlette app."""

    async def body(request: Request) -> Any:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > 16 * 1024:
                raise BadRequestError("body exceeds 16384 bytes")
        return json_object(raw or b"{}", "body")

    def now() -> float:
        return service.engine.clock()

    async def create(request: Request, caller: Caller) -> Response:
        lease = await service.request(
            parse_lease_request(await body(request)), caller.user, caller.team
        )
        return JSONResponse(lease.to_json(now()), status_code=201)

    async def listing(request: Request, caller: Caller) -> Response:
        everyone = caller.admin
        active_only = request.query_params.get("active") in ("1", "true", "yes")
        leases = service.engine.leases.leases(
            user=None if everyone else caller.user, include_ended=not active_only
        )
        t = now()
        if active_only:
            leases = [lease for lease in leases if lease.active_at(t)]
        return JSONResponse({"leases": [lease.to_json(t) for lease in leases],
                             "all_users": everyone})

    def _visible(lease_id: str, caller: Caller) -> Lease:
        lease = service.engine.leases.get(lease_id)
        if lease.user != caller.user and not caller.admin:
            raise UnknownLeaseError(f"no lease {lease_id[:40]}")
        return lease

    async def show(request: Request, caller: Caller) -> Response:
        lease = _visible(request.path_params["lease_id"], caller)
        result = lease.to_json(now())
        result["events"] = lease_events(service.db, lease.id)
        return JSONResponse(result)

    async def extend(request: Request, caller: Caller) -> Response:
        fields = await body(request)
        lease = service.extend(
            request.path_params["lease_id"], caller.user, _int(fields, "by_s")
        )
        return JSONResponse(lease.to_json(now()))

    async def done(request: Request, caller: Caller) -> Response:
        lease = service.done(request.path_params["lease_id"], caller.user,
                             admin=caller.admin)
        return JSONResponse(lease.to_json(now()))

    table = [
        ("/v1/leases", create, "POST"),
        ("/v1/leases", listing, "GET"),
        ("/v1/leases/{lease_id}", show, "GET"),
        ("/v1/leases/{lease_id}", done, "DELETE"),
        ("/v1/leases/{lease_id}/extend", extend, "POST"),
    ]
    return [Route(path, auth.endpoint(handler, _refuse), methods=[method])
            for path, handler, method in table]


def held_by_node(service_or_engine: Engine, now: float) -> dict[str, list[str]]:
    """Active lease ids per node key (text), for ``nodes ls``."""
    return {str(k): v for k, v in service_or_engine.leases.held_by(now).items()}

