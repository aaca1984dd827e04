"""The bubblewrap sandbox: its command line, and a supervisor that runs one command in it.

Inside the sandbox a build sees (see docs/build-execution.md for the reasoning):

* ``/usr`` read-only, with ``/bin``, ``/sbin``, ``/lib*`` recreated as on the host (merged
  ``/usr`` symlinks or read-only binds);
* a short allow-list of ``/etc`` entries, read-only (users and groups, the dynamic linker
  cache, Debian's ``alternatives``, rpm's configuration, the OS release); never the whole
  of ``/etc``, so ``shadow``, SSH host keys and the node's own key stay out of reach;
* ``/build``: the job's scratch directory, the only writable place; ``/tmp`` and
  ``/var/tmp`` are ``/build/tmp``, so temporary files count against the disk limit;
* ``/input``: the verified source file, read-only;
* fresh ``/dev`` (null, zero, urandom, tty, ...) and ``/proc``; no ``/sys``, ``/home``,
  ``/root``, ``/run`` or ``/var``;
* new user, PID, IPC, UTS, cgroup and network namespaces. The network namespace holds only
  its own loopback, so nothing outside is reachable, not even the host's ``127.0.0.1``;
* all capabilities dropped, a new session (no terminal injection), a fixed host name, and
  an environment of only ``PATH``, ``HOME``, ``LANG``, ``TZ``, ``TMPDIR`` and what the
  executor adds (``SOURCE_DATE_EPOCH``).

The supervisor starts ``bwrap`` in a new session (its own process group) and kills the
group with SIGKILL when the time limit passes, the log outgrows its cap, the scratch
directory outgrows the disk limit, or the caller is cancelled. ``--die-with-parent`` and
the PID namespace take everything inside down with it: when the namespace's init dies the
kernel kills every process in it, daemonized or not.

Every sandbox is started from one thread that lives as long as the process
(:data:`_SPAWNER`). ``--die-with-parent`` is ``PR_SET_PDEATHSIG``, and the kernel sends
that signal when the *thread* that forked bwrap exits, not the process. trio's
``open_process`` forks from a worker of trio's thread cache, which exits after 10 s idle,
and so killed every build that ran longer than that. From the spawner thread the signal
means what it says: the node daemon is gone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import json
import os
import resource
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from ._errors import BuildEnvironmentError

__all__ = [
    "DEFAULT_ETC_ALLOW",
    "BUILD_DIR",
    "INPUT_DIR",
    "LogSink",
    "LogWriter",
    "Sandbox",
    "Stop",
    "run_supervised",
    "usr_union",
]

BUILD_DIR = "/build"
INPUT_DIR = "/input"

#: ``/etc`` entries bound read-only when they exist on the host. Enough for compilers,
#: make, shells and rpmbuild on Debian and Fedora; nothing secret.
DEFAULT_ETC_ALLOW: tuple[str, ...] = (
    "alternatives",
    "debian_version",
    "fedora-release",
    "group",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "redhat-release",
    "rpm",
    "system-release",
    "system-release-cpe",
)

_TOP_LEVEL_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")

#: Called with every chunk of build output as it arrives, up to the log cap; a
#: ``trio.MemorySendChannel[bytes].send`` fits. It should not block for long: the build's
#: output pipe is not read while it runs.
LogSink = Callable[[bytes], Awaitable[None]]


@attrs.frozen
class Sandbox:
    """How to start bubblewrap on this machine.

    ``bwrap`` is the executable; ``etc_allow`` the ``/etc`` entries made visible;
    ``hostname`` the name the build sees (fixed, because builds do embed it);
    ``host_root`` exists so tests can describe another host layout.
    """

    bwrap: str = "bwrap"
    etc_allow: tuple[str, ...] = DEFAULT_ETC_ALLOW
    hostname: str = "p2pbuild"
    host_root: Path = Path("/")

    def command(
        self,
        argv: Sequence[str],
        *,
        build_dir: Path,
        input_dir: Path | None = None,
        env: Mapping[str, str] = {},
        cwd: str = BUILD_DIR,
        buildroot: Path | None = None,
    ) -> list[str]:
        """The full ``bwrap`` command line that runs ``argv`` with ``build_dir`` as
        ``/build`` (writable) and ``input_dir`` as ``/input`` (read-only).

        With ``buildroot`` (a directory with ``usr/`` below it, see ``_buildroot.py``),
        ``/usr`` is the host's ``/usr`` with the buildroot's files over it, read-only
        (:func:`usr_union`)."""
        cmd = [
            self.bwrap,
            "--unshare-all",  # user (if possible), pid, ipc, uts, cgroup and *net*
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            self.hostname,
            "--clearenv",
        ]
        if buildroot is None:
            cmd += ["--ro-bind", str(self.host_root / "usr"), "/usr"]
        else:
            cmd += usr_union(self.host_root / "usr", buildroot / "usr")
        for name in _TOP_LEVEL_LINKS:
            host = self.host_root / name
            if host.is_symlink():
                cmd += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():
                cmd += ["--ro-bind", str(host), f"/{name}"]
        cmd += ["--dir", "/etc"]
        for name in self.etc_allow:
            host = self.host_root / "etc" / name
            if host.is_symlink() or host.exists():
                cmd += ["--ro-bind", str(host), f"/etc/{name}"]
        cmd += [
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--bind",
            str(build_dir),
            BUILD_DIR,
            "--bind",
            str(build_dir / "tmp"),
            "/tmp",
            "--dir",
            "/var",
            "--symlink",
            "../tmp",
            "/var/tmp",
        ]
        if buildroot is not None:
            cmd += ["--remount-ro", "/usr"]
        if input_dir is not None:
            cmd += ["--ro-bind", str(input_dir), INPUT_DIR]
        full_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": f"{BUILD_DIR}/home",
            "LANG": "C.UTF-8",
            "TZ": "UTC",
            "TMPDIR": "/tmp",
            **env,
        }
        for key, value in sorted(full_env.items()):
            cmd += ["--setenv", key, value]
        cmd += ["--chdir", cwd, "--", *argv]
        return cmd

    @staticmethod
    def prepare(build_dir: Path) -> None:
        """Create the directories :meth:`command` binds (``tmp``, ``home``) in ``build_dir``."""
        (build_dir / "tmp").mkdir(parents=True, exist_ok=True)
        (build_dir / "home").mkdir(parents=True, exist_ok=True)

    async def check(self, scratch: Path) -> str:
        """Prove that bwrap runs here with every namespace we ask for; return its version.

        ``scratch`` is an empty directory to use as ``/build``. Raises
        :class:`BuildEnvironmentError` when bwrap is missing or cannot create the sandbox
        (e.g. unprivileged user namespaces disabled, or an AppArmor profile denying them).
        """
        self.prepare(scratch)
        try:
            version = await trio.run_process([self.bwrap, "--version"], capture_stdout=True)
            probe = await trio.run_process(
                self.command(["true"], build_dir=scratch),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        except (FileNotFoundError, PermissionError) as exc:
            raise BuildEnvironmentError(f"cannot run {self.bwrap!r}: {exc}") from exc
        except subprocess.CalledProcessError as exc:
            raise BuildEnvironmentError(f"{self.bwrap} --version failed: {exc}") from exc
        if probe.returncode != 0:
            message = probe.stderr.decode(errors="replace").strip()
            raise BuildEnvironmentError(f"bubblewrap cannot create the sandbox: {message}")
        return version.stdout.decode().strip().removeprefix("bubblewrap ").strip()


def usr_union(host_usr: Path, root_usr: Path) -> list[str]:
    """bwrap arguments that make ``/usr`` the union of ``host_usr`` and ``root_usr``.

    bubblewrap 0.8 has no overlay mounts, so the union is made of bind mounts on a tmpfs:
    where only one side has an entry, that entry is bound read-only (a symlink is
    recreated); where both have a directory, a directory is made and the union recurses;
    where both have something else, the buildroot's wins. The caller remounts ``/usr``
    read-only once everything is in place. Mounts grow with the size of the directories
    the buildroot shares with the host (``/usr/include``, ``/usr/share``, ...), not with
    the host's whole tree.
    """
    args = ["--tmpfs", "/usr"]
    _union(host_usr, root_usr, "/usr", args)
    return args


def _entries(directory: Path) -> dict[str, os.DirEntry[str]]:
    if directory.is_symlink() or not directory.is_dir():
        return {}
    with os.scandir(directory) as it:
        return {entry.name: entry for entry in it}


def _bind(entry: os.DirEntry[str], dest: str, args: list[str]) -> None:
    if entry.is_symlink():
        args += ["--symlink", os.readlink(entry.path), dest]
    elif entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
        args += ["--ro-bind", entry.path, dest]


def _union(host: Path, root: Path, dest: str, args: list[str]) -> None:
    host_entries, root_entries = _entries(host), _entries(root)
    for name in sorted(host_entries.keys() | root_entries.keys()):
        target = f"{dest}/{name}"
        h, r = host_entries.get(name), root_entries.get(name)
        if r is None:
            assert h is not None
            _bind(h, target, args)
        elif h is None or not (
            h.is_dir(follow_symlinks=False) and r.is_dir(follow_symlinks=False)
        ):
            _bind(r, target, args)
        else:
            args += ["--dir", target]
            _union(Path(h.path), Path(r.path), target, args)


class Stop(enum.Enum):
    """Why :func:`run_supervised` stopped a command before it exited on its own."""

    TIME = "time"
    OUTPUT = "output"
    DISK = "disk"


@attrs.define(eq=False)
class LogWriter:
    """Passes build output to ``write`` (the log file) and ``sink`` (a live follower), up
    to ``cap`` bytes in total including the truncation marker."""

    write: Callable[[bytes], Awaitable[object]]
    sink: LogSink | None
    cap: int
    written: int = 0

    MARKER = b"\n[p2pbuild: log truncated here; output limit reached, build stopped]\n"

    async def add(self, chunk: bytes) -> bool:
        """Log ``chunk``; return False (after writing the truncation marker) if it overflows."""
        room = self.cap - self.written
        if len(chunk) <= room:
            await self._emit(chunk)
            return True
        keep = max(0, self.cap - len(self.MARKER) - self.written)
        await self._emit(chunk[:keep] + self.MARKER[: self.cap - self.written - keep])
        return False

    async def _emit(self, data: bytes) -> None:
        if not data:
            return
        self.written += len(data)
        await self.write(data)
        if self.sink is not None:
            await self.sink(data)


def _limit_child(max_file_bytes: int) -> None:  # pragma: no cover - runs in the child
    # A single file bigger than the disk limit is refused by the kernel (SIGXFSZ/EFBIG)
    # instead of waiting for the next disk poll; no core dumps into the work directory.
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _disk_usage(root: Path) -> int:
    """Bytes allocated under ``root`` (not following symlinks); vanished entries count 0."""
    total = 0
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
    return total


# One thread, never idle-timed-out (ThreadPoolExecutor workers wait for work for as long as
# the executor lives), starts every sandbox: see the module docstring.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="p2pbuild-sandbox-spawner"
)


@attrs.define(eq=False)
class _Child:
    """A started bwrap: its Popen, awaited through a pidfd (trio's own way on Linux)."""

    popen: subprocess.Popen[bytes]
    pidfd: int

    @classmethod
    async def start(cls, argv: Sequence[str], **options: Any) -> _Child:
        """Start ``argv`` from the spawner thread. Not cancellable (it takes milliseconds),
        so a started child is never lost."""

        def start() -> _Child:
            popen = subprocess.Popen(argv, **options)
            try:
                return cls(popen, os.pidfd_open(popen.pid))
            except BaseException:
                popen.kill()
                popen.wait()
                raise

        future = _SPAWNER.submit(start)
        return await trio.to_thread.run_sync(future.result)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        """Wait for the exit and reap; the exit status (negative: killed by that signal)."""
        if self.popen.returncode is None:
            await trio.lowlevel.wait_readable(self.pidfd)
            self.popen.wait()  # exited: reaps at once
        return self.popen.returncode

    def close(self) -> None:
        os.close(self.pidfd)


async def run_supervised(
    command: Sequence[str],
    *,
    deadline: float,
    log: LogWriter,
    disk_root: Path,
    max_disk_bytes: int,
    disk_poll_interval: float = 0.5,
) -> tuple[int, Stop | None]:
    """Run ``command`` (a :meth:`Sandbox.command` line) until it exits or a limit stops it.

    Output (stdout and stderr merged) goes to ``log``. ``deadline`` is in trio time. Returns
    the exit status (negative signal number when killed) and why we stopped it, or None if
    it exited by itself. When this returns or raises (cancellation included) every process
    of the sandbox is gone, so ``disk_root`` can be removed at once.
    """
    info_read, info_write = os.pipe()
    try:
        proc = await _Child.start(
            # --info-fd: bwrap reports the host pid of the sandbox's init (its PID 1).
            [command[0], "--info-fd", str(info_write), *command[1:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(info_write,),
            preexec_fn=partial(_limit_child, max_disk_bytes),
        )
    except BaseException:
        os.close(info_read)
        raise
    finally:
        os.close(info_write)
    stop: Stop | None = None
    init = _SandboxInit()
    assert proc.popen.stdout is not None
    stdout = trio.lowlevel.FdStream(os.dup(proc.popen.stdout.fileno()))
    proc.popen.stdout.close()
    try:
        async with trio.open_nursery() as nursery:
            limits = trio.CancelScope(deadline=deadline)

            async def watch_disk() -> None:
                nonlocal stop
                while True:
                    await trio.sleep(disk_poll_interval)
                    used = await trio.to_thread.run_sync(
                        _disk_usage, disk_root, abandon_on_cancel=True
                    )
                    if used > max_disk_bytes:
                        stop = Stop.DISK
                        limits.cancel()
                        return

            nursery.start_soon(init.read_info, info_read)
            nursery.start_soon(watch_disk)
            with limits:
                while chunk := await stdout.receive_some(65536):
                    if not await log.add(bytes(chunk)):
                        stop = Stop.OUTPUT
                        break
                else:
                    await proc.wait()
            if limits.cancelled_caught and stop is None:
                stop = Stop.TIME
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await _stop_sandbox(proc, init)
            await stdout.aclose()
            init.close()
            proc.close()
    assert proc.returncode is not None
    return proc.returncode, stop


@attrs.define(eq=False)
class _SandboxInit:
    """A pidfd for the sandbox's PID 1, once bwrap has told us its pid."""

    pidfd: int | None = None

    async def read_info(self, fd: int) -> None:
        data = b""
        async with trio.lowlevel.FdStream(fd) as stream:
            while len(data) < 65536 and (chunk := await stream.receive_some(4096)):
                data += chunk
        with contextlib.suppress(ValueError, KeyError, TypeError):
            pid = json.loads(data)["child-pid"]
            with contextlib.suppress(ProcessLookupError):
                self.pidfd = os.pidfd_open(int(pid))

    def kill(self) -> bool:
        if self.pidfd is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        return True

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


async def _stop_sandbox(proc: _Child, init: _SandboxInit) -> None:
    """Kill what is left of the sandbox and return once all of it is gone."""
    if proc.returncode is not None:
        return
    # Killing the namespace's init makes the kernel kill every process in the namespace
    # and reap them before init's own exit completes; bwrap (our child) exits only after
    # it has reaped init. So waiting for bwrap is waiting for the whole tree. Killing bwrap
    # first would leave --die-with-parent to do the rest *asynchronously*.
    if init.kill():
        with trio.move_on_after(10):
            await proc.wait()
    # Fallback (bwrap not yet started the sandbox, or stuck): the whole process group.
    # Until bwrap is reaped its pid, and so the group id, cannot be reused.
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
