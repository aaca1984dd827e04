"""The node daemon: the directory, the job service, the HTTPS API and the pull clients.

:func:`run_node` runs one node from a :class:`~p2pbuild.node.NodeConfig` until it is told
to stop. In order, it:

1. loads the node key, the trust list (which must verify now) and the TLS certificate;
2. opens the state file (``_state.py``): the replay cache, finished results (served again)
   and jobs that were running when the daemon last died (each gets a signed
   ``handed-back`` result, so its dispatcher learns at once);
3. detects the capability (``_detect.py``; config overrides win) and, with the real
   runner, proves that bubblewrap can build here (else it offers no build type);
4. joins the DHT (UDP, ``dht.bind``, ``dht.bootstrap``) and publishes its capability and
   status; the status is republished every ``status_interval_s`` with a short lifetime,
   the capability at half its lifetime; ``seq`` comes from the state file, so it rises
   across restarts;
5. serves the job API (push mode) and/or long-polls each ``[pull]`` dispatcher;
6. calls ``task_status.started(daemon)`` with the :class:`NodeDaemon`.

Stopping: :meth:`NodeDaemon.request_shutdown` (the CLI calls it on SIGTERM or SIGINT) or
cancelling the task. Either way the node publishes a ``draining`` status, takes no new job,
and then gives running builds ``grace_s`` to finish (a cancelled task: no grace) before
handing the rest back (each ends with a signed ``handed-back`` result, which pull clients
still upload), publishes its final status and returns. Cancellation is honoured within
``urgent_timeout`` seconds even if the directory does not answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from .._errors import P2PBuildError
from .._identity import Identity, PublicKey, Role
from .._jobs import Result, ResultState
from .._records import DETECTED_FIELDS, Capability, SignedRecord, Status
from .._trust import TrustList, accept_update, read_trust_list
from ..dht import Directory, node_id_for, open_directory
from ..https import TlsMaterial, load_tls_material
from ._api import NodeApiConfig, serve_node_api
from ._buildroot import BuildrootCache
from ._config import ConfigError, NodeConfig
from ._detect import Detected, HostProbe, apply_overrides, detect
from ._errors import BuildEnvironmentError
from ._executor import Limits
from ._ondemand import OnDemand
from ._pull import PullClient
from ._runner import ExecutorRunner
from ._sandbox import Sandbox
from ._service import JobFilter, JobRunner, JobService
from ._state import NodeState

__all__ = ["NodeDaemon", "executor_limits", "load_trust_file", "run_node"]

_log = logging.getLogger("p2pbuild.node")
# Seconds after start before the first republish (see ``_status_loop``).
_FIRST_REPUBLISH_S = 5.0
_WILDCARDS = ("0.0.0.0", "::", "")


def load_trust_file(path: Path, now: float) -> TrustList:
    """Read, parse and verify the trust list at ``path`` (signed by its threshold, not
    expired). Raises :class:`ConfigError` (unreadable) or the trust list's
    :class:`~p2pbuild.RemoteError`, with the path in the message."""
    trust = read_trust_list(path, error=ConfigError)
    try:
        trust.verify(now)
    except P2PBuildError as exc:
        raise type(exc)(f"trust list {path}: {exc}") from None
    return trust


def _file_stamp(path: Path) -> tuple[int, int, int]:
    """What tells a replaced or rewritten file from the one read before."""
    try:
        info = path.stat()
    except OSError:
        return (0, 0, 0)
    return (info.st_mtime_ns, info.st_size, info.st_ino)


def trust_problem(trust: TrustList, key: PublicKey) -> str | None:
    """Why dispatchers will ignore node ``key`` under ``trust`` (not listed, or listed in
    another role), or None when it is listed as a node."""
    entry = trust.entry(key)
    if entry is None:
        return (f"this node's key {key.fingerprint} is not on trust list v{trust.version}: "
                "dispatchers ignore it until the farm's maintainers add it (send them the "
                "line in node.key.pub and your operator name)")
    if entry.role is not Role.NODE:
        return (f"this node's key {key.fingerprint} is on trust list v{trust.version} as a "
                f"{entry.role.value}, not as a node: dispatchers never send it jobs")
    return None


def _endpoint(config: NodeConfig, port: int) -> str:
    if config.api.endpoint:
        return config.api.endpoint
    host = config.api.bind[0]
    if host in _WILDCARDS:
        raise ConfigError(
            f"{config.source or 'config'}: api.endpoint: required when api.bind listens on "
            f"all addresses ({host or '*'}): dispatchers need a URL to reach this node"
        )
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def _load_milli() -> int:
    try:
        return min(int(os.getloadavg()[0] * 1000), 2**32 - 1)
    except OSError:
        return 0


@attrs.define(eq=False)
class NodeDaemon:
    """A running node; :func:`run_node` hands it to ``task_status.started``.

    ``runner`` replaces the sandboxed executor (tests, benchmarks); ``probe`` the
    capability detection's sources; ``clock`` returns Unix seconds.
    """

    config: NodeConfig
    runner: JobRunner | None = None
    probe: HostProbe | None = None
    clock: Callable[[], float] = time.time
    #: How long a cancelled daemon may spend publishing its draining status.
    urgent_timeout: float = 5.0
    #: How long pull clients get to upload handed-back results at shutdown.
    upload_timeout: float = 10.0
    #: How often the trust list file is looked at for a new version (SIGHUP: at once).
    trust_check_s: float = 30.0

    identity: Identity = attrs.field(init=False)
    trust_list: TrustList = attrs.field(init=False)
    service: JobService = attrs.field(init=False)
    directory: Directory = attrs.field(init=False)
    detected: Detected = attrs.field(init=False)
    tls: TlsMaterial | None = attrs.field(default=None, init=False)
    #: The bound HTTPS port (push mode), else None.
    api_port: int | None = attrs.field(default=None, init=False)
    endpoint: str = attrs.field(default="", init=False)
    capability_record: SignedRecord | None = attrs.field(default=None, init=False)
    status_record: SignedRecord | None = attrs.field(default=None, init=False)
    pull_clients: list[PullClient] = attrs.field(factory=list, init=False)
    #: The standby state of an on-demand node (``[on_demand]``), else None.
    on_demand: OnDemand | None = attrs.field(default=None, init=False)
    _state: NodeState | None = attrs.field(default=None, init=False)
    _started_at: float = attrs.field(default=0.0, init=False)
    _shutdown: trio.Event = attrs.field(factory=trio.Event, init=False)
    _urgent: bool = attrs.field(default=False, init=False)
    _stopped: trio.Event = attrs.field(factory=trio.Event, init=False)
    _trust_stamp: tuple[int, int, int] = attrs.field(default=(0, 0, 0), init=False)
    _starts: int = attrs.field(default=0, init=False)

    @property
    def public_key(self) -> PublicKey:
        return self.identity.public_key

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown.is_set()

    def request_shutdown(self, *, urgent: bool = False) -> None:
        """Start the shutdown described in the module doc; ``urgent`` skips the grace
        period (running jobs are handed back at once). Calling it again with ``urgent``
        hurries a graceful shutdown along."""
        self._urgent = self._urgent or urgent
        if urgent:
            self.service.hand_back()
        self._shutdown.set()

    async def wait_stopped(self) -> None:
        """Return once the daemon has shut down."""
        await self._stopped.wait()

    # -- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[NodeDaemon]) -> None:
        """See :func:`run_node`."""
        body_scope = trio.CancelScope(shield=True)
        done = trio.Event()

        async def body(task_status: trio.TaskStatus[NodeDaemon]) -> None:
            try:
                # Shielded: an outer cancellation becomes an urgent shutdown (below), so
                # the draining status can still be published through the directory.
                with body_scope:
                    await self._main(task_status)
            finally:
                done.set()
                self._stopped.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(body)
            task_status.started(self)
            try:
                await done.wait()
            except trio.Cancelled:
                if not done.is_set():
                    self.request_shutdown(urgent=True)
                    with trio.CancelScope(shield=True):
                        with trio.move_on_after(self.urgent_timeout):
                            await done.wait()
                        body_scope.cancel()
                raise

    async def _main(self, task_status: trio.TaskStatus[NodeDaemon]) -> None:
        config = self.config
        now = self.clock()
        self.identity = Identity.load(config.key_file)
        self._trust_stamp = _file_stamp(config.trust_list)
        self.trust_list = load_trust_file(config.trust_list, now)
        problem = trust_problem(self.trust_list, self.identity.public_key)
        if problem is not None:
            _log.warning("%s", problem)
        if config.api.enabled:
            self.tls = load_tls_material(config.tls_dir)
        self._started_at = now
        with NodeState.open(config.state_file) as state:
            self._state = state
            starts = state.started(now)
            config.work_dir.mkdir(parents=True, exist_ok=True)
            detected = apply_overrides(detect(config.work_dir, self.probe), config.capability)
            runner = self.runner
            if runner is None:
                detected = await self._check_sandbox(detected)
                buildroots = None
                if "rpm.dnf" in detected.build_types:
                    buildroots = BuildrootCache(
                        config.data_dir / "buildroots",
                        max_bytes=config.limits.buildroot_cache_mb * 1024 * 1024,
                    )
                runner = ExecutorRunner(self._limits(), buildroots=buildroots)
            self.detected = detected
            self.service = JobService(
                self.identity,
                self.trust_list,
                runner,
                config.work_dir,
                slots=config.limits.slots,
                replay=state.load_replay(now),
                clock=self.clock,
                max_log_bytes=config.limits.max_output_mb * 1024 * 1024,
                max_finished=config.max_finished,
                result_keep_s=config.keep_s,
                job_filter=JobFilter(
                    arches={detected.arch},
                    oses={detected.os},
                    build_types=set(detected.build_types),
                    max_source_bytes=config.limits.max_source_mb * 1024 * 1024,
                ),
                store=state,
            )
            self._restore(state)
            host, port = config.dht.bind
            async with open_directory(
                host,
                port,
                bootstrap=config.dht.bootstrap,
                node_id=node_id_for(self.identity.public_key),
            ) as directory:
                self.directory = directory
                self._warn_alone()
                async with trio.open_nursery() as nursery:
                    await self._start_services(nursery)
                    await self._publish(capability=True)
                    nursery.start_soon(self._status_loop)
                    nursery.start_soon(self._maintenance_loop)
                    nursery.start_soon(self._trust_watch_loop)
                    for client in self.pull_clients:
                        await nursery.start(client.run)
                    self._starts = starts
                    self._write_run_file()
                    _log.info(
                        "node %s running: %s, %s/%s, %s, build types %s, DHT %s",
                        self.public_key.fingerprint,
                        self.endpoint or "pull only",
                        detected.arch,
                        detected.os,
                        detected.machine.value,
                        ",".join(detected.build_types) or "none",
                        directory.address,
                    )
                    task_status.started(self)
                    await self._shutdown.wait()
                    await self._drain()
                    nursery.cancel_scope.cancel()
            self.config.run_file.unlink(missing_ok=True)
        _log.info("node %s stopped", self.public_key.fingerprint)

    def _warn_alone(self) -> bool:
        """Say so when no DHT node answered: the node publishes into nothing and no
        dispatcher can find it. True when alone."""
        bootstrap = self.config.dht.bootstrap
        if not bootstrap or self.directory.statistics().contacts > 0:
            return False
        _log.warning(
            "no DHT bootstrap node answered (%s): this node is not in the directory and no "
            "dispatcher can find it; retrying every %gs (check [dht] bootstrap and that UDP "
            "reaches it)", ", ".join(f"{h}:{p}" for h, p in bootstrap),
            self.config.status_interval_s,
        )
        return True

    def reload_trust_list(self) -> bool:
        """Read the trust list file again and adopt it if it is the list in use or the valid
        next version (signed by the threshold of the current one). Returns True when a new
        version was adopted. Never raises: a list that is refused is logged and the current
        one kept."""
        path = self.config.trust_list
        self._trust_stamp = _file_stamp(path)
        now = self.clock()
        try:
            offered = load_trust_file(path, now)
            adopted = accept_update(self.trust_list, offered, now)
        except P2PBuildError as exc:
            _log.warning("trust list %s not adopted; keeping v%d: %s", path,
                         self.trust_list.version, exc)
            return False
        if adopted is self.trust_list:
            return False
        previous = self.trust_list.version
        self.trust_list = adopted
        self.service.trust_list = adopted
        _log.info("trust list v%d adopted (was v%d)", adopted.version, previous)
        problem = trust_problem(adopted, self.public_key)
        if problem is not None:
            _log.warning("%s", problem)
        self._write_run_file()
        return True

    async def _trust_watch_loop(self) -> None:
        while True:
            await trio.sleep(self.trust_check_s)
            if _file_stamp(self.config.trust_list) != self._trust_stamp:
                self.reload_trust_list()

    def _limits(self) -> Limits:
        return executor_limits(self.config)

    async def _check_sandbox(self, detected: Detected) -> Detected:
        if not detected.build_types:
            return detected
        probe = self.config.work_dir / f".sandbox-probe-{os.getpid()}"
        shutil.rmtree(probe, ignore_errors=True)
        probe.mkdir()
        try:
            await Sandbox().check(probe)
        except BuildEnvironmentError as exc:
            _log.warning("this machine cannot run sandboxed builds; offering none: %s", exc)
            return attrs.evolve(detected, build_types=())
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        return detected

    def _restore(self, state: NodeState) -> None:
        """Serve finished results again; sign ``handed-back`` for interrupted jobs; remove
        work directories nobody remembers."""
        now_ms = int(self.clock() * 1000)
        known = set()
        for stored in state.jobs():
            result = stored.result
            files = stored.files
            finished_ms = stored.finished_ms or now_ms
            if result is None:
                result = Result.create(
                    self.identity,
                    stored.job,
                    state=ResultState.HANDED_BACK,
                    exit_code=None,
                    started_ms=stored.accepted_ms,
                    ended_ms=max(stored.accepted_ms, now_ms),
                    environment={},
                    artifacts=(),
                    logs=(),
                )
                files = {}
                shutil.rmtree(stored.workdir / "build", ignore_errors=True)
                state.finished(stored.job, result, files, finished_ms)
                _log.info("job %s was interrupted: handed back", stored.job.id_hex)
            self.service.restore(
                stored.job,
                result,
                files,
                accepted_ms=stored.accepted_ms,
                finished_ms=finished_ms,
                workdir=stored.workdir,
            )
            known.add(stored.workdir.name)
        for child in self.config.work_dir.iterdir():
            if child.is_dir() and child.name not in known:
                shutil.rmtree(child, ignore_errors=True)

    async def _start_services(self, nursery: trio.Nursery) -> None:
        config = self.config
        if config.on_demand is not None:
            self.on_demand = OnDemand(
                config.on_demand, self.identity.public_key, self.trust_list, self.clock,
                # The capability too: a machine stopped in standby cannot republish, and
                # the directory keeps its records only until they expire.
                on_change=lambda: self._publish(capability=True),
            )
        if config.api.enabled:
            assert self.tls is not None
            host, port = config.api.bind
            api = NodeApiConfig(
                tls=self.tls, host=host or "0.0.0.0", port=port,
                keep_alive_timeout=config.api.keep_alive_timeout_s,
                max_connections=config.api.max_connections,
                max_connections_per_address=config.api.max_connections_per_address,
            )
            self.api_port = await nursery.start(
                lambda task_status: serve_node_api(
                    api, self.service, on_demand=self.on_demand, task_status=task_status
                )
            )
            self.endpoint = _endpoint(config, self.api_port)
        else:
            await nursery.start(self.service.run)
            if self.on_demand is not None:
                await nursery.start(self.on_demand.run, self.service.activity)
        self.pull_clients = [
            PullClient(
                dispatcher,
                self.identity,
                self.service,
                poll_timeout=config.pull.poll_timeout_s,
                heartbeat_s=config.pull.heartbeat_s,
                clock=self.clock,
            )
            for dispatcher in config.pull.dispatchers
        ]

    # -- records ------------------------------------------------------------------------------

    def _capability(self) -> Capability:
        detected = self.detected
        disk_mb = detected.disk_mb
        if self.config.capability.disk_mb is None:
            with contextlib.suppress(OSError):
                disk_mb = min(shutil.disk_usage(self.config.work_dir).free >> 20, 2**32 - 1)
        detected_fields = {name: getattr(detected, name) for name in DETECTED_FIELDS}
        return Capability(
            **{**detected_fields, "disk_mb": disk_mb},
            pools=self.config.pools,
            endpoint=self.endpoint,
            tls_sha256=self.tls.sha256 if self.tls is not None and self.endpoint else b"",
            **self._wake_fields(),
        )

    def _wake_fields(self) -> dict[str, Any]:
        """An on-demand node's wake-up in its capability: its declared wake time, and where
        dispatchers send wake requests (by default its own ``/v1/wake``; a pull node's
        long-poll needs none)."""
        on_demand = self.config.on_demand
        if on_demand is None:
            return {}
        url = on_demand.wake_url or (f"{self.endpoint}/v1/wake" if self.endpoint else "")
        return {"wake_s": on_demand.wake_s, "wake_url": url}

    def _status(self) -> Status:
        stats = self.service.statistics()
        return Status(
            load_milli=_load_milli(),
            slots_total=stats.slots,
            slots_free=self.service.free_slots,
            running=stats.running,
            uptime_s=max(0, int(self.clock() - self._started_at)),
            draining=stats.draining,
            standby=self.on_demand is not None and self.on_demand.standby,
        )

    def _sign(self, body: Capability | Status, lifetime: int) -> SignedRecord:
        assert self._state is not None
        now = self.clock()
        seq = self._state.next_seq(now)
        return SignedRecord.create(
            self.identity, body, seq=seq, issued_at=int(now), lifetime=lifetime
        )

    async def _publish(self, *, capability: bool = False) -> None:
        """Sign and publish a fresh status (and capability); acknowledgements are logged,
        not required: a node alone in the DHT still serves its API."""
        records = []
        if capability:
            self.capability_record = self._sign(
                self._capability(), self.config.capability_lifetime_s
            )
            records.append(self.capability_record)
        self.status_record = self._sign(self._status(), self.config.status_lifetime_s)
        records.append(self.status_record)
        acks = await self.directory.publish(records)
        _log.debug("published %d record(s), %d ack(s)", len(records), sum(acks.values()))

    async def _status_loop(self) -> None:
        config = self.config
        next_capability = self.clock() + config.capability_lifetime_s / 2
        # The first publish happens while the routing table holds little more than the
        # seeds, so the facet keys' closest nodes may not have been known yet (nodes that
        # start together all have this problem). Publish again soon, and again whenever the
        # node has learned of more contacts than it knew at its last capability publish.
        published_with = self.directory.statistics().contacts
        delay = min(config.status_interval_s, _FIRST_REPUBLISH_S)
        while True:
            await trio.sleep(delay)
            delay = config.status_interval_s
            if config.dht.bootstrap and self.directory.statistics().contacts == 0:
                # Nobody answered at start (or everybody left): try the seeds again.
                await self.directory.bootstrap(config.dht.bootstrap)
                self._warn_alone()
            contacts = self.directory.statistics().contacts
            refresh = self.clock() >= next_capability or contacts > published_with
            if refresh:
                next_capability = self.clock() + config.capability_lifetime_s / 2
                published_with = contacts
            await self._publish(capability=refresh)
            self._write_run_file()

    async def _maintenance_loop(self) -> None:
        assert self._state is not None
        interval = min(60.0, float(self.config.keep_s))
        while True:
            await trio.sleep(interval)
            expired = self.service.expire_finished()
            if expired:
                _log.info("forgot %d expired result(s)", expired)
            self._state.prune(self.clock())

    async def _drain(self) -> None:
        """The shutdown sequence of the module doc."""
        self.service.drain()
        for client in self.pull_clients:
            client.stop_polling()
        running = len(self.service.running_jobs())
        _log.info(
            "draining: %d running job(s), %s", running,
            "handing back at once" if self._urgent else f"grace {self.config.grace_s:g}s",
        )  # fmt: skip
        with trio.move_on_after(self.urgent_timeout):
            await self._publish()
        if not self._urgent:
            with trio.move_on_after(self.config.grace_s):
                await self.service.wait_idle()
        handed_back = self.service.hand_back()
        if handed_back:
            _log.info("handed back %d job(s)", handed_back)
        await self.service.wait_idle()
        with trio.move_on_after(self.upload_timeout):
            for client in self.pull_clients:
                await client.wait_uploads()
        with trio.move_on_after(self.urgent_timeout):
            await self._publish()

    def _write_run_file(self) -> None:
        """The run file ``node status`` reads: how to reach the daemon, and the state a
        volunteer needs to see (trust list in use, whether it is listed, DHT contacts)."""
        problem = trust_problem(self.trust_list, self.public_key)
        info = {
            "pid": os.getpid(),
            "node": str(self.public_key),
            "api_port": self.api_port,
            "endpoint": self.endpoint,
            "tls_sha256": self.tls.sha256.hex() if self.tls is not None else None,
            "dht": list(self.directory.address),
            "starts": self._starts,
            "started_at": int(self._started_at),
            "trust_version": self.trust_list.version,
            "trust_expires_at": self.trust_list.expires_at,
            "trusted": problem is None,
            "trust_problem": problem,
            "dht_contacts": self.directory.statistics().contacts,
            "dht_bootstrap": [f"{h}:{p}" for h, p in self.config.dht.bootstrap],
            "updated_at": int(self.clock()),
        }
        path = self.config.run_file
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(info) + "\n")
        os.replace(tmp, path)


async def run_node(
    config: NodeConfig,
    *,
    runner: JobRunner | None = None,
    probe: HostProbe | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[NodeDaemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the node daemon until shut down (see the module doc); use with
    ``daemon = await nursery.start(run_node, config)``.

    Raises, before ``started``: :class:`~p2pbuild.KeyFileError` (node key),
    :class:`ConfigError` (unreadable trust list, missing endpoint),
    :class:`~p2pbuild.TrustError` and other :class:`~p2pbuild.RemoteError` (a trust list
    that does not verify), :class:`~p2pbuild.LocalError` (TLS material, state file) and
    :class:`OSError` (an address that cannot be bound). After ``started`` nothing a peer
    sends ends it; a broken disk (``OSError``, ``sqlite3.Error``) does.
    """
    daemon = NodeDaemon(config, runner=runner, probe=probe, clock=clock)
    await daemon.run(task_status=task_status)


def executor_limits(config: NodeConfig) -> Limits:
    """The sandboxed executor's bounds from the config's ``[limits]``."""
    limits = config.limits
    return Limits(
        time_limit=float(limits.time_limit_s),
        max_output_bytes=limits.max_output_mb * 1024 * 1024,
        max_disk_bytes=limits.max_disk_mb * 1024 * 1024,
        max_source_bytes=limits.max_source_mb * 1024 * 1024,
    )
