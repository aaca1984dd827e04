"""The host base of a buildroot on a node whose system is not RPM-based (Debian).

A buildroot on such a node stands on the host's ``/usr``: ``gcc``, ``make``, the C
library and its headers come from dpkg, not from an rpmdb. So that a spec's
``BuildRequires: gcc`` or ``pkgconfig(zlib)`` is met *honestly* (by what is really there,
at its real version, and nothing else), the node describes its host in one generated,
empty RPM, ``p2pbuild-host``, whose ``Provides`` are exactly:

* ``deb(<package>) = <version>`` for every dpkg package installed (the whole host, so the
  package's digest changes whenever any host package does);
* the RPM names of a short, fixed table of equivalent packages (:data:`RPM_EQUIVALENTS`:
  ``gcc`` is Debian's ``gcc``, ``glibc-devel`` is ``libc6-dev``), each at its dpkg
  version, only when that dpkg package is installed;
* ``pkgconfig(<name>) = <Version>`` for every ``.pc`` file in the host's pkg-config
  directories;
* every command in ``/usr/bin`` and ``/usr/sbin`` as a file (``/usr/bin/make``, and
  ``/bin/make`` on a merged-``/usr`` host).

The package is built deterministically (fixed build time, host name and payload format),
so two hosts with identical package sets produce the same bytes and the same SHA-256, and
any difference in the host makes the buildroots differ. It is installed into every
buildroot the node makes and listed in the signed result like any package.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import attrs

from ._errors import BuildEnvironmentError
from ._repodata import Dep
from ._resolve import HostBase

__all__ = [
    "HOST_PACKAGE", "RPM_EQUIVALENTS", "HostFacts", "build_host_rpm", "gather_host_facts",
    "rpmbuild_binary",
]

HOST_PACKAGE = "p2pbuild-host"
#: 2024-01-01T00:00:00Z: the build time of every generated host package.
_HOST_EPOCH = 1704067200

#: RPM package names a Debian host honestly provides, and the dpkg package that holds the
#: same software. Only names whose content is the same upstream software are listed.
RPM_EQUIVALENTS: dict[str, str] = {
    "bash": "bash",
    "binutils": "binutils",
    "bzip2": "bzip2",
    "coreutils": "coreutils",
    "cpio": "cpio",
    "cpp": "cpp",
    "diffutils": "diffutils",
    "file": "file",
    "findutils": "findutils",
    "gawk": "gawk",
    "gcc": "gcc",
    "gcc-c++": "g++",
    "glibc": "libc6",
    "glibc-devel": "libc6-dev",
    "grep": "grep",
    "gzip": "gzip",
    "make": "make",
    "patch": "patch",
    "perl-interpreter": "perl",
    "pkgconf": "pkgconf",
    "pkgconf-pkg-config": "pkgconf",
    "python3": "python3",
    "rpm-build": "rpm",
    "sed": "sed",
    "tar": "tar",
    "unzip": "unzip",
    "util-linux": "util-linux",
    "which": "debianutils",
    "xz": "xz-utils",
}

_UNSAFE_EVR = re.compile(r"[^A-Za-z0-9._+~^]")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
_PC_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
_DEB_NAME = re.compile(r"[a-z0-9][a-z0-9.+-]{0,127}")


def _rpm_evr(version: str) -> str:
    """A dpkg version as an rpm ``[epoch:]version[-release]``."""
    epoch, sep, rest = version.partition(":")
    if not sep or not epoch.isdigit():
        epoch, rest = "", version
    upstream, dash, revision = rest.rpartition("-")
    if not dash:
        upstream, revision = rest, ""
    upstream = _UNSAFE_EVR.sub("_", upstream) or "0"
    revision = _UNSAFE_EVR.sub("_", revision)
    return (f"{epoch}:" if epoch else "") + upstream + (f"-{revision}" if revision else "")


@attrs.frozen
class HostFacts:
    """What the host has, as :func:`gather_host_facts` found it (sorted, deduplicated)."""

    dpkg: tuple[tuple[str, str], ...]
    pkgconfig: tuple[tuple[str, str], ...]
    files: tuple[str, ...]

    def provides(self) -> list[Dep]:
        installed: dict[str, str] = {}
        deps = []
        for name, version in self.dpkg:
            installed.setdefault(name, version)
            deps.append(Dep(f"deb({name})", "=", _rpm_evr(version)))
        for rpm_name, deb_name in sorted(RPM_EQUIVALENTS.items()):
            if deb_name in installed:
                deps.append(Dep(rpm_name, "=", _rpm_evr(installed[deb_name])))
        for name, version in self.pkgconfig:
            deps.append(Dep(f"pkgconfig({name})", "=", version) if version
                        else Dep(f"pkgconfig({name})"))
        return sorted(set(deps))

    def host_base(self) -> HostBase:
        return HostBase.of(self.provides(), self.files)

    def spec_text(self) -> str:
        """The ``p2pbuild-host`` spec: a deterministic function of the facts."""
        lines = [f"Provides: {dep}" for dep in self.provides()]
        lines += [f"Provides: {path}" for path in self.files]
        body = "\n".join(lines) + "\n"
        release = hashlib.sha256(body.encode()).hexdigest()[:16]
        return (
            f"Name: {HOST_PACKAGE}\nVersion: 1\nRelease: {release}\n"
            "Summary: The host base system a p2pbuild buildroot stands on\n"
            "License: MIT\nBuildArch: noarch\n" + body + "\n"
            "%description\nGenerated by the p2pbuild node from dpkg's package list, the\n"
            "host's pkg-config files and its commands. It holds no files.\n\n%files\n"
        )

    @property
    def nevra(self) -> str:
        release = self.spec_text().split("Release: ", 1)[1].split("\n", 1)[0]
        return f"{HOST_PACKAGE}-1-{release}.noarch"


def _dpkg_installed(status: Path) -> list[tuple[str, str]]:
    found = []
    try:
        text = status.read_text(errors="replace")
    except FileNotFoundError:
        return []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(": ")
            if sep and not line.startswith(" "):
                fields[key] = value.strip()
        name, version = fields.get("Package", ""), fields.get("Version", "")
        if fields.get("Status") == "install ok installed" and _DEB_NAME.fullmatch(name):
            found.append((name, version))
    return sorted(set(found))


def _pc_files(root: Path) -> list[tuple[str, str]]:
    dirs = [root / "usr/lib/pkgconfig", root / "usr/share/pkgconfig"]
    dirs += sorted((root / "usr/lib").glob("*/pkgconfig"))
    found: dict[str, str] = {}
    for directory in dirs:
        if not directory.is_dir():
            continue
        for pc in sorted(directory.glob("*.pc")):
            name = pc.name[:-3]
            if not _PC_NAME.fullmatch(name) or name in found:
                continue
            version = ""
            try:
                for line in pc.read_text(errors="replace").splitlines():
                    if line.startswith("Version:"):
                        version = line.split(":", 1)[1].strip()
                        break
            except OSError:
                continue
            found[name] = version if version and not _UNSAFE_EVR.search(version) else ""
    return sorted(found.items())


def _commands(root: Path) -> list[str]:
    files = []
    for sub in ("bin", "sbin"):
        directory = root / "usr" / sub
        if not directory.is_dir():
            continue
        merged = (root / sub).is_symlink() and os.readlink(root / sub) in (f"usr/{sub}",
                                                                           f"/usr/{sub}")
        for entry in os.scandir(directory):
            if _FILE_NAME.fullmatch(entry.name) and not entry.is_dir():
                files.append(f"/usr/{sub}/{entry.name}")
                if merged:
                    files.append(f"/{sub}/{entry.name}")
    return sorted(files)


def gather_host_facts(
    root: Path = Path("/"), dpkg_status: Path = Path("/var/lib/dpkg/status")
) -> HostFacts:
    """Read what the host at ``root`` has: dpkg's status file, pkg-config files, commands."""
    return HostFacts(
        dpkg=tuple(_dpkg_installed(dpkg_status)),
        pkgconfig=tuple(_pc_files(root)),
        files=tuple(_commands(root)),
    )


