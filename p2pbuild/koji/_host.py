"""The dispatcher as a Koji build host (design item 16; the pattern of Koji's ``kojivmd``).

:func:`serve_koji_host` logs into the hub with the host's credentials (password or SSL
client certificate), takes an exclusive session and runs a :class:`P2PTaskManager` (Koji's
own ``koji.daemon.TaskManager``) every ``poll_interval_s``: ``host.updateHost`` (the
heartbeat), ``host.getHostTasks`` (notice cancelled tasks), ``host.getTasks`` and
``host.openTask``. The koji client is synchronous, so each round runs in a worker thread
(``trio.to_thread``); the manager never blocks on a build, so the heartbeat continues while
builds run.

Where ``kojid`` forks a process per task, :meth:`P2PTaskManager.forkTask` starts a trio
task in our nursery instead, with its own hub *subsession* (a ``ClientSession`` is not
shared between threads). That task runs ``TaskManager.runTask`` with a
:class:`P2PBuildTask` (a ``koji.tasks.BaseTaskHandler``) in a worker thread, so closing,
failing and refusing the task are Koji's code. The handler:

1. downloads the SRPM the task names (``cli-build/...`` under the hub's ``topurl``, with
   ``koji.openRemoteFile``) and reads its NVR;
2. reserves the build: ``CGInitBuild`` -> build id and token;
3. runs the replicated, verified build through the engine (``trio.from_thread``);
4. verified: uploads the SRPM and RPMs, each verifying node's logs and signed result under
   its own directory, and ``metadata.json`` (``_cg.build_metadata``), then ``CGImport``,
   ``host.tagBuild`` and returns ``{"koji_builds": [id]}`` (``closeTask``);
5. otherwise refunds the reservation (``CGRefundBuild``) and fails the task with the
   mismatch report naming the nodes and the differing files; no capable node: refuses the
   task softly (``host.refuseTask``) with the selection's reason; cancelled in Koji (seen
   by ``TaskManager.updateTasks``, which calls :meth:`P2PTaskManager.cleanupTask`): the P2P
   build is cancelled on the nodes and the reservation refunded as cancelled.

Hub restarts and ``ServerOffline`` are retried inside the koji client (a task's calls
``max_retries`` times every ``retry_interval_s``; ``offline_retry``); an expired session
(``AuthExpired``) is renewed by the client itself. The manager's own calls give up after
two tries: the round is logged and repeated after ``retry_interval_s`` with the same
session (the hub keeps it across a restart); only an authentication error makes the host
log in again, keeping the tasks it runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import secrets
import shutil
import time
import types
from pathlib import Path
from typing import Any, ClassVar

import attrs
import httpx
import koji
import koji.daemon
import koji.tasks
import requests
import trio

from .._errors import RemoteError
from .._jobs import Result
from ..dispatcher._config import KojiConfig
from ..dispatcher._db import BuildRow, BuildState
from ..dispatcher._engine import BuildRequest, Engine
from ..dispatcher._errors import DispatcherError
from ..node._tls import pinned_client
from ._cg import NodeProof, OutputFile, build_metadata, node_subdir
from ._rpm import RpmHeader, RpmHeaderError, read_rpm_header

__all__ = [
    "KojiHost",
    "KojiHostStatistics",
    "P2PBuildTask",
    "P2POutcome",
    "P2PTaskManager",
    "serve_koji_host",
]

_log = logging.getLogger("p2pbuild.koji")

#: What a failed hub round may raise: Koji faults (also AuthError, ServerOffline), raw
#: XML-RPC faults and the network errors the client gives up on.
HUB_ERRORS = (koji.GenericError, koji.xmlrpcplus.Fault, requests.exceptions.RequestException,
              OSError)


class TaskCancelled(koji.GenericError):  # type: ignore[misc]
    """The task was cancelled in Koji while its P2P build ran."""


@attrs.frozen
class P2POutcome:
    """How the engine ended a Koji task's build."""

    build: BuildRow
    #: The build never got a node: the task should go back to Koji (soft refusal).
    no_node: bool
    #: Each verifying node's logs and signed result, downloaded for the import.
    node_files: dict[str, list[Path]] = attrs.field(factory=dict)


