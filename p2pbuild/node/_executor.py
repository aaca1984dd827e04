"""Build executors: run one job's ``rpm`` or ``make`` build in the sandbox and describe it.

:func:`run_build` is the whole life of one build in a work directory the caller owns:
verify the source's SHA-256 while copying it in, run the build in bubblewrap under the
limits, move the declared artifacts and the log into ``results/``, hash them, and remove
the scratch tree. :class:`Executor` adds what a node needs around it: concurrency slots, a
fresh work directory per job, and removing it when the caller is done with the results.

Work directory layout (``workdir`` on the host, mount point in the sandbox)::

    input/source.src.rpm|source.tar.gz   /input   read-only, the verified copy
    scratch/                             /build   the only writable place; removed at end
    scratch/tmp/                         /tmp     (and /var/tmp)
    results/artifacts/<name>                      artifacts, moved out of scratch/
    results/logs/build.log                        stdout and stderr of the build, capped

The sandbox path is the same on every node (``/build``), so paths that compilers and
rpmbuild embed do not differ between nodes. See docs/build-execution.md.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import platform
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from .._errors import LocalError
from .._jobs import (  # rpm: rpmbuild --rebuild; make: configure, make, check
    BuildrootRecord,
    BuildrootSpec,
    BuildType,
)
from ._archive import extract_tar_gz
from ._buildroot import BuildrootCache, BuildrootStep, PreparedBuildroot
from ._errors import BadBuildSpecError, BadSourceError, BuildEnvironmentError, SourceDigestError
from ._repodata import Dep
from ._sandbox import BUILD_DIR, INPUT_DIR, LogSink, LogWriter, Sandbox, Stop, run_supervised

__all__ = [
    "BUILDHOST",
    "BuildOutcome",
    "BuildSpec",
    "BuildState",
    "BuildType",
    "Executor",
    "ExecutorStatistics",
    "Limits",
    "OutputFile",
    "Timings",
    "MAKE_ARTIFACT_DIR",
    "remove_tree",
    "rpm_macros",
    "run_build",
]

#: The host name rpm records in every package we build (``%_buildhost``).
BUILDHOST = "p2pbuild"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_ARCH = re.compile(r"[A-Za-z0-9_]{1,32}")
_BCOND = re.compile(r"[A-Za-z0-9_]{1,48}")
_NAME_PART = re.compile(r"[A-Za-z0-9._+~@=,-]{1,200}")
_CHUNK = 1 << 20

# The make build: configure if the tree has one, then make and make check. Fixed text
# (the job's code runs only through the tree's configure script and Makefile); $1 is -jN,
# $2 is "check" or "nocheck".
_MAKE_SCRIPT = (
    "set -ex\n"
    "if [ -x ./configure ]; then ./configure; elif [ -f ./configure ]; then sh ./configure; fi\n"
    'make "$1"\n'
    'if [ "$2" = check ]; then make "$1" check; fi\n'
)
#: Where a make build puts its artifacts, relative to the directory it builds in.
MAKE_ARTIFACT_DIR = "out"


class BuildState(enum.StrEnum):
    """How a build ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  #: non-zero exit, or unusable artifacts (see ``reason``)
    TIMED_OUT = "timed-out"
    LIMIT_EXCEEDED = "limit-exceeded"  #: output or disk limit; ``reason`` says which


def _check_sha256(_inst: object, _attr: object, value: str) -> None:
    if not _SHA256.fullmatch(value):
        raise BadBuildSpecError(f"source SHA-256 must be 64 lowercase hex digits: {value!r}")


def _to_names(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(value)))


