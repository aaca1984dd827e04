"""What the dispatcher's web view shows: its pages as plain values (JSON-ready dicts).

The web view (``_web.py``) renders these with templates and serves them as JSON under
``/v1/web/``; the values are the one definition of what a page contains. Everything here
is public, so nothing that the API keeps for admins appears: no job ids of running jobs,
no node endpoints (a job id plus an endpoint is what controls a job on a node). Signed jobs
and results, which carry job ids, are shown once the build has ended (a verified build's
proof is published in the repository anyway).

Reading: :class:`WebReader` opens its own read-only connection to the dispatcher's SQLite
file (WAL lets it read while the engine writes), so the view cannot change state by
construction and needs no query methods on the engine's :class:`Database`. Queries are
paged and indexed (``bench/web.py``: 10,000 builds, 1,000 nodes).

Node liveness (:class:`NodeSightings`): a node republishes its status every
``status_interval_s``; the interval is learnt from the issue times of the status records
seen (median of the latest gaps), and a node whose newest status is older than two
intervals (plus a second) is *offline*. A node that is draining with nothing running is
leaving (its last record, sent as it stops) and is offline at once. (The facet keys the
node list reads get a node's status less often while its state holds, every fourth
interval: ``docs/protocol.md``, *Status updates*. The interval learnt from them is
longer, and *offline* comes when the status expires.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sqlite3
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .._errors import MalformedError
from .._identity import PublicKey, Role
from .._jobs import Result
from .._trust import TrustList
from ..dht import NodeEntry
from ._access import OPERATIONAL_KEYS
from ._db import AttemptRow, AttemptState, BuildRow, BuildState, HeartbeatRow, ObservationRow
from ._errors import SinkError
from ._plot import rating_history
from ._ratings import NodeRating, RatingModel
from ._sink import nvr_of
from ._stored import StoredBuild, StoredProof
from ._verify import artifact_key

__all__ = [
    "NodeSightings",
    "WebReader",
    "build_view",
    "builds_view",
    "difference_view",
    "node_view",
    "nodes_view",
    "trust_view",
]

#: Marker of the diffoscope part of a build's difference report (``_engine._with_diffoscope``).
_DIFFOSCOPE = "\ndiffoscope "


@functools.lru_cache(maxsize=16384)
def _fingerprint(key: str) -> str:
    try:
        return PublicKey.from_text(key).fingerprint
    except MalformedError:
        return key[:20]


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the dispatcher's database file (rows as sqlite3.Row)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA busy_timeout=5000")
    return connection


@attrs.define(eq=False)
class WebReader:
    """Read-only queries of the pages, over their own connection (module doc)."""

    path: Path
    _db: sqlite3.Connection | None = attrs.field(default=None, init=False)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = connect_read_only(self.path)
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def builds_page(
        self, *, states: Sequence[BuildState] = (), owner: str | None = None,
        offset: int = 0, limit: int = 50,
    ) -> tuple[list[BuildRow], int]:
        """One page of builds, newest first, and how many match in all."""
        where, args = [], []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += [s.value for s in states]
        if owner:
            where.append("user = ?")
            args.append(owner)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = self.db.execute(f"SELECT COUNT(*) FROM builds {clause}", args).fetchone()[0]
        rows = self.db.execute(
            # Newest first in the order accepted: rowid order, which needs no sort (a sort
            # of 10,000 rows costs 60 ms or more; bench/web.py).
            f"SELECT * FROM builds {clause} ORDER BY rowid DESC LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        return [BuildRow(**dict(r)) for r in rows], int(total)

    def build(self, build_id: str) -> BuildRow | None:
        row = self.db.execute("SELECT * FROM builds WHERE id = ?", (build_id,)).fetchone()
        return None if row is None else BuildRow(**dict(row))

    def attempts(self, build_ids: Sequence[str]) -> dict[str, list[AttemptRow]]:
        """The attempts of each build, oldest first."""
        found: dict[str, list[AttemptRow]] = {b: [] for b in build_ids}
        if not build_ids:
            return found
        rows = self.db.execute(
            f"SELECT * FROM attempts WHERE build_id IN ({', '.join('?' * len(build_ids))}) "
            "ORDER BY id", tuple(build_ids),
        )
        for r in rows:
            found[r["build_id"]].append(AttemptRow(**dict(r)))
        return found

    def attempt(self, attempt_id: int) -> AttemptRow | None:
        row = self.db.execute("SELECT * FROM attempts WHERE id = ?", (attempt_id,)).fetchone()
        return None if row is None else AttemptRow(**dict(row))

    def results(self, build_id: str) -> dict[int, bytes]:
        rows = self.db.execute("SELECT attempt_id, raw FROM results WHERE build_id = ?",
                               (build_id,))
        return {r[0]: bytes(r[1]) for r in rows}

    def proof_nodes(self, build_ids: Sequence[str]) -> dict[str, list[str]]:
        """The verifying nodes of each verified build (its ``build-verified`` audit entry)."""
        if not build_ids:
            return {}
        rows = self.db.execute(
            "SELECT build_id, detail FROM audit WHERE event = 'build-verified' AND build_id IN "
            f"({', '.join('?' * len(build_ids))})", tuple(build_ids),
        )
        found = {}
        for r in rows:
            proof = json.loads(r[1]).get("proof", [])
            found[r[0]] = [str(p) for p in proof] if isinstance(proof, list) else []
        return found

    def events(self, build_id: str | None = None, *, after: int = 0,
               limit: int = 500) -> list[sqlite3.Row]:
        if build_id is None:
            return list(self.db.execute(
                "SELECT id, at, build_id, node, event, detail FROM audit WHERE id > ? "
                "ORDER BY id LIMIT ?", (after, limit)))
        return list(self.db.execute(
            "SELECT id, at, build_id, node, event, detail FROM audit WHERE build_id = ? "
            "AND id > ? ORDER BY id LIMIT ?", (build_id, after, limit)))

    def last_event(self) -> int:
        value = self.db.execute("SELECT MAX(id) FROM audit").fetchone()[0]
        return int(value or 0)

    def node_attempts(self, node: str, limit: int = 20) -> list[tuple[AttemptRow, BuildRow]]:
        rows = self.db.execute(
            "SELECT * FROM attempts WHERE node = ? ORDER BY id DESC LIMIT ?", (node, limit)
        ).fetchall()
        attempts = [AttemptRow(**dict(r)) for r in rows]
        ids = sorted({a.build_id for a in attempts})
        builds = {}
        if ids:
            for r in self.db.execute(
                f"SELECT * FROM builds WHERE id IN ({', '.join('?' * len(ids))})", ids
            ):
                builds[r["id"]] = BuildRow(**dict(r))
        return [(a, builds[a.build_id]) for a in attempts if a.build_id in builds]

    def observations(self, node: str, limit: int = 5000) -> list[ObservationRow]:
        rows = self.db.execute(
            "SELECT at, node, kind, value, build_id FROM observations WHERE node = ? "
            "ORDER BY id DESC LIMIT ?", (node, limit),
        ).fetchall()
        return [ObservationRow(**dict(r)) for r in reversed(rows)]

    def heartbeats(self) -> dict[str, HeartbeatRow]:
        return {r["node"]: HeartbeatRow(**dict(r))
                for r in self.db.execute("SELECT * FROM heartbeats")}

    def active_attempts_by_node(self) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT node, COUNT(*) FROM attempts WHERE state IN ('pending', 'running') "
            "GROUP BY node")
        return {r[0]: r[1] for r in rows}

    def counts(self, table: str) -> dict[str, int]:
        """Rows of ``builds`` or ``attempts`` by state (for the metrics)."""
        assert table in ("builds", "attempts")
        return {r[0]: r[1] for r in
                self.db.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state")}


# -- builds ------------------------------------------------------------------------------------


def _duration(build: BuildRow, now: float) -> float:
    end = build.updated_at if build.state.terminal else now
    return max(0.0, end - build.created_at)


def build_summary(build: BuildRow, attempts: Sequence[AttemptRow], proof: Sequence[str],
                  now: float) -> dict[str, Any]:
    """One row of the builds list."""
    if build.state is BuildState.VERIFIED and proof:
        by_node = {a.node: a.operator for a in attempts}
        operators = [by_node.get(p, "?") for p in proof]
    else:
        operators = sorted({a.operator for a in attempts
                            if a.state in (AttemptState.PENDING, AttemptState.RUNNING,
                                           AttemptState.SUCCEEDED)})
    return {
        "id": build.id,
        "nvr": nvr_of(build.source_name),
        "source": build.source_name,
        "owner": build.user,
        "state": build.state.value,
        "reason": build.reason,
        "submitted": build.created_at,
        "duration_s": round(_duration(build, now), 3),
        "operators": operators,
        "verified_by": operators if build.state is BuildState.VERIFIED else [],
        "arch": build.arch,
        "os": build.os,
        "mismatch": bool(build.report),
    }


def builds_view(
    reader: WebReader, now: float, *, states: Sequence[BuildState] = (),
    owner: str | None = None, page: int = 1, per_page: int = 50,
) -> dict[str, Any]:
    """The builds list: one page, filters, paging links' numbers."""
    page = max(1, page)
    builds, total = reader.builds_page(states=states, owner=owner,
                                       offset=(page - 1) * per_page, limit=per_page)
    ids = [b.id for b in builds]
    attempts = reader.attempts(ids)
    proofs = reader.proof_nodes([b.id for b in builds if b.state is BuildState.VERIFIED])
    return {
        "builds": [build_summary(b, attempts[b.id], proofs.get(b.id, []), now) for b in builds],
        "total": total,
        "page": page,
        "per_page": per_page,
        "pages": max(1, math.ceil(total / per_page)),
        "filters": {"state": [s.value for s in states], "owner": owner or ""},
        "states": [s.value for s in BuildState],
        "last_event": reader.last_event(),
        "now": now,
    }


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(items: Iterable[Any]) -> list[dict[str, Any]]:
    return [{"name": f.name, "size": f.size, "sha256": f.sha256.hex()} for f in items]