@attrs.frozen
class KojiHostStatistics:
    rounds: int
    failed_rounds: int
    tasks_taken: int
    tasks_running: int
    last_error: str


@attrs.define(eq=False)
class _Bridge:
    """What the blocking Koji side needs from trio: run a P2P build, cancel it."""

    engine: Engine
    config: KojiConfig
    workdir: Path
    nursery: trio.Nursery
    token: trio.lowlevel.TrioToken
    builds: dict[int, str] = attrs.field(factory=dict)
    running: set[int] = attrs.field(factory=set)
    done: set[int] = attrs.field(factory=set)
    taken: int = 0

    # -- trio side ------------------------------------------------------------------------------

    async def p2p_build(self, task_id: int, srpm: Path, user: str) -> P2POutcome:
        """Submit the SRPM to the engine and wait for the build to end (any way)."""
        data = await trio.Path(srpm).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        store = self.engine.sources
        await trio.Path(store.root).mkdir(parents=True, exist_ok=True)
        if not store.has(sha):
            partial = store.path(sha).with_suffix(".part")
            await trio.Path(partial).write_bytes(data)
            await trio.Path(partial).rename(store.path(sha))
        request = BuildRequest(
            source_name=srpm.name, source_sha256=sha, source_size=len(data),
            arch=self.config.arch, os=self.config.os, replicas=self.config.replicas,
            time_limit_s=self.config.time_limit_s,
        )
        build = self.engine.accept(request, user, None)
        self.builds[task_id] = build.id
        _log.info("koji task %d: p2p build %s", task_id, build.id)
        while True:
            build = self.engine.db.build(build.id)
            if build.state.terminal:
                break
            await self.engine.wait_changed()
        attempts = self.engine.db.attempts(build.id)
        files: dict[str, list[Path]] = {}
        if build.state is BuildState.VERIFIED:
            files = await self._node_files(build)
        return P2POutcome(build, no_node=build.state is BuildState.FAILED and not attempts,
                          node_files=files)

    async def _node_files(self, build: BuildRow) -> dict[str, list[Path]]:
        """Each verifying node's signed result and its logs (fetched from push nodes; a
        pull-only node's logs stay on the node)."""
        manifest = json.loads(
            await trio.Path(Path(build.sink_path) / "manifest.json").read_text()
        )
        by_job = {a.job_id: a for a in self.engine.db.attempts(build.id)}
        out: dict[str, list[Path]] = {}
        for entry in manifest["verified_by"]:
            subdir = node_subdir(entry["fingerprint"])
            target = self.workdir / "nodes" / build.id / subdir
            await trio.Path(target).mkdir(parents=True, exist_ok=True)
            result_file = target / "p2pbuild-result.msgpack"
            raw = await trio.Path(Path(build.sink_path) / entry["result"]).read_bytes()
            await trio.Path(result_file).write_bytes(raw)
            job_file = target / "p2pbuild-job.msgpack"
            await trio.Path(job_file).write_bytes(
                await trio.Path(Path(build.sink_path) / entry["job"]).read_bytes()
            )
            paths = [job_file, result_file]
            attempt = by_job.get(entry["job_id"])
            if attempt is not None and attempt.endpoint:
                paths += await self._fetch_logs(attempt.endpoint, attempt.tls_sha256,
                                                attempt.job_id, raw, target)
            out[subdir] = paths
        return out

    async def _fetch_logs(self, endpoint: str, pin: bytes, job_id: str, raw_result: bytes,
                          target: Path) -> list[Path]:
        result = Result.from_bytes(raw_result)
        paths = []
        try:
            async with pinned_client(pin, base_url=endpoint) as client:
                for item in result.logs:
                    response = await client.get(f"/v1/jobs/{job_id}/logs/{item.name}")
                    data = response.content
                    if (response.status_code != 200 or len(data) != item.size
                            or hashlib.sha256(data).digest() != item.sha256):
                        _log.warning("log %s of job %s: not as signed; left out",
                                     item.name, job_id)
                        continue
                    path = target / item.name.replace("/", "_")
                    await trio.Path(path).write_bytes(data)
                    paths.append(path)
        except (httpx.HTTPError, RemoteError) as exc:
            _log.warning("logs of job %s: %s; left out", job_id, exc)
        return paths

    def cancel_nowait(self, task_id: int) -> None:
        build_id = self.builds.get(task_id)
        if build_id is None:
            return
        try:
            self.engine.cancel(build_id, "koji")
        except DispatcherError as exc:
            _log.warning("cancel of koji task %d: %s", task_id, exc)

    # -- called from worker threads -------------------------------------------------------------

    def run_p2p_build(self, task_id: int, srpm: Path, user: str) -> P2POutcome:
        return trio.from_thread.run(self.p2p_build, task_id, srpm, user, trio_token=self.token)

    def cancel(self, task_id: int) -> None:
        trio.from_thread.run_sync(self.cancel_nowait, task_id, trio_token=self.token)

    def start_task(self, manager: P2PTaskManager, handler: P2PBuildTask) -> None:
        self.running.add(handler.id)
        self.taken += 1
        trio.from_thread.run_sync(
            self.nursery.start_soon, self._run_task, manager, handler, trio_token=self.token
        )

    async def _run_task(self, manager: P2PTaskManager, handler: P2PBuildTask) -> None:
        try:
            await trio.to_thread.run_sync(_run_task_blocking, manager, handler)
        finally:
            self.running.discard(handler.id)
            self.done.add(handler.id)
            self.builds.pop(handler.id, None)