@attrs.frozen
class BuildSpec:
    """What to build: the type, the source file and its expected SHA-256, and options.

    The options mirror a signed job's (``check``, ``jobs``, ``with``, ``without``):

    * ``with_features``/``without_features`` (rpm): bcond names for ``%bcond_with`` and
      ``%bcond_without``, passed as ``_with_<name>``/``_without_<name>`` macros. This is the
      only way a job reaches rpm macros, so it cannot override the reproducibility ones.
    * ``check``: run ``%check`` (rpm) or ``make check`` (make); default yes.
    * ``jobs``: parallel jobs (``%_smp_mflags``, ``make -j``), 1 to 1024.
    * ``target_arch`` (rpm only): passed as ``rpmbuild --target``.
    * ``source_date_epoch`` overrides the value taken from the source (see
      docs/build-execution.md).
    * ``buildroot`` (rpm only): build in a clean buildroot made from these pinned
      repositories (``_buildroot.py``) instead of on the host as it is.

    Raises :class:`BadBuildSpecError` for anything outside these bounds.
    """

    build_type: BuildType
    source: Path
    source_sha256: str = attrs.field(validator=_check_sha256)
    target_arch: str | None = None
    with_features: tuple[str, ...] = attrs.field(default=(), converter=_to_names)
    without_features: tuple[str, ...] = attrs.field(default=(), converter=_to_names)
    check: bool = True
    jobs: int = 1
    source_date_epoch: int | None = None
    buildroot: BuildrootSpec | None = None

    def __attrs_post_init__(self) -> None:
        if self.buildroot is not None and self.build_type is not BuildType.RPM:
            raise BadBuildSpecError("only rpm builds run in a buildroot")
        if self.target_arch is not None and not _ARCH.fullmatch(self.target_arch):
            raise BadBuildSpecError(f"bad target arch: {self.target_arch!r}")
        for name in (*self.with_features, *self.without_features):
            if not _BCOND.fullmatch(name):
                raise BadBuildSpecError(f"bad bcond name: {name!r}")
        if set(self.with_features) & set(self.without_features):
            raise BadBuildSpecError("a feature is both 'with' and 'without'")
        rpm_only = self.with_features or self.without_features or self.target_arch
        if self.build_type is BuildType.MAKE and rpm_only:
            raise BadBuildSpecError("target arch, with and without apply to rpm builds only")
        if type(self.jobs) is not int or not 1 <= self.jobs <= 1024:
            raise BadBuildSpecError(f"jobs must be an integer in [1, 1024]: {self.jobs!r}")
        sde = self.source_date_epoch
        if sde is not None and not 0 <= sde < 2**63:
            raise BadBuildSpecError(f"bad SOURCE_DATE_EPOCH: {sde}")


def _positive(_inst: object, attr: Any, value: float) -> None:
    if not value > 0:
        raise LocalError(f"{attr.name} must be positive, not {value!r}")


@attrs.frozen
class Limits:
    """Bounds on one build; the node takes them from its configuration.

    ``max_output_bytes`` caps the build log (the build is stopped when it is reached);
    ``max_disk_bytes`` caps the scratch tree, extracted sources and temporary files
    included (polled every ``disk_poll_interval`` seconds, and no single file may exceed
    it); ``max_source_bytes`` and ``max_archive_members`` bound the job's input.
    """

    time_limit: float = attrs.field(default=3600.0, validator=_positive)
    max_output_bytes: int = attrs.field(default=16 << 20, validator=_positive)
    max_disk_bytes: int = attrs.field(default=8 << 30, validator=_positive)
    max_source_bytes: int = attrs.field(default=2 << 30, validator=_positive)
    max_archive_members: int = attrs.field(default=200_000, validator=_positive)
    disk_poll_interval: float = attrs.field(default=0.5, validator=_positive)


@attrs.frozen
class OutputFile:
    """An artifact or log: a relative ``/``-separated name (sorted, no ``..``, never
    absolute), its size and SHA-256, and where it is on this host."""

    name: str
    size: int
    sha256: str
    path: Path


@attrs.frozen
class Timings:
    """Wall-clock start and end (Unix milliseconds) and the monotonic duration."""

    started_ms: int
    ended_ms: int
    duration_ms: int


@attrs.frozen
class BuildOutcome:
    """The result of :func:`run_build`, everything the node signs about a build.

    ``exit_status`` is the build command's status (negative: killed by that signal).
    ``reason`` is set unless the build succeeded or merely failed: ``"time"``,
    ``"output"`` or ``"disk"`` for a stopped build, ``"artifact-name"`` or
    ``"artifact-clash"`` when the build produced artifacts we cannot name. ``artifacts``
    is empty unless the build succeeded.
    """

    state: BuildState
    exit_status: int
    reason: str | None
    artifacts: tuple[OutputFile, ...]
    logs: tuple[OutputFile, ...]
    environment: Mapping[str, str]
    source_date_epoch: int
    timings: Timings
    #: What the build ran in, when the spec named a buildroot.
    buildroot: BuildrootRecord | None = None
    buildroot_step: BuildrootStep | None = None

    def to_wire(self) -> dict[str, object]:
        """Plain data (no host paths) for the node's signed result record."""

        def files(items: tuple[OutputFile, ...]) -> list[dict[str, object]]:
            return [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in items]

        return {
            "artifacts": files(self.artifacts),
            "environment": dict(self.environment),
            "exit_status": self.exit_status,
            "logs": files(self.logs),
            "reason": self.reason,
            "source_date_epoch": self.source_date_epoch,
            "state": self.state.value,
            "timings": attrs.asdict(self.timings),
        }


