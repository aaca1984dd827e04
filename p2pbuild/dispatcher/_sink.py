"""The embedded default sink: verified builds in a local repository directory.

Layout of one stored build (``<nvr>`` from the source file name, e.g. ``hello-1.0-1``)::

    <repo>/<nvr>/
        artifacts/<artifact name>        the verified files (names as in the results)
        proof/<n>-<node fingerprint>.job     the signed job each verifying node ran
        proof/<n>-<node fingerprint>.result  its signed result (the two that agreed)
        logs/<n>-<node fingerprint>/<log name>  its signed logs that reached us
        manifest.json                    a StoredBuild (``_stored``): build id, source,
                                         artifacts with SHA-256, nodes and their logs

Atomic: everything is written into a private ``<repo>/.incoming-<build id>-<random>/``, each
artifact re-hashed against the signed digest, then every file and directory fsynced, the
repository directory with them (all at once: concurrent fsyncs share one journal commit), then
the directory is renamed into place. A failed store removes its staging directory; a crash
leaves at most an ``.incoming-*`` directory, never a half build under a visible name. If the
build was already stored (a crash between the rename and the database update, or a store of
the same build racing in a worker thread of a dispatcher that was stopped),
:meth:`RepositorySink.store` returns the existing path. Another build of the same NVR goes
to ``<nvr>+<build id prefix>``.

Two journal commits, not three, before a build is verified: the rename reaches the disk with
:meth:`RepositorySink.settle`, which the engine calls within a second after the database says
"verified" (one call for every build verified meanwhile), off the build's critical path. A
power cut in between can undo the rename but not the staging directory, whose every byte and
whose name were on disk before; :meth:`RepositorySink.mend`, at the engine's start, renames
it again to the path the database holds (the same order as a journaling file system: the
data first, then the commit record, the rest replayed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import trio

from .._jobs import Job, Result
from .._trust import TrustList
from ._errors import SinkError
from ._stored import StoredBuild, StoredFile, StoredProof

__all__ = ["ProofItem", "RepositorySink", "Settler", "nvr_of"]

_log = logging.getLogger("p2pbuild.dispatcher.sink")

_SUFFIXES = (".src.rpm", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".tar", ".rpm")
_SAFE = re.compile(r"[^A-Za-z0-9._+~^-]")


def nvr_of(source_name: str) -> str:
    """The directory name for a source file: ``hello-1.0-1.src.rpm`` gives ``hello-1.0-1``."""
    name = source_name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = _SAFE.sub("_", name).lstrip(".") or "build"
    return name[:200]


@attrs.frozen
class ProofItem:
    """One verifying node's signed job and result, and where its artifacts are locally
    (and its logs, those the engine could fetch: a log missing there is left out)."""

    job: Job
    result: Result
    operator: str
    artifact_dir: Path
    log_dir: Path | None = None


def _copy_verified(src: Path, dest: Path, size: int, sha256: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    total = 0
    try:
        with src.open("rb") as fin, dest.open("xb") as fout:
            while chunk := fin.read(1024 * 1024):
                digest.update(chunk)
                total += len(chunk)
                fout.write(chunk)
    except OSError as exc:
        raise SinkError(f"cannot copy {src} to the repository: {exc}") from None
    if total != size or digest.digest() != sha256:
        raise SinkError(f"{src} no longer matches its signed digest; not storing it")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("xb") as f:
        f.write(data)


#: The threads that fsync stored builds, made once rather than for every build.
_FSYNC_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="p2pbuild-fsync")


def _fsync_all(paths: Sequence[Path]) -> None:
    """fsync every file, in parallel: the file system commits concurrent fsyncs together
    (one journal commit for all), where one after the other each waits for its own."""
    try:
        for _ in _FSYNC_POOL.map(_fsync_dir, paths):  # raises the first OSError
            pass
    except OSError as exc:
        raise SinkError(f"cannot write the build to disk: {exc}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.frozen
class RepositorySink:
    """Stores verified builds under ``root`` (created if missing)."""

    root: Path

    def _existing(self, build_id: str, nvr: str) -> Path | None:
        for candidate in (self.root / nvr, self.root / f"{nvr}+{build_id[:12]}"):
            if (candidate / "manifest.json").is_file():
                try:
                    if StoredBuild.read(candidate).build_id == build_id:
                        return candidate
                except SinkError:
                    continue
        return None

    def store(
        self,
        build_id: str,
        source_name: str,
        source_sha256: str,
        proof: Sequence[ProofItem],
        *,
        trust_list: TrustList,
        now: float,
        user: str = "",
        arch: str = "",
        os_name: str = "",
        build_type: str = "",
    ) -> Path:
        """Store the artifacts of ``proof[0]`` (identical in every proof item, by
        verification) with every item's signed job and result and a manifest; return the
        build's directory. Idempotent for the same ``build_id``. Every byte is on disk when
        it returns; the directory's name after :meth:`settle` (module doc).

        Blocking file I/O: call through ``trio.to_thread.run_sync``. Raises
        :class:`SinkError` if a file cannot be written or no longer re-hashes.
        """
        if not proof:
            raise SinkError("nothing to store without proof")
        nvr = nvr_of(source_name)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create repository {self.root}: {exc}") from None
        existing = self._existing(build_id, nvr)
        if existing is not None:
            return existing
        # A private staging directory per call: a store still running in a worker thread of
        # a dispatcher that was stopped may race with the restarted dispatcher's store of the
        # same build, and neither may clobber the other's files.
        try:
            incoming = Path(tempfile.mkdtemp(prefix=f".incoming-{build_id[:16]}-", dir=self.root))
        except OSError as exc:
            raise SinkError(f"cannot write in repository {self.root}: {exc}") from None
        try:
            os.chmod(incoming, 0o755)  # mkdtemp makes it 0700; the repository is readable
            first = proof[0]
            for item in first.result.artifacts:
                _copy_verified(
                    first.artifact_dir / item.name, incoming / "artifacts" / item.name,
                    item.size, item.sha256,
                )
            nodes = []
            for index, p in enumerate(proof, start=1):
                stem = f"{index}-{p.result.node.fingerprint.replace(':', '')}"
                _write(incoming / "proof" / f"{stem}.job", p.job.to_bytes())
                _write(incoming / "proof" / f"{stem}.result", p.result.to_bytes())
                logs = []
                for log in p.result.logs:
                    if p.log_dir is None or not (p.log_dir / log.name).is_file():
                        continue
                    _copy_verified(p.log_dir / log.name, incoming / "logs" / stem / log.name,
                                   log.size, log.sha256)
                    logs.append(StoredFile(log.name, log.size, log.sha256.hex()))
                nodes.append(StoredProof(
                    node=str(p.result.node),
                    fingerprint=p.result.node.fingerprint,
                    operator=p.operator,
                    job=f"proof/{stem}.job",
                    result=f"proof/{stem}.result",
                    job_id=p.job.id_hex,
                    environment=p.result.environment_map,
                    duration_ms=p.result.duration_ms,
                    logs=tuple(logs),
                ))
            manifest = StoredBuild(
                build_id=build_id,
                nvr=nvr,
                source_name=source_name,
                source_sha256=source_sha256,
                stored_at=now,
                trust_list_version=trust_list.version,
                artifacts=tuple(
                    StoredFile(a.name, a.size, a.sha256.hex()) for a in first.result.artifacts
                ),
                verified_by=tuple(nodes),
                user=user, arch=arch, os=os_name, build_type=build_type,
            )
            _write(incoming / "manifest.json", manifest.to_bytes())
            # Every file and directory on disk before the rename makes the build visible,
            # and the staging directory's own name (the repository's entry), which
            # :meth:`mend` needs after a power cut: all in one round (one journal commit).
            _fsync_all([self.root, incoming, *sorted(incoming.rglob("*"))])
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        alternate = self.root / f"{nvr}+{build_id[:12]}"
        problem = "it is taken by another build"
        for target in (self.root / nvr, alternate):
            if target.exists():
                # Look again after the slow writes: the same build may have landed meanwhile.
                stored = self._existing(build_id, nvr)
                if stored is not None:
                    shutil.rmtree(incoming, ignore_errors=True)
                    return stored
                if target == alternate:
                    break
                continue  # another build of this NVR holds the name: take the alternate
            try:
                os.rename(incoming, target)
                return target  # on disk with settle(); mend() redoes it after a power cut
            except OSError as exc:
                # The same build stored concurrently (see above) won the rename: success;
                # another build of the same NVR won it: try the alternate name.
                stored = self._existing(build_id, nvr)
                if stored is not None:
                    shutil.rmtree(incoming, ignore_errors=True)
                    return stored
                problem = str(exc)
        shutil.rmtree(incoming, ignore_errors=True)
        raise SinkError(f"cannot move the build into {alternate}: {problem}")

    def settle(self) -> None:
        """Put the names of the builds stored so far on disk (fsync the repository
        directory). Blocking: call through ``trio.to_thread.run_sync``. Raises
        :class:`SinkError`."""
        try:
            _fsync_dir(self.root)
        except OSError as exc:
            raise SinkError(f"cannot write repository {self.root} to disk: {exc}") from None

    def staged(self) -> dict[str, Path]:
        """The staging directories whose store finished writing (a readable manifest), by
        build id: what a crash left behind. Blocking."""
        found: dict[str, Path] = {}
        try:
            candidates = sorted(self.root.glob(".incoming-*"))
        except OSError:
            return found
        for path in candidates:
            try:
                found.setdefault(StoredBuild.read(path).build_id, path)
            except SinkError:
                continue  # interrupted before its manifest: never verified, left as it is
        return found

    def mend(self, staging: Path, target: Path) -> None:
        """Rename ``staging`` to ``target``, a verified build's directory that a power cut
        took back (see the module doc), and put the name on disk. Blocking. Raises
        :class:`SinkError` if ``target`` is not a free name in this repository."""
        if target.parent != self.root or staging.parent != self.root:
            raise SinkError(f"{target} is not a build directory of {self.root}")
        if target.exists():
            raise SinkError(f"{target} exists: nothing to mend")
        try:
            os.rename(staging, target)
            _fsync_dir(self.root)
        except OSError as exc:
            raise SinkError(f"cannot restore {target}: {exc}") from None


@attrs.define(eq=False)
class Settler:
    """Puts the directory names of stored builds on disk (:meth:`RepositorySink.settle`)
    :attr:`delay_s` after their verified state: off their critical path, one fsync for
    every build verified meanwhile, none in the way of the next build's own commits."""

    sink: RepositorySink
    delay_s: float = 1.0
    #: Builds stored whose directory name may not be on disk yet.
    pending: set[str] = attrs.field(factory=set)
    _stored: trio.Event = attrs.field(factory=trio.Event)

    def stored(self, build_id: str) -> None:
        """``build_id`` is stored and marked verified."""
        self.pending.add(build_id)
        self._stored.set()

    async def run(self, errors: Counter[str]) -> None:
        """Settle until cancelled, and once more then; a failure is counted in ``errors``
        (a power cut before the next success is what :meth:`RepositorySink.mend` is for)."""
        try:
            while True:
                await self._stored.wait()
                self._stored = trio.Event()
                await trio.sleep(self.delay_s)
                await self.settle(errors)
        finally:
            with trio.CancelScope(shield=True):
                await self.settle(errors)

    async def settle(self, errors: Counter[str]) -> None:
        if not self.pending:
            return
        self.pending = set()
        try:
            await trio.to_thread.run_sync(self.sink.settle)
        except SinkError as exc:
            errors[exc.code] += 1
            _log.warning("%s", exc)

    async def mend(
        self, verified_path: Callable[[str], Path | None], errors: Counter[str]
    ) -> list[tuple[str, Path]]:
        """Rename again every staging directory of a build that ``verified_path`` says is
        verified at a path that does not exist (a power cut took the rename back before
        :meth:`settle`); returns those mended. A failure is logged and counted."""
        mended = []
        for build_id, staging in (await trio.to_thread.run_sync(self.sink.staged)).items():
            target = verified_path(build_id)
            if target is None or await trio.Path(target).exists():
                continue
            try:
                await trio.to_thread.run_sync(self.sink.mend, staging, target)
            except SinkError as exc:
                errors[exc.code] += 1
                _log.error("build %s: verified but not in the repository: %s", build_id, exc)
                continue
            mended.append((build_id, target))
        return mended
