"""RPM header facts Koji cares about (NVR, arch, SOURCERPM), read with the ``rpm`` CLI.

The PyPI ``koji`` client reads headers with the ``rpm`` Python bindings, which are not on
PyPI; the ``rpm`` command line is a Debian package on every machine that builds RPMs here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import attrs

__all__ = ["Nvr", "RpmHeader", "RpmHeaderError", "read_rpm_header"]

_TAGS = ("NAME", "VERSION", "RELEASE", "EPOCH", "ARCH", "SOURCERPM", "SOURCEPACKAGE",
         "BUILDTIME")
_FORMAT = "".join(f"%{{{tag}}}\\n" for tag in _TAGS)


class RpmHeaderError(Exception):
    """The file is not an RPM ``rpm -qp`` can read (or ``rpm`` is missing)."""


class Nvr:
    """A package's name, version and release, and its NVR (``name-version-release``), as
    Koji names builds: for an RPM's header and a task's build alike."""

    __slots__ = ()
    name: str
    version: str
    release: str

    @property
    def nvr(self) -> str:
        return f"{self.name}-{self.version}-{self.release}"


@attrs.frozen
class RpmHeader(Nvr):
    name: str
    version: str
    release: str
    epoch: int | None
    #: ``src`` for a source package (what Koji records), else the header's arch.
    arch: str
    #: The binary package's SOURCERPM header; None for a source package.
    sourcerpm: str | None
    buildtime: int

    @property
    def is_source(self) -> bool:
        return self.arch == "src"


def read_rpm_header(path: Path, *, timeout: float = 30.0) -> RpmHeader:
    """Read ``path``'s header (signatures and digests are not checked: Koji checks sizes and
    checksums itself). Blocking. Raises :class:`RpmHeaderError`."""
    try:
        done = subprocess.run(
            ["rpm", "-qp", "--nosignature", "--nodigest", "--qf", _FORMAT, str(path)],
            capture_output=True, timeout=timeout, check=False,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RpmHeaderError(f"cannot run rpm: {exc}") from None
    lines = done.stdout.decode("utf-8", "replace").split("\n")
    if done.returncode != 0 or len(lines) < 8:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RpmHeaderError(
            f"{path.name}: not a readable RPM ({message[-1] if message else 'no output'})"
        )
    name, version, release, epoch, arch, sourcerpm, source_package, buildtime = lines[:8]
    is_source = source_package == "1" or sourcerpm == "(none)"
    return RpmHeader(
        name=name,
        version=version,
        release=release,
        epoch=None if epoch == "(none)" else int(epoch),
        arch="src" if is_source else arch,
        sourcerpm=None if is_source else sourcerpm,
        buildtime=int(buildtime) if buildtime.isdigit() else 0,
    )