def difference_view(replicas: Sequence[tuple[AttemptRow, Result]], report: str) -> dict[str, Any]:
    """A mismatch as a table: the groups of agreeing results and, for every file that is
    not the same in all groups, what each group has; plus diffoscope's text if the report
    has it."""
    groups: dict[str, list[tuple[AttemptRow, Result]]] = {}
    for attempt, result in replicas:
        groups.setdefault(artifact_key(result), []).append((attempt, result))
    ordered = list(groups.values())
    names = sorted({a.name for g in ordered for a in g[0][1].artifacts})
    files = []
    for name in names:
        cells = []
        for group in ordered:
            item = group[0][1].artifact(name)
            cells.append(None if item is None else {"size": item.size,
                                                   "sha256": item.sha256.hex()})
        if len({json.dumps(c, sort_keys=True) for c in cells}) > 1:
            files.append({"name": name, "groups": cells})
    # Results from different buildroots never verify each other: what differs there.
    records = [g[0][1].buildroot for g in ordered]
    buildroots: list[dict[str, Any]] = []
    if len({None if r is None else r.key for r in records}) > 1:
        present = [r for r in records if r is not None]
        for name in sorted({n for r in present for n, _ in r.repos}):
            digests = [None if r is None else next((d.hex() for n, d in r.repos if n == name),
                                                 None) for r in records]
            if len(set(digests)) > 1:
                buildroots.append({"what": f"repository {name} (repomd.xml)", "groups": digests})
        for nevra in sorted({p.nevra for r in present for p in r.packages}):
            digests = [None if r is None else next((p.sha256.hex() for p in r.packages
                                                  if p.nevra == nevra), None) for r in records]
            if len(set(digests)) > 1:
                buildroots.append({"what": f"package {nevra}", "groups": digests})
        if not buildroots:
            buildroots.append({"what": "buildroot", "groups": [
                None if r is None else r.key for r in records]})
    diffoscope = ""
    if _DIFFOSCOPE in report:
        diffoscope = report.split(_DIFFOSCOPE, 1)[1]
    return {
        "groups": [
            [{"node": str(r.node), "fingerprint": r.node.fingerprint, "operator": a.operator,
              "attempt": a.id} for a, r in group]
            for group in ordered
        ],
        "differing": files,
        "identical": [n for n in names if n not in {f["name"] for f in files}],
        "buildroots": buildroots,
        "diffoscope": diffoscope,
        "report": report,
    }