def rpmbuild_binary(
    spec: Path, top: Path, rpm_dir: Path, *, epoch: int
) -> subprocess.CompletedProcess[bytes]:
    """``rpmbuild -bb`` of ``spec`` (no dependency check), reproducibly: the build time
    and file times are ``epoch``, the build host ``p2pbuild``, the payload compressed one
    fixed way, the environment minimal (``HOME`` is ``top``). The package lands in
    ``rpm_dir`` as ``NAME-VERSION-RELEASE.ARCH.rpm``; the caller checks the returncode."""
    argv = ["rpmbuild", "-bb", "--nodeps"]
    for key, value in {
        "_topdir": str(top / "top"),
        "_rpmdir": str(rpm_dir),
        "_build_name_fmt": "%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}.rpm",
        "_buildhost": "p2pbuild",
        "use_source_date_epoch_as_buildtime": "1",
        "clamp_mtime_to_source_date_epoch": "1",
        "_binary_payload": "w9.gzdio",
    }.items():
        argv += ["--define", f"{key} {value}"]
    return subprocess.run(
        [*argv, str(spec)],
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(top), "LANG": "C.UTF-8", "TZ": "UTC",
             "SOURCE_DATE_EPOCH": str(epoch)},
        check=False,
    )


def build_host_rpm(facts: HostFacts, dest_dir: Path) -> Path:
    """Build the ``p2pbuild-host`` RPM for ``facts`` into ``dest_dir`` (kept: the name
    carries the content digest, so an existing file is the same package). Raises
    :class:`BuildEnvironmentError` if rpmbuild fails."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / f"{facts.nevra}.rpm"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix="p2pbuild-host-", dir=dest_dir) as tmp:
        spec = Path(tmp) / "host.spec"
        spec.write_text(facts.spec_text())
        done = rpmbuild_binary(spec, Path(tmp), Path(tmp) / "out", epoch=_HOST_EPOCH)
        built = Path(tmp) / "out" / f"{facts.nevra}.rpm"
        if done.returncode != 0 or not built.exists():
            raise BuildEnvironmentError(
                f"cannot build the host base package: {done.stderr.decode(errors='replace')[-400:]}"
            )
        os.replace(built, target)
    return target
