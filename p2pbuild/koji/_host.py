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
failing and refusing the task are Koji's code. The handler (``_task``):

1. downloads the SRPM the task names (``cli-build/...`` under the hub's ``topurl``, with
   ``koji.openRemoteFile``) and reads its NVR;
2. reserves the build: ``CGInitBuild`` -> build id and token;
3. runs the replicated, verified build through the dispatcher's build service
   (``trio.from_thread``; the ``_bridge`` and ``_service`` modules);
4. verified: uploads the SRPM and RPMs, each verifying node's logs and signed result under
   its own directory, and ``metadata.json`` (``_cg.build_metadata``), then ``CGImport``,
   ``host.tagBuild`` and returns ``{"koji_builds": [id]}`` (``closeTask``);
5. otherwise refunds the reservation (``CGRefundBuild``) and fails the task with the
   mismatch report naming the nodes and the differing files; no capable node: refuses the
   task softly (``host.refuseTask``) with the selection's reason; cancelled in Koji (seen
   by ``TaskManager.updateTasks``, which calls :meth:`P2PTaskManager.cleanupTask`): the P2P
   build is cancelled on the nodes and the reservation refunded as cancelled.

Restarts. ``kojid`` frees the tasks a restarted daemon finds open on its host; for us that
would strand the reservation (the next attempt finds the NVR reserved) and throw away the
P2P build. Instead every step is recorded in a :class:`~._store.TaskStore` (SQLite next to
the dispatcher's state) before it is taken, and each round first *reconciles* the rows no
running handler owns (:meth:`P2PTaskManager.updateTasks`):

* the task is still open on this host: a handler is started for it again (no
  ``openTask``), and picks up where the row says: reserve (cancelling a reservation whose
  token was lost), follow the same P2P build (which the dispatcher resumed), import unless
  the hub already has the build ``COMPLETE`` (then only tag and close), or report the
  recorded failure;
* the task is cancelled, finished, or on another host: the reservation is refunded and
  the P2P build cancelled;
* the task was freed (the host was away longer than the hub waits): the reservation is
  refunded, so that whichever host gets the task can reserve the NVR; the P2P build is
  kept, and if the task comes back here its next attempt follows it.

Only rows whose task's outcome the hub has (closed, failed, refused) are finished, so a
crash between the import and ``closeTask`` closes the task after the restart, with the
build imported once: a build the hub has ``COMPLETE`` is never imported again, and a
second ``CGImport`` with the same token is refused by the hub anyway.

Hub restarts and ``ServerOffline`` are retried inside the koji client (a task's calls
``max_retries`` times every ``retry_interval_s``; ``offline_retry``); an expired session
(``AuthExpired``) is renewed by the client itself. The manager's own calls give up after
two tries: the round is logged and repeated after ``retry_interval_s`` with the same
session (the hub keeps it across a restart); only an authentication error makes the host
log in again, keeping the tasks it runs.

The row's phases are in ``_store``; refunding, recovering a lost reservation and the
recorded outcomes in ``_resume``.
"""

from __future__ import annotations

import logging
import time
import types
from pathlib import Path
from typing import Any

import attrs
import koji
import koji.daemon
import koji.tasks
import trio

from ._bridge import Bridge, P2POutcome
from ._config import KojiConfig
from ._resume import (
    CANCELED,
    COMPLETE,
    FAILED,
    HUB_ERRORS,
    hub_build_state,
    recover_lost_reservation,
    refund,
)
from ._service import BuildService
from ._store import TaskPhase, TaskRow, TaskStore
from ._task import P2PBuildTask

__all__ = [
    "KojiHost",
    "KojiHostStatistics",
    "P2PBuildTask",
    "P2POutcome",
    "P2PTaskManager",
    "serve_koji_host",
]

_log = logging.getLogger("p2pbuild.koji")

TASK_FREE = koji.TASK_STATES["FREE"]
TASK_ASSIGNED = koji.TASK_STATES["ASSIGNED"]
TASK_CANCELED = koji.TASK_STATES["CANCELED"]
TASK_OPEN = koji.TASK_STATES["OPEN"]


@attrs.frozen
class KojiHostStatistics:
    rounds: int
    failed_rounds: int
    tasks_taken: int
    tasks_running: int
    last_error: str
    #: Tasks found open on this host without a running handler and taken up again.
    tasks_resumed: int = 0
    #: Tasks that left this host while it was away, whose reservation it refunded.
    tasks_released: int = 0
    #: Tasks freed and handed back to this host while their attempt ran on.
    tasks_handed_back: int = 0


class P2PTaskManager(koji.daemon.TaskManager):  # type: ignore[misc]
    """``koji.daemon.TaskManager`` with trio tasks in place of forked processes, and a
    task store in place of freeing the tasks a restart finds open (module doc)."""

    def __init__(self, options: Any, session: koji.ClientSession, bridge: Bridge) -> None:
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
        """kojid kills the process of a task that is no longer open on the host. Here:

        * cancelled (or gone): cancel its P2P build; the handler ends with the hub
          refusing its report;
        * freed (``koji free-task``, ``FREE`` or handed back to this host already): keep
          the handler running (False: still ours); if the scheduler hands the task back,
          :meth:`takeTask` opens it again and the same attempt goes on and reports once;
        * on another host: stop the attempt quietly (``Bridge.detach_nowait``); the next
          round refunds its reservation and cancels its P2P build (:meth:`settle`).
        """
        bridge = self.bridge
        if task_id in bridge.running and task_id not in bridge.detached:
            info = self.session.getTaskInfo(task_id)
            state = None if info is None else info["state"]
            if info is not None and state in (TASK_FREE, TASK_ASSIGNED) and (
                    info["host_id"] in (None, self.host_id)):
                _log.info("koji task %d was freed: its attempt goes on while the task may "
                          "come back here", task_id)
                return False
            if state in (TASK_FREE, TASK_ASSIGNED, TASK_OPEN):
                _log.info("koji task %d went to host %s: stopping this host's attempt",
                          task_id, info["host_id"] if info else None)
                bridge.call(bridge.detach_nowait, task_id)
            else:
                _log.info("koji task %d cancelled: cancelling its p2p build", task_id)
                bridge.cancel(task_id)
        bridge.done.discard(task_id)
        return True

    def takeTask(self, task: dict[str, Any]) -> bool:
        """kojid's, except for a task whose attempt still runs here: freed and handed back
        (open it again; the same attempt goes on and reports once), or detached and still
        stopping (take it at a later round)."""
        task_id = task["id"]
        bridge = self.bridge
        if task_id not in bridge.running:
            return bool(super().takeTask(task))
        if task_id in bridge.detached:
            return False
        data = self.session.host.openTask(task_id)
        if data is None:
            return False
        _log.info("koji task %d came back to this host: its running attempt goes on", task_id)
        self.tasks[task_id] = data
        self.pids.setdefault(task_id, task_id)
        self.session.host.setTaskWeight(task_id, P2PBuildTask._taskWeight)
        bridge.handed_back += 1
        return True

    def readyForTask(self) -> bool:
        """kojid's checks (``TaskManager.readyForTask``: host enabled, task load within
        capacity, ``maxjobs``, free space) except the local load average: the builds run on
        the P2P nodes, and a busy gateway machine is no reason to leave tasks waiting."""
        if self.restart_pending:
            if self.tasks:
                self.status = "Pending restart"
                return False
            raise koji.tasks.ServerRestart
        self.hostdata = self.session.host.getHost()
        if not self.hostdata["enabled"]:
            self.status = "Host is disabled"
            return False
        if self.task_load > self.hostdata["capacity"]:
            self.status = "Over capacity"
            return False
        if len(self.tasks) >= self.options.maxjobs:
            self.status = "Full queue"
            return False
        return bool(self.checkSpace())

    def updateTasks(self) -> None:
        """Reconcile the store with the hub, then kojid's own bookkeeping (which frees the
        open tasks we know nothing about: nothing of theirs is ours to keep)."""
        self.reconcile()
        super().updateTasks()

    def round(self) -> None:
        """One pass of kojid's main loop: tasks we hold, then maybe a new one."""
        self.updateTasks()
        self.getNextTask()

    # -- restarts -------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Every unfinished row without a running handler: take its task up again if it is
        open here, else settle what the row holds. Raises HUB_ERRORS (the round is
        repeated)."""
        bridge = self.bridge
        rows = [r for r in bridge.call(bridge.store.unfinished)
                if r.task_id not in self.pids and r.task_id not in bridge.running]
        if not rows:
            return
        open_here = {t["id"] for t in self.session.host.getHostTasks()}
        for row in rows:
            if row.task_id in open_here:
                self.resumeTask(row)
            else:
                self.settle(row, self.session.getTaskInfo(row.task_id))

    def resumeTask(self, row: TaskRow) -> None:
        """Start a handler for a task that is open here already (what ``takeTask`` does
        after ``openTask``)."""
        info = self.session.getTaskInfo(row.task_id, request=True)
        if info is None or info.get("request") is None or info["method"] not in self.handlers:
            _log.error("koji task %d: cannot take it up again: %r", row.task_id, info)
            return
        _log.info("koji task %d: taking it up again (%s)", row.task_id, row.phase.value)
        handler = self.handlers[info["method"]](row.task_id, info["method"], info["request"],
                                                self.session, self.options)
        self.tasks[row.task_id] = info
        pid, session_id = self.forkTask(handler)
        self.pids[row.task_id] = pid
        self.subsessions[row.task_id] = session_id
        self.bridge.resumed += 1

    def settle(self, row: TaskRow, info: dict[str, Any] | None) -> None:
        """The task of ``row`` is not open here (``info``: the hub's task). Refund what the
        row holds unless the hub has the build; cancel the P2P build unless the task may
        come back here. A row whose hub side is not known yet is kept for the next round."""
        bridge, config = self.bridge, self.bridge.config
        state = None if info is None else info["state"]
        ours_next = state in (TASK_FREE, TASK_ASSIGNED) and info is not None and (
            info["host_id"] in (None, self.host_id))
        if ours_next and state == TASK_ASSIGNED:
            return  # getNextTask opens it in this round and its handler goes on
        why = "task " + ("gone" if info is None else koji.TASK_STATES[state].lower())
        now = time.time()
        phase = row.phase
        if phase is TaskPhase.RESERVING:
            cancelled = recover_lost_reservation(
                self.session, config.content_generator, config.host, row,
                lambda build_id: bridge.call(bridge.store.holder_of, build_id))
            if cancelled is not None:
                bridge.call(bridge.store.note, row.task_id, now, "lost-reservation-cancelled",
                            build_id=cancelled)
        elif phase is TaskPhase.RESERVED:
            assert row.build_id is not None
            if hub_build_state(self.session, row.build_id) == COMPLETE:
                # Imported before we could record it: the next attempt here closes the
                # task with it; elsewhere there is nothing left to undo.
                if ours_next:
                    bridge.call(bridge.store.imported, row.task_id, now)
                else:
                    bridge.call(bridge.store.done, row.task_id, now, why)
                return
            cancel = ours_next or state == TASK_CANCELED
            if not refund(self.session, config.content_generator, row,
                          CANCELED if cancel else FAILED):
                return
        elif phase in (TaskPhase.IMPORTED, TaskPhase.RELEASED) and ours_next:
            return
        if phase is TaskPhase.REFUNDED or not ours_next:
            if phase is not TaskPhase.IMPORTED:
                bridge.call(bridge.cancel_p2p, row.p2p_build_id)
            bridge.call(bridge.store.done, row.task_id, now, why)
            return
        keep = bridge.call(bridge.p2p_live, row.p2p_build_id)
        _log.info("koji task %d was freed while we were away: reservation refunded%s",
                  row.task_id, ", p2p build kept" if keep else "")
        bridge.call(bridge.store.released, row.task_id, now, keep_p2p=keep)
        bridge.released += 1


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


def _connect(config: KojiConfig, bridge: Bridge,
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
    service: BuildService,
    workdir: Path,
    *,
    task_status: trio.TaskStatus[KojiHost] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the build host until cancelled. Starts at once (a hub that is away is retried
    every ``retry_interval_s``); hub and network failures are logged, never raised.

    ``workdir`` holds the task store (``tasks.db``) and the tasks' files; keep it across
    restarts (the dispatcher's ``state_dir/koji``). Raises :class:`ConfigError` if the
    store cannot be opened, :class:`sqlite3.Error` if it breaks."""
    await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
    store = TaskStore.open(workdir / "tasks.db")
    try:
        await _serve(config, service, workdir, store, task_status)
    finally:
        store.close()


async def _serve(config: KojiConfig, service: BuildService, workdir: Path, store: TaskStore,
                 task_status: trio.TaskStatus[KojiHost]) -> None:
    async with trio.open_nursery() as nursery:
        bridge = Bridge(service, config, workdir, nursery, store)
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
                    host._ended_round()
                    await trio.sleep(config.poll_interval_s)
                except HUB_ERRORS as exc:
                    host.failed_rounds += 1
                    host.last_error = f"{type(exc).__name__}: {exc}"
                    host._ended_round()
                    if isinstance(exc, koji.AuthError) or manager is None:
                        # The session is gone (the client renews only expired ones): log
                        # in again. A hub that is away keeps our session: just retry.
                        if manager is not None:
                            manager.session._forget()  # no logout of a dead session
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

    bridge: Bridge
    rounds: int = 0
    failed_rounds: int = 0
    last_error: str = ""
    connected: trio.Event = attrs.field(factory=trio.Event)
    _round: trio.Event = attrs.field(factory=trio.Event, init=False)

    def _ended_round(self) -> None:
        self._round.set()
        self._round = trio.Event()

    async def wait_rounds(self, count: int) -> None:
        """Return after ``count`` more rounds with the hub, answered or failed."""
        for _ in range(count):
            await self._round.wait()

    def statistics(self) -> KojiHostStatistics:
        return KojiHostStatistics(self.rounds, self.failed_rounds, self.bridge.taken,
                                  len(self.bridge.running), self.last_error,
                                  self.bridge.resumed, self.bridge.released,
                                  self.bridge.handed_back)