def _public_detail(detail: Mapping[str, Any]) -> dict[str, Any]:
    # What the API shows only to admins (``_access.py``) is not public here either.
    return {k: v for k, v in detail.items() if k not in OPERATIONAL_KEYS}


def _log_url(build_id: str, attempt: AttemptRow, kept: StoredProof | None,
             name: str) -> str | None:
    """Where a log can be downloaded: the repository keeps a verifying node's logs; a
    push node keeps its own for a while; a pull node's is nowhere else (None)."""
    if kept is not None and any(log.name == name for log in kept.logs):
        return f"/builds/{build_id}/logs/{kept.stem}/{name}"
    if attempt.endpoint:
        return f"/builds/{build_id}/attempts/{attempt.id}/logs/{name}"
    return None


def build_view(
    reader: WebReader, build_id: str, now: float, trust_list: TrustList
) -> dict[str, Any] | None:
    """Everything the build page shows (None: no such build)."""
    build = reader.build(build_id)
    if build is None:
        return None
    attempts = reader.attempts([build_id])[build_id]
    raws = reader.results(build_id)
    proof = reader.proof_nodes([build_id]).get(build_id, [])
    ended = build.state.terminal
    stored: StoredBuild | None = None
    if build.state is BuildState.VERIFIED and build.sink_path:
        try:
            stored = StoredBuild.read(Path(build.sink_path))
        except SinkError:
            stored = None
    kept = {p.node: p for p in stored.verified_by} if stored is not None else {}
    rows, replicas = [], []
    for attempt in attempts:
        raw = raws.get(attempt.id)
        result = Result.from_bytes(raw) if raw is not None else None
        start = attempt.sent_at or attempt.created_at
        end = attempt.ended_at if attempt.ended_at is not None else (
            None if attempt.active else start)
        row: dict[str, Any] = {
            "id": attempt.id,
            "node": attempt.node,
            "fingerprint": _fingerprint(attempt.node),
            "operator": attempt.operator,
            "role": attempt.role,
            "state": attempt.state.value,
            "reason": attempt.reason,
            "mode": "push" if attempt.endpoint else "pull",
            "created": attempt.created_at,
            "started": attempt.sent_at,
            "ended": attempt.ended_at,
            "duration_s": round(((end if end is not None else now) - start), 3),
            "live_log": attempt.state is AttemptState.RUNNING and bool(attempt.endpoint),
            "in_proof": attempt.node in proof and attempt.state is AttemptState.SUCCEEDED,
            "job_sha256": _digest(attempt.job),
            "signed_files": ended,
            "result": None,
        }
        if result is not None:
            row["result"] = {
                "state": result.state.value,
                "exit_code": result.exit_code,
                "sha256": _digest(raw or b""),
                "build_s": round(result.duration_ms / 1000, 3),
                "artifacts": _files(result.artifacts),
                "logs": [
                    {**f, "url": _log_url(build_id, attempt, kept.get(attempt.node), f["name"])}
                    for f in _files(result.logs)
                ],
                "environment": result.environment_map,
                "buildroot": None if result.buildroot is None else {
                    "key": result.buildroot.key,
                    "repos": [{"name": n, "repomd_sha256": d.hex()}
                              for n, d in result.buildroot.repos],
                    "packages": len(result.buildroot.packages),
                },
            }
            if attempt.state is AttemptState.SUCCEEDED:
                replicas.append((attempt, result))
        rows.append(row)
    proof_files = []
    for entry in stored.verified_by if stored is not None else ():
        for relpath in (entry.job, entry.result):
            proof_files.append({"name": Path(relpath).name, "operator": entry.operator,
                                "fingerprint": entry.fingerprint})
    events = [
        {"id": e["id"], "at": e["at"], "event": e["event"],
         "node": _fingerprint(e["node"]) if e["node"] else "",
         "detail": _public_detail(json.loads(e["detail"]))}
        for e in reader.events(build_id, limit=1000)
    ]
    summary = build_summary(build, attempts, proof, now)
    return {
        **summary,
        "source_sha256": build.source_sha256,
        "source_size": build.source_size,
        "build_type": build.build_type,
        "machine": build.machine,
        "pool": build.pool,
        "replicas": build.replicas,
        "updated": build.updated_at,
        "attempts": rows,
        "artifacts": [a.to_json() for a in stored.artifacts] if stored is not None else [],
        "proof_files": proof_files,
        "trust_list_version": (stored.trust_list_version if stored is not None
                               else trust_list.version),
        "difference": difference_view(replicas, build.report) if build.report else None,
        "events": events,
        "last_event": events[-1]["id"] if events else 0,
        "now": now,
    }


