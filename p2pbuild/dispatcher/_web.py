"""The dispatcher's read-only web view and ``/metrics``, on its HTTPS port.

Pages (server-rendered from the Jinja2 templates in ``templates/``; every one works
without JavaScript) and the same values as JSON under ``/v1/web/`` (``_views.py`` makes
them)::

    GET /builds[?state=&owner=&page=]       /v1/web/builds        builds, newest first, paged
    GET /builds/{id}                        /v1/web/builds/{id}   attempts, proof, difference
    GET /nodes                              /v1/web/nodes         nodes, liveness, ratings
    GET /nodes/{key}                        /v1/web/nodes/{key}   recent builds, rating plot
    GET /trust                              /v1/web/trust         the trust list
    GET /v1/web/events?after=N              public audit events (NDJSON), followed for a while
    GET /builds/{id}/attempts/{n}/log       live log of a running push attempt (text, streamed)
    GET /builds/{id}/attempts/{n}/logs/{f}  a finished attempt's log file (from its node)
    GET /builds/{id}/attempts/{n}/job|result  signed job and result, once the build ended
    GET /builds/{id}/artifacts/{f}          a verified build's artifact (from the repository)
    GET /builds/{id}/proof/{f}              a verified build's proof file
    GET /metrics                            Prometheus text format (``_metrics.py``)

No login: everything here is public, and what the API keeps for admins (job ids of running
jobs, node endpoints) is not shown (``_views.py``). Live updates: ``static/live.js``
follows ``/v1/web/events`` and, when something changed, fetches the page again and swaps
its ``<main>``; a running attempt's log is streamed into the page by the same script.
Logs are fetched from the node on request through the engine's certificate pin for it;
pull-mode nodes deliver logs only with their result, so they have no live log here.
"""

from __future__ import annotations

import html
import json
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import jinja2
import trio
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Route

from .._errors import MalformedError
from .._identity import PublicKey
from .._jobs import DEFAULT_ARCH
from ..dht import NodeEntry, Query
from ._db import BuildState
from ._engine import Engine
from ._errors import SinkError
from ._logs import from_node
from ._metrics import CONTENT_TYPE, DispatcherMetrics
from ._nodes import DirectoryFinder
from ._plot import rating_svg
from ._stored import StoredBuild
from ._views import (
    NodeSightings,
    WebReader,
    build_view,
    builds_view,
    node_view,
    nodes_view,
    trust_view,
)

__all__ = ["WebView", "web_routes"]

_HERE = Path(__file__).parent
_STATIC = {"live.js": "text/javascript", "style.css": "text/css"}
#: How long one follow of the public event stream lasts (the script reconnects).
_FOLLOW_S = 55.0
_PER_PAGE = 50


def _ts(value: float | None) -> str:
    if value is None:
        return ""
    try:
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, ValueError, OSError):
        return "never" if value > 0 else str(value)


def _duration(value: float | None) -> str:
    if value is None:
        return ""
    seconds = max(0.0, float(value))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} d {hours % 24} h"