def rpm_macros() -> dict[str, str]:
    """The rpm macros every rpm build gets (before the job's allow-listed defines);
    ``SOURCE_DATE_EPOCH`` itself is passed in the environment."""
    return {
        "_topdir": f"{BUILD_DIR}/rpmbuild",
        "_tmppath": "/tmp",
        "_buildhost": BUILDHOST,
        "use_source_date_epoch_as_buildtime": "1",
        "clamp_mtime_to_source_date_epoch": "1",
        "source_date_epoch_from_changelog": "0",
        # Debian's rpm has no working debuginfo pipeline by default, and debuginfo would
        # embed more host detail; build-id links would add per-build symlinks.
        "debug_package": "%{nil}",
        "_build_id_links": "none",
        # Pin the payload format instead of inheriting the host's default.
        "_binary_payload": "w9.gzdio",
    }


# -- the build ----------------------------------------------------------------------------


async def run_build(
    spec: BuildSpec,
    workdir: Path,
    limits: Limits,
    *,
    log: LogSink | None = None,
    sandbox: Sandbox = Sandbox(),  # noqa: B008 - frozen value
    wall_clock_ns: Callable[[], int] = time.time_ns,
    buildroots: BuildrootCache | None = None,
) -> BuildOutcome:
    """Build ``spec`` in ``workdir`` (created if missing, must be empty) within ``limits``.

    ``log`` receives the build's output as it arrives, capped like the log file. Returns a
    :class:`BuildOutcome` for any build that ran, whatever its exit. The results stay in
    ``workdir/results`` (the outcome's paths) until the caller removes ``workdir``; the
    scratch tree is always removed, also on error or cancellation.

    Raises :class:`SourceDigestError` when the source's SHA-256 is not the spec's,
    :class:`BadSourceError` for a source too big or of the wrong kind,
    :class:`UnsafeArchiveError`/:class:`ArchiveLimitError` for a rejected tarball, and
    :class:`BuildEnvironmentError` when ``rpmbuild``, ``make`` or ``bwrap`` is missing
    (or the spec names a buildroot and ``buildroots`` is None), and the
    :class:`BuildrootError` family when the buildroot cannot be made (nothing is built).
    ``OSError`` from the work directory's filesystem propagates.
    """
    if spec.buildroot is not None and buildroots is None:
        raise BuildEnvironmentError("this node cannot make buildroots")
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise FileExistsError(f"work directory is not empty: {workdir}")
    input_dir, scratch = workdir / "input", workdir / "scratch"
    artifacts_dir, logs_dir = workdir / "results" / "artifacts", workdir / "results" / "logs"
    for d in (input_dir, scratch, artifacts_dir, logs_dir):
        d.mkdir(parents=True)
    started_ms, t0 = wall_clock_ns() // 1_000_000, time.monotonic_ns()
    deadline = trio.current_time() + limits.time_limit
    try:
        source_name = "source.src.rpm" if spec.build_type is BuildType.RPM else "source.tar.gz"
        await trio.to_thread.run_sync(
            _copy_verified, spec.source, input_dir / source_name, spec.source_sha256, limits
        )
        sandbox.prepare(scratch)
        environment = await _environment(spec.build_type, sandbox)
        log_path = logs_dir / "build.log"
        async with await trio.open_file(log_path, "wb") as log_file:
            writer = LogWriter(write=log_file.write, sink=log, cap=limits.max_output_bytes)
            build = _Build(spec, sandbox, scratch, input_dir, limits, writer, deadline)
            prepared: PreparedBuildroot | None = None
            if spec.build_type is BuildType.RPM:
                status, stop, sde, prepared = await _build_rpm(build, buildroots)
                found = await trio.to_thread.run_sync(_rpm_artifacts, scratch)
            else:
                status, stop, sde, build_root = await _build_make(build)
                found = await trio.to_thread.run_sync(
                    _tree_artifacts, scratch / build_root / MAKE_ARTIFACT_DIR
                )
        state, reason = _judge(status, stop)
        artifacts: tuple[OutputFile, ...] = ()
        if state is BuildState.SUCCEEDED:
            if isinstance(found, str):
                state, reason = BuildState.FAILED, found
            else:
                artifacts = await trio.to_thread.run_sync(_move_and_hash, found, artifacts_dir)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(remove_tree, scratch)
    ended_ms = wall_clock_ns() // 1_000_000
    return BuildOutcome(
        state=state,
        exit_status=status,
        reason=reason,
        artifacts=artifacts,
        logs=(_describe("build.log", log_path),),
        environment=environment,
        source_date_epoch=sde,
        timings=Timings(started_ms, ended_ms, (time.monotonic_ns() - t0) // 1_000_000),
        buildroot=prepared.record if prepared is not None else None,
        buildroot_step=prepared.step if prepared is not None else None,
    )


def _judge(status: int, stop: Stop | None) -> tuple[BuildState, str | None]:
    if stop is Stop.TIME:
        return BuildState.TIMED_OUT, stop.value
    if stop is not None:
        return BuildState.LIMIT_EXCEEDED, stop.value
    return (BuildState.SUCCEEDED if status == 0 else BuildState.FAILED), None


@attrs.frozen
class _Build:
    """One build under way: what each build type's commands run with."""

    spec: BuildSpec
    sandbox: Sandbox
    scratch: Path
    input_dir: Path
    limits: Limits
    writer: LogWriter
    deadline: float

    async def run(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] = {},
        cwd: str = BUILD_DIR,
        buildroot: Path | None = None,
        log: LogWriter | None = None,
    ) -> tuple[int, Stop | None]:
        """Run ``argv`` in the sandbox (``/build`` the scratch tree, ``/input`` the
        source) until the deadline, within the disk bound, its output to the build log
        (or ``log``). Returns the exit status and why it was stopped, if it was."""
        return await run_supervised(
            self.sandbox.command(argv, build_dir=self.scratch, input_dir=self.input_dir,
                                 env=env, cwd=cwd, buildroot=buildroot),
            deadline=self.deadline,
            log=self.writer if log is None else log,
            disk_root=self.scratch,
            max_disk_bytes=self.limits.max_disk_bytes,
            disk_poll_interval=self.limits.disk_poll_interval,
        )


