"""Test-only build inputs: packages that probe the sandbox (network, processes, disk,
output), made with the product's :func:`~p2pbuild._cli._packages.write_srpm` and
:func:`~p2pbuild._cli._packages.write_tarball`."""

from __future__ import annotations

from pathlib import Path

from .._cli._packages import SourcePackage, write_srpm, write_tarball

__all__ = [
    "disk_filler_tarball",
    "network_probe_command",
    "network_probe_srpm",
    "network_probe_tarball",
    "output_flood_tarball",
    "sleeper_tarball",
]


def network_probe_command(host: str, port: int) -> list[str]:
    """A command that exits 0 only if a TCP connection to ``host:port`` succeeds (bash's
    ``/dev/tcp``, so it needs nothing but bash). Run it outside the sandbox as the
    control, and inside it through :func:`network_probe_srpm`."""
    return ["bash", "-c", f"exec 3<>/dev/tcp/{host}/{port} && echo NETWORK-REACHED"]


def _probe_script(host: str, port: int) -> str:
    return f"bash -c 'exec 3<>/dev/tcp/{host}/{port} && echo NETWORK-REACHED'"


def network_probe_srpm(dest_dir: Path, host: str, port: int) -> SourcePackage:
    """A noarch SRPM whose ``%build`` connects to ``host:port`` and fails if it cannot: in
    the sandbox it must fail even when the port listens on the host."""
    return write_srpm(
        dest_dir,
        name="netprobe",
        noarch=True,
        build=_probe_script(host, port),
        install="install -D -m 0644 README %{buildroot}/usr/share/netprobe/README",
        files=["/usr/share/netprobe/README"],
    )


def _makefile_only(dest: Path, top: str, recipe: str) -> SourcePackage:
    makefile = "all:\n" + "".join(f"\t{line}\n" for line in recipe.splitlines())
    return write_tarball(dest, top, {"Makefile": makefile + "check:\n\ttrue\n"})


def sleeper_tarball(dest: Path, marker: str) -> SourcePackage:
    """A make build that starts background and daemonized (``setsid``) sleepers and then
    sleeps itself. Every sleeper's command line contains ``marker`` (digits only, e.g.
    ``"4242"``), so a test can look for survivors in ``/proc``."""
    if not marker.isdigit():
        raise ValueError("marker must be digits")
    seconds = f"3600.{marker}"
    return _makefile_only(
        dest,
        "sleeper-1.0",
        f"sleep {seconds} &\nsetsid -f sleep {seconds}\nnohup sleep {seconds} >/dev/null 2>&1 &\n"
        f"sleep {seconds}",
    )


def output_flood_tarball(dest: Path) -> SourcePackage:
    """A make build that writes endless output (``yes``)."""
    return _makefile_only(dest, "flood-1.0", "yes p2pbuild-flood-p2pbuild-flood")


def disk_filler_tarball(dest: Path, file_bytes: int = 256 * 1024) -> SourcePackage:
    """A make build that writes ``file_bytes``-sized files until something stops it."""
    return _makefile_only(
        dest,
        "filler-1.0",
        f"i=0; while true; do head -c {file_bytes} /dev/zero > fill.$$i; i=$$((i+1)); done",
    )


def network_probe_tarball(dest: Path, host: str, port: int) -> SourcePackage:
    """A make build that fails unless it can connect to ``host:port``."""
    return _makefile_only(dest, "netprobe-1.0", _probe_script(host, port))