def _size(value: int) -> str:
    number = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if number < 1024 or unit == "GiB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1024
    return f"{value} B"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def make_templates() -> jinja2.Environment:
    """The Jinja2 environment of the pages (autoescaped)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True, trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(ts=_ts, duration=_duration, size=_size, percent=_percent)
    return env


def _cell(value: object, css: str = "") -> str:
    attr = f' class="{css}"' if css else ""
    return f"<td{attr}>{html.escape(str(value), quote=False)}</td>"


def node_rows_html(rows: Sequence[dict[str, Any]]) -> Markup:
    """The rows of the nodes table. Made here rather than in the template: with 1,000
    nodes a Jinja2 loop of 16 cells a row costs several times the rest of the page
    (``bench/web.py``); every value is escaped."""
    out = []
    for n in rows:
        key = html.escape(n["node"])
        state = html.escape(n["state"])
        rating = n["rating"]
        score = rating["score"]
        pull = ' <span class="badge">pull</span>' if n.get("mode") == "pull" else ""
        if n.get("leased_slots"):
            pull += f' <span class="badge">{int(n["leased_slots"])} leased</span>'

        if n.get("leased_slots"):
            pull += f' <span class="badge">leased ({n["leased_slots"]})</span>'
        slots = (f"{n['slots_total'] - n['slots_free']}/{n['slots_total']}"
                 if "slots_total" in n else "")
        meter = (f'<meter min="0" max="1" value="{score}"></meter> {score:.2f}'
                 if score is not None else "")
        out.append(
            f'<tr data-node="{key}" class="node-{state}">'
            f'<td><a href="/nodes/{key}"><code>{html.escape(n["fingerprint"])}</code></a>'
            f"{pull}</td>"
            + _cell(n["operator"])
            + f'<td><span class="state state-{state}">{state}</span></td>'
            + _cell(_ts(n["last_seen"]))
            + _cell(f"{n['arch']} / {n['os']}" if "arch" in n else "")
            + _cell(n.get("machine", ""))
            + _cell(", ".join(n.get("pools", [])))
            + _cell(", ".join(n.get("build_types", [])))
            + _cell(f"{n['load']:.2f}" if "load" in n else "")
            + _cell(slots)
            + f'<td class="num">{meter}</td>'
            + "".join(_cell(_percent(rating.get(k)), "num")
                      for k in ("success", "agreement", "speed", "reliability"))
            + _cell(n["active_jobs"], "num")
            + "</tr>\n"
        )
    return Markup("".join(out))


@attrs.define(eq=False)
class WebView:
    """The web view over one engine: pages, JSON and metrics (module doc)."""

    engine: Engine
    list_arches: Sequence[str] = (DEFAULT_ARCH,)
    lookup_timeout_s: float = 10.0
    reader: WebReader = attrs.field(default=None)
    sightings: NodeSightings = attrs.field(factory=NodeSightings)
    templates: jinja2.Environment = attrs.field(factory=make_templates)
    metrics: DispatcherMetrics = attrs.field(default=None)
    #: Directory lookups of the nodes pages and the metrics are reused this long, so that
    #: many viewers (each nodes page reloads every few seconds) cost one lookup.
    lookup_cache_s: float = 1.0
    _cached: tuple[float, dict[str, NodeEntry]] | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.reader is None:
            self.reader = WebReader(self.engine.db.path)
        if self.metrics is None:
            finder = self.engine.finder
            directory = finder.directory if isinstance(finder, DirectoryFinder) else None
            self.metrics = DispatcherMetrics(
                self.reader, lambda: dict(self.engine.statistics().node_errors),
                dht=(lambda: directory.statistics()) if directory is not None else
                (lambda: None),
            )

    def now(self) -> float:
        return float(self.engine.clock())

    # -- values ---------------------------------------------------------------------------------

    async def entries(self) -> dict[str, NodeEntry]:
        """Every trusted node in the directory for the listed arches (one lookup each),
        by key text."""
        now = trio.current_time()
        if self._cached is not None and now - self._cached[0] < self.lookup_cache_s:
            return self._cached[1]
        found: dict[str, NodeEntry] = {}
        with trio.move_on_after(self.lookup_timeout_s):
            for arch in self.list_arches:
                for entry in await self.engine.finder.find(Query(arch=arch), fresh=True):
                    found[str(entry.publisher)] = entry
        self.sightings.observe(found)
        self._cached = (now, found)
        return found

    async def nodes(self) -> dict[str, Any]:
        entries = await self.entries()
        now = self.now()
        ratings = self.engine.ratings.ratings(now, entries)
        view = nodes_view(entries, ratings, self.reader.heartbeats(),
                          self.reader.active_attempts_by_node(), self.sightings,
                          self.engine.trust_list, now)
        # Slots held by leases (``_leases.py``): how many, on the node's row.
        held = {str(key): len(slots) for key, slots in self.engine.leases.held_by(now).items()}
        for row in view["nodes"]:
            row["leased_slots"] = held.get(row["node"], 0)
        return view

    def pull_progress(self, build_id: str) -> dict[int, dict[str, Any]]:
        """What the pull nodes building ``build_id`` last reported with their lease
        renewals (phase, seconds in, log size: the node's own, unverified claim), by
        attempt id."""
        queue = self.engine.connector.pull_queue
        found: dict[int, dict[str, Any]] = {}
        if queue is None:
            return found
        for attempt in self.reader.attempts([build_id])[build_id]:
            if attempt.endpoint or not attempt.active:
                continue
            delivery = queue.delivery(bytes.fromhex(attempt.job_id))
            progress = getattr(delivery, "progress", None)
            if progress is not None:
                found[attempt.id] = {key: getattr(progress, key, None)
                                     for key in ("phase", "elapsed_s", "log_bytes")}
        return found

    async def node_states(self) -> dict[str, int]:
        """How many nodes in the directory are online, draining and offline (for the
        metrics: the nodes page without ratings)."""
        now = self.now()
        counts: dict[str, int] = {}
        for key, entry in (await self.entries()).items():
            state = self.sightings.state(key, entry, now)
            counts[state] = counts.get(state, 0) + 1
        return counts

    async def node(self, key: str) -> dict[str, Any] | None:
        try:
            public = PublicKey.from_text(key)
        except MalformedError:
            return None
        entry = None
        with trio.move_on_after(self.lookup_timeout_s):
            entry = await self.engine.finder.lookup(public)
        if entry is not None:
            self.sightings.observe({key: entry})
        now = self.now()
        ratings = self.engine.ratings.ratings(now, [key])
        if entry is None and key not in self.reader.heartbeats() and not \
                self.reader.node_attempts(key, 1) and self.engine.trust_list.entry(public) is None:
            return None
        model = self.engine.ratings.model
        priors = population_priors(ratings)
        return node_view(self.reader, key, entry, ratings.get(key), priors, model,
                         self.sightings, self.engine.trust_list, now)

    # -- responses ------------------------------------------------------------------------------

    def page(self, template: str, view: dict[str, Any], request: Request,
             status: int = 200) -> HTMLResponse:
        text = self.templates.get_template(template).render(
            v=view, path=request.url.path, query=request.url.query,
            json_url="/v1/web" + request.url.path + (
                f"?{request.url.query}" if request.url.query else ""),
        )
        return HTMLResponse(text, status_code=status)

    def not_found(self, request: Request, what: str) -> Response:
        if request.url.path.startswith("/v1/"):
            return JSONResponse({"error": "not-found", "reason": what}, status_code=404)
        return self.page("missing.html", {"what": what}, request, status=404)


def population_priors(ratings: dict[str, Any]) -> dict[str, float]:
    """Means of success and agreement over the rated nodes with evidence (a stand-in for
    the rating book's prior, close enough for a plot)."""
    priors = {}
    for name in ("success", "agreement"):
        values = [getattr(r, name) for r in ratings.values() if r.observations >= 1.0]
        priors[name] = sum(values) / len(values) if values else 0.9
    return priors


def _states(params: Any) -> list[BuildState]:
    states = []
    for text in params.getlist("state"):
        for part in text.split(","):
            try:
                if part:
                    states.append(BuildState(part))
            except ValueError:
                continue
    return states


def _page_number(params: Any) -> int:
    text = params.get("page", "1")
    return int(text) if text.isdigit() and 0 < len(text) < 7 else 1


def web_routes(view: WebView) -> list[BaseRoute]:
    """The routes of ``view`` (mount them in the dispatcher's app)."""

    async def home(request: Request) -> Response:
        return RedirectResponse("/builds", status_code=302)

    async def builds(request: Request) -> Response:
        params = request.query_params
        owner = params.get("owner", "").strip()[:200] or None
        value = builds_view(view.reader, view.now(), states=_states(params), owner=owner,
                            page=_page_number(params), per_page=_PER_PAGE)
        if request.url.path.startswith("/v1/"):
            return JSONResponse(value)
        return view.page("builds.html", value, request)

    async def build(request: Request) -> Response:
        build_id = request.path_params["build_id"]
        value = build_view(view.reader, build_id, view.now(), view.engine.trust_list)
        if value is None:
            return view.not_found(request, f"no build {build_id[:64]}")
        progress = view.pull_progress(build_id)
        for attempt in value["attempts"]:
            attempt["reported"] = progress.get(attempt["id"])
        if request.url.path.startswith("/v1/"):
            return JSONResponse(value)
        return view.page("build.html", value, request)

    async def nodes(request: Request) -> Response:
        value = await view.nodes()
        if request.url.path.startswith("/v1/"):
            return JSONResponse(value)
        value["rows_html"] = node_rows_html(value["nodes"])
        return view.page("nodes.html", value, request)

    async def node(request: Request) -> Response:
        key = request.path_params["key"]
        value = await view.node(key)
        if value is None:
            return view.not_found(request, f"no node {key[:64]}")
        if request.url.path.startswith("/v1/"):
            return JSONResponse(value)
        value["svg"] = Markup(rating_svg(value["history"]))  # numbers only: safe
        return view.page("node.html", value, request)

    async def trust(request: Request) -> Response:
        value = trust_view(view.engine.trust_list, view.now())
        if request.url.path.startswith("/v1/"):
            return JSONResponse(value)
        return view.page("trust.html", value, request)

    async def events(request: Request) -> Response:
        text = request.query_params.get("after", "")
        after = int(text) if text.isdigit() and len(text) < 19 else view.reader.last_event()
        return StreamingResponse(_public_events(view, after),
                                 media_type="application/x-ndjson")

    def _attempt(request: Request) -> tuple[Any, Any] | None:
        build_row = view.reader.build(request.path_params["build_id"])
        attempt = view.reader.attempt(request.path_params["attempt_id"])
        if build_row is None or attempt is None or attempt.build_id != build_row.id:
            return None
        return build_row, attempt

    async def live_log(request: Request) -> Response:
        found = _attempt(request)
        if found is None:
            return view.not_found(request, "no such attempt")
        _, attempt = found
        if not attempt.endpoint:
            return Response("(a pull-mode node sends its logs with its result)\n",
                            media_type="text/plain; charset=utf-8", status_code=404)
        path = f"/v1/jobs/{attempt.job_id}/log"
        if attempt.state.value == "running":
            path += "?follow=1"
        return StreamingResponse(from_node(attempt.tls_sha256, attempt.endpoint, path),
                                 media_type="text/plain; charset=utf-8")

    async def log_file(request: Request) -> Response:
        found = _attempt(request)
        name = request.path_params["name"]
        if found is None:
            return view.not_found(request, "no such attempt")
        _, attempt = found
        raw = view.reader.results(attempt.build_id).get(attempt.id)
        if raw is None or not attempt.endpoint:
            return view.not_found(request, "no log from this attempt here")
        from .._jobs import Result

        if Result.from_bytes(raw).log(name) is None:
            return view.not_found(request, f"no log {name[:100]}")
        return StreamingResponse(
            from_node(attempt.tls_sha256, attempt.endpoint,
                      f"/v1/jobs/{attempt.job_id}/logs/{urllib.parse.quote(name)}"),
            media_type="text/plain; charset=utf-8",
        )

    async def signed(request: Request) -> Response:
        found = _attempt(request)
        if found is None:
            return view.not_found(request, "no such attempt")
        build_row, attempt = found
        if request.path_params["kind"] not in ("job", "result"):
            return view.not_found(request, "no such file")
        if not build_row.state.terminal:
            return view.not_found(request, "signed jobs and results are shown once the build "
                                           "has ended")
        if request.path_params["kind"] == "job":
            data: bytes | None = attempt.job
        else:
            data = view.reader.results(build_row.id).get(attempt.id)
        if data is None:
            return view.not_found(request, "no signed result from this attempt")
        name = f"{build_row.id[:12]}-{attempt.id}.{request.path_params['kind']}"
        return Response(data, media_type="application/msgpack",
                        headers={"content-disposition": f'attachment; filename="{name}"'})

    async def stored(request: Request) -> Response:
        build_row = view.reader.build(request.path_params["build_id"])
        kind, name = request.path_params["kind"], request.path_params["name"]
        if kind not in ("artifacts", "proof", "logs"):
            return view.not_found(request, f"no such file {name[:100]}")
        if build_row is None or build_row.state is not BuildState.VERIFIED:
            return view.not_found(request, "no verified build")
        root = Path(build_row.sink_path)
        try:
            stored = await trio.to_thread.run_sync(StoredBuild.read, root)
        except SinkError:
            return view.not_found(request, "the build's manifest is unreadable")
        if kind == "artifacts":
            allowed = {a.name for a in stored.artifacts}
        elif kind == "logs":
            allowed = {f"{e.stem}/{log.name}" for e in stored.verified_by for log in e.logs}
        else:
            allowed = {Path(relpath).name for e in stored.verified_by
                       for relpath in (e.job, e.result)}
        if name not in allowed:
            return view.not_found(request, f"no such file {name[:100]}")
        path = root / kind / name
        if kind == "logs":
            return FileResponse(path, media_type="text/plain; charset=utf-8")
        return FileResponse(path, media_type="application/octet-stream",
                            filename=Path(name).name)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return Response(status_code=404)
        return FileResponse(_HERE / "static" / name, media_type=_STATIC[name],
                            headers={"cache-control": "max-age=300"})

    async def metrics(request: Request) -> Response:
        view.metrics.refresh(await view.node_states())
        return Response(view.metrics.render(), media_type=CONTENT_TYPE)

    routes: list[BaseRoute] = [Route("/", home, methods=["GET"])]
    for path, endpoint in (
        ("/builds", builds), ("/builds/{build_id}", build), ("/nodes", nodes),
        ("/nodes/{key}", node), ("/trust", trust),
    ):
        routes.append(Route(path, endpoint, methods=["GET"]))
        routes.append(Route("/v1/web" + path, endpoint, methods=["GET"]))
    routes += [
        Route("/v1/web/events", events, methods=["GET"]),
        Route("/builds/{build_id}/attempts/{attempt_id:int}/log", live_log, methods=["GET"]),
        Route("/builds/{build_id}/attempts/{attempt_id:int}/logs/{name:path}", log_file,
              methods=["GET"]),
        Route("/builds/{build_id}/attempts/{attempt_id:int}/{kind:str}", signed,
              methods=["GET"]),
        Route("/builds/{build_id}/{kind:str}/{name:path}", stored, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return routes


async def _public_events(view: WebView, after: int) -> AsyncIterator[bytes]:
    """Audit entries after ``after``, public fields only, then new ones as they come for
    :data:`_FOLLOW_S` seconds."""
    deadline = trio.current_time() + _FOLLOW_S
    # A first line at once, so the client knows the stream is open.
    yield (json.dumps({"id": after, "event": "hello"}) + "\n").encode()
    while True:
        changed = view.engine.wait_changed
        rows = view.reader.events(after=after, limit=500)
        lines = []
        for row in rows:
            after = row["id"]
            lines.append(json.dumps({"id": row["id"], "at": row["at"],
                                     "build_id": row["build_id"], "event": row["event"]}))
        if lines:
            yield ("\n".join(lines) + "\n").encode()
            continue
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            return
        # The engine wakes followers on state changes; a second's poll catches the rest.
        with trio.move_on_after(min(remaining, 1.0)):
            await changed()