def _run_task_blocking(manager: P2PTaskManager, handler: P2PBuildTask) -> None:
    # What kojid's forked child does: the same manager, talking through the task's own
    # subsession (the main session belongs to the manager's thread).
    child = copy.copy(manager)
    child.session = handler.session
    try:
        child.runTask(handler)
    except koji.ActionNotAllowed as exc:
        # closeTask/failTask refused: cancelled in Koji or given to another host.
        _log.info("koji task %d is no longer ours: %s", handler.id, exc)
    except HUB_ERRORS as exc:
        _log.error("koji task %d: could not report the outcome: %s", handler.id, exc)
    finally:
        try:
            handler.session.logout()
        except HUB_ERRORS as exc:
            _log.debug("subsession logout: %s", exc)


class P2PTaskManager(koji.daemon.TaskManager):  # type: ignore[misc]
    """``koji.daemon.TaskManager`` with trio tasks in place of forked processes."""

    def __init__(self, options: Any, session: koji.ClientSession, bridge: _Bridge) -> None:
        self.bridge = bridge
        super().__init__(options, session)
        self.registerHandler(P2PBuildTask)

    def forkTask(self, handler: P2PBuildTask) -> tuple[int, int]:
        subsession = self.session.subsession()
        # The task rides out hub restarts; the manager's own session gives up sooner (its
        # loop retries anyway, and must keep heartbeating).
        subsession.opts.update(max_retries=self.bridge.config.max_retries)
        handler.session = subsession
        self.bridge.start_task(self, handler)
        # The task id stands in for a pid: _waitTask and cleanupTask take it back.
        return handler.id, int(subsession.sinfo["session-id"])

    def _waitTask(self, task_id: int, pid: int | None = None) -> bool:
        return task_id in self.bridge.done

    def cleanupTask(self, task_id: int, wait: bool = True) -> bool:
        if task_id in self.bridge.running:
            _log.info("koji task %d cancelled or reassigned: cancelling its p2p build", task_id)
            self.bridge.cancel(task_id)
        self.bridge.done.discard(task_id)
        return True

    def round(self) -> None:
        """One pass of kojid's main loop: tasks we hold, then maybe a new one."""
        self.updateTasks()
        self.getNextTask()