# -- nodes -------------------------------------------------------------------------------------


@attrs.define(eq=False)
class NodeSightings:
    """The status records seen per node, to tell online from offline (module doc)."""

    grace_s: float = 1.0
    #: How many gaps between status records are kept per node; the interval is their
    #: median once there are ``min_gaps``, so one early or late republish (a node
    #: publishes out of turn as it starts and as it drains) does not move it.
    max_gaps: int = 5
    min_gaps: int = 3
    #: node -> (issue time of its newest status, the latest gaps between issue times)
    _seen: dict[str, tuple[int, tuple[float, ...]]] = attrs.field(factory=dict, init=False)

    def observe(self, entries: Mapping[str, NodeEntry]) -> None:
        """Note the status records of ``entries`` (by node key text)."""
        for key, entry in entries.items():
            record = entry.status_record
            if record is None:
                continue
            last = self._seen.get(key)
            if last is None:
                self._seen[key] = (record.issued_at, ())
            elif record.issued_at > last[0]:
                gaps = (*last[1], float(record.issued_at - last[0]))[-self.max_gaps:]
                self._seen[key] = (record.issued_at, gaps)

    def interval(self, node: str) -> float | None:
        """The node's status interval as seen (a lookup that misses a record sees a
        multiple of it, which only delays *offline*), or None while too few were seen."""
        seen = self._seen.get(node)
        if seen is None or len(seen[1]) < self.min_gaps:
            return None
        return float(statistics.median(seen[1]))

    def state(self, key: str, entry: NodeEntry | None, now: float) -> str:
        """``online``, ``draining``, ``standby`` or ``offline`` for node ``key`` (its text).

        An on-demand node whose status is gone is ``standby``: its machine may be stopped
        (it cannot republish) until a dispatcher wakes it."""
        asleep = "standby" if entry is not None and entry.capability.on_demand else "offline"
        if entry is None or entry.status_record is None:
            return asleep
        record, status = entry.status_record, entry.status
        assert status is not None
        if record.expires_at <= now:
            return asleep
        if status.standby:
            return "standby"
        interval = self.interval(key)
        if interval is not None and now - record.issued_at > 2 * interval + self.grace_s:
            return "offline"
        if status.draining:
            return "offline" if status.running == 0 else "draining"
        return "online"


