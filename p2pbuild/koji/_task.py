"""The ``build`` task handler: an uploaded SRPM built on P2P nodes, verified, imported
into Koji as a content generator (``CGInitBuild``, uploads, ``CGImport``, ``tagBuild``).

One handler runs a fresh task and one taken up again after a restart: it first reads the
task's row (:class:`~._store.TaskStore`) and goes on from the phase an earlier attempt
recorded (``_host`` module doc).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import koji
import koji.tasks

from ..dispatcher import BuildState, BuildStatus
from ._bridge import Bridge, P2POutcome
from ._cg import OutputFile, build_metadata, node_files, node_proof
from ._config import KojiConfig
from ._resume import (
    BUILDING,
    CANCELED,
    COMPLETE,
    FAILED,
    HUB_ERRORS,
    TaskCancelled,
    hub_build_state,
    outcome_error,
    outcome_of,
    recover_lost_reservation,
    refund,
)
from ._rpm import RpmHeader, RpmHeaderError, read_rpm_header
from ._store import TaskPhase, TaskRow

__all__ = ["P2PBuildTask"]

_log = logging.getLogger("p2pbuild.koji")


class P2PBuildTask(koji.tasks.BaseTaskHandler):  # type: ignore[misc]
    """The ``build`` method: an SRPM built on P2P nodes, imported as a content generator.

    The same handler runs a fresh task and one taken up again after a restart: the task's
    row (:class:`~._store.TaskStore`) says how far an earlier attempt got."""

    Methods: ClassVar[list[str]] = ["build"]
    #: The host only waits on the nodes.
    _taskWeight = 0.2

    def handler(self, src: str, target: str, opts: dict[str, Any] | None = None) -> Any:
        opts = opts or {}
        bridge: Bridge = self.options.bridge
        session = self.session
        if opts.get("scratch"):
            raise koji.BuildError("scratch builds are not supported by the p2p build host")
        if "://" in src:
            raise koji.BuildError(
                f"the p2p build host builds uploaded SRPMs, not SCM sources: {src}"
            )
        target_info = session.getBuildTarget(target, strict=True)
        row = bridge.call(bridge.store.get, self.id)
        if row is not None and row.phase is TaskPhase.DONE:
            row = None  # an earlier attempt ended; this one starts afresh
        if row is None:
            # kojid's BuildTask.handler asks the hub's policies here, before any work (an
            # attempt taken up again was granted them when it began).
            self._assert_policies(src, target_info, opts)
        if row is not None:
            _log.info("koji task %d: resuming (%s)", self.id, row.phase.value)
            bridge.call(bridge.store.note, self.id, time.time(), "resumed",
                        phase=row.phase.value)
            if row.phase is TaskPhase.IMPORTED:
                return self._finish(row, target_info, opts, resumed=True)
            if row.phase is TaskPhase.REFUNDED:
                raise outcome_error(row.outcome_map)
        srpm = self._source(src, row)
        try:
            header = read_rpm_header(srpm)
        except RpmHeaderError as exc:
            raise koji.BuildError(str(exc)) from None
        if not header.is_source:
            raise koji.BuildError(f"{srpm.name} is not a source RPM")
        resumed = row is not None
        if row is None:
            # kojid checks the destination tag's package list before it reserves the NVR.
            self._check_package_list(header.name, target_info, opts)
            row = self._begin(srpm, header)
        elif row.nvr != header.nvr:
            raise koji.BuildError(f"task {self.id} builds {header.nvr}, not {row.nvr}")
        if row.phase in (TaskPhase.RESERVING, TaskPhase.RELEASED):
            row = self._reserve(row, recover=row.phase is TaskPhase.RESERVING and resumed)
        elif resumed:
            assert row.build_id is not None
            state = hub_build_state(session, row.build_id)
            if state == COMPLETE:
                row = bridge.call(bridge.store.imported, self.id, time.time())
                return self._finish(row, target_info, opts, resumed=True)
            if state != BUILDING:
                # Cancelled in Koji (``koji cancel <nvr>``) while we were away.
                bridge.call(bridge.cancel_p2p, row.p2p_build_id)
                name = "unknown" if state is None else koji.BUILD_STATES[state]
                error = koji.BuildError(f"build {row.nvr} (id {row.build_id}) is no longer "
                                        f"reserved in Koji (state {name})")
                bridge.call(bridge.store.refunded, self.id, outcome_of(error), time.time())
                raise error
        try:
            outcome = bridge.run_p2p_build(self.id, srpm, adopt=resumed,
                                           repo=self._tag_repo(target_info))
            build = outcome.build
            if build.state is BuildState.CANCELLED:
                raise TaskCancelled(f"task {self.id} was cancelled; p2p build {build.id} "
                                    "cancelled on the nodes")
            if outcome.no_node:
                raise koji.tasks.RefuseTask(f"no capable p2p node: {build.reason}")
            if build.state is not BuildState.VERIFIED:
                raise koji.BuildError(self._failure_message(build))
        except Exception as exc:
            # Any failure (also a bug) gives the reservation back before it propagates;
            # trio.Cancelled (the host stops) does not: the next start goes on from here.
            self._give_up(row, exc)
            raise
        try:
            self._import(src, header, srpm, build, outcome, row)
        except Exception as exc:
            # The hub may have imported it all the same (an answer lost on the way, an
            # earlier attempt's import): then it is done, and must not be refunded.
            assert row.build_id is not None
            try:
                imported = hub_build_state(session, row.build_id) == COMPLETE
            except HUB_ERRORS:
                imported = False
            if not imported:
                self._give_up(row, exc)
                raise
            _log.warning("koji task %d: import reported %s, but build %d is imported",
                         self.id, exc, row.build_id)
        row = bridge.call(bridge.store.imported, self.id, time.time())
        return self._finish(row, target_info, opts, resumed=resumed)

    def _assert_policies(self, src: str, target_info: dict[str, Any],
                         opts: dict[str, Any]) -> None:
        """``host.assertPolicy`` for what kojid asks for a ``build`` task of an SRPM, with
        kojid's policy data (``builder/kojid``, ``BuildTask.handler``): ``build_from_srpm``,
        ``build_from_repo_id`` when the task names a repo, ``build_rpm``. A denial is the
        hub's ``ActionNotAllowed``, which fails the task with the hub's message."""
        task = self.session.getTaskInfo(self.id)
        data: dict[str, Any] = {
            "user_id": task["owner"], "source": src, "task_id": self.id,
            "build_tag": target_info["build_tag"], "skip_tag": bool(opts.get("skip_tag")),
            "scratch": opts.get("scratch"), "draft": opts.get("draft"), "from_scm": False,
            "repo_id": opts.get("repo_id"), "target": target_info["name"],
        }
        if not opts.get("skip_tag"):
            data["tag"] = target_info["dest_tag"]
        self.session.host.assertPolicy("build_from_srpm", data)
        if opts.get("repo_id") is not None:
            self.session.host.assertPolicy("build_from_repo_id", data)
        self.session.host.assertPolicy("build_rpm", data)

    def _dest_tag(self, target_info: dict[str, Any], opts: dict[str, Any]) -> str | None:
        """The tag the build goes into, or None (``--skip-tag``, ``dest_tag = ""``)."""
        if opts.get("skip_tag"):
            return None
        config: KojiConfig = self.options.bridge.config
        dest = target_info["dest_tag_name"] if config.dest_tag == "target" else config.dest_tag
        return str(dest) or None

    def _check_package_list(self, name: str, target_info: dict[str, Any],
                            opts: dict[str, Any]) -> None:
        """kojid's check (``BuildTask.handler``): the package must be on the destination
        tag's list and not blocked, else the task fails before anything is reserved."""
        dest = self._dest_tag(target_info, opts)
        if dest is None:
            return
        listed = self.session.getPackageConfig(dest, name)
        if listed is None:
            raise koji.BuildError(f"package {name} not in list for tag {dest}")
        if listed.get("blocked"):
            raise koji.BuildError(f"package {name} is blocked for tag {dest}")

    def _tag_repo(self, target_info: dict[str, Any]) -> tuple[str, str] | None:
        """The build tag's current repository (``getRepo``): its tag name and the URL of
        its directory for the build arch under the hub's ``topurl``; None when the tag has
        no repository (the build then runs without a buildroot)."""
        config: KojiConfig = self.options.bridge.config
        tag = target_info["build_tag_name"]
        repo = self.session.getRepo(target_info["build_tag"])
        if not repo:
            _log.warning("koji task %d: build tag %s has no repository; building without "
                         "a buildroot", self.id, tag)
            return None
        arch = config.arch or "x86_64"
        return tag, f"{config.topurl}/repos/{tag}/{repo['id']}/{arch}/"

    def _begin(self, srpm: Path, header: RpmHeader) -> TaskRow:
        bridge: Bridge = self.options.bridge
        task = self.session.getTaskInfo(self.id)
        owner = self.session.getUser(task["owner"]) if task else None
        name = owner["name"] if owner else ""
        now = time.time()
        return bridge.call(
            bridge.store.begin, self.id, now=now, started=int(now), name=header.name,
            version=header.version, release=header.release, epoch=header.epoch,
            source_name=srpm.name, source_sha256=_sha256(srpm), owner=name,
            user=f"koji:{name or 'unknown'}",
        )

    def _reserve(self, row: TaskRow, *, recover: bool) -> TaskRow:
        """Reserve the NVR (``CGInitBuild``), first dropping what an earlier attempt left:
        a dead P2P build, a reservation whose token was lost (``recover``)."""
        bridge: Bridge = self.options.bridge
        config = bridge.config
        if row.phase is TaskPhase.RELEASED:
            if row.p2p_build_id is not None and not bridge.call(bridge.p2p_live,
                                                                row.p2p_build_id):
                bridge.call(bridge.store.linked, self.id, None, time.time(), how="dropped")
            row = bridge.call(bridge.store.reserving, self.id, time.time())
        if recover:
            cancelled = recover_lost_reservation(
                self.session, config.content_generator, config.host, row,
                lambda build_id: bridge.call(bridge.store.holder_of, build_id))
            if cancelled is not None:
                bridge.call(bridge.store.note, self.id, time.time(),
                            "lost-reservation-cancelled", build_id=cancelled)
        # Without task_id: a reservation tied to the task can only be cancelled with the
        # task (cancelBuild cancels both), which would make a lost token fatal to the task.
        # The import sets the build's task (metadata build.task_id).
        data: dict[str, Any] = {"name": row.name, "version": row.version,
                                "release": row.release}
        if row.epoch is not None:
            data["epoch"] = row.epoch
        reserved = self.session.CGInitBuild(config.content_generator, data)
        return bridge.call(bridge.store.reserved, self.id, int(reserved["build_id"]),
                           str(reserved["token"]), time.time())

    def _give_up(self, row: TaskRow, exc: Exception) -> None:
        """Refund the reservation for ``exc``; record the outcome once the hub confirms."""
        bridge: Bridge = self.options.bridge
        cancel = isinstance(exc, TaskCancelled | koji.tasks.RefuseTask)
        state = CANCELED if cancel else FAILED
        if refund(self.session, bridge.config.content_generator, row, state):
            # The refunded build shows the host as its owner and no task (CGInitBuild sets
            # the owner to the caller; CGRefundBuild takes no owner or task): the task's
            # message names it, so the user can find it.
            if isinstance(exc, koji.GenericError) and not cancel and exc.args:
                exc.args = (f"{exc.args[0]}\n(Koji build {row.nvr}, id {row.build_id}, "
                            f"reserved for this task, refunded as "
                            f"{koji.BUILD_STATES[state]})", *exc.args[1:])
            bridge.call(bridge.store.refunded, self.id, outcome_of(exc), time.time())

    def _finish(self, row: TaskRow, target_info: dict[str, Any], opts: dict[str, Any], *,
                resumed: bool) -> dict[str, Any]:
        """Tag the imported build (unless ``--skip-tag``, or it is tagged already) and give
        the task's result."""
        assert row.build_id is not None
        dest = self._dest_tag(target_info, opts)
        if dest is not None and not (resumed and any(
                b.get("build_id") == row.build_id
                for b in self.session.listTagged(dest, package=row.name))):
            self.session.host.tagBuild(self.id, dest, row.build_id)
        return {"koji_builds": [row.build_id]}

    def _source(self, src: str, row: TaskRow | None) -> Path:
        """The task's SRPM in the work directory: from the build service's sources when an
        earlier attempt put it there, else downloaded from the hub."""
        bridge: Bridge = self.options.bridge
        name = src.rsplit("/", 1)[-1]
        if not name.endswith(".src.rpm"):
            raise koji.BuildError(f"not an SRPM: {src}")
        dest = Path(self.workdir) / name
        kept = None if row is None else bridge.call(bridge.service.source, row.source_sha256)
        if kept is not None:
            shutil.copyfile(kept, dest)
            return dest
        # koji.downloadFile without a path: openRemoteFile would also check the file with
        # the rpm Python bindings (not on PyPI) and warn on every task that it cannot; the
        # header is read with the rpm command below instead.
        with dest.open("wb") as out:
            koji.downloadFile(f"{bridge.config.topurl}/work/{src}", fo=out)
        return dest

    def _failure_message(self, build: BuildStatus) -> str:
        if build.report:
            # The replicas disagreed: that is the news, whatever ended the tie-breaks.
            lines = [f"p2p build {build.id} failed: the replicas disagreed "
                     f"(nothing imported); {build.reason}", "", build.report.rstrip()]
        else:
            lines = [f"p2p build {build.id} failed: {build.reason}"]
        self._upload_report(build)
        return "\n".join(lines)

    def _upload_report(self, build: BuildStatus) -> None:
        if not build.report:
            return
        path = Path(self.workdir) / "p2pbuild-mismatch.txt"
        path.write_text(build.report)
        try:
            self.session.uploadWrapper(str(path), koji.pathinfo.taskrelpath(self.id))
        except HUB_ERRORS as exc:
            _log.warning("koji task %d: report upload failed: %s", self.id, exc)

    def _import(self, src: str, header: RpmHeader, srpm: Path, build: BuildStatus,
                outcome: P2POutcome, row: TaskRow) -> None:
        bridge: Bridge = self.options.bridge
        config: KojiConfig = bridge.config
        stored = outcome.stored
        assert stored is not None
        # A fresh directory per attempt: what an interrupted attempt uploaded is not reused.
        upload_dir = f"p2p-cg/{time.time():.6f}.{secrets.token_hex(4)}"
        packages: list[OutputFile] = []
        names = set()
        for item in stored.artifacts:
            path = stored.artifact_path(item.name)
            filename = item.name.rsplit("/", 1)[-1]
            if not filename.endswith(".rpm"):
                _log.info("koji task %d: %s is not an RPM; not imported", self.id, item.name)
                continue
            if filename in names:
                raise koji.BuildError(f"two artifacts are named {filename}")
            names.add(filename)
            try:
                rpm_header = read_rpm_header(path)
            except RpmHeaderError as exc:
                raise koji.BuildError(str(exc)) from None
            packages.append(OutputFile(filename, item.size, item.sha256, "rpm",
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
        for proof in stored.verified_by:
            node = node_proof(stored, proof)
            for upload, path in zip(node.files, node_files(stored, proof), strict=True):
                self.session.uploadWrapper(str(path), f"{upload_dir}/{upload.relpath}",
                                           name=upload.filename)
            proofs.append(node)
        metadata = build_metadata(
            name=header.name, version=header.version, release=header.release,
            epoch=header.epoch, source=src, start_time=row.started, end_time=int(time.time()),
            content_generator=config.content_generator, packages=packages, nodes=proofs,
            extra={"p2pbuild": {
                "build_id": build.id,
                "dispatcher": bridge.service.dispatcher_key,
                "verified_by": [{"node": p.node, "operator": p.operator} for p in proofs],
                "reproducible": True,
                "mismatch_report": build.report or None,
                "trust_list_version": stored.trust_list_version,
            }},
            build_id=row.build_id, task_id=self.id, owner=row.owner or None,
        )
        meta_path = Path(self.workdir) / "metadata.json"
        meta_path.write_text(json.dumps(metadata, indent=2, sort_keys=True))
        self.session.uploadWrapper(str(meta_path), upload_dir, name="metadata.json")
        self.session.CGImport("metadata.json", upload_dir, token=row.token)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