class P2PBuildTask(koji.tasks.BaseTaskHandler):  # type: ignore[misc]
    """The ``build`` method: an SRPM built on P2P nodes, imported as a content generator."""

    Methods: ClassVar[list[str]] = ["build"]
    #: The host only waits on the nodes.
    _taskWeight = 0.2

    def handler(self, src: str, target: str, opts: dict[str, Any] | None = None) -> Any:
        opts = opts or {}
        bridge: _Bridge = self.options.bridge
        config: KojiConfig = bridge.config
        session = self.session
        started = int(time.time())
        if opts.get("scratch"):
            raise koji.BuildError("scratch builds are not supported by the p2p build host")
        if "://" in src:
            raise koji.BuildError(
                f"the p2p build host builds uploaded SRPMs, not SCM sources: {src}"
            )
        target_info = session.getBuildTarget(target, strict=True)
        srpm = self._fetch_srpm(src)
        try:
            header = read_rpm_header(srpm)
        except RpmHeaderError as exc:
            raise koji.BuildError(str(exc)) from None
        if not header.is_source:
            raise koji.BuildError(f"{srpm.name} is not a source RPM")
        task = session.getTaskInfo(self.id)
        owner = session.getUser(task["owner"]) if task else None
        user = f"koji:{owner['name'] if owner else 'unknown'}"
        data: dict[str, Any] = {"name": header.name, "version": header.version,
                                "release": header.release, "task_id": self.id}
        if header.epoch is not None:
            data["epoch"] = header.epoch
        reserved = session.CGInitBuild(config.content_generator, data)
        build_id, token = int(reserved["build_id"]), str(reserved["token"])
        try:
            outcome = bridge.run_p2p_build(self.id, srpm, user)
            build = outcome.build
            if build.state is BuildState.CANCELLED:
                raise TaskCancelled(f"task {self.id} was cancelled; p2p build {build.id} "
                                    "cancelled on the nodes")
            if outcome.no_node:
                raise koji.tasks.RefuseTask(f"no capable p2p node: {build.reason}")
            if build.state is not BuildState.VERIFIED:
                raise koji.BuildError(self._failure_message(build))
            self._import(config, src, header, srpm, build, outcome, token, started)
        except BaseException as exc:
            state = koji.BUILD_STATES[
                "CANCELED" if isinstance(exc, (TaskCancelled, koji.tasks.RefuseTask))
                else "FAILED"
            ]
            self._refund(config, build_id, token, state)
            raise
        if not opts.get("skip_tag"):
            dest = target_info["dest_tag_name"] if config.dest_tag == "target" else config.dest_tag
            if dest:
                session.host.tagBuild(self.id, dest, build_id)
        return {"koji_builds": [build_id]}

    def _refund(self, config: KojiConfig, build_id: int, token: str, state: int) -> None:
        try:
            self.session.CGRefundBuild(config.content_generator, build_id, token, state)
        except HUB_ERRORS as exc:
            _log.error("koji task %d: refund of build %d failed: %s", self.id, build_id, exc)

    def _fetch_srpm(self, src: str) -> Path:
        bridge: _Bridge = self.options.bridge
        name = src.rsplit("/", 1)[-1]
        if not name.endswith(".src.rpm"):
            raise koji.BuildError(f"not an SRPM: {src}")
        dest = Path(self.workdir) / name
        remote = koji.openRemoteFile(f"work/{src}", topurl=bridge.config.topurl,
                                     tempdir=self.workdir)
        try:
            with dest.open("wb") as out:
                shutil.copyfileobj(remote, out)
        finally:
            remote.close()
        return dest

    def _failure_message(self, build: BuildRow) -> str:
        lines = [f"p2p build {build.id} failed: {build.reason}"]
        if build.report:
            lines += ["", build.report.rstrip()]
        self._upload_report(build)
        return "\n".join(lines)

    def _upload_report(self, build: BuildRow) -> None:
        if not build.report:
            return
        path = Path(self.workdir) / "p2pbuild-mismatch.txt"
        path.write_text(build.report)
        try:
            self.session.uploadWrapper(str(path), koji.pathinfo.taskrelpath(self.id))
        except HUB_ERRORS as exc:
            _log.warning("koji task %d: report upload failed: %s", self.id, exc)

    def _import(self, config: KojiConfig, src: str, header: RpmHeader, srpm: Path,
                build: BuildRow, outcome: P2POutcome, token: str, started: int) -> None:
        stored = Path(build.sink_path)
        manifest = json.loads((stored / "manifest.json").read_text())
        upload_dir = f"p2p-cg/{time.time():.6f}.{secrets.token_hex(4)}"
        packages: list[OutputFile] = []
        names = set()
        for item in manifest["artifacts"]:
            path = stored / "artifacts" / item["name"]
            filename = item["name"].rsplit("/", 1)[-1]
            if not filename.endswith(".rpm"):
                _log.info("koji task %d: %s is not an RPM; not imported", self.id, item["name"])
                continue
            if filename in names:
                raise koji.BuildError(f"two artifacts are named {filename}")
            names.add(filename)
            try:
                rpm_header = read_rpm_header(path)
            except RpmHeaderError as exc:
                raise koji.BuildError(str(exc)) from None
            packages.append(OutputFile(filename, item["size"], item["sha256"], "rpm",
                                       rpm_header.arch))
            self.session.uploadWrapper(str(path), upload_dir, name=filename)
        if not any(p.arch != "src" for p in packages):
            raise koji.BuildError("the verified build has no binary RPM to import")
        if srpm.name not in names:
            data = srpm.read_bytes()
            packages.insert(0, OutputFile(srpm.name, len(data), hashlib.sha256(data).hexdigest(),
                                          "rpm", "src"))
            self.session.uploadWrapper(str(srpm), upload_dir, name=srpm.name)
        proofs = []
        for entry in manifest["verified_by"]:
            subdir = node_subdir(entry["fingerprint"])
            files = []
            for path in outcome.node_files.get(subdir, []):
                data = path.read_bytes()
                files.append(OutputFile(path.name, len(data), hashlib.sha256(data).hexdigest(),
                                        "log", "noarch", subdir))
                self.session.uploadWrapper(str(path), f"{upload_dir}/{subdir}", name=path.name)
            job_raw = (stored / entry["job"]).read_bytes()
            result_raw = (stored / entry["result"]).read_bytes()
            result = Result.from_bytes(result_raw)
            proofs.append(NodeProof(
                node=entry["node"], fingerprint=entry["fingerprint"],
                operator=entry["operator"], job_id=entry["job_id"],
                job_sha256=hashlib.sha256(job_raw).hexdigest(),
                result_sha256=hashlib.sha256(result_raw).hexdigest(),
                environment=result.environment_map, started_ms=result.started_ms,
                ended_ms=result.ended_ms,
                artifacts={a.name: a.sha256.hex() for a in result.artifacts}, files=tuple(files),
            ))
        metadata = build_metadata(
            name=header.name, version=header.version, release=header.release,
            epoch=header.epoch, source=src, start_time=started, end_time=int(time.time()),
            content_generator=config.content_generator, packages=packages, nodes=proofs,
            extra={"p2pbuild": {
                "build_id": build.id,
                "dispatcher": str(self.options.bridge.engine.identity.public_key),
                "verified_by": [{"node": p.node, "operator": p.operator} for p in proofs],
                "reproducible": True,
                "mismatch_report": build.report or None,
                "trust_list_version": manifest.get("trust_list_version"),
            }},
        )
        meta_path = Path(self.workdir) / "metadata.json"
        meta_path.write_text(json.dumps(metadata, indent=2, sort_keys=True))
        self.session.uploadWrapper(str(meta_path), upload_dir, name="metadata.json")
        self.session.CGImport("metadata.json", upload_dir, token=token)