async def _build_rpm(
    build: _Build, buildroots: BuildrootCache | None = None
) -> tuple[int, Stop | None, int, PreparedBuildroot | None]:
    spec = build.spec
    srpm = f"{INPUT_DIR}/source.src.rpm"
    # Read the header inside the sandbox too: rpm parses untrusted bytes here.
    query = bytearray()

    async def collect(data: bytes) -> None:
        query.extend(data)

    # The header fields, then one "REQ name|flags|version" line per BuildRequires.
    qf = (
        "%{SOURCEPACKAGE}|%{CHANGELOGTIME}|%{BUILDTIME}\\n"
        "[REQ %{REQUIRENAME}|%{REQUIREFLAGS:depflags}|%{REQUIREVERSION}\\n]"
    )
    status, stop = await build.run(
        ["rpm", "-qp", "--nosignature", "--nodigest", "--qf", qf, srpm],
        log=LogWriter(write=collect, sink=None, cap=256 * 1024),
    )
    if stop is Stop.TIME:
        return status, stop, spec.source_date_epoch or 0, None
    lines = query.decode(errors="replace").strip().splitlines()
    requires = [line[4:] for line in lines if line.startswith("REQ ")]
    fields = [line for line in lines if not line.startswith("REQ ")][-1:]
    parts = fields[0].split("|") if fields else []
    if status != 0 or len(parts) != 3 or parts[0] != "1":
        raise BadSourceError(f"not a source RPM: {query.decode(errors='replace').strip()!r:.300}")
    sde = spec.source_date_epoch
    if sde is None:
        sde = int(parts[1]) if parts[1].isdigit() else int(parts[2]) if parts[2].isdigit() else 0
    argv = ["rpmbuild", "--rebuild", "--nodeps"]
    if spec.target_arch is not None:
        argv += ["--target", spec.target_arch]
    if not spec.check:
        argv.append("--nocheck")
    macros = rpm_macros()
    macros["_smp_mflags"] = f"-j{spec.jobs}"
    macros["_smp_build_ncpus"] = str(spec.jobs)
    macros.update({f"_with_{name}": f"--with-{name}" for name in spec.with_features})
    macros.update({f"_without_{name}": f"--without-{name}" for name in spec.without_features})
    for name, value in macros.items():
        argv += ["--define", f"{name} {value}"]
    argv.append(srpm)
    env = {"SOURCE_DATE_EPOCH": str(sde)}

    if spec.buildroot is None:
        status, stop = await build.run(argv, env=env)
        return status, stop, sde, None
    assert buildroots is not None  # run_build checked

    async def note(text: str) -> None:
        await build.writer.add(f"[p2pbuild: {text}]\n".encode())

    deps = [_build_require(line) for line in requires]
    with trio.CancelScope(deadline=build.deadline) as scope:
        async with buildroots.use(spec.buildroot, deps, log=note) as prepared:
            status, stop = await build.run(argv, env=env, buildroot=prepared.path)
            return status, stop, sde, prepared
    assert scope.cancelled_caught
    return -9, Stop.TIME, sde, None