def _rating_json(rating: NodeRating | None) -> dict[str, Any]:
    if rating is None:
        return {"score": None}
    return {
        "score": round(rating.score, 4),
        "success": round(rating.success, 4),
        "agreement": round(rating.agreement, 4),
        "speed": round(rating.speed, 4),
        "reliability": round(rating.reliability, 4),
        "mtbf_s": round(rating.mtbf_s, 1),
        "evidence": round(rating.observations, 2),
    }


def node_summary(
    key: str, entry: NodeEntry | None, rating: NodeRating | None, beat: HeartbeatRow | None,
    active: int, state: str, trust_list: TrustList,
) -> dict[str, Any]:
    """One row of the nodes list."""
    trust = entry.trust if entry is not None else None
    if trust is None:
        try:
            trust = trust_list.entry(PublicKey.from_text(key))
        except MalformedError:
            trust = None
    row: dict[str, Any] = {
        "node": key,
        "fingerprint": _fingerprint(key),
        "operator": trust.operator if trust is not None else (beat.operator if beat else ""),
        "trusted": trust is not None and trust.role is Role.NODE,
        "in_directory": entry is not None,
        "state": state,
        "active_jobs": active,
        "rating": _rating_json(rating),
    }
    last_seen = beat.last_seen if beat is not None else None
    if entry is not None:
        cap = entry.capability
        row.update({
            "arch": cap.arch, "os": cap.os, "machine": cap.machine.value,
            "pools": list(cap.pools), "build_types": list(cap.build_types),
            "cpus": cap.cpus, "memory_mb": cap.memory_mb, "disk_mb": cap.disk_mb,
            "mode": "pull" if cap.pull_only else "push",
        })
        status = entry.status
        if status is not None and entry.status_record is not None:
            last_seen = max(last_seen or 0.0, float(entry.status_record.issued_at))
            row.update({
                "load": status.load_milli / 1000,
                "slots_total": status.slots_total,
                "slots_free": status.slots_free,
                "running": status.running,
                "uptime_s": status.uptime_s,
                "draining": status.draining,
            })
    row["last_seen"] = last_seen
    return row