def _client_options(config: KojiConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "max_retries": 2,
        "retry_interval": config.retry_interval_s,
        "offline_retry": True,
        "offline_retry_interval": config.retry_interval_s,
        "anon_retry": True,
        "timeout": 60 * 60 * 12,
    }
    if config.serverca is not None:
        opts["serverca"] = str(config.serverca)
    if config.authtype == "password":
        assert config.password_file is not None
        opts["user"] = config.host
        opts["password"] = config.password_file.read_text().strip()
    else:
        opts["cert"] = str(config.cert)
    return opts


def _connect(config: KojiConfig, bridge: _Bridge,
             previous: P2PTaskManager | None) -> P2PTaskManager:
    """Log in as the host, take the exclusive session, build the task manager (keeping the
    tasks a previous manager runs, so they are not freed as stale). Blocking."""
    session = koji.ClientSession(config.server, _client_options(config))
    if config.authtype == "password":
        session.login()
    else:
        session.ssl_login(cert=str(config.cert),
                          serverca=str(config.serverca) if config.serverca else None)
    session.exclusiveSession(force=True)
    bridge.workdir.mkdir(parents=True, exist_ok=True)
    options = types.SimpleNamespace(
        maxjobs=config.max_jobs, mockdir=str(bridge.workdir), minspace=config.min_space_mb,
        workdir=str(bridge.workdir / "tasks"), topurl=config.topurl, bridge=bridge,
    )
    manager = P2PTaskManager(options, session, bridge)
    if previous is not None:
        manager.pids, manager.tasks = previous.pids, previous.tasks
        manager.subsessions = previous.subsessions
    channels = {c["name"] for c in session.listChannels(hostID=manager.host_id)}
    if config.channel not in channels:
        _log.warning("host %s is not in channel %s (it is in %s)", config.host, config.channel,
                     ", ".join(sorted(channels)) or "none")
    _log.info("logged into %s as build host %s (id %d)", config.server, config.host,
              manager.host_id)
    return manager