def _build_require(line: str) -> Dep:
    name, _, rest = line.partition("|")
    flags, _, version = rest.partition("|")
    flags = flags.strip()
    if flags in ("=", "<", "<=", ">", ">=") and version:
        return Dep(name, flags, version)
    return Dep(name)


async def _build_make(build: _Build) -> tuple[int, Stop | None, int, str]:
    spec, limits = build.spec, build.limits
    src = build.scratch / "src"
    src.mkdir()
    tree = await trio.to_thread.run_sync(
        lambda: extract_tar_gz(
            build.input_dir / "source.tar.gz",
            src,
            max_members=limits.max_archive_members,
            max_bytes=limits.max_disk_bytes,
        )
    )
    sde = spec.source_date_epoch if spec.source_date_epoch is not None else tree.newest_mtime
    root = "src" if tree.root == "." else f"src/{tree.root}"
    argv = ["/bin/sh", "-c", _MAKE_SCRIPT, "p2pbuild-make", f"-j{spec.jobs}",
            "check" if spec.check else "nocheck"]
    status, stop = await build.run(
        argv, env={"SOURCE_DATE_EPOCH": str(sde)}, cwd=f"{BUILD_DIR}/{root}"
    )
    return status, stop, sde, root


# -- files --------------------------------------------------------------------------------


def _copy_verified(source: Path, dest: Path, expected: str, limits: Limits) -> None:
    """Copy ``source`` to ``dest`` while hashing; the copy is what the build uses."""
    digest = hashlib.sha256()
    size = 0
    with source.open("rb") as src, dest.open("xb") as out:
        if os.fstat(src.fileno()).st_size > limits.max_source_bytes:
            raise BadSourceError(f"source larger than {limits.max_source_bytes} bytes")
        while chunk := src.read(_CHUNK):
            size += len(chunk)
            if size > limits.max_source_bytes:
                raise BadSourceError(f"source larger than {limits.max_source_bytes} bytes")
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected:
        dest.unlink()
        raise SourceDigestError(f"source SHA-256 is {digest.hexdigest()}, job says {expected}")
    dest.chmod(0o444)


def _rpm_artifacts(scratch: Path) -> dict[str, Path] | str:
    """Every ``*.rpm`` under ``rpmbuild/RPMS``, by file name (they carry name and arch)."""
    tree = _tree_artifacts(scratch / "rpmbuild" / "RPMS")
    if isinstance(tree, str):
        return tree
    found: dict[str, Path] = {}
    for name, path in tree.items():
        base = name.rsplit("/", 1)[-1]
        if not base.endswith(".rpm"):
            continue
        if base in found:
            return "artifact-clash"
        found[base] = path
    return found


def _tree_artifacts(top: Path) -> dict[str, Path] | str:
    """Regular files under ``top`` by relative name, or a reason string if one has a name
    we will not publish. Symlinks are not followed and not published."""
    found: dict[str, Path] = {}
    try:
        if not stat.S_ISDIR(top.lstat().st_mode):
            return found
    except FileNotFoundError:
        return found
    stack = [(top, "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if not _NAME_PART.fullmatch(entry.name) or entry.name in (".", ".."):
                    return "artifact-name"
                name = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), name + "/"))
                elif entry.is_file(follow_symlinks=False):
                    found[name] = Path(entry.path)
    return found