def nodes_view(
    entries: Mapping[str, NodeEntry], ratings: Mapping[str, NodeRating],
    heartbeats: Mapping[str, HeartbeatRow], active: Mapping[str, int],
    sightings: NodeSightings, trust_list: TrustList, now: float,
) -> dict[str, Any]:
    """Every node in the directory and every node we have ratings of."""
    keys = set(entries) | set(ratings)
    rows = []
    for key in keys:
        entry = entries.get(key)
        rows.append(node_summary(key, entry, ratings.get(key), heartbeats.get(key),
                                 active.get(key, 0), sightings.state(key, entry, now),
                                 trust_list))
    rows.sort(key=lambda r: (r["operator"], r["fingerprint"]))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {"nodes": rows, "states": counts, "now": now}


def node_view(
    reader: WebReader, key: str, entry: NodeEntry | None, rating: NodeRating | None,
    priors: Mapping[str, float], model: RatingModel, sightings: NodeSightings,
    trust_list: TrustList, now: float,
) -> dict[str, Any]:
    """The node page: its summary, recent builds and rating history."""
    beat = reader.heartbeats().get(key)
    active = reader.active_attempts_by_node().get(key, 0)
    summary = node_summary(key, entry, rating, beat, active,
                           sightings.state(key, entry, now), trust_list)
    recent = [
        {"build": b.id, "nvr": nvr_of(b.source_name), "build_state": b.state.value,
         "attempt_state": a.state.value, "role": a.role, "reason": a.reason,
         "created": a.created_at,
         "duration_s": round((a.ended_at or now) - (a.sent_at or a.created_at), 3)}
        for a, b in reader.node_attempts(key)
    ]
    history = rating_history(reader.observations(key), beat, priors, model)
    return {**summary, "recent": recent, "history": history,
            "status_interval_s": sightings.interval(key), "now": now}


# -- trust -------------------------------------------------------------------------------------


def trust_view(trust_list: TrustList, now: float) -> dict[str, Any]:
    """The trust list: version, threshold, signers, entries by role and operator."""
    signers = {str(k) for k, _ in trust_list.signatures}
    roles: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for entry in trust_list.entries:
        roles.setdefault(entry.role.value, {}).setdefault(entry.operator, []).append({
            "key": str(entry.key),
            "fingerprint": entry.key.fingerprint,
            "pools": list(entry.pools),
            "arches": list(entry.arches),
            "signed": str(entry.key) in signers,
        })
    order = [r.value for r in (Role.MAINTAINER, Role.DISPATCHER, Role.NODE)]
    return {
        "version": trust_list.version,
        "expires_at": trust_list.expires_at,
        "expires_in_s": trust_list.expires_at - now,
        "threshold": trust_list.threshold,
        "maintainers": len(trust_list.maintainers),
        "signatures": len(signers),
        "roles": [{"role": role, "operators": [
            {"operator": op, "entries": keys} for op, keys in sorted(roles[role].items())
        ]} for role in order if role in roles],
        "now": now,
    }