def _shutdown(manager: P2PTaskManager) -> None:
    manager.session.opts.update(max_retries=0, offline_retry=False)
    try:
        manager.session.host.updateHost(0.0, False)
        manager.session.logout()
    except HUB_ERRORS as exc:
        _log.debug("logout: %s", exc)


async def serve_koji_host(
    config: KojiConfig,
    engine: Engine,
    workdir: Path,
    *,
    task_status: trio.TaskStatus[KojiHost] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the build host until cancelled. Starts at once (a hub that is away is retried
    every ``retry_interval_s``); hub and network failures are logged, never raised."""
    async with trio.open_nursery() as nursery:
        bridge = _Bridge(engine, config, workdir, nursery, trio.lowlevel.current_trio_token())
        host = KojiHost(bridge)
        task_status.started(host)
        manager: P2PTaskManager | None = None
        previous: P2PTaskManager | None = None
        try:
            while True:
                try:
                    if manager is None:
                        manager = await trio.to_thread.run_sync(_connect, config, bridge,
                                                                previous)
                    await trio.to_thread.run_sync(manager.round)
                    host.rounds += 1
                    host.connected.set()
                    await trio.sleep(config.poll_interval_s)
                except HUB_ERRORS as exc:
                    host.failed_rounds += 1
                    host.last_error = f"{type(exc).__name__}: {exc}"
                    if isinstance(exc, koji.AuthError) or manager is None:
                        # The session is gone (the client renews only expired ones): log
                        # in again. A hub that is away keeps our session: just retry.
                        previous, manager = manager or previous, None
                    _log.warning("koji hub round failed (%s); retrying in %.1f s",
                                 host.last_error, config.retry_interval_s)
                    await trio.sleep(config.retry_interval_s)
        finally:
            if manager is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_shutdown, manager)


@attrs.define(eq=False)
class KojiHost:
    """The running host, as :func:`serve_koji_host` reports it."""

    bridge: _Bridge
    rounds: int = 0
    failed_rounds: int = 0
    last_error: str = ""
    connected: trio.Event = attrs.field(factory=trio.Event)

    def statistics(self) -> KojiHostStatistics:
        return KojiHostStatistics(self.rounds, self.failed_rounds, self.bridge.taken,
                                  len(self.bridge.running), self.last_error)