def _move_and_hash(found: dict[str, Path], dest: Path) -> tuple[OutputFile, ...]:
    out = []
    for name in sorted(found):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(found[name], target)
        out.append(_describe(name, target))
    return tuple(out)


def _describe(name: str, path: Path) -> OutputFile:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return OutputFile(name=name, size=size, sha256=digest.hexdigest(), path=path)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it, also directories a build made read-only
    or unreadable. ``OSError`` propagates if something still cannot be removed."""

    def retry(func: Callable[..., object], failed: str, _exc: object) -> None:
        # Make the entry and its directory ours again, then remove it without a handler.
        os.chmod(os.path.dirname(failed), 0o700)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, 0o700)
            shutil.rmtree(failed, onerror=retry if func is not os.rmdir else None)
        elif os.path.lexists(failed):
            os.unlink(failed)

    if path.is_symlink() or path.exists():
        shutil.rmtree(path, onerror=retry)


# -- environment --------------------------------------------------------------------------


def _os_release(path: Path = Path("/etc/os-release")) -> dict[str, str]:
    fields: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key in ("ID", "VERSION_ID", "PRETTY_NAME"):
                parsed = shlex.split(value)
                fields[f"os_{key.lower()}"] = parsed[0] if parsed else ""
    return fields


async def _tool_version(argv: list[str]) -> str:
    try:
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        raise BuildEnvironmentError(f"cannot run {argv[0]}: {exc}") from exc
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    return lines[0] if lines else ""


async def _environment(build_type: BuildType, sandbox: Sandbox) -> dict[str, str]:
    env = {
        "arch": platform.machine(),
        "kernel": platform.release(),
        "bwrap": (await _tool_version([sandbox.bwrap, "--version"])).removeprefix("bubblewrap "),
        **_os_release(),
    }
    if build_type is BuildType.RPM:
        env["rpm"] = (await _tool_version(["rpmbuild", "--version"])).removeprefix("RPM version ")
    else:
        env["make"] = await _tool_version(["make", "--version"])
    return dict(sorted(env.items()))


# -- the executor -------------------------------------------------------------------------


@attrs.frozen
class ExecutorStatistics:
    """Concurrency slots: how many there are and how many builds hold one."""

    slots: int
    busy: int


@attrs.define(eq=False)
class Executor:
    """Runs builds in fresh work directories under ``work_root``, at most ``slots`` at once.

    The node builds one from its configuration; ``limits`` applies to every build.
    """

    work_root: Path
    limits: Limits = Limits()
    slots: int = attrs.field(default=1, validator=_positive)
    sandbox: Sandbox = attrs.field(factory=Sandbox)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(self.slots)

    def statistics(self) -> ExecutorStatistics:
        """Slots in total and in use (for the node's status record)."""
        return ExecutorStatistics(slots=self.slots, busy=self._limiter.borrowed_tokens)

    async def check(self) -> str:
        """Prove this machine can run sandboxed builds; return the bwrap version.

        Raises :class:`BuildEnvironmentError` if it cannot (the node must then not
        advertise any build type).
        """
        self.work_root.mkdir(parents=True, exist_ok=True)
        probe = self.work_root / f"probe-{secrets.token_hex(8)}"
        probe.mkdir()
        try:
            return await self.sandbox.check(probe)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(remove_tree, probe)

    @contextlib.asynccontextmanager
    async def build(
        self, spec: BuildSpec, *, log: LogSink | None = None
    ) -> AsyncIterator[BuildOutcome]:
        """Wait for a free slot, run :func:`run_build` in a new work directory and yield
        its outcome; the directory (results included) is removed when the block exits, so
        upload or copy the artifacts inside it. The slot is held until then.

        Raises what :func:`run_build` raises.
        """
        async with self._limiter:
            self.work_root.mkdir(parents=True, exist_ok=True)
            workdir = self.work_root / f"job-{secrets.token_hex(8)}"
            try:
                yield await run_build(spec, workdir, self.limits, log=log, sandbox=self.sandbox)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(remove_tree, workdir)
