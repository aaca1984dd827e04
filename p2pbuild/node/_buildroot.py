"""Buildroots: a clean root made from the job's pinned repositories, cached between builds.

:class:`BuildrootCache.use` is the whole life of one job's buildroot (docs/build-execution.md,
*Buildroots*):

1. **Pin.** Fetch each repository's ``repodata/repomd.xml`` (bounded) and compare its
   SHA-256 with the job's: another digest is :class:`RepoChangedError`, a failed fetch
   :class:`RepoUnreachableError` (transient). Then fetch the metadata it names (primary,
   and comps for a group) and check each against the checksum in ``repomd.xml``; cached
   on disk by that checksum.
2. **Resolve** (``_resolve.py``, pure): the base set plus the SRPM's BuildRequires, on top
   of the host base (``_hostbase.py``). The result, with the host base package and the
   repository digests, is the signed :class:`~p2pbuild.BuildrootRecord`; its digest is the
   cache key.
3. **Warm**: a complete root under that key is used as it is.
   **Cold**: download every package (size and SHA-256 checked against the metadata; kept by
   digest), refuse a package with a file outside ``/usr``, and install them all with
   ``dnf --installroot`` from a local repository of exactly these files. dnf runs inside
   bubblewrap without network, as root of a user namespace, with only the new root and its
   staging directory writable, so a package (or dnf) cannot write outside the buildroot.
   Scriptlets are not run (``tsflags=noscripts``): a buildroot is the packages' files.
4. The root is kept under its key; roots not in use are evicted, least recently used
   first, while the cache is over ``max_bytes``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import secrets
import shutil
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import attrs
import httpx
import trio

from .._jobs import BuildrootPackage, BuildrootRecord, BuildrootSpec
from ._errors import (
    BadMetadataError,
    BuildEnvironmentError,
    BuildrootError,
    MissingBuildDependencyError,
    PackageChecksumError,
    PackageOutsideBuildrootError,
    RepoChangedError,
    RepoUnreachableError,
)
from ._hostbase import HostFacts, build_host_rpm, gather_host_facts
from ._repodata import (
    Dep,
    MetadataLimits,
    RepoFile,
    RepoPackage,
    parse_comps,
    parse_primary,
    parse_repomd,
)
from ._resolve import HostBase, resolve
from ._sandbox import LogWriter, Sandbox, Stop, run_supervised

__all__ = [
    "BuildrootCache",
    "BuildrootStep",
    "Fetcher",
    "Downloader",
    "PreparedBuildroot",
    "download_https",
    "fetch_https",
]

#: ``await fetch(url, max_bytes)``: the body of a 200 answer, at most ``max_bytes``.
#: Raises :class:`RepoUnreachableError`, or :class:`BadMetadataError` past ``max_bytes``.
Fetcher = Callable[[str, int], Awaitable[bytes]]
#: ``await download(url, dest, max_bytes)``: stream a 200 answer into the new file
#: ``dest``, at most ``max_bytes`` (else :class:`PackageChecksumError`); its size and
#: SHA-256 (hex). Raises :class:`RepoUnreachableError`.
Downloader = Callable[[str, Path, int], Awaitable[tuple[int, str]]]
_CHUNK = 1 << 20


@contextlib.asynccontextmanager
async def _get_unverified(url: str, timeout: float) -> AsyncIterator[httpx.Response]:
    """GET ``url``: its 200 answer, streaming. The pinned digests, not TLS, make what
    arrives from a repository authentic, so the server's certificate is not checked (as
    for sources). Raises :class:`RepoUnreachableError` for a network failure (also while
    the body is read) or a status other than 200."""
    try:
        async with (
            httpx.AsyncClient(verify=False, timeout=timeout, trust_env=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise RepoUnreachableError(f"{url} answered HTTP {response.status_code}")
            yield response
    except httpx.HTTPError as exc:
        raise RepoUnreachableError(f"cannot fetch {url}: {exc.__class__.__name__}") from None


async def fetch_https(url: str, max_bytes: int, *, timeout: float = 120) -> bytes:
    """GET ``url``, its certificate unchecked (the digests are). Raises
    :class:`RepoUnreachableError` for a network failure or a status other than 200 and
    :class:`BadMetadataError` for a body over ``max_bytes`` (stopped while reading)."""
    body = bytearray()
    async with _get_unverified(url, timeout) as response:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise BadMetadataError(f"{url} is larger than {max_bytes} bytes")
    return bytes(body)


async def download_https(
    url: str, dest: Path, max_bytes: int, *, timeout: float = 600
) -> tuple[int, str]:
    """Stream ``url`` into ``dest`` (created), hashing as it arrives; like
    :func:`fetch_https` the digest, not TLS, is what the caller checks. Raises
    :class:`RepoUnreachableError` or :class:`PackageChecksumError` (over ``max_bytes``)."""
    digest = hashlib.sha256()
    size = 0
    async with (
        _get_unverified(url, timeout) as response,
        await trio.open_file(dest, "xb") as out,
    ):
        async for chunk in response.aiter_bytes(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise PackageChecksumError(
                    f"package-checksum-mismatch: {url} is larger than the "
                    f"{max_bytes} bytes its metadata gives"
                )
            digest.update(chunk)
            await out.write(chunk)
    return size, digest.hexdigest()


@attrs.frozen
class BuildrootStep:
    """What preparing the buildroot did, for the log and the demo: cache hit or miss,
    the packages installed, and where the time went (seconds)."""

    cache_hit: bool
    key: str
    packages: tuple[str, ...]
    from_host: tuple[str, ...]
    metadata_s: float
    download_s: float
    install_s: float
    downloaded_bytes: int

    def describe(self) -> str:
        state = "cache hit" if self.cache_hit else "cache miss"
        names = ", ".join(self.packages)
        text = (f"buildroot {self.key[:12]}: {state}; {len(self.packages)} package(s): {names}; "
                f"metadata {self.metadata_s:.2f}s")
        if not self.cache_hit:
            text += (f", download {self.download_s:.2f}s ({self.downloaded_bytes} bytes), "
                     f"install {self.install_s:.2f}s")
        if self.from_host:
            text += f"; from the host base: {', '.join(self.from_host)}"
        return text


@attrs.frozen
class PreparedBuildroot:
    """A ready buildroot: its directory (``usr/`` below it), the signed record, the step."""

    path: Path
    record: BuildrootRecord
    step: BuildrootStep


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@attrs.define(eq=False)
class BuildrootCache:
    """Makes and keeps buildroots under ``root`` (``metadata/``, ``host/``, ``roots/<key>/``),
    at most ``max_bytes`` of roots not in use. Downloaded packages live only as long as
    the install that needs them.

    ``fetch`` and ``host_facts`` are injectable for tests; ``arch`` is the node's.
    """

    root: Path
    max_bytes: int = 8 << 30
    limits: MetadataLimits = attrs.field(factory=MetadataLimits)
    max_package_bytes: int = 2 << 30
    sandbox: Sandbox = attrs.field(factory=Sandbox)
    fetch: Fetcher = fetch_https
    download: Downloader = download_https
    host_facts: Callable[[], HostFacts] = gather_host_facts
    arch: str = attrs.field(factory=platform.machine)
    install_time_limit: float = 1800.0
    #: Disk bound of one install (staging, downloads linked in, the new root).
    max_install_bytes: int = 16 << 30
    _locks: dict[str, trio.Lock] = attrs.field(factory=dict, init=False)
    _in_use: dict[str, int] = attrs.field(factory=dict, init=False)
    _parsed: OrderedDict[str, tuple[RepoPackage, ...]] = attrs.field(
        factory=OrderedDict, init=False
    )
    _host: tuple[float, HostFacts, Path, str] | None = attrs.field(default=None, init=False)

    @contextlib.asynccontextmanager
    async def use(
        self,
        spec: BuildrootSpec,
        build_requires: Sequence[Dep],
        log: Callable[[str], Awaitable[None]] | None = None,
    ) -> AsyncIterator[PreparedBuildroot]:
        """Prepare the buildroot for ``spec`` plus ``build_requires`` and yield it; it is
        not evicted while the block runs.

        Raises :class:`RepoUnreachableError` (transient), :class:`RepoChangedError`,
        :class:`BadMetadataError`, :class:`MissingBuildDependencyError`,
        :class:`PackageChecksumError`, :class:`PackageOutsideBuildrootError`,
        :class:`BuildrootError` (dnf refused the set) or :class:`BuildEnvironmentError`.
        """
        t0 = time.monotonic()
        repos = await self._pinned_packages(spec)
        requests = [Dep(name) for name in spec.packages]
        if spec.group:
            requests += [Dep(name) for name in await self._group(repos, spec.group)]
        requests += list(build_requires)
        host_base = await trio.to_thread.run_sync(self._host_base)
        resolution = resolve(requests, [pkgs for _, pkgs, _ in repos], host_base, self.arch)
        facts, host_rpm, host_sha = await trio.to_thread.run_sync(self._host_package)
        packages = [BuildrootPackage(p.nevra, bytes.fromhex(p.sha256))
                    for _, p in resolution.packages]
        packages.append(BuildrootPackage(facts.nevra, bytes.fromhex(host_sha)))
        record = BuildrootRecord(
            tuple((r.name, r.repomd_sha256) for r in spec.repos),
            tuple(sorted(packages)),
        )
        key = record.key
        metadata_s = time.monotonic() - t0
        lock = self._locks.setdefault(key, trio.Lock())
        self._in_use[key] = self._in_use.get(key, 0) + 1
        try:
            async with lock:
                entry = self.root / "roots" / key
                hit = (entry / "complete").exists()
                if hit:
                    os.utime(entry / "complete")
                    step = BuildrootStep(True, key, tuple(p.nevra for p in record.packages),
                                         tuple(str(d) for d in resolution.from_host),
                                         metadata_s, 0.0, 0.0, 0)
                else:
                    step = await self._make(
                        entry, spec, repos, resolution.packages, host_rpm, record, metadata_s,
                        tuple(str(d) for d in resolution.from_host),
                    )
                record = _with_sigmd5(record, entry / "record.json")
            if log is not None:
                await log(step.describe())
            yield PreparedBuildroot(entry / "root", record, step)
        finally:
            self._in_use[key] -= 1
            if not self._in_use[key]:
                del self._in_use[key]
                self._locks.pop(key, None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._evict)

    # -- pinning and metadata ------------------------------------------------------------------

    async def _pinned_packages(
        self, spec: BuildrootSpec
    ) -> list[tuple[str, tuple[RepoPackage, ...], dict[str, RepoFile]]]:
        out = []
        for repo in spec.repos:
            base = repo.url.rstrip("/")
            data = await self.fetch(f"{base}/repodata/repomd.xml", self.limits.max_repomd_bytes)
            digest = hashlib.sha256(data).hexdigest()
            if digest != repo.repomd_sha256.hex():
                raise RepoChangedError(
                    f"repo-changed: repository {repo.name} ({repo.url}) now has repomd.xml "
                    f"SHA-256 {digest[:16]}..., the job pinned {repo.repomd_sha256.hex()[:16]}..."
                )
            files = parse_repomd(data, self.limits)
            primary = files["primary"]
            packages = self._parsed.get(primary.sha256)
            if packages is None:
                raw = await self._metadata(base, primary)
                packages = await trio.to_thread.run_sync(
                    parse_primary, raw, primary.href, self.limits
                )
                self._parsed[primary.sha256] = packages
                while len(self._parsed) > 16:
                    self._parsed.popitem(last=False)
            out.append((base, packages, files))
        return out

    async def _metadata(self, base: str, item: RepoFile) -> bytes:
        path = self.root / "metadata" / item.sha256
        if path.exists():
            return path.read_bytes()
        data = await self.fetch(f"{base}/{item.href}", self.limits.max_metadata_bytes)
        if hashlib.sha256(data).hexdigest() != item.sha256:
            raise BadMetadataError(
                f"{item.href} does not match the SHA-256 repomd.xml gives for it"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return data

    async def _group(
        self, repos: list[tuple[str, tuple[RepoPackage, ...], dict[str, RepoFile]]], group: str
    ) -> tuple[str, ...]:
        for base, _, files in repos:
            item = files.get("group_gz") or files.get("group")
            if item is None:
                continue
            raw = await self._metadata(base, item)
            groups = parse_comps(raw, item.href, self.limits)
            if group in groups:
                return groups[group]
        raise MissingBuildDependencyError(f"@{group}", f"missing-build-dependency: @{group} "
                                          "(no repository has this comps group)")

    # -- the host base ------------------------------------------------------------------------

    def _host_base(self) -> HostBase:
        return self._facts().host_base()

    def _facts(self) -> HostFacts:
        status = Path("/var/lib/dpkg/status")
        stamp = status.stat().st_mtime if status.exists() else 0.0
        if self._host is None or self._host[0] != stamp:
            facts = self.host_facts()
            rpm = build_host_rpm(facts, self.root / "host")
            self._host = (stamp, facts, rpm, _sha256_file(rpm))
        return self._host[1]

    def _host_package(self) -> tuple[HostFacts, Path, str]:
        self._facts()
        assert self._host is not None
        _, facts, rpm, sha = self._host
        return facts, rpm, sha

    # -- a cold root --------------------------------------------------------------------------

    async def _make(
        self,
        entry: Path,
        spec: BuildrootSpec,
        repos: list[tuple[str, tuple[RepoPackage, ...], dict[str, RepoFile]]],
        chosen: tuple[tuple[int, RepoPackage], ...],
        host_rpm: Path,
        record: BuildrootRecord,
        metadata_s: float,
        from_host: tuple[str, ...],
    ) -> BuildrootStep:
        stage = self.root / "tmp" / f"stage-{secrets.token_hex(6)}"
        try:
            (stage / "repo").mkdir(parents=True)
            (stage / "root").mkdir()
            (stage / "etc-rpm").mkdir()
            (stage / "work").mkdir()
            (stage / "etc-rpm" / "macros").write_text("%_dbpath /var/lib/rpm\n")
            t0 = time.monotonic()
            downloaded = 0
            for index, (repo_index, pkg) in enumerate(chosen):
                path = stage / "repo" / f"{index:04d}.rpm"
                downloaded += await self._package(repos[repo_index][0], pkg, path)
            download_s = time.monotonic() - t0
            t1 = time.monotonic()
            shutil.copyfile(host_rpm, stage / "repo" / "host.rpm")
            expected = sorted([pkg.nevra for _, pkg in chosen] + [_host_nevra(record)])
            sigmd5 = await self._install(stage, expected)
            entry.mkdir(parents=True, exist_ok=True)
            os.replace(stage / "root", entry / "root")
            size = await trio.to_thread.run_sync(_tree_bytes, entry / "root")
            (entry / "record.json").write_text(json.dumps({
                "packages": [p.nevra for p in record.packages],
                "sigmd5": sigmd5,
                "repos": {name: digest.hex() for name, digest in record.repos},
                "bytes": size,
            }, indent=1))
            (entry / "complete").touch()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove, stage)
        return BuildrootStep(False, record.key, tuple(p.nevra for p in record.packages),
                             from_host, metadata_s, download_s, time.monotonic() - t1, downloaded)

    async def _package(self, base: str, pkg: RepoPackage, path: Path) -> int:
        """Download ``pkg`` to ``path``, checked against the metadata; its size."""
        if pkg.size > self.max_package_bytes:
            raise PackageChecksumError(f"{pkg.nevra} is larger than {self.max_package_bytes}")
        size, sha256 = await self.download(f"{base}/{pkg.location}", path, pkg.size)
        if size != pkg.size or sha256 != pkg.sha256:
            raise PackageChecksumError(
                f"package-checksum-mismatch: {pkg.nevra} from {base} does not match the "
                "size and SHA-256 of the repository metadata"
            )
        return size

    async def _install(self, stage: Path, expected: list[str]) -> dict[str, str]:
        """createrepo_c, the file-list check and ``dnf --installroot``, in one sandbox;
        the installed packages' ``SIGMD5`` (hex) by NEVRA."""
        script = (
            "set -e\n"
            # Every file of every package must be below /usr (all a build sees).
            "rpm -qp --nosignature --nodigest --qf '[%{FILENAMES}\\n]' /stage/repo/*.rpm "
            "> /stage/work/files\n"
            "if grep -v -E '^/usr/' /stage/work/files | grep -q .; then\n"
            "  echo P2PBUILD-OUTSIDE: $(grep -v -E '^/usr/' /stage/work/files | head -3)\n"
            "  exit 3\nfi\n"
            "if grep -q -E '(^|/)\\.\\.?(/|$)' /stage/work/files; then\n"
            "  echo P2PBUILD-OUTSIDE: dot-dot; exit 3\nfi\n"
            "createrepo_c --quiet --no-database /stage/repo\n"
            "printf '[local]\\nname=local\\nbaseurl=file:///stage/repo\\ngpgcheck=0\\n' "
            "> /stage/work/local.repo\n"
            "dnf -y -q --installroot /buildroot --releasever 1 --setopt=reposdir=/stage/work "
            "--setopt=cachedir=/stage/work/cache --setopt=tsflags=noscripts "
            "--setopt=install_weak_deps=False --setopt=keepcache=False "
            "--disablerepo='*' --enablerepo=local install \"$@\"\n"
            "echo P2PBUILD-INSTALLED-BEGIN\n"
            "rpm --root /buildroot -qa --qf '%{NEVRA} %{SIGMD5}\\n' | sort\n"
            "echo P2PBUILD-INSTALLED-END\n"
        )
        command = self._install_command(stage, ["/bin/sh", "-c", script, "p2pbuild-install",
                                                *expected])
        out = bytearray()

        async def collect(data: bytes) -> None:
            out.extend(data)

        status, stop = await run_supervised(
            command,
            deadline=trio.current_time() + self.install_time_limit,
            log=LogWriter(write=collect, sink=None, cap=1 << 20),
            disk_root=stage,
            max_disk_bytes=self.max_install_bytes,
        )
        text = out.decode(errors="replace")
        if "P2PBUILD-OUTSIDE:" in text:
            line = text.split("P2PBUILD-OUTSIDE:", 1)[1].splitlines()[0].strip()
            raise PackageOutsideBuildrootError(
                f"package-outside-buildroot: a package installs outside /usr: {line[:200]}"
            )
        if stop is not None or status != 0:
            why = "time limit" if stop is Stop.TIME else f"exit {status}"
            raise BuildrootError(f"installing the buildroot failed ({why}): {text[-600:]}")
        installed = text.split("P2PBUILD-INSTALLED-BEGIN", 1)[-1]
        installed = installed.split("P2PBUILD-INSTALLED-END", 1)[0]
        sigmd5: dict[str, str] = {}
        for line in installed.splitlines():
            nevra, _, digest = line.strip().partition(" ")
            if nevra:
                sigmd5[nevra] = digest
        got = sorted(sigmd5)
        if got != expected:
            raise BuildrootError(
                f"dnf installed {got[:20]}, the resolved set is {expected[:20]}"
            )
        return sigmd5

    def _install_command(self, stage: Path, argv: list[str]) -> list[str]:
        host = self.sandbox.host_root
        cmd = [
            self.sandbox.bwrap, "--unshare-all", "--die-with-parent", "--new-session",
            # Root of a new user namespace: rpm may chroot into the new root, but nothing
            # it can do reaches outside the binds below (and there is no network).
            "--uid", "0", "--gid", "0", "--cap-add", "ALL",
            "--hostname", self.sandbox.hostname, "--clearenv",
            "--ro-bind", str(host / "usr"), "/usr",
        ]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            path = host / name
            if path.is_symlink():
                cmd += ["--symlink", os.readlink(path), f"/{name}"]
            elif path.is_dir():
                cmd += ["--ro-bind", str(path), f"/{name}"]
        cmd += ["--dir", "/etc"]
        for name in ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "passwd", "group",
                     "nsswitch.conf", "alternatives"):
            if (host / "etc" / name).exists():
                cmd += ["--ro-bind", str(host / "etc" / name), f"/etc/{name}"]
        cmd += [
            "--dir", "/etc/rpm",
            "--ro-bind", str(stage / "etc-rpm" / "macros"), "/etc/rpm/macros",
            "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--bind", str(stage), "/stage",
            "--bind", str(stage / "root"), "/buildroot",
            "--setenv", "PATH", "/usr/bin:/bin:/usr/sbin:/sbin",
            "--setenv", "HOME", "/stage/work",
            "--setenv", "LANG", "C.UTF-8",
            "--chdir", "/stage", "--", *argv,
        ]
        return cmd

    # -- eviction ------------------------------------------------------------------------------

    def _evict(self) -> None:
        roots = self.root / "roots"
        if not roots.is_dir():
            return
        entries = []
        for entry in roots.iterdir():
            marker = entry / "complete"
            try:
                used = marker.stat().st_mtime
                size = int(json.loads((entry / "record.json").read_text())["bytes"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            entries.append((used, entry.name, size))
        total = sum(size for _, _, size in entries)
        for _, name, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if name in self._in_use:
                continue
            (roots / name / "complete").unlink()
            _remove(roots / name)
            total -= size

    def statistics(self) -> dict[str, int]:
        """Roots kept and their bytes (for status and the benchmark)."""
        roots = self.root / "roots"
        count = total = 0
        if roots.is_dir():
            for entry in roots.iterdir():
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    total += int(json.loads((entry / "record.json").read_text())["bytes"])
                    count += 1
        return {"roots": count, "bytes": total}


def _with_sigmd5(record: BuildrootRecord, path: Path) -> BuildrootRecord:
    """``record`` with each package's SIGMD5 as the install read it (``record.json``)."""
    try:
        known = json.loads(path.read_text()).get("sigmd5", {})
        packages = tuple(
            attrs.evolve(p, sigmd5=bytes.fromhex(known[p.nevra]))
            if len(known.get(p.nevra, "")) == 32 else p
            for p in record.packages
        )
    except (OSError, ValueError, AttributeError) as exc:
        raise BuildEnvironmentError(
            f"buildroot cache entry {path.parent} is damaged: {exc}"
        ) from None
    return attrs.evolve(record, packages=packages)


def _host_nevra(record: BuildrootRecord) -> str:
    for package in record.packages:
        if package.nevra.startswith("p2pbuild-host-"):
            return package.nevra
    raise BuildEnvironmentError("buildroot record without the host base package")


def _remove(path: Path) -> None:
    from ._executor import remove_tree  # the executor's robust rmtree; no import cycle

    remove_tree(path)
